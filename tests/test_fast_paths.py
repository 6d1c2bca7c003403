"""The fast paths that are defaults give the numbers of the plain paths: foreach EMA (bit for bit), fused AdamW and
SDPA attention (fp32 rounding), bf16 autocast (bf16 tolerance), the batched guided forward against two forwards, and
the guidance-interval skip of the unconditional half. Small models; the whole file runs in a few seconds."""
import copy

import pytest
import torch

from sit_workbench.config import TrainConfig, digits_config
from sit_workbench.model import Attention, SiT
from sit_workbench.train import build_optimizer, update_ema
from sit_workbench.transport import Sampler, create_transport


def small(seed=0, **kw):
    "A small SiT with every weight random (the zero-initialised adaLN would make outputs trivially zero)."
    torch.manual_seed(seed)
    m = SiT(**{**dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4,
                      num_classes=10, learn_sigma=True), **kw})
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name != "pos_embed":
                p.normal_(std=0.05)
    return m


def batch(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, 8, 8, generator=g), torch.rand(n, generator=g), torch.randint(0, 10, (n,), generator=g)


def set_attention(model, fused):
    for mod in model.modules():
        if isinstance(mod, Attention):
            mod.fused = fused


def loss_and_grads(model, x, t, y, autocast=False):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(x, t, y)
    loss = out.float().square().mean()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


# ------------------------------------------------------------------------------ training step
def test_foreach_ema_is_bit_identical_to_the_per_tensor_loop():
    model, ema = small(seed=0), small(seed=1).requires_grad_(False)
    fast, plain = copy.deepcopy(ema), copy.deepcopy(ema)
    for _ in range(3):
        update_ema(fast, model, 0.9999)                 # the default: two torch._foreach calls
        update_ema(plain, model, 0.9999, foreach=False)
    for (name, a), b, e in zip(fast.named_parameters(), plain.parameters(), ema.parameters()):
        assert torch.equal(a, b), name
        if name != "pos_embed":
            assert not torch.equal(a, e), name           # the EMA did move
    assert torch.equal(fast.pos_embed, ema.pos_embed)   # the frozen table is left alone


def test_fused_adamw_is_the_default_and_matches_per_tensor_adamw():
    assert TrainConfig().optim == "adamw_torch_fused"
    models = {o: small(seed=0) for o in ("adamw_torch_fused", "adamw_torch")}
    opts = {o: build_optimizer(m, digits_config(optim=o, warmup_steps=0), max_steps=10) for o, m in models.items()}
    assert opts["adamw_torch_fused"][0].defaults["fused"] is True
    assert not opts["adamw_torch"][0].defaults["fused"]
    x, t, y = batch()
    fused, plain = models["adamw_torch_fused"], models["adamw_torch"]
    for step in range(4):
        # the same gradients on both sides (those of the fused model's weights), so that only the optimizers differ:
        # recomputed on each side, the ~1e-10 rounding noise of gradients that are zero in exact arithmetic (the key
        # bias: softmax ignores it) is blown up to full-size steps by Adam's normalisation
        fused.train(); torch.manual_seed(step)
        loss_and_grads(fused, x, t, y)
        for a, b in zip(fused.parameters(), plain.parameters()):
            b.grad = None if a.grad is None else a.grad.clone()
        for o in models:
            opts[o][0].step(); opts[o][1].step()
    moved = max((a - b).abs().max().item() for a, b in zip(fused.parameters(), small(seed=0).parameters()))
    assert moved > 1e-3                                 # lr 1e-3 for 4 steps: the weights did change
    for (name, a), b in zip(fused.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


def test_sdpa_gives_the_math_attention_forward_and_gradients():
    m = small(seed=2).train()
    x, t, y = batch(seed=3)
    torch.manual_seed(0)
    loss_sdpa, g_sdpa = loss_and_grads(m, x, t, y)
    set_attention(m, False)
    torch.manual_seed(0)
    loss_math, g_math = loss_and_grads(m, x, t, y)
    assert loss_sdpa.item() > 1e-3
    torch.testing.assert_close(loss_sdpa, loss_math, rtol=1e-5, atol=1e-7)
    for a, b in zip(g_sdpa, g_math):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_bf16_autocast_matches_fp32_to_bf16_tolerance():
    m = small(seed=4).eval()                            # eval: no class dropout, same labels on both sides
    x, t, y = batch(seed=5)
    loss32, g32 = loss_and_grads(m, x, t, y)
    loss16, g16 = loss_and_grads(m, x, t, y, autocast=True)
    assert rel_err(loss16, loss32) < 2e-2               # bf16 keeps 8 bits of mantissa: ~0.4% per rounding
    assert all(rel_err(a, b) < 5e-2 for a, b in zip(g16, g32))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        sdpa = m(x, t, y)
        set_attention(m, False)
        math = m(x, t, y)
    assert rel_err(sdpa, math) < 2e-2                   # SDPA under bf16 agrees with the math path too


# ------------------------------------------------------------------------------ sampling
def guided_reference(m, z, t, labels, scale, channels=3):
    "Classifier-free guidance with two separate forwards (conditional, unconditional)."
    cond = m(z, t, labels)
    uncond = m(z, t, torch.full_like(labels, m.null_class))
    k = channels
    guided = uncond[:, :k] + scale * (cond[:, :k] - uncond[:, :k])
    return torch.cat([guided, cond[:, k:]], dim=1)


@pytest.mark.parametrize("channels", [3, None])
def test_batched_guided_forward_matches_two_forwards(channels):
    m = small(seed=6).eval()
    z, t, labels = batch(n=3, seed=7)
    x, y = torch.cat([z, z]), torch.cat([labels, torch.full_like(labels, m.null_class)])
    with torch.no_grad():
        fast = m.forward_with_cfg(x, t.repeat(2), y, 4.0, cfg_channels=channels)
        ref = guided_reference(m, z, t, labels, 4.0, channels=4 if channels is None else channels)
    torch.testing.assert_close(fast[:3], ref, rtol=1e-5, atol=1e-6)


class CountingModel(torch.nn.Module):
    "Wraps a SiT; records the batch size of every network evaluation."
    def __init__(self, m):
        super().__init__()
        self.m, self.sizes = m, []
        m.x_embedder.register_forward_hook(lambda mod, inp, out: self.sizes.append(inp[0].shape[0]))


def test_guidance_interval_skip_gives_the_plain_samples_at_lower_cost():
    m = small(seed=8).eval()
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(9))
    labels = torch.tensor([1, 7])
    x, y = torch.cat([z, z]), torch.cat([labels, torch.full_like(labels, m.null_class)])
    counter = CountingModel(m)
    fn = Sampler(create_transport()).sample_ode(sampling_method="heun2", num_steps=11)
    out = {}
    for skip in (True, False):
        counter.sizes.clear()
        with torch.no_grad():
            out[skip] = fn(x, m.forward_with_cfg, y=y, cfg_scale=4.0, cfg_interval=(0.3, 0.7), skip_unguided=skip)[-1]
        sizes = list(counter.sizes)
        if skip:
            assert 2 in sizes and 4 in sizes            # half batch outside the interval, full batch inside
        else:
            assert set(sizes) == {4}
    assert fn.nfe == 20                                 # heun2: 2 evaluations per interval, 10 intervals
    torch.testing.assert_close(out[True][:2], out[False][:2], rtol=1e-5, atol=1e-5)
    assert (out[True][:2] - z).abs().max() > 0.1        # the sample moved away from the noise
