"""The multistep solvers and schedules through `Sampler` (sit_workbench.solvers): NFE, interval, CFG, accuracy."""
import json

import pytest
import torch

from sit_workbench.model import SiT
from sit_workbench.solvers import optimize_schedule, save_schedule, time_grid, data_prediction, multistep_solve
from sit_workbench.transport import Sampler, create_transport

from conftest import PATHS, PREDICTIONS, Strict, assert_moments, exact, noise

METHODS = ("dpm++2m", "dpm++3m", "unipc", "unipc3", "ab2", "ab3", "abm3")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_multistep_counts_nfe_stays_inside_and_recovers_moments(path, prediction):
    tr = create_transport(path, prediction)
    s = Sampler(tr)
    fns = [s.sample_ode(sampling_method=m, num_steps=11, schedule=sch) for m in METHODS
           for sch in ("uniform", "logsnr", "shift:3")]
    fns += [s.sample_sde(sampling_method="sde-dpm++2m", num_steps=11),
            s.sample_ode(sampling_method="heun2", num_steps=11, schedule="logsnr")]
    for fn in fns:
        model = Strict(tr, fn.t0, fn.t1)
        torch.manual_seed(0)
        out = fn(noise(256), model)
        assert torch.isfinite(out[-1]).all(), fn
        assert fn.nfe == len(model.seen) == (20 if "heun2" in fn.description else 10), fn
    # uniform in t suits velocity models from t = 0; VP (log-SNR moving mostly near t = 1) and score/noise models
    # (starting at t = 1e-3, lambda = -6.4: a huge first log-SNR step) need the log-SNR grid
    schedule = "uniform" if path != "VP" and prediction == "velocity" else "logsnr"
    for m in METHODS:   # with 40 evaluations every solver lands on the data's moments
        x = s.sample_ode(sampling_method=m, num_steps=41, schedule=schedule)(noise(4000), exact(tr))[-1]
        assert_moments(x, slack=0.02, what=f"{path} {prediction} {m}")


def test_sde_multistep_converges_to_the_data():
    tr = create_transport("GVP", "velocity")
    torch.manual_seed(0)
    x = Sampler(tr).sample_sde(sampling_method="sde-dpm++2m", num_steps=200)(noise(20_000), exact(tr))[-1]
    assert_moments(x, slack=0.01, what="sde-dpm++2m")


def test_defaults_unchanged_and_bad_input():
    s = Sampler(create_transport())
    assert "dopri5" in s.sample_ode().description and "SDE Euler" in s.sample_sde().description
    for bad in (lambda: s.sample_ode(sampling_method="dpm++2m", reverse=True),
                lambda: s.sample_ode(sampling_method="dopri5", schedule="logsnr"),
                lambda: s.sample_sde(sampling_method="sde-dpm++2m", diffusion_form="sigma"),
                lambda: s.sample_ode(sampling_method="dpm++4m")):
        with pytest.raises(ValueError): bad()


def test_guided_sit_with_interval_through_multistep():
    """Batched CFG (forward_with_cfg) and the guidance interval work through the multistep samplers: the guided
    half matches a hand-rolled guided velocity, NFE counts one batched call per step."""
    torch.manual_seed(0)
    model = SiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10,
                learn_sigma=False).eval()
    tr = create_transport()
    fn = Sampler(tr).sample_ode(sampling_method="dpm++3m", num_steps=7)
    z, y = torch.randn(4, 1, 8, 8), torch.tensor([1, 2, 3, 4])
    out = fn(torch.cat([z, z]), model.forward_with_cfg, y=torch.cat([y, torch.full_like(y, 10)]), cfg_scale=3.0,
             cfg_channels=None, cfg_interval=(0.0, 0.5))[-1][:4]
    assert fn.nfe == 6
    def guided(x, t):
        t = t.expand(len(x)).float()
        c, u = model(x, t, y), model(x, t, torch.full_like(y, 10))
        return torch.where((t <= 0.5).view(-1, 1, 1, 1), u + 3.0 * (c - u), c)
    ref = multistep_solve(lambda x, t: data_prediction(tr.path_sampler, "velocity", guided(x, t), x, t), z,
                          time_grid("uniform", 0.0, 1.0, 7, tr.path_sampler), tr.path_sampler, "dpm++3m")[-1]
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_optimized_schedule_lowers_the_error_and_is_reused_by_name(tmp_path):
    tr = create_transport("Linear", "velocity")
    path, model = tr.path_sampler, exact(tr)
    def denoise(x, t): return data_prediction(path, "velocity", model(x, t.expand(len(x)) if torch.is_tensor(t) and t.ndim == 0 else t), x, t)
    x = noise(256)
    ref = multistep_solve(denoise, x, time_grid("uniform", 0.0, 1.0, 501, path), path, "unipc3")[-1]
    ts, info = optimize_schedule(denoise, x, ref, path, 0.0, 1.0, 5, method="abm3", iters=60)
    assert info["rms"] < 0.7 * info["rms_init"], info
    both = optimize_schedule(denoise, x, ref, path, 0.0, 1.0, 5, method="abm3", init=("logsnr", "uniform"), iters=60)
    other = optimize_schedule(denoise, x, ref, path, 0.0, 1.0, 5, method="abm3", init="logsnr", iters=60)[1]
    assert both[1]["rms"] == min(info["rms"], other["rms"]) and both[1]["init"] == min((info, other), key=lambda i: i["rms"])["init"]
    save_schedule(tmp_path, "gauss", {5: ts}, 0.0, 1.0, method="abm3")
    assert json.loads((tmp_path / "gauss.json").read_text())["grids"]["5"][0] == 0.0
    fn = Sampler(tr).sample_ode(sampling_method="abm3", num_steps=5, schedule="optimized:gauss", schedule_dir=tmp_path)
    out = fn(x, model)[-1]
    assert float(((out - ref) ** 2).mean().sqrt()) == pytest.approx(info["rms"], rel=1e-5)
    with pytest.raises(ValueError, match="num_steps"):
        Sampler(tr).sample_ode(sampling_method="dpm++3m", num_steps=6, schedule="optimized:gauss", schedule_dir=tmp_path)
