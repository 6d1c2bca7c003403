"""`sit-workbench sample` on any run of ours with no option but the checkpoint (the run's classes, one row each, no
VAE, its guidance and sampler), every option's default in `--help`, and the published presets reaching the sampler
and the `sample-eval` manifest."""
import argparse
import contextlib
import io
import json

import pytest
import torch
from PIL import Image

import sit_workbench.cli as C
import sit_workbench.run as R
import sit_workbench.sampling_cli as S
from sit_workbench.sample import PRESETS, preset
from sit_workbench.transport import Sampler

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    "A tiny digits run (10 classes, 8x8 pixels, guidance 2 in its config), trained for 20 steps."
    from sit_workbench.config import digits_config
    from sit_workbench.train import train
    out = tmp_path_factory.mktemp("sample") / "run"
    res = train(digits_config(depth=1, hidden_size=32, num_heads=2, warmup_steps=0, max_steps=20, save_steps=20,
                              output_dir=str(out)), progress=False)
    assert res["status"] == "finished"
    return res["checkpoint"]


def cli(*argv):
    with contextlib.redirect_stdout(io.StringIO()) as out: C.main([str(a) for a in argv])
    return out.getvalue()


@pytest.fixture
def vaes(monkeypatch):
    "The VAE names `sample` asks for (a run without a VAE must never try to download one)."
    asked, load = [], R.load_vae
    monkeypatch.setattr(R, "load_vae", lambda name, device: asked.append(name) or load(name, device))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return asked


def test_sample_needs_only_the_checkpoint(run, tmp_path, vaes):
    out = tmp_path / "x.png"
    msg = cli("sample", run, "--out", out)
    assert vaes == [None]                                       # pixel-space run: no VAE
    assert "40 samples" in msg and "one row per class [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]" in msg, msg
    assert "ODE heun2, 26 points" in msg and "guidance 2 on all channels" in msg, msg   # the run's sampler and guidance
    assert "(run.json)" in msg, msg                             # where each value came from
    img = Image.open(out)
    # 10 rows (one per class) of 4 columns of 8x8 digits with 2-pixel padding, enlarged 8 times
    assert img.size == (8 * (4 * 10 + 2), 8 * (10 * 10 + 2))
    # the run folder stands for its latest checkpoint; options given override the run
    msg = cli("sample", "--ckpt", run.rsplit("/", 1)[0], "--classes", "3", "7", "--per-class", "2", "--cfg-scale", "1",
              "--sampling-method", "euler", "--num-sampling-steps", "5", "--scale", "1", "--out", out)
    assert "4 samples, 4 network evaluations" in msg and "no guidance" in msg, msg
    assert Image.open(out).size == (2 * 10 + 2, 2 * 10 + 2)


def test_every_option_shows_its_default():
    parser = C.make_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        fmt = p._get_formatter()
        for action in p._actions:
            if action.option_strings and action.dest != "help" and not isinstance(action, argparse._StoreTrueAction):
                assert action.help and "default" in fmt._expand_help(action), (name, action.option_strings)
    per_class = next(a for a in sub.choices["sample"]._actions if a.dest == "per_class")
    assert fmt._expand_help(per_class).endswith("(default: 4)")


def test_one_spelling_of_the_shared_options():
    "sample and sample-eval take the same sampler, guidance and transport options, and the checkpoint as --ckpt."
    parser = C.make_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    opts = {n: {o for a in sub.choices[n]._actions for o in a.option_strings} for n in ("sample", "sample-eval")}
    shared = {"--preset", "--mode", "--sampling-method", "--num-sampling-steps", "--schedule", "--cfg-scale",
              "--cfg-interval", "--cfg-channels", "--path-type", "--prediction", "--vae", "--ckpt", "--seed"}
    assert shared <= opts["sample"] and shared <= opts["sample-eval"]
    for name in ("export", "import", "velocity-loss"):
        assert "--ckpt" in {o for a in sub.choices[name]._actions for o in a.option_strings}, name


@pytest.mark.parametrize("name", [n for n in PRESETS if preset(n).guidance is not None])   # fast: tests/test_few_step.py
def test_preset_values_reach_the_sampler(name, run, tmp_path, monkeypatch):
    pre, seen = preset(name), {}
    for mode in ("ode", "sde"):
        orig = getattr(Sampler, f"sample_{mode}")
        def spy(self, _orig=orig, _mode=mode, **kw): seen.update(mode=_mode, **kw); return _orig(self, **kw)
        monkeypatch.setattr(Sampler, f"sample_{mode}", spy)
    guidance = []
    orig_generate = S.generate
    monkeypatch.setattr(S, "generate", lambda *a, **kw: guidance.append(a[3]) or orig_generate(*a, **kw))
    cli("sample", "--ckpt", run, "--preset", name, "--num-sampling-steps", "4", "--classes", "1", "--per-class", "1",
        "--out", tmp_path / "p.png")
    want = pre.spec.to_dict()
    assert seen["mode"] == pre.spec.mode
    assert {k: seen[k] for k in want if k != "mode"} == {k: v for k, v in {**want, "num_steps": 4}.items() if k != "mode"}
    assert guidance == [pre.guidance]


def test_sample_eval_records_the_preset(run, tmp_path):
    out = tmp_path / "eval"
    cli("sample-eval", run, "--out-dir", out, "--num-samples", "3", "--preset", "repa-interval",
        "--num-sampling-steps", "4", "--no-eval", "--device", "cpu")
    m = json.loads((out / "manifest.json").read_text())
    pre = preset("repa-interval")
    assert m["preset"] == "repa-interval" and m["sampler"]["mode"] == "sde"
    assert m["sampler"] == {**pre.spec.to_dict(), "num_steps": 4}
    assert m["guidance"] == {"scale": 1.8, "interval": [0.3, 1.0], "channels": None}
    assert m["labels"] == "balanced"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["nfe"] == 4 and metrics["measured"]["preset"] == "repa-interval"
