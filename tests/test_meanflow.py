"""MeanFlow (nbs/03b_meanflow.ipynb): signs on exact Gaussian-mixture fields, the model's JVP, the fine-tuning start,
the sampler through `SampleFn`, the config's checks, and training end to end on the digits (checkpoint, resume)."""
import json

import pytest
import torch

from sit_workbench.config import digits_config, load_config
from sit_workbench.errors import UserError
from sit_workbench.gaussian import GaussianMixture
from sit_workbench.interpolants import LinearPath
from sit_workbench.meanflow import (MeanFlowObjective, exact_average_velocity, meanflow_from_flow,
                                    meanflow_loss, meanflow_sampler, meanflow_target, model_jvp, sample_t_r)
from sit_workbench.model import SiT
from sit_workbench.sample import generate
from sit_workbench.transport import Sampler, create_transport

GM = GaussianMixture([[-2.0, 1.0], [1.5, -0.5], [0.5, 2.0]], [[0.2, 0.5], [0.4, 0.1], [0.3, 0.3]], [0.5, 0.3, 0.2])
FIELD = GM.model(LinearPath())
TINY = dict(depth=1, hidden_size=32, num_heads=2, warmup_steps=0, logging_steps=1, save_total_limit=None,
            lr_scheduler_type="constant")   # constant: a run stopped at 4 of 4 steps resumes to 6 as a 6-step run


def small_sit(mean_flow=False, seed=0, **kw):
    "A tiny SiT on 8x8x1 images whose zero-initialised layers are perturbed, so that every input matters."
    torch.manual_seed(seed)
    net = SiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10,
              learn_sigma=False, mean_flow=mean_flow, **kw)
    with torch.no_grad():
        for p in net.parameters(): p.add_(0.05 * torch.randn_like(p))
    return net.eval()


def states(n, seed=0, t_max=0.9):
    "Points `z_t` of the mixture's marginals at random `t`, with random later `r` (t <= r: noise -> data)."
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(n, generator=g, dtype=torch.float64) * t_max
    r = t + (1 - t) * torch.rand(n, generator=g, dtype=torch.float64)
    x1, x0 = GM.sample(n, generator=g), torch.randn(n, 2, generator=g, dtype=torch.float64)
    return t[:, None] * x1 + (1 - t[:, None]) * x0, t, r


# ------------------------------------------------------------------ signs on the exact fields

def test_exact_average_velocity_satisfies_the_identity_with_our_sign():
    z, t, r = states(128)
    u_fn = lambda z_, t_, r_: exact_average_velocity(FIELD, z_, t_, r_, steps=64)
    v = FIELD(z, t)
    u, dudt = torch.func.jvp(u_fn, (z, t, r), (v, torch.ones_like(t), torch.zeros_like(r)))
    assert (meanflow_target(v, dudt, t, r) - u).abs().max() < 1e-3
    assert (v + (t - r)[:, None] * dudt - u).abs().max() > 0.1           # the paper's sign with our time flipped: wrong
    # the step lands where the ODE does: z_r = z_t + (r - t) u, checked against a fine solve of the same field
    fine = exact_average_velocity(FIELD, z, t, r, steps=400)
    assert (fine - u).abs().max() < 1e-5


def test_identity_also_holds_backwards_in_time():
    "u is defined for either order of t and r; the identity is the same formula (data -> noise: r < t)."
    z, t, r = states(64, seed=1)
    u_fn = lambda z_, t_, r_: exact_average_velocity(FIELD, z_, t_, r_, steps=64)
    v = FIELD(z, r * 0 + t)
    u, dudt = torch.func.jvp(u_fn, (z, t, t * 0.3), (v, torch.ones_like(t), torch.zeros_like(t)))
    assert (meanflow_target(v, dudt, t, t * 0.3) - u).abs().max() < 1e-3


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_steps_of_the_exact_average_velocity_give_the_ode_solution(steps):
    noise = torch.randn(200, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ode = Sampler(create_transport("Linear", "velocity")).sample_ode(sampling_method="dopri5", atol=1e-10, rtol=1e-10)
    ref = ode(noise, FIELD)[-1]
    fn = meanflow_sampler(steps)
    out = fn(noise, lambda x, t, r: exact_average_velocity(FIELD, x, t, r, steps=256))
    assert fn.nfe == steps and len(out) == steps + 1
    assert (out[-1] - ref).abs().max() < 1e-5
    # and one Euler step of the instantaneous velocity does not (the average velocity is what makes one step work)
    assert (noise + FIELD(noise, torch.zeros(200, dtype=torch.float64)) - ref).abs().max() > 0.3


def test_loss_is_zero_for_the_exact_model_and_exact_velocity_pairs():
    z, t, r = states(64, seed=3)
    model = lambda z_, t_, r=None, **kw: exact_average_velocity(FIELD, z_, t_, t_ if r is None else r, steps=64)
    v = FIELD(z, t)
    x1, x0 = z + (1 - t[:, None]) * v, z - t[:, None] * v          # t x1 + (1 - t) x0 = z and x1 - x0 = v
    out = meanflow_loss(model, x1, x0, t, r)
    assert out["mse"].max() < 1e-6
    assert torch.allclose(out["weight"], 1 / (out["mse"] * 2 + 1e-3))   # p = 1: 1 / (||err||^2 + c), norm over 2 dims
    out0 = meanflow_loss(model, x1, x0, t, r, p=0.0)
    assert torch.allclose(out0["loss"], out["mse"] * 2)                # p = 0: the plain squared norm


def test_model_tangent_leaves_only_the_regression_noise():
    """tangent='model': the total derivative follows the model's own velocity, so for the exact model the error is
    exactly the pair's deviation from the marginal velocity; the data tangent adds the deviation's JVP term."""
    z, t, r = states(64, seed=5)
    model = lambda z_, t_, r=None, **kw: exact_average_velocity(FIELD, z_, t_, t_ if r is None else r, steps=64)
    v, delta = FIELD(z, t), 0.3 * torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x1, x0 = z + (1 - t[:, None]) * (v + delta), z - t[:, None] * (v + delta)   # x1 - x0 = v + delta
    out = meanflow_loss(model, x1, x0, t, r, p=0.0, tangent="model")
    assert torch.allclose(out["loss"], (delta ** 2).sum(1), atol=1e-6)
    data = meanflow_loss(model, x1, x0, t, r, p=0.0)
    assert (data["loss"] - (delta ** 2).sum(1)).abs().max() > 1e-2
    with pytest.raises(ValueError, match="tangent must be one of data, model"):
        meanflow_loss(model, x1, x0, t, r, tangent="x")

def test_guided_target_uses_the_models_own_velocities():
    "With omega and kappa the target field is omega v + kappa u(c) + (1 - omega - kappa) u(null); dropped labels keep v."
    z, t, r = states(8, seed=4)
    x1, x0 = torch.randn(8, 2, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    y, drop = torch.arange(8) % 3, torch.tensor([0, 0, 0, 0, 0, 0, 1, 1])
    shift = {0: 0.0, 1: 1.0, 2: -1.0, 10: 0.5}   # the "network": a constant velocity per label (null = 10)
    def model(z_, t_, y, r=None, force_drop_ids=None):
        lab = torch.where(force_drop_ids == 1, 10, y) if force_drop_ids is not None else y
        return torch.tensor([shift[int(l)] for l in lab], dtype=z_.dtype)[:, None].expand_as(z_)
    omega, kappa = 2.0, 0.25
    out = meanflow_loss(model, x1, x0, t, r, y, drop, p=0.0, omega=omega, kappa=kappa, null_class=10)
    v = x1 - x0
    u_c = model(z, t, y, force_drop_ids=torch.zeros(8, dtype=torch.long))
    want = omega * v + kappa * u_c + (1 - omega - kappa) * 0.5          # du/dt = 0: the target is the guided field
    want[6:] = v[6:]
    err = model(z, t, y, force_drop_ids=drop) - want
    assert torch.allclose(out["loss"], (err ** 2).sum(1))
    with pytest.raises(ValueError, match="null_class"):
        meanflow_loss(model, x1, x0, t, r, y, drop, omega=2.0)


def test_time_sampler():
    t, r = sample_t_r(4000, ratio=0.25, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.float32 and (t <= r).all() and ((r != t).sum() == 1000)
    assert float(r.mean()) > float(t.mean()) > 0.5 - 0.1      # mean -0.4 in the paper's time: tilted to our data end
    # the same draws as the paper's: its times are 1 - ours, with its t the larger
    g = torch.Generator().manual_seed(0)
    a, b = torch.sigmoid(-0.4 + torch.randn(2, 4000, generator=g))
    assert torch.allclose(1 - t, torch.maximum(a, b), atol=1e-7)
    with pytest.raises(ValueError, match="ratio"): sample_t_r(4, ratio=1.5)


# ------------------------------------------------------------------ the network

def test_model_jvp_matches_finite_differences_and_backpropagates():
    net = small_sit(mean_flow=True).double()
    z, v = torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.randn(4, 1, 8, 8, dtype=torch.float64)
    t = torch.tensor([0.1, 0.3, 0.6, 0.8], dtype=torch.float64)
    r = torch.tensor([0.5, 0.3, 1.0, 0.9], dtype=torch.float64)
    y = torch.tensor([0, 3, 5, 10])
    fn = lambda z_, t_, r_: net(z_, t_, y, r=r_)
    u, dudt = model_jvp(fn, z, t, r, v)
    h = 1e-4
    fd = (fn(z + h * v, t + h, r) - fn(z - h * v, t - h, r)) / (2 * h)
    assert (dudt - fd).abs().max() < 1e-3 * fd.abs().max()
    # the r direction matters too (the interval's embedder is live)
    fd_r = (fn(z, t, r + h) - fn(z, t, r - h)) / (2 * h)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.MATH):
        _, dudr = torch.func.jvp(lambda r_: net(z, t, y, r=r_), (r,), (torch.ones_like(r),))
    assert (dudr - fd_r).abs().max() < 1e-3 * fd_r.abs().max() and fd_r.abs().max() > 1e-3
    # backward through the loss reaches every parameter
    net.float().train()
    out = meanflow_loss(net, torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8), t.float(), r.float(), y=y.clamp(max=9),
                        force_drop_ids=torch.tensor([0, 0, 1, 0]))
    out["loss"].mean().backward()
    grads = {k: p.grad for k, p in net.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["r_embedder.mlp.2.weight"].abs().sum() > 0


def test_fused_attention_stays_on_for_the_plain_forward():
    "model_jvp switches to the math backend only inside its call: the global SDPA switches are as before."
    b = torch.backends.cuda
    flags = lambda: (b.flash_sdp_enabled(), b.mem_efficient_sdp_enabled(), b.math_sdp_enabled(), b.cudnn_sdp_enabled())
    before = flags()
    net = small_sit(mean_flow=True)
    z, t = torch.randn(2, 1, 8, 8), torch.rand(2)
    u, _ = model_jvp(lambda z_, t_, r_: net(z_, t_, torch.tensor([1, 2]), r=r_), z, t, t, z)
    assert flags() == before and torch.allclose(u, net(z, t, torch.tensor([1, 2])), atol=1e-6)


def test_flow_model_is_unchanged_and_meanflow_from_flow_starts_as_it():
    flow = small_sit()
    official = SiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10,
                   learn_sigma=False)
    official.load_state_dict(flow.state_dict(), strict=True)          # the flag off: the official keys, strict
    assert "mean_flow" not in flow.config and not hasattr(flow, "r_embedder")
    mf = meanflow_from_flow(flow)
    assert mf.mean_flow and mf.config == {**flow.config, "mean_flow": True} and not mf.training
    z, t, y = torch.randn(6, 1, 8, 8), torch.rand(6), torch.arange(6)
    with torch.no_grad():
        ref = flow(z, t, y)
        assert torch.equal(mf(z, t, y), ref) and torch.equal(mf(z, t, y, r=t), ref)
        for r in (torch.rand(6), torch.ones(6), torch.zeros(6) - 0.5):
            assert torch.equal(mf(z, t, y, r=r), ref)
        xx, yy = torch.cat([z, z]), torch.cat([y, torch.full_like(y, 10)])
        tt = torch.cat([t, t])
        assert torch.equal(mf.forward_with_cfg(xx, tt, yy, 2.0, r=torch.rand(12)), flow.forward_with_cfg(xx, tt, yy, 2.0))
    with pytest.raises(ValueError, match="already"): meanflow_from_flow(mf)


def test_sampler_calls_the_model_with_t_and_r_and_counts_evaluations():
    calls = []
    def model(x, t, y=None, r=None):
        calls.append((t.clone(), r.clone(), y))
        return torch.ones_like(x)
    z = torch.zeros(3, 1, 8, 8)
    fn = meanflow_sampler(4)
    out = fn(z, model, y=torch.tensor([1, 2, 3]))
    assert fn.nfe == 4 and torch.allclose(out[-1], torch.ones_like(z))   # four steps of 1/4 with u = 1
    assert [round(float(c[0][0]), 4) for c in calls] == [0, 0.25, 0.5, 0.75]
    assert [round(float(c[1][0]), 4) for c in calls] == [0.25, 0.5, 0.75, 1.0]
    assert all(c[2] is not None for c in calls)
    fn2 = meanflow_sampler(2, times=[0.0, 0.8, 1.0])
    fn2(z, model, y=torch.tensor([1, 2, 3]))
    assert float(calls[-1][0][0]) == pytest.approx(0.8) and fn2.nfe == 2


def test_guided_generation_through_forward_with_cfg():
    mf = small_sit(mean_flow=True)
    z, y = torch.randn(3, 1, 8, 8), torch.tensor([1, 2, 3])
    with torch.no_grad():
        plain = generate(mf, meanflow_sampler(1), y, noise=z).samples
        assert torch.allclose(plain, z + mf(z, torch.zeros(3), y, r=torch.ones(3)), atol=1e-6)
        guided = generate(mf, meanflow_sampler(1), y, guidance=3.0, noise=z).samples
        cond, unc = mf(z, torch.zeros(3), y, r=torch.ones(3)), mf(z, torch.zeros(3), torch.full_like(y, 10), r=torch.ones(3))
        want = z.clone(); want[:, :3] = (z + unc + 3.0 * (cond - unc))[:, :3]   # the official 3-channel quirk: 1 channel here
        assert torch.allclose(guided, want, atol=1e-5)


# ------------------------------------------------------------------ configuration and training

def test_config_checks():
    assert load_config("configs/digits-meanflow.yaml").model_config.objective == "meanflow"
    for kw, match in ((dict(path_type="GVP"), "Linear"), (dict(prediction="noise"), "velocity"),
                      (dict(repa_encoder="digits", repa_block=2), "REPA"), (dict(gradient_checkpointing=True), "gradient checkpointing"),
                      (dict(torch_compile=True), "torch_compile")):
        with pytest.raises(UserError, match=match): digits_config(objective="meanflow", **kw)
    for kw, match in ((dict(objective="meanflows"), "objective"), (dict(objective="meanflow", meanflow_ratio=1.5), "ratio"),
                      (dict(objective="meanflow", meanflow_cfg_kappa=1.0), "kappa"),
                      (dict(meanflow_cfg_omega=2.0), "read only with objective 'meanflow'"),
                      (dict(objective="meanflow", class_dropout_prob=0.0, meanflow_cfg_omega=2.0), "null class")):
        with pytest.raises(ValueError, match=match): digits_config(**kw)


def test_objective_reads_the_config():
    obj = MeanFlowObjective.from_config(load_config("configs/digits-meanflow.yaml").model_config)
    assert (obj.ratio, obj.time_mean, obj.time_std, obj.adaptive_p, obj.omega, obj.kappa, obj.null_class) == \
        (0.25, -0.4, 1.0, 1.0, 2.0, 0.0, 10)
    assert obj.sample_times(8).shape == (8, 2)


def test_training_checkpoint_and_resume(tmp_path):
    from sit_workbench.checkpoint import load_sit
    from sit_workbench.train import read_log, train
    out = tmp_path / "run"
    cfg = digits_config(**TINY, objective="meanflow", meanflow_cfg_omega=2.0, cfg_scale=1.0, max_steps=4, save_steps=2,
                        per_device_train_batch_size=16, output_dir=str(out))
    res = train(cfg, progress=False)
    assert res["status"] == "finished" and res["step"] == 4
    rows = read_log(out / "log.jsonl")
    assert len(rows) == 4 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    config = json.loads((out / "checkpoint-4" / "config.json").read_text())
    assert config["mean_flow"] is True
    model = load_sit(out / "checkpoint-4")
    assert model.mean_flow and hasattr(model, "r_embedder")
    with torch.no_grad():
        x = generate(model, meanflow_sampler(1), [3, 4]).samples
    assert torch.isfinite(x).all()
    # resume from checkpoint-4 to 6 equals an uninterrupted run of 6 steps
    res = train(digits_config(**{**TINY, "objective": "meanflow", "meanflow_cfg_omega": 2.0, "cfg_scale": 1.0,
                                 "max_steps": 6, "save_steps": 2, "per_device_train_batch_size": 16,
                                 "output_dir": str(out)}), progress=False)
    assert res["step"] == 6
    straight = tmp_path / "straight"
    train(digits_config(**{**TINY, "objective": "meanflow", "meanflow_cfg_omega": 2.0, "cfg_scale": 1.0, "max_steps": 6,
                           "save_steps": 6, "per_device_train_batch_size": 16, "output_dir": str(straight)}), progress=False)
    a, b = load_sit(out / "checkpoint-6", prefer="model"), load_sit(straight / "checkpoint-6", prefer="model")
    assert all(torch.allclose(a.state_dict()[k], b.state_dict()[k], atol=1e-6) for k in a.state_dict())


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_two_gloo_processes_match_one_process(tmp_path, fsdp):
    "The JVP goes through DDP (and FSDP2): two processes of 8 images give one process's 16-image run."
    import os, subprocess, sys
    from pathlib import Path
    from sit_workbench.config import save_config
    from sit_workbench.train import read_log
    from safetensors.torch import load_file
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    exe = str(Path(sys.executable).parent / "sit-workbench")
    kw = dict(TINY, objective="meanflow", meanflow_cfg_omega=2.0, cfg_scale=1.0, max_steps=3, save_steps=3)
    save_config(digits_config(**kw, per_device_train_batch_size=16, output_dir=str(tmp_path / "one")), tmp_path / "one.yaml")
    save_config(digits_config(**kw, per_device_train_batch_size=8, output_dir=str(tmp_path / "two"), fsdp=fsdp),
                tmp_path / "two.yaml")
    subprocess.run([exe, "train", "--config", str(tmp_path / "one.yaml"), "--no-progress"], check=True, env=env,
                   capture_output=True)
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", exe,
                          "train", "--config", str(tmp_path / "two.yaml"), "--no-progress"], env=env,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    one, two = read_log(tmp_path / "one" / "log.jsonl"), read_log(tmp_path / "two" / "log.jsonl")
    torch.testing.assert_close(torch.tensor([r["loss"] for r in two]), torch.tensor([r["loss"] for r in one]),
                               rtol=1e-4, atol=1e-6)
    a, b = (load_file(str(tmp_path / d / "checkpoint-3" / "model.safetensors")) for d in ("one", "two"))
    for n in a: torch.testing.assert_close(b[n], a[n], rtol=1e-4, atol=1e-5)


def test_finetuning_starts_from_the_flow_checkpoint(tmp_path, tiny_digits_run):
    from sit_workbench.checkpoint import load_sit
    from sit_workbench.train import Trainer, train
    flow_ck = tiny_digits_run(steps=4)
    flow = load_sit(flow_ck).eval()
    out = tmp_path / "ft"
    mf = dict(depth=1, hidden_size=32, num_heads=2, warmup_steps=0, objective="meanflow", output_dir=str(out))
    trainer = Trainer(digits_config(**mf, init_from=str(flow_ck), max_steps=2, save_steps=2), progress=False).setup()
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0.2, 0.5, 0.9])
    with torch.no_grad():   # model and EMA start as the flow model's EMA weights, at r = t and at any r
        for net in (trainer.raw.eval(), trainer.ema.eval()):
            assert torch.allclose(net(x, t, y=torch.tensor([1, 2, 3]), r=t), flow(x, t, y=torch.tensor([1, 2, 3])), atol=1e-6)
            assert torch.allclose(net(x, t, y=torch.tensor([1, 2, 3]), r=t + 0.1), flow(x, t, y=torch.tensor([1, 2, 3])), atol=1e-6)
    res = train(digits_config(**mf, init_from=str(flow_ck), max_steps=2, save_steps=2), progress=False)
    assert res["status"] == "finished" and load_sit(res["checkpoint"]).mean_flow
    # the resumed run does not read init_from again: it may be gone
    res = train(digits_config(**mf, init_from=str(tmp_path / "gone"), max_steps=3, save_steps=1), progress=False)
    assert res["step"] == 3


@pytest.mark.parametrize("change, message", [
    (dict(depth=2), "another architecture (depth: 1 there, 2 here)"),
    (dict(objective="flow", path_type="GVP"), "path_type 'Linear'"),
    (dict(objective="flow", prediction="score"), "prediction 'velocity'"),
])
def test_finetuning_refuses_weights_that_mean_something_else(tmp_path, tiny_digits_run, change, message):
    from sit_workbench.train import Trainer
    cfg = digits_config(**{**dict(depth=1, hidden_size=32, num_heads=2, warmup_steps=0, objective="meanflow", max_steps=2,
                                  output_dir=str(tmp_path / "x")), **change}, init_from=str(tiny_digits_run(steps=4)))
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Trainer(cfg, progress=False).setup()


def test_a_flow_run_cannot_start_from_a_meanflow_checkpoint(tmp_path, tiny_digits_run):
    from sit_workbench.train import Trainer
    mf_ck = tiny_digits_run(steps=2, objective="meanflow")
    cfg = digits_config(depth=1, hidden_size=32, num_heads=2, warmup_steps=0, max_steps=2, output_dir=str(tmp_path / "x"), init_from=str(mf_ck))
    with pytest.raises(UserError, match="is a MeanFlow model"):
        Trainer(cfg, progress=False).setup()
