"""Internal guidance (arXiv 2512.24176): a SiT with an intermediate output head (`internal_block`), trained with the
same loss on both heads, and that head as the guide of the one generation path (`--guide internal`, the pipeline's
`guide="internal"`, `generate(..., guide_model=InternalGuide(model))`): guided = internal + w (final - internal)."""
import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import sit_workbench.cli as C
from sit_workbench.checkpoint import load_sit, load_state_dict, save_pretrained, sit_from_state_dict
from sit_workbench.config import digits_config
from sit_workbench.errors import UserError
from sit_workbench.model import InternalGuide, SiT, SiT_models
from sit_workbench.pipeline import SiTPipeline
from sit_workbench.run import load_guide, load_model, read_run
from sit_workbench.sample import Guidance, generate, sample_noise
from sit_workbench.train import read_log
from sit_workbench.transport import Sampler, create_transport

torch.set_num_threads(1)
SMALL = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=3, num_heads=2, num_classes=10)


def cli(*argv):
    with contextlib.redirect_stdout(io.StringIO()) as out: C.main([str(a) for a in argv])
    return out.getvalue()


def randomized(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed": p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def ck(tiny_digits_run):
    """A two-block digits run with the intermediate head after block 1, trained for 60 steps with a short EMA (both heads
    start at zero on the same features, so they part only once the blocks have learnt something)."""
    return Path(tiny_digits_run(steps=60, depth=2, internal_guidance_block=1, ema_decay=0.9))


# --- the model -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("learn_sigma", [True, False])
def test_the_internal_head_has_the_final_heads_shape_and_starts_at_zero(learn_sigma):
    m = SiT(**SMALL, learn_sigma=learn_sigma, internal_block=2).eval()
    x, t, y = torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([0, 4, 10])
    with torch.no_grad():
        assert torch.equal(m(x, t, y, head="internal"), torch.zeros(3, 4, 8, 8))     # zero init, like final_layer
        randomized(m)
        final, inner = m(x, t, y, head="both")
        assert inner.shape == final.shape == (3, 4, 8, 8)
        assert torch.equal(final, m(x, t, y)) and torch.equal(inner, m(x, t, y, head="internal"))
        assert torch.equal(InternalGuide(m)(x, t, y), inner)
        assert not torch.equal(inner, final)
        # forward_with_cfg still calls the final head
        out = m.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, 10)]), 1.0)
        assert torch.allclose(out[:3], final, atol=1e-6)
    assert m.internal_layer.linear.weight.shape == m.final_layer.linear.weight.shape
    assert m.config["internal_block"] == 2


def test_only_the_first_k_blocks_run_for_the_internal_head():
    m = randomized(SiT(**SMALL, internal_block=1))
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    ran = []
    for i, b in enumerate(m.blocks): b.register_forward_hook(lambda *a, i=i: ran.append(i))
    with torch.no_grad(): m(x, t, y, head="internal")
    assert ran == [0]
    ran.clear()
    with torch.no_grad(): m(x, t, y, head="both")
    assert ran == [0, 1, 2]


def test_a_model_without_the_head_and_bad_blocks_say_so():
    plain = SiT(**SMALL).eval()
    x, t, y = torch.randn(1, 4, 8, 8), torch.rand(1), torch.tensor([1])
    with pytest.raises(ValueError, match="built without internal_block"): plain(x, t, y, head="internal")
    with pytest.raises(ValueError, match="built without internal_block"): plain(x, t, y, head="both")
    with pytest.raises(ValueError, match="InternalGuide needs"): InternalGuide(plain)
    for k in (0, 3, 5, 1.0, True):
        with pytest.raises(ValueError, match=r"internal_block .* must be an integer in \[1, 2\]"): SiT(**SMALL, internal_block=k)


def test_official_models_are_unchanged():
    with torch.device("meta"): xl = SiT_models["SiT-XL/2"]()
    assert "internal_block" not in xl.config and xl.internal_block is None
    assert not any(k.startswith("internal_layer") for k in xl.state_dict())


def test_the_head_survives_save_and_load_and_bare_tensors_say_what_is_missing(tmp_path):
    m = randomized(SiT(**SMALL, internal_block=2))
    save_pretrained(m, tmp_path / "m")
    back = load_sit(tmp_path / "m")
    assert back.config == m.config and back.internal_block == 2
    assert all(torch.equal(back.state_dict()[k], v) for k, v in m.state_dict().items())
    with pytest.raises(UserError, match="internal_layer"):
        sit_from_state_dict(load_state_dict(tmp_path / "m"))        # the block is in no tensor's shape
    assert sit_from_state_dict(load_state_dict(tmp_path / "m"), config=m.config).internal_block == 2


# --- the config ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    (dict(internal_guidance_block=0), "model_config.internal_guidance_block must be null or >= 1, got 0"),
    (dict(internal_guidance_block=4), "model_config.internal_guidance_block must be in [1, 3]"),
    (dict(depth=2, internal_guidance_block=2), "model_config.internal_guidance_block must be in [1, 1]"),
    (dict(internal_guidance_block=2, objective="meanflow"), "does not combine with objective 'meanflow'"),
    (dict(internal_guidance_weight=0.5), "internal_guidance_weight is read only with model_config.internal_guidance_block"),
    (dict(internal_guidance_block=2, internal_guidance_weight=-1.0), "internal_guidance_weight must be positive"),
])
def test_config_errors(overrides, message):
    with pytest.raises(UserError) as e: digits_config(**overrides)
    assert message in str(e.value)


def test_the_config_builds_the_head():
    from sit_workbench.train import build_model
    cfg = digits_config(internal_guidance_block=3, internal_guidance_weight=0.5)
    assert build_model(cfg.model_config).internal_block == 3
    assert build_model(digits_config().model_config).internal_block is None


# --- training ------------------------------------------------------------------------------------------------------

def test_training_logs_both_losses_and_saves_the_head(ck, tmp_path):
    rows = read_log(ck.parent / "log.jsonl")
    assert rows and all(math.isfinite(r["loss"]) and math.isfinite(r["internal_loss"]) for r in rows), rows
    assert any(r["loss"] != r["internal_loss"] for r in rows)       # `loss` is the final head's alone
    net = load_sit(ck)
    assert net.internal_block == 1 and json.loads((ck / "config.json").read_text())["internal_block"] == 1
    assert net.internal_layer.linear.weight.abs().sum() > 0         # trained away from its zero start
    save_pretrained(net, tmp_path / "again")
    back = load_sit(tmp_path / "again")
    assert set(back.state_dict()) == set(net.state_dict())
    assert all(torch.equal(back.state_dict()[k], v) for k, v in net.state_dict().items())
    assert read_run(ck).architecture["internal_block"] == 1


def test_the_training_loss_is_the_final_loss_plus_weight_times_the_internal_one(monkeypatch):
    "One micro-step by hand: the loss that goes backward is L(final) + w L(internal) for the same x0, t, labels."
    from sit_workbench.train import Trainer
    cfg = digits_config(depth=2, hidden_size=32, num_heads=2, internal_guidance_block=1, internal_guidance_weight=0.25,
                        per_device_train_batch_size=8, warmup_steps=0, max_steps=1,
                        output_dir="/nonexistent")
    tr = Trainer(cfg, progress=False).setup()
    randomized(tr.raw).train()
    x1, y = torch.randn(8, 1, 8, 8), torch.arange(8)
    x0, t = torch.randn(8, 1, 8, 8), torch.rand(8)
    kw = dict(y=y, force_drop_ids=torch.zeros(8, dtype=torch.long))
    loss, inner = tr._flow_losses(x1, x0, t, kw)
    tp = tr.transport
    final = tp.training_losses_at(tr.raw, x1, x0, t, kw)["loss"].mean()
    internal = tp.training_losses_at(lambda x, tt, **k: tr.raw(x, tt, head="internal", **k), x1, x0, t, kw)["loss"].mean()
    assert torch.allclose(loss, final) and torch.allclose(inner, internal) and not torch.allclose(loss, inner)


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_two_gloo_processes_match_one_process(tmp_path, fsdp):
    "The wrapped model's forward takes head='both': two processes of batch 16 train as one of batch 32."
    import os, subprocess, sys
    from safetensors.torch import load_file
    from sit_workbench.config import save_config
    root = str(Path(__file__).resolve().parents[1])    # this checkout's package, whichever one is installed
    steps, env = 4, {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                     "PYTHONPATH": os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])}
    for name, n, extra in (("one", 32, {}), ("two", 16, {"fsdp": fsdp})):
        save_config(digits_config(depth=2, hidden_size=32, num_heads=2, internal_guidance_block=1, warmup_steps=0,
                                  logging_steps=1, max_steps=steps, save_steps=steps, per_device_train_batch_size=n,
                                  output_dir=str(tmp_path / name), **extra), tmp_path / f"{name}.yaml")
    cmd = [str(Path(sys.executable).parent / "sit-workbench"), "train", "--no-progress", "--config"]
    subprocess.run(cmd + [str(tmp_path / "one.yaml")], check=True, env=env, capture_output=True)
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *cmd,
                          str(tmp_path / "two.yaml")], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    one, two = read_log(tmp_path / "one" / "log.jsonl"), read_log(tmp_path / "two" / "log.jsonl")
    for key in ("loss", "internal_loss"):
        torch.testing.assert_close(torch.tensor([r[key] for r in two]), torch.tensor([r[key] for r in one]),
                                   rtol=1e-5, atol=1e-6)
    a, b = (load_file(str(tmp_path / name / f"checkpoint-{steps}" / "model.safetensors")) for name in ("one", "two"))
    assert any(k.startswith("internal_layer.") for k in a)
    for k in a: torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)


def test_a_plain_checkpoint_starts_an_internal_guidance_run(tiny_digits_run, tmp_path):
    "init_from: the weights of a plain run, the new head at zero."
    from sit_workbench.train import Trainer
    plain = tiny_digits_run(steps=4, depth=2)
    cfg = digits_config(depth=2, hidden_size=32, num_heads=2, internal_guidance_block=1, init_from=str(plain),
                        warmup_steps=0, max_steps=2, output_dir=str(tmp_path / "x"))
    tr = Trainer(cfg, progress=False).setup()
    src = load_model(read_run(plain)).state_dict()
    own = tr.raw.state_dict()
    assert all(torch.equal(own[k], v) for k, v in src.items())
    assert all(not v.any() for k, v in own.items() if k.startswith("internal_layer.") and "linear" in k)


# --- generation ----------------------------------------------------------------------------------------------------

def test_generate_with_the_internal_guide(ck):
    m = load_sit(ck)
    guide = InternalGuide(m)
    labels = [0, 3, 7, 9]
    fn = Sampler(create_transport()).sample_ode(sampling_method="euler", num_steps=2)    # one Euler step
    plain = generate(m, fn, labels, seed=5)
    at1 = generate(m, fn, labels, Guidance(1.0, None, None, "internal"), seed=5, guide_model=guide)
    assert torch.equal(at1.samples, plain.samples)                                  # scale 1: no guidance
    at2 = generate(m, fn, labels, Guidance(2.0, None, None, "internal"), seed=5, guide_model=guide)
    z, y = sample_noise(range(4), (1, 8, 8), seed=5), torch.tensor(labels)
    t0 = torch.full((4,), fn.t0)
    with torch.no_grad():
        final, inner = m(z, t0, y), m(z, t0, y, head="internal")
        want = z + (fn.t1 - fn.t0) * (inner + 2.0 * (final - inner))
    assert torch.allclose(at2.samples, want, atol=1e-6)
    assert (at2.samples - plain.samples).abs().max() > 1e-4


def test_the_run_describes_and_loads_its_internal_guide(ck, tiny_digits_run):
    spec = read_run(ck).with_options(guide="internal", guidance_scale=2.0)
    assert "guided by its internal head (block 1)" in spec.describe(), spec.describe()
    assert isinstance(load_guide(spec), InternalGuide) and load_guide(spec).model is load_model(spec)
    plain = read_run(tiny_digits_run(steps=4)).with_options(guide="internal", guidance_scale=2.0)
    with pytest.raises(UserError, match="train with model_config.internal_guidance_block"): load_guide(plain)


def test_sample_with_guide_internal_from_every_front_end(ck, tmp_path):
    "sample, sample-eval, the pipeline and the exports of the run give the same internally guided images."
    msg = cli("sample", ck, "--guide", "internal", "--cfg-scale", 2, "--per-class", 1,
              "--out", tmp_path / "a.png", "--npz", tmp_path / "a.npz")
    assert "guided by its internal head (block 1)" in msg, msg
    with np.load(tmp_path / "a.npz") as f: images, labels = f["arr_0"], f["arr_1"]
    cli("sample", ck, "--cfg-scale", 2, "--per-class", 1, "--out", tmp_path / "c.png", "--npz", tmp_path / "c.npz")
    with np.load(tmp_path / "c.npz") as f: assert not np.array_equal(f["arr_0"], images)   # not classifier-free
    cli("sample-eval", ck, "--guide", "internal", "--cfg-scale", 2, "--out-dir", tmp_path / "ev", "--num-samples", 10,
        "--no-eval", "--device", "cpu")
    with np.load(tmp_path / "ev" / "samples.npz") as f: assert np.abs(f["arr_0"].astype(int) - images.astype(int)).max() <= 1
    assert json.loads((tmp_path / "ev" / "manifest.json").read_text())["guidance"]["guide"] == "internal"
    pipe = SiTPipeline.from_pretrained(ck)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(class_labels=labels.tolist(), guidance_scale=2.0, generator=torch.Generator().manual_seed(0),
               output_type="np", guide="internal").images
    assert np.abs(np.round(out * 255).astype(int).repeat(3, -1) - images.astype(int)).max() <= 1
    from sit_workbench import explore as X                        # the widgets' panel: 'internal' in the guide field
    res = X.sample_grid(X.Request(checkpoint=str(ck), classes="0-9", per_class=1, cfg_scale=2.0, cfg_channels=None,
                                  guide="internal"))
    assert np.abs(np.round(res.images.permute(0, 2, 3, 1).numpy() * 255).astype(int).repeat(3, -1)
                  - images.astype(int)).max() <= 1
    # the head survives the official .pt, its import and the diffusers export
    cli("export", ck, tmp_path / "official.pt")
    cli("import", tmp_path / "official.pt", tmp_path / "imported")
    cli("export", ck, tmp_path / "pipe", "--format", "diffusers")
    for src in (tmp_path / "official.pt", tmp_path / "imported", tmp_path / "pipe"):
        assert load_model(read_run(src)).internal_block == 1, src
        cli("sample", src, "--guide", "internal", "--cfg-scale", 2, "--per-class", 1, "--out", tmp_path / "s.png",
            "--npz", tmp_path / "s.npz")
        with np.load(tmp_path / "s.npz") as f: assert np.abs(f["arr_0"].astype(int) - images.astype(int)).max() <= 1, src
    pipe = SiTPipeline.from_pretrained(tmp_path / "pipe")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.transformer.internal_block == 1


def test_guide_internal_on_a_model_without_the_head_exits_2(tiny_digits_run, tmp_path, capsys):
    plain = tiny_digits_run(steps=4)
    with pytest.raises(SystemExit) as e:
        cli("sample", plain, "--guide", "internal", "--cfg-scale", 2, "--out", tmp_path / "x.png")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "has none: train with model_config.internal_guidance_block" in err, err
    pipe = SiTPipeline.from_pretrained(plain)
    with pytest.raises(UserError, match="internal_guidance_block"):
        pipe(class_labels=[1], guidance_scale=2.0, guide="internal")


def test_the_help_names_internal_guidance():
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit): C.main(["sample", "--help"])
    assert "'internal' for internal guidance" in " ".join(out.getvalue().split())
