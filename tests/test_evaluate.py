"""sit_workbench.evaluate: the ADM sample format, resumable and split-independent sample generation from a tiny
digits checkpoint, digits metrics, exact sampler metrics on a Gaussian mixture, the FID/IS maths and the offline
error of the Inception weights."""
import argparse
import json
import shutil

import numpy as np
import pytest
import torch

import sit_workbench.evaluate as E
from sit_workbench.errors import UserError
from sit_workbench.gaussian import GaussianMixture

FAST = dict(sampling_method="euler", num_steps=4)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    "A tiny digits checkpoint (20 steps) and a private cache for the digits classifier."
    from sit_workbench.config import digits_config
    from sit_workbench.train import train
    root = tmp_path_factory.mktemp("eval")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SIT_WORKBENCH_CACHE", str(root / "cache"))
        res = train(digits_config(depth=1, hidden_size=32, num_heads=2, warmup_steps=0, max_steps=20, save_steps=20,
                                  output_dir=str(root / "run")), progress=False)
        assert res["status"] == "finished"
        from sit_workbench.digits import load_or_train_classifier
        clf = load_or_train_classifier()
        yield dict(ckpt=res["checkpoint"], root=root, clf=clf, mp=mp)


def _model_transport(ckpt):
    from sit_workbench.run import load_model, read_run
    spec = read_run(ckpt)
    return load_model(spec), spec.build_transport()


# --- the ADM format -------------------------------------------------------------------------------------------------

def test_adm_roundtrip_and_checks(tmp_path):
    arr = E.to_uint8_nhwc(torch.rand(6, 1, 8, 8))
    assert arr.shape == (6, 8, 8, 3) and arr.dtype == np.uint8
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 0] == arr[..., 2]).all()
    E.write_adm_npz(tmp_path / "a.npz", arr, labels=np.arange(6))
    f = np.load(tmp_path / "a.npz")
    assert sorted(f.files) == ["arr_0", "arr_1"]
    np.testing.assert_array_equal(f["arr_0"], arr)
    imgs, labels = E.read_adm_npz(tmp_path / "a.npz")
    np.testing.assert_array_equal(imgs, arr); np.testing.assert_array_equal(labels, np.arange(6))
    E.write_adm_npz(tmp_path / "b.npz", arr)
    assert np.load(tmp_path / "b.npz").files == ["arr_0"] and E.read_adm_npz(tmp_path / "b.npz")[1] is None
    # 0 -> 0, 1 -> 255, rounding as sample_ddp.py (127.5 x + 128 for x in [-1, 1])
    edge = E.to_uint8_nhwc(torch.tensor([0.0, 1.0, 0.5, 1.5]).reshape(1, 1, 2, 2))
    assert edge[0, :, :, 0].ravel().tolist() == [0, 255, 128, 255]


@pytest.mark.parametrize("bad,msg", [(np.zeros((2, 8, 8, 3), np.float32), "uint8"),
                                     (np.zeros((2, 3, 8, 8), np.uint8), "NCHW"),
                                     (np.zeros((8, 8, 3), np.uint8), "rank 4"),
                                     (np.zeros((2, 8, 8, 1), np.uint8), "3 channels")])
def test_adm_reader_refuses_wrong_layouts(tmp_path, bad, msg):
    np.savez(tmp_path / "bad.npz", arr_0=bad)
    with pytest.raises(ValueError, match=msg): E.read_adm_npz(tmp_path / "bad.npz")
    with pytest.raises(ValueError, match=msg): E.write_adm_npz(tmp_path / "w.npz", bad)
    np.savez(tmp_path / "nokey.npz", images=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="arr_0"): E.read_adm_npz(tmp_path / "nokey.npz")


# --- generation -----------------------------------------------------------------------------------------------------

def test_resume_regenerates_only_missing_shard(env, tmp_path):
    model, tr = _model_transport(env["ckpt"])
    kw = dict(sampler=FAST, guidance=1.5, shard_size=8, seed=3)
    r1 = E.generate_samples(model, tr, tmp_path, 20, **kw)
    assert r1["made"] == [0, 8, 16] and r1["skipped"] == []
    first = np.load(r1["samples"])
    assert first["arr_0"].shape == (20, 8, 8, 3) and first["arr_0"].dtype == np.uint8 and first["arr_1"].shape == (20,)
    assert len(set(first["arr_1"].tolist())) > 1                     # labels drawn over the classes
    before = {s: E.shard_path(tmp_path, s).stat().st_mtime_ns for s in (0, 16)}
    E.shard_path(tmp_path, 8).unlink()
    r2 = E.generate_samples(model, tr, tmp_path, 20, **kw)
    assert r2["made"] == [8] and r2["skipped"] == [0, 16]
    assert {s: E.shard_path(tmp_path, s).stat().st_mtime_ns for s in (0, 16)} == before
    second = np.load(r2["samples"])
    np.testing.assert_array_equal(second["arr_0"], first["arr_0"])
    np.testing.assert_array_equal(second["arr_1"], first["arr_1"])


def test_results_independent_of_batch_size_and_processes(env, tmp_path):
    model, tr = _model_transport(env["ckpt"])
    kw = dict(sampler=FAST, guidance=1.5, shard_size=8, seed=5)
    a = np.load(E.generate_samples(model, tr, tmp_path / "a", 20, batch_size=8, **kw)["samples"])
    b = np.load(E.generate_samples(model, tr, tmp_path / "b", 20, batch_size=3, **kw)["samples"])
    # two "processes": rank 1 makes shard 8, rank 0 shards 0 and 16 and merges
    r1 = E.generate_samples(model, tr, tmp_path / "c", 20, rank=1, world_size=2, **kw)
    assert r1["made"] == [8] and r1["samples"] is None
    r0 = E.generate_samples(model, tr, tmp_path / "c", 20, rank=0, world_size=2, **kw)
    assert r0["made"] == [0, 16]
    c = np.load(r0["samples"])
    for other in (b, c):
        np.testing.assert_array_equal(other["arr_1"], a["arr_1"])
        assert np.abs(other["arr_0"].astype(int) - a["arr_0"].astype(int)).max() <= 1   # float summation order only
    d = np.load(E.generate_samples(model, tr, tmp_path / "d", 20, batch_size=8, **{**kw, "seed": 6})["samples"])
    assert not np.array_equal(d["arr_0"], a["arr_0"])                   # the seed matters


def test_sample_eval_main_writes_adm_npz_and_digits_metrics(env, tmp_path):
    from sit_workbench.sampling_cli import sample_eval_main, sample_eval_parser
    p = sample_eval_parser(argparse.ArgumentParser())
    args = p.parse_args([env["ckpt"], "--out-dir", str(tmp_path), "--num-samples", "12", "--shard-size", "5",
                         "--sampling-method", "euler", "--num-sampling-steps", "4", "--cfg-scale", "2", "--device", "cpu"])
    m = sample_eval_main(args)
    arr = np.load(tmp_path / "samples.npz")["arr_0"]
    assert arr.shape == (12, 8, 8, 3) and arr.dtype == np.uint8
    assert 0 <= m["accuracy"] <= 1 and np.isfinite(m["digits_fid"]) and m["digits_fid"] >= 0
    assert json.loads((tmp_path / "metrics.json").read_text())["nfe"] == m["nfe"] > 0


# --- metrics --------------------------------------------------------------------------------------------------------

def test_digits_checkpoint_metrics_in_range(env):
    res = E.evaluate_digits_checkpoint(env["ckpt"], n=60, sampler=FAST, cfg_scale=2.0, seed=0, clf=env["clf"])
    assert 0.0 <= res["accuracy"] <= 1.0 and 0 < res["digits_fid"] < float("inf")
    assert res["nfe"] == 3 and res["n"] == 60
    # the metric sees the samples: real test digits score near-perfect accuracy and a much smaller FID
    from sit_workbench.digits import digits_arrays
    x, y = digits_arrays("test")
    real = E.digits_metrics((x + 1) / 2, y, env["clf"])
    assert real["accuracy"] > 0.95 and real["digits_fid"] < res["digits_fid"]
    from sit_workbench.digits import digits_fid
    assert abs(real["digits_fid"] - digits_fid(env["clf"], x)) < 1e-9          # one definition of digits-FID
    boot = E.digits_metrics((x[:200] + 1) / 2, y[:200], env["clf"], bootstrap=10)
    assert 0 < boot["digits_fid_std"] < boot["digits_fid"]


def test_exact_sampler_metric_ordering():
    gm = GaussianMixture([[-2.0, 0.0], [2.0, 1.0]], [0.3, 0.5])
    fine = E.sampler_error(gm, sampler_kwargs=dict(sampling_method="dopri5", atol=1e-6, rtol=1e-6), n=1000, seed=0)
    coarse = E.sampler_error(gm, sampler_kwargs=dict(sampling_method="euler", num_steps=3), n=1000, seed=0)
    mc = E.sliced_wasserstein(gm.sample(1000, generator=torch.Generator().manual_seed(8)),
                              gm.sample(1000, generator=torch.Generator().manual_seed(9)))
    assert coarse["nfe"] == 2 and fine["nfe"] > 10
    assert fine["sw"] < 2 * mc and abs(fine["nll_gap"]) < 0.1
    assert coarse["sw"] > 2 * fine["sw"] and abs(coarse["nll_gap"]) > 5 * abs(fine["nll_gap"])


def test_sliced_wasserstein_and_nll_values():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 3, generator=g, dtype=torch.float64)
    assert E.sliced_wasserstein(x, x) == 0.0
    # a shift by s along every axis: every unit direction theta moves by s * sum(theta), E[(sum theta)^2] = 1
    assert abs(E.sliced_wasserstein(x, x + 0.5, n_projections=2000) - 0.5) < 0.05
    gm = GaussianMixture([[0.0, 0.0]], [1.0, 1.0])           # standard normal: entropy per dim 0.5 log(2 pi e)
    nll = E.mixture_nll(gm, gm.sample(20000, generator=g))
    assert abs(nll - 0.5 * np.log(2 * np.pi * np.e)) < 0.03


def test_fid_and_inception_score_maths():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(20000, 4, generator=g, dtype=torch.float64)
    b = 1 + 2 * torch.randn(20000, 4, generator=g, dtype=torch.float64)
    assert abs(E.fid_from_features(a, b) - 8.0) < 0.3            # |1|^2 * 4 + 4 * (1 + 4 - 2 * 2)
    assert E.fid_from_features(a, a) < 1e-8
    # agrees with torch-fidelity's scipy-based formula on correlated features
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    c = a @ torch.randn(4, 4, generator=g, dtype=torch.float64)
    ref = fid_statistics_to_metric(fid_features_to_statistics(a), fid_features_to_statistics(c), False)
    assert abs(E.fid_from_features(a, c) - ref["frechet_inception_distance"]) < 1e-6 * max(1, ref["frechet_inception_distance"])
    # IS: confident predictions spread evenly over k classes give k; identical predictions give 1
    k = 10
    logits = torch.full((1000, 1008), -50.0); logits[torch.arange(1000), torch.arange(1000) % k] = 50.0
    assert abs(E.inception_score(logits, splits=1)[0] - k) < 1e-3
    assert 8 < E.inception_score(logits)[0] <= k                # 10 shuffled splits of 100: uneven classes
    assert abs(E.inception_score(torch.zeros(1000, 1008))[0] - 1) < 1e-9


def test_inception_weights_offline_error(tmp_path, monkeypatch):
    monkeypatch.setenv("SIT_WORKBENCH_CACHE", str(tmp_path))
    monkeypatch.setattr(E, "INCEPTION_URL", "http://127.0.0.1:9/weights-inception-2015-12-05-6726825d.pth")
    expected = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    assert E.inception_weights_path() == expected
    with pytest.raises(UserError) as e: E.ensure_inception_weights(timeout=2)
    assert str(expected) in str(e.value) and "127.0.0.1:9" in str(e.value)
    assert not expected.exists()
    # metrics need the weights: the same error, before any work
    arr = np.zeros((2, 8, 8, 3), np.uint8)
    E.write_adm_npz(tmp_path / "s.npz", arr); E.write_adm_npz(tmp_path / "r.npz", arr)
    with pytest.raises(UserError, match="Inception weights"): E.imagenet_metrics(tmp_path / "s.npz", tmp_path / "r.npz")
    # a file already in place is used without any download
    expected.write_bytes(b"x")
    assert E.ensure_inception_weights(timeout=2) == expected


def test_imagenet_metrics_pipeline_with_local_weights(tmp_path, monkeypatch):
    "FID/IS end to end from a local weights file (random weights with the real layout: no download, numbers not real)."
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    torch.save({}, tmp_path / "empty.pth")
    with monkeypatch.context() as m:
        m.setattr(FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        torch.manual_seed(0)
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(tmp_path / "empty.pth"))
    monkeypatch.setenv("SIT_WORKBENCH_CACHE", str(tmp_path))
    monkeypatch.setattr(E, "INCEPTION_URL", "http://127.0.0.1:9/none")       # must not be needed
    torch.save(net.state_dict(), E.inception_weights_path())
    rng = np.random.default_rng(0)
    s = rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    E.write_adm_npz(tmp_path / "s.npz", s); E.write_adm_npz(tmp_path / "r.npz", s[::-1].copy())
    m = E.imagenet_metrics(tmp_path / "s.npz", tmp_path / "r.npz", batch_size=4)
    assert m["num_samples"] == m["num_reference"] == 4
    assert abs(m["fid"]) < 1e-3 and abs(m["sfid"]) < 1e-3         # the same images in another order
    assert m["precision"] == m["recall"] == 1.0
    feats = E.inception_features(s, extractor=E.inception_extractor())
    assert feats["spatial"].shape == (4, 7 * 17 * 17)                # ADM's mixed_6/conv[..., :7] on a 17x17 grid
    assert (feats["spatial"] >= 0).all()                             # taken after the ReLU
    assert m["inception_score"] >= 1 - 1e-9 and np.isfinite(m["inception_score_std"])
