"""One run, one way to generate from it: a training checkpoint, its official-format export, the folder `import`
makes of that, and its diffusers export give the same images from `sit-workbench sample`, `SiTPipeline` and
`sample-eval`, with no sampler or guidance option given; a GVP noise run stays a GVP noise run through every door."""
import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import sit_workbench.cli as C
from sit_workbench.pipeline import SiTPipeline
from sit_workbench.run import read_run
from sit_workbench.explore import run_defaults
from sit_workbench.widgets import SamplerPanel

torch.set_num_threads(1)
SEED = 7


def cli(*argv):
    with contextlib.redirect_stdout(io.StringIO()) as out: C.main([str(a) for a in argv])
    return out.getvalue()


@pytest.fixture(scope="module")
def sources(tiny_digits_run, tmp_path_factory):
    "A GVP noise run with guidance 3, and the same run exported every way the package writes one."
    ck = Path(tiny_digits_run(steps=20, path_type="GVP", prediction="noise", cfg_scale=3.0))
    d = tmp_path_factory.mktemp("exports")
    cli("export", ck, d / "official.pt")
    cli("import", d / "official.pt", d / "imported")
    cli("export", ck, d / "pipe", "--format", "diffusers")
    return {"checkpoint": ck, "run folder": ck.parent, "official .pt": d / "official.pt", "imported": d / "imported",
            "pipeline": d / "pipe"}


def _sample_npz(src, tmp_path):
    out = tmp_path / "s.npz"
    msg = cli("sample", src, "--seed", SEED, "--per-class", 2, "--out", tmp_path / "s.png", "--npz", out)
    with np.load(out) as f: return f["arr_0"], f["arr_1"], msg


@pytest.mark.parametrize("name", ["checkpoint", "run folder", "official .pt", "imported", "pipeline"])
def test_every_source_samples_the_same_images_from_every_front_end(sources, name, tmp_path):
    ref_images, ref_labels, _ = _sample_npz(sources["checkpoint"], tmp_path / "ref")
    images, labels, msg = _sample_npz(sources[name], tmp_path)
    # a noise run's default sampler: 26 Heun points on the grid crowded toward the noise end (registry.default_sampler)
    assert "transport GVP noise" in msg and "guidance 3 on all channels" in msg, msg
    assert "ODE heun2, 26 points, schedule=shift:4 (50 network evaluations)" in msg, msg
    assert np.array_equal(labels, ref_labels) and labels[:12].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert np.abs(images.astype(int) - ref_images.astype(int)).max() <= 1            # within one grey level
    # the diffusers pipeline, from the same source, with the seed's generator and no option
    pipe = SiTPipeline.from_pretrained(sources[name])
    pipe.set_progress_bar_config(disable=True)
    out = pipe(class_labels=labels.tolist(), generator=torch.Generator().manual_seed(SEED), output_type="np").images
    pipe_u8 = np.clip(np.round(out * 255), 0, 255).astype(int).repeat(3, axis=-1)
    assert np.abs(pipe_u8 - ref_images.astype(int)).max() <= 1
    # the widgets' defaults are the run's
    d = run_defaults(sources[name])
    assert (d["cfg_scale"], d["cfg_channels"], d["method"], d["num_steps"], d["schedule"]) == (3.0, None, "heun2", 26, "shift:4")
    assert SamplerPanel(sources[name], device="cpu").request().sampler() == read_run(sources[name]).sampler


def test_sample_eval_reproduces_sample(sources, tmp_path):
    ref_images, ref_labels, _ = _sample_npz(sources["official .pt"], tmp_path / "ref")
    cli("sample-eval", sources["official .pt"], "--out-dir", tmp_path / "eval", "--num-samples", 25, "--seed", SEED,
        "--shard-size", 10, "--batch-size", 4, "--no-eval", "--device", "cpu")
    with np.load(tmp_path / "eval" / "samples.npz") as f: images, labels = f["arr_0"], f["arr_1"]
    assert np.array_equal(labels[:20], ref_labels)
    assert np.abs(images[:20].astype(int) - ref_images.astype(int)).max() <= 1
    m = json.loads((tmp_path / "eval" / "manifest.json").read_text())
    assert m["guidance"]["scale"] == 3.0 and m["sampler"]["sampling_method"] == "heun2"


def test_the_description_survives_every_round_trip(sources):
    want = read_run(sources["checkpoint"]).to_dict()
    for name, src in sources.items():
        got = read_run(src).to_dict()
        for key in ("transport", "guidance", "sampler", "num_classes", "class_names"):
            assert got[key] == want[key], (name, key, got[key], want[key])
        assert got["vae"] is None, name


def test_autoguidance_from_every_front_end(tiny_digits_run, tmp_path):
    "`--guide` (an earlier checkpoint of the same run) in sample and sample-eval, the pipeline's guide=, the widgets."
    main, guide = Path(tiny_digits_run(steps=20)), Path(tiny_digits_run(steps=6))
    msg = cli("sample", main, "--guide", guide, "--per-class", 1, "--out", tmp_path / "a.png", "--npz", tmp_path / "a.npz")
    assert f"guided by {guide} (autoguidance)" in msg, msg
    with np.load(tmp_path / "a.npz") as f: images, labels = f["arr_0"], f["arr_1"]
    cli("sample", main, "--per-class", 1, "--out", tmp_path / "c.png", "--npz", tmp_path / "c.npz")
    with np.load(tmp_path / "c.npz") as f: assert not np.array_equal(f["arr_0"], images)   # not classifier-free guidance
    pipe = SiTPipeline.from_pretrained(main)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(class_labels=labels.tolist(), generator=torch.Generator().manual_seed(0), output_type="np", guide=guide).images
    assert np.abs(np.round(out * 255).astype(int).repeat(3, -1) - images.astype(int)).max() <= 1
    cli("sample-eval", main, "--guide", guide, "--out-dir", tmp_path / "ev", "--num-samples", 10, "--no-eval", "--device", "cpu")
    with np.load(tmp_path / "ev" / "samples.npz") as f: assert np.abs(f["arr_0"].astype(int) - images.astype(int)).max() <= 1
    assert json.loads((tmp_path / "ev" / "manifest.json").read_text())["guidance"]["guide"] == str(guide)
    from sit_workbench import explore as X
    res = X.sample_grid(X.Request(checkpoint=str(main), classes="0-9", per_class=1, cfg_scale=2.0, cfg_channels=None,
                                  guide=str(guide)))
    assert np.abs(np.round(res.images.permute(0, 2, 3, 1).numpy() * 255).astype(int).repeat(3, -1)
                  - images.astype(int)).max() <= 1
    other = Path(tiny_digits_run(steps=6, path_type="GVP"))
    with pytest.raises(SystemExit):
        cli("sample", main, "--guide", other, "--out", tmp_path / "x.png")


def test_fallbacks_are_said(tiny_digits_run, tmp_path):
    "A damaged latest checkpoint, a folder without EMA weights or without a run description: never silently."
    import shutil
    from sit_workbench.checkpoint import save_pretrained, load_sit
    run = tmp_path / "run"
    shutil.copytree(Path(tiny_digits_run(steps=20, save_steps=10)).parent, run)
    newest = max(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    (newest / "ema.pt").write_bytes((newest / "ema.pt").read_bytes()[:100])        # truncated
    with pytest.warns(UserWarning, match=f"skipping {newest}: ema.pt has"):
        spec = read_run(run)
    assert Path(spec.location) != newest
    save_pretrained(load_sit(spec.location), tmp_path / "raw")                       # model.safetensors only
    with pytest.warns(UserWarning, match="no EMA weights"):
        spec = read_run(tmp_path / "raw")
    assert spec.weights == "model" and "no EMA" in spec.describe()
    assert "official defaults" in spec.describe()                                   # and no run.json: said too


def test_a_meanflow_run_samples_in_one_step_everywhere(tmp_path):
    "configs/digits-meanflow.yaml trains one; every front end samples it with one network evaluation, no option given."
    from sit_workbench.config import load_config
    from sit_workbench.train import train
    from sit_workbench.config import apply_overrides
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "digits-meanflow.yaml")   # made tiny and short
    cfg = apply_overrides(cfg, ["model_config.depth=1", "model_config.hidden_size=32", "model_config.num_heads=2",
                                "max_steps=4", "save_steps=4", "warmup_steps=0", f"output_dir={tmp_path / 'mf'}"])
    ck = Path(train(cfg, progress=False)["checkpoint"])
    msg = cli("sample", ck, "--per-class", 1, "--out", tmp_path / "mf.png", "--npz", tmp_path / "mf.npz")
    assert "meanflow, 2 points" in msg and "1 network evaluation each" in msg, msg
    with np.load(tmp_path / "mf.npz") as f: images, labels = f["arr_0"], f["arr_1"]
    cli("export", ck, tmp_path / "mf.pt")
    for src in (ck, tmp_path / "mf.pt"):
        pipe = SiTPipeline.from_pretrained(src)
        pipe.set_progress_bar_config(disable=True)
        out = pipe(class_labels=labels.tolist(), generator=torch.Generator().manual_seed(0), output_type="np").images
        assert np.abs(np.round(out * 255).astype(int).repeat(3, -1) - images.astype(int)).max() <= 1, src
    cli("sample-eval", tmp_path / "mf.pt", "--out-dir", tmp_path / "ev", "--num-samples", 10, "--no-eval", "--device", "cpu")
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["nfe"] == 1 and m["measured"]["sampler"]["sampling_method"] == "meanflow"
    assert "3 points (2 network evaluations)" in cli("sample", ck, "--num-sampling-steps", 3, "--per-class", 1,
                                                     "--out", tmp_path / "two.png")
