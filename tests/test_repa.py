"""Representation alignment (REPA) in the trainer: exact resume, the features cache, export without the projector,
DDP/FSDP2 against one process, latent-space training with a timm encoder, the offline error."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sit_workbench.errors import UserError
from sit_workbench import errors as E
from sit_workbench.checkpoint import PROJECTOR_FILES, load_sit
from sit_workbench.run import export_official, import_official
from sit_workbench.config import config_from_dict, config_to_dict, digits_config, save_config
from sit_workbench.digits import load_digits_encoder
from sit_workbench.model import SiT
from sit_workbench.repa import build_encoder, TimmEncoder
from sit_workbench.train import Trainer, read_log
from sit_workbench.train import train as _train

BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
REPA = dict(depth=2, hidden_size=32, num_heads=2, warmup_steps=0, logging_steps=1, save_total_limit=None,
            per_device_train_batch_size=16, repa_encoder="digits", repa_block=1, repa_projector_dim=32,
            repa_lambda=0.5)


PROJECTOR_FILE, PROJECTOR_OPT_FILE = PROJECTOR_FILES


def train(cfg, **kw):
    "The trainer as `sit-workbench train` calls it: the 'digits' encoder passed in."
    return _train(cfg, encoder=load_digits_encoder() if cfg.repa_encoder == "digits" else None, **kw)


def files(folder):
    folder = Path(folder)
    return {"model": load_file(str(folder / "model.safetensors")),
            "ema": torch.load(folder / "ema.pt", weights_only=True),
            "projector": load_file(str(folder / PROJECTOR_FILE)),
            "projector_opt": torch.load(folder / PROJECTOR_OPT_FILE, weights_only=True)["optimizer"]["state"]}


def assert_equal_tensors(a, b):
    if isinstance(a, dict):
        assert set(a) == set(b)
        for k in a: assert_equal_tensors(a[k], b[k])
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert a == b


@pytest.mark.parametrize("accum", [1, 2])
def test_resume_with_alignment_is_bit_exact(tmp_path, accum):
    kw = dict(REPA, max_steps=6, save_steps=3, gradient_accumulation_steps=accum)
    train(digits_config(**kw, output_dir=str(tmp_path / "a")), progress=False)
    shutil.copytree(tmp_path / "a" / "checkpoint-3", tmp_path / "b" / "checkpoint-3")
    res = train(digits_config(**kw, output_dir=str(tmp_path / "b")), progress=False)
    assert res["step"] == 6
    assert_equal_tensors(files(tmp_path / "a" / "checkpoint-6"), files(tmp_path / "b" / "checkpoint-6"))
    ra, rb = read_log(tmp_path / "a" / "log.jsonl"), read_log(tmp_path / "b" / "log.jsonl")
    # run b's log starts at the resumed step (the copied checkpoint carries no log)
    assert [(r["loss"], r["repa_align"]) for r in ra[3:]] == [(r["loss"], r["repa_align"]) for r in rb]
    assert all(-1 <= r["repa_align"] <= 1 for r in ra)


def test_alignment_trains_the_projector_and_lowers_the_alignment_loss(tmp_path):
    res = train(digits_config(**{**REPA, "learning_rate": 3e-3}, max_steps=40, save_steps=40,
                              output_dir=str(tmp_path / "r")), progress=False)
    log = read_log(tmp_path / "r" / "log.jsonl")
    first, last = sum(r["repa_align"] for r in log[:5]) / 5, sum(r["repa_align"] for r in log[-5:]) / 5
    assert last < first - 0.1, (first, last)
    # the same seed without alignment starts from the same weights and draws the same data and noise
    plain = train(digits_config(**{k: v for k, v in REPA.items() if not k.startswith("repa_")}, learning_rate=3e-3,
                                max_steps=1, save_steps=1, output_dir=str(tmp_path / "p")), progress=False)
    assert read_log(tmp_path / "p" / "log.jsonl")[0]["loss"] == log[0]["loss"]
    assert not (Path(plain["checkpoint"]) / PROJECTOR_FILE).exists()
    assert (Path(res["checkpoint"]) / PROJECTOR_FILE).is_file()


def test_features_cache_gives_the_on_the_fly_run(tmp_path):
    kw = dict(REPA, max_steps=4, save_steps=4)
    train(digits_config(**kw, output_dir=str(tmp_path / "fly")), progress=False)
    train(digits_config(**kw, output_dir=str(tmp_path / "cached"), repa_feature_cache=str(tmp_path / "feats")),
          progress=False)
    assert (tmp_path / "feats" / "meta.json").is_file()
    a, b = files(tmp_path / "fly" / "checkpoint-4"), files(tmp_path / "cached" / "checkpoint-4")
    for part in ("model", "projector"):
        for k in a[part]:
            torch.testing.assert_close(b[part][k], a[part][k], rtol=1e-5, atol=1e-6)


# the official SiT's state-dict names (github.com/willisma/SiT models.py; shared/reference/sit-state-dict-keys.md)
OFFICIAL_TOP = {"pos_embed", "x_embedder.proj.weight", "x_embedder.proj.bias", "t_embedder.mlp.0.weight",
                "t_embedder.mlp.0.bias", "t_embedder.mlp.2.weight", "t_embedder.mlp.2.bias",
                "y_embedder.embedding_table.weight", "final_layer.linear.weight", "final_layer.linear.bias",
                "final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias"}
OFFICIAL_BLOCK = {"attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias", "mlp.fc1.weight",
                  "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias", "adaLN_modulation.1.weight",
                  "adaLN_modulation.1.bias"}


def test_export_drops_the_projector_and_loads_strictly(tmp_path):
    from sit_workbench.checkpoint import COMPLETE, checkpoint_problem
    res = train(digits_config(**REPA, max_steps=2, save_steps=2, output_dir=str(tmp_path / "run")), progress=False)
    ck = Path(res["checkpoint"])
    assert (ck / PROJECTOR_FILE).is_file() and (ck / PROJECTOR_OPT_FILE).is_file()
    listed = json.loads((ck / COMPLETE).read_text())["files"]
    assert set(PROJECTOR_FILES) <= set(listed)          # the projector counts for the checkpoint's completeness
    pt = export_official(ck, tmp_path / "official.pt")
    blob = torch.load(pt, weights_only=False)
    official = OFFICIAL_TOP | {f"blocks.{i}.{k}" for i in range(REPA["depth"]) for k in OFFICIAL_BLOCK}
    net = SiT(**load_sit(ck).config)
    for part, want in (("model", load_file(str(ck / "model.safetensors"))),
                       ("ema", torch.load(ck / "ema.pt", weights_only=True))):
        assert set(blob[part]) == official, sorted(set(blob[part]) ^ official)   # no projector, nothing else
        net.load_state_dict(blob[part], strict=True)
        assert all(torch.equal(blob[part][k], want[k]) for k in official)       # the trained weights themselves
    back = load_sit(import_official(pt, tmp_path / "imported"))                 # and the official file reads back
    assert all(torch.equal(back.state_dict()[k], blob["ema"][k]) for k in official)
    with open(ck / PROJECTOR_FILE, "r+b") as f: f.truncate(100)                # a damaged projector: not complete
    assert "projector.safetensors has 100 bytes" in checkpoint_problem(ck)


def test_resuming_a_plain_checkpoint_with_alignment_fails_clearly(tmp_path):
    plain = {k: v for k, v in REPA.items() if not k.startswith("repa_")}
    train(digits_config(**plain, max_steps=2, save_steps=2, output_dir=str(tmp_path / "run")), progress=False)
    with pytest.raises(E.UserError, match="trained with another model or objective: repa_encoder None -> 'digits'"):
        train(digits_config(**REPA, max_steps=4, save_steps=2, output_dir=str(tmp_path / "run")), progress=False)
    wide = train(digits_config(**REPA, max_steps=2, save_steps=2, output_dir=str(tmp_path / "wide")), progress=False)
    with pytest.raises(E.UserError, match="trained with another model or objective: repa_projector_dim 32 -> 16"):
        train(digits_config(**{**REPA, "repa_projector_dim": 16}, max_steps=4, save_steps=2,
                            output_dir=wide["output_dir"]), progress=False)


def test_the_encoder_is_passed_or_named(tmp_path):
    with pytest.raises(ValueError, match="repa_encoder is null"):
        Trainer(digits_config(output_dir=str(tmp_path)), encoder=torch.nn.Identity())
    # 'digits' names the digits classifier: train loads it, the caller need not pass it
    assert _train(digits_config(**REPA, max_steps=1, output_dir=str(tmp_path / "r")), progress=False)["status"] == "finished"
    with pytest.raises(E.UserError, match=r"load_digits_encoder\(\)"):   # build_encoder alone does not build it
        build_encoder("digits", (1, 8, 8))


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_two_gloo_processes_match_one_process(tmp_path, fsdp):
    steps = 4
    for name, batch, extra in (("one", 32, {}), ("two", 16, {"fsdp": fsdp})):
        save_config(digits_config(**{**REPA, "per_device_train_batch_size": batch}, max_steps=steps, save_steps=steps,
                                  gradient_accumulation_steps=2, output_dir=str(tmp_path / name), **extra),
                    tmp_path / f"{name}.yaml")
    cmd = [str(BIN / "sit-workbench"), "train", "--no-progress", "--config"]
    subprocess.run(cmd + [str(tmp_path / "one.yaml")], check=True, env=ENV, capture_output=True)
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          *cmd, str(tmp_path / "two.yaml")], env=ENV, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    one, two = read_log(tmp_path / "one" / "log.jsonl"), read_log(tmp_path / "two" / "log.jsonl")
    for key in ("loss", "repa_align"):
        torch.testing.assert_close(torch.tensor([r[key] for r in two]), torch.tensor([r[key] for r in one]),
                                   rtol=1e-5, atol=1e-6)
    a, b = files(tmp_path / "one" / f"checkpoint-{steps}"), files(tmp_path / "two" / f"checkpoint-{steps}")
    for part in ("model", "projector"):
        for k in a[part]:
            torch.testing.assert_close(b[part][k], a[part][k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cached", [False, True], ids=["encoder-on-the-fly", "features-cache"])
def test_latent_space_with_a_timm_encoder_from_a_local_file(tmp_path, cached, image_folder):
    """The ImageNet path at toy scale: pixels -> a small random VAE's latents for the SiT, and the same (flipped)
    pixels -> a timm ViT loaded from a local weights file (resized to its 32 px input) for the alignment targets; on
    the fly (the published recipe: VAE and encoder every step) or from the latent and features caches."""
    import timm
    from safetensors.torch import save_file
    from sit_workbench.latents import tiny_vae
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32)
    save_file(vit.state_dict(), str(tmp_path / "vit.safetensors"))
    tiny_vae().save_pretrained(tmp_path / "vae")
    d = config_to_dict(digits_config(**{**REPA, "per_device_train_batch_size": 4}, max_steps=3, save_steps=3))
    d["model_config"].update(vae_path=str(tmp_path / "vae"), input_size=4, in_channels=4, num_classes=2)
    d["dataset_config"].update(dataset_format="imagefolder", dataset_path=str(image_folder(tmp_path / "images", n_per_class=6, size=32)),
                               image_size=32, random_flip=True,   # cached: latents and features; else the VAE runs
                               latent_cache=str(tmp_path / "latents") if cached else None)
    d.update(output_dir=str(tmp_path / "run"), repa_encoder="vit_tiny_patch16_224", repa_encoder_resolution=32,
             repa_encoder_weights=str(tmp_path / "vit.safetensors"),
             repa_feature_cache=str(tmp_path / "feats") if cached else None)
    res = train(config_from_dict(d), progress=False)
    assert res["status"] == "finished" and res["step"] == 3
    log = read_log(tmp_path / "run" / "log.jsonl")
    assert all(-1 <= r["repa_align"] <= 1 for r in log)
    assert load_file(str(Path(res["checkpoint"]) / PROJECTOR_FILE))["4.weight"].shape == (192, 32)  # ViT-Ti width
    if cached:
        assert (tmp_path / "feats" / "meta.json").is_file()


def test_timm_encoder_without_network_says_how_to_pass_a_file(monkeypatch):
    import timm
    real = timm.create_model
    def offline(name, pretrained=False, **kw):
        if pretrained and "pretrained_cfg_overlay" not in kw:
            raise OSError("We couldn't connect to 'https://huggingface.co'")
        return real(name, pretrained=pretrained, **kw)
    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(UserError, match="repa_encoder_weights: /path/to/encoder.safetensors"):
        TimmEncoder("vit_tiny_patch16_224", resolution=32)


def test_study_arms_are_the_zoo_config_but_for_repa():
    from sit_workbench.studies import repa as study
    from sit_workbench.studies.zoo import zoo_config
    zoo = config_to_dict(zoo_config(study.MODEL, "full", 1500))
    plain, repa = (config_to_dict(study.run_config(o, 1, 1500, "full")) for o in study.OBJECTIVES)
    assert {k for k in zoo if zoo[k] != plain[k]} == {"seed", "save_steps", "output_dir"}
    assert (plain["seed"], plain["save_steps"]) == (1, 375)          # a checkpoint at every rung of 375/750/1500/3000
    assert {k for k in plain if plain[k] != repa[k]} <= {"output_dir", *study.REPA_DIGITS}
    assert all(repa[k] == v for k, v in study.REPA_DIGITS.items()) and plain["repa_encoder"] is None
    assert "zoo" not in plain["output_dir"] and plain["output_dir"] != repa["output_dir"]


def test_study_writes_each_rung_and_continues(tmp_path, monkeypatch):
    """A study stopped after its first rung (here: run with a one-rung ladder) keeps that rung's rows and continues
    from the runs' checkpoints; runs and results stay in the folders the environment names."""
    from sit_workbench.studies import repa as study
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    monkeypatch.setenv("SIT_WORKBENCH_ZOO", str(tmp_path / "zoo"))
    monkeypatch.setenv("SIT_WORKBENCH_REPA_RUNS", str(tmp_path / "runs"))
    first = study.run_study("quick", ladder=(8,), seeds=(0,))
    assert [(r["objective"], r["steps"]) for r in first["rows"]] == [("plain", 8), ("repa", 8)]
    res = study.run_study("quick", ladder=(8, 16), seeds=(0,))
    assert [(r["objective"], r["steps"]) for r in res["rows"]] == [("plain", 8), ("plain", 16), ("repa", 8), ("repa", 16)]
    assert [r for r in res["rows"] if r["steps"] == 8] == first["rows"]          # measured once, kept
    for r in res["rows"]:
        assert {"objective", "seed", "steps", "digits_fid", "digits_fid_std", "accuracy", "n", "seconds",
                "model", "train_seeds", *study.REMEASURED} <= set(r)
        assert r["n"] == 200 and r["seconds"] > 0 and ("repa_align" in r) == (r["objective"] == "repa")
        assert r["train_seeds"] == [0] and r["model"] == ("linear-velocity" if r["objective"] == "plain" else "linear-velocity+repa")
        assert 0 < r["nll_bpd"] < 8 and r["nll_bpd_se"] > 0 and r["heldout_loss"] > 0 and r["converged_fid"] > 0
    assert [r["model"].split(":")[0] for r in res["reference_rows"]] == ["floor", "memoriser"]
    assert (tmp_path / "zoo" / "quick" / "results" / "repa.json").is_file()
    for arm in ("plain-seed0", "repa-seed0"):   # the 16-step runs resumed from the 8-step checkpoints
        run = tmp_path / "runs" / "quick" / arm
        assert (run / "checkpoint-8").is_dir() and (run / "checkpoint-16").is_dir()
        assert [r["step"] for r in read_log(run / "log.jsonl")] == [1, 8, 16]   # a fresh start: [1, 16]
    assert res["ladder"] == [8, 16] and res["config"]["repa_encoder"] is None
    assert "Not enough rungs measured yet" in study.verdict(res)
    # a row of the earlier measurement (no held-out NLL, loss or converged FID) is measured again, from its checkpoint
    path = tmp_path / "zoo" / "quick" / "results" / "repa.json"
    doc = json.loads(path.read_text())
    doc["rows"][0] = {k: v for k, v in doc["rows"][0].items() if k not in study.REMEASURED}
    path.write_text(json.dumps(doc))
    again = study.run_study("quick", ladder=(8, 16), seeds=(0,))
    assert again["rows"][0] == {**res["rows"][0], "eval_seconds": again["rows"][0]["eval_seconds"]}
    assert [r["step"] for r in read_log(tmp_path / "runs" / "quick" / "plain-seed0" / "log.jsonl")] == [1, 8, 16]


def test_study_refuses_foreign_runs_and_old_results(tmp_path, monkeypatch):
    from sit_workbench.config import save_config
    from sit_workbench.studies import repa as study
    from sit_workbench.studies.zoo import results_path
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    monkeypatch.setenv("SIT_WORKBENCH_ZOO", str(tmp_path / "zoo"))
    monkeypatch.setenv("SIT_WORKBENCH_REPA_RUNS", str(tmp_path / "runs"))
    cfg = study.run_config("plain", 0, 8, "quick", (8,))
    Path(cfg.output_dir).mkdir(parents=True)
    save_config(config_from_dict({**config_to_dict(cfg), "learning_rate": 5e-4}), Path(cfg.output_dir) / "config.yaml")
    with pytest.raises(E.UserError, match="was trained with another config"):
        study.measure_rung("plain", 0, 8, "quick", (8,))
    path = results_path(study.STUDY, "quick")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"rows": [{"objective": "plain", "steps": 8, "digits_fid": 1.0}]}))
    with pytest.raises(E.UserError, match="older version of this study"):
        study.run_study("quick", ladder=(8,), seeds=(0,))
