"""Slower checks of the transport API against closed forms (Gaussian data, exact fields as the model)."""
import math

import pytest
import torch

from sit_workbench.interpolants import DIFFUSION_FORMS, LinearPath
from sit_workbench.transport import (ADAPTIVE_METHODS, FIXED_METHODS, LogitNormal, Sampler, create_transport,
                                     estimate_velocity_loss)

from conftest import GAUSS, PATHS, PREDICTIONS, Strict, assert_moments, exact, noise


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_ode_and_sde_recover_gaussian_moments(path, prediction):
    tr = create_transport(path, prediction)
    s = Sampler(tr)
    z = noise(20_000)
    x = s.sample_ode()(z, exact(tr))[-1]
    assert_moments(x, slack=0.01, what=f"ODE {path}/{prediction}")
    x = s.sample_ode(sampling_method="heun2", num_steps=100)(z, exact(tr))[-1]
    assert_moments(x, slack=0.01, what=f"Heun {path}/{prediction}")
    torch.manual_seed(0)
    x = s.sample_sde(num_steps=500, last_step_size=0.01)(z, exact(tr))[-1]
    assert_moments(x, slack=0.02, what=f"SDE {path}/{prediction}")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_likelihood_matches_true_log_density(path, prediction):
    tr = create_transport(path, prediction)
    s = Sampler(tr)
    x = GAUSS.sample(500, generator=torch.Generator().manual_seed(1))
    true = GAUSS.log_prob(tr.path_sampler, x, 1.0)
    torch.manual_seed(0)
    logp, z = s.sample_ode_likelihood()(x, exact(tr))
    assert z.shape == x.shape
    assert (logp - true).mean().abs() < 0.1, f"Hutchinson: mean error {(logp - true).mean():.3f} nats"
    logp_exact, _ = s.sample_ode_likelihood(divergence="exact")(x, exact(tr))
    assert (logp_exact - true).abs().mean() < 0.1, f"exact divergence: {(logp_exact - true).abs().mean():.3f} nats"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_reverse_then_forward_returns_input(path, prediction):
    tr = create_transport(path, prediction)
    s = Sampler(tr)
    x = GAUSS.sample(200, generator=torch.Generator().manual_seed(2))
    z = s.sample_ode(reverse=True, rtol=1e-7, atol=1e-9)(x, exact(tr))[-1]
    assert (z - x).abs().max() > 0.1  # it really went somewhere
    back = s.sample_ode(rtol=1e-7, atol=1e-9)(z, exact(tr))[-1]
    torch.testing.assert_close(back, x, rtol=0, atol=5e-3 if path == "VP" else 1e-4)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_model_never_called_outside_interval(path, prediction):
    tr = create_transport(path, prediction)
    s = Sampler(tr)
    z = noise(32, dtype=torch.float32)
    fns = [s.sample_ode(sampling_method=m, num_steps=20) for m in ADAPTIVE_METHODS + FIXED_METHODS]
    fns += [s.sample_ode(reverse=True), s.sample_ode(reverse=True, sampling_method="rk4")]
    fns += [s.sample_sde(sampling_method=m, last_step=ls, diffusion_form=f, num_steps=30)
            for m in ("Euler", "Heun") for ls in (None, "Mean", "Tweedie", "Euler") for f in ("SBDM", "sigma")]
    fns += [s.sample_ode_likelihood(), s.sample_ode_likelihood(sampling_method="heun2", divergence="gaussian")]
    for fn in fns:
        model = Strict(tr, fn.t0, fn.t1)
        out = fn(z, model)
        final = out[0] if isinstance(out, tuple) else out[-1]
        assert torch.isfinite(final).all(), fn
        assert model.seen and fn.nfe == len(model.seen), fn


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("form", [f for f in DIFFUSION_FORMS if f != "w_KL_eta"] + ["w_KL_eta"])
def test_every_diffusion_form_recovers_moments_at_1000_steps(path, form):
    tr = create_transport(path, "velocity")
    s = Sampler(tr)
    extra = {}
    if form == "w_KL_eta":
        batches = [GAUSS.sample(4096, generator=torch.Generator().manual_seed(i)) for i in range(2)]
        torch.manual_seed(0)
        extra = dict(eta=0.5, velocity_loss=estimate_velocity_loss(tr, exact(tr), batches, num_bins=20))
    fn = s.sample_sde(diffusion_form=form, num_steps=1000, last_step_size=0.01, **extra)
    torch.manual_seed(0)
    x = fn(noise(10_000), exact(tr))[-1]
    assert torch.isfinite(x).all()
    assert_moments(x, slack=0.02, what=f"{path} {form}")


def test_w_kl_eta_interpolates_between_w_kl_and_ode():
    """eta = 0 is w_KL; a huge eta kills the noise except where L_t is large relative to w_KL."""
    tr = create_transport("Linear")
    prof = estimate_velocity_loss(tr, exact(tr), [GAUSS.sample(2048)], num_bins=10)
    x, t = torch.zeros(5, 3), torch.linspace(0.1, 0.9, 5)
    path = tr.path_sampler
    torch.testing.assert_close(path.compute_diffusion(x, t, "w_KL_eta", eta=0.0, velocity_loss=prof),
                               path.compute_diffusion(x, t, "w_KL"))
    small = path.compute_diffusion(x, t, "w_KL_eta", eta=1e6, velocity_loss=prof)
    assert (small < 1e-2 * path.compute_diffusion(x, t, "w_KL")).all()


def test_guided_model_kwargs_are_passed_and_counted_once():
    """Samplers take model.forward_with_cfg as the official sample.py passes it: one call per evaluation."""
    tr = create_transport()
    calls = []
    def forward_with_cfg(x, t, y, cfg_scale):
        calls.append((y.clone(), cfg_scale))
        return exact(tr)(x, t)
    z = noise(8)
    fn = Sampler(tr).sample_ode(sampling_method="euler", num_steps=11)
    fn(torch.cat([z, z]), forward_with_cfg, y=torch.arange(16), cfg_scale=4.0)
    assert fn.nfe == 10 == len(calls) and all(c[1] == 4.0 and c[0].shape == (16,) for c in calls)


def test_seeded_training_losses_are_reproducible_and_use_official_draw_order():
    tr = create_transport("GVP", "score", "likelihood")
    model = lambda x, t: -x
    x1 = GAUSS.sample(32).float()
    torch.manual_seed(7)
    a = tr.training_losses(model, x1)["loss"]
    torch.manual_seed(7)
    b = tr.training_losses(model, x1)["loss"]
    assert torch.equal(a, b)
    torch.manual_seed(7)
    x0 = torch.randn_like(x1)
    t = torch.rand(32) * (1 - 2e-3) + 1e-3
    _, xt, _ = tr.path_sampler.plan(t, x0, x1)
    sigma = torch.cos(t * math.pi / 2)[:, None]
    drift_var = (math.pi / 2 / torch.tan(t * math.pi / 2))[:, None]
    want = (drift_var / sigma ** 2 * (-xt * sigma + x0) ** 2).mean(1)
    torch.testing.assert_close(a, want, rtol=1e-4, atol=1e-5)


def test_logit_normal_time_sampler():
    tr = create_transport("VP", time_sampler=LogitNormal(0.0, 1.0))
    torch.manual_seed(0)
    t, _, _ = tr.sample(torch.zeros(20_000, 1))
    assert t.min() >= 0 and t.max() <= 1 - 1e-5
    logit = torch.logit(t.double() / (1 - 1e-5))
    assert abs(float(logit.mean())) < 0.05 and abs(float(logit.std()) - 1) < 0.05
    tr_default = create_transport("VP")
    torch.manual_seed(0)
    t2, _, _ = tr_default.sample(torch.zeros(20_000, 1))
    assert abs(float(t2.mean()) - 0.5) < 0.01  # uniform by default


def test_custom_path_samples_like_linear():
    tr = create_transport(LinearPath())
    custom = create_transport(__import__("sit_workbench.interpolants", fromlist=["CustomPath"]).CustomPath(
        lambda t: t ** 2, lambda t: 1 - t ** 2))
    x = Sampler(custom).sample_ode()(noise(10_000), exact(custom))[-1]
    assert_moments(x, slack=0.01, what="custom path t^2")
    assert tr.path_type.name == "CUSTOM" and custom.path_type.name == "CUSTOM"
