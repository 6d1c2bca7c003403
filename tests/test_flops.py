"""The model's own FLOP count (`forward_flops`, torch.utils.flop_counter on the meta device) against the published
figure: SiT-XL/2 at 256x256 is 118.6 GMACs (the SiT/DiT papers' "118.6 Gflops" count a multiply-add once)."""
import pytest
import torch

from sit_workbench.model import SiT_models, forward_flops


def test_sit_xl2_256px_forward_is_118_6_gmacs():
    with torch.device("meta"):
        xl = SiT_models["SiT-XL/2"](input_size=32)
    flops = forward_flops(xl)
    assert flops / 2 / 1e9 == pytest.approx(118.6, rel=1e-3)   # 237.24 GFLOPs
    assert forward_flops(xl, batch=2) == flops                 # per image


def test_flops_scale_with_the_token_count():
    with torch.device("meta"):
        s2, s4 = SiT_models["SiT-S/2"](), SiT_models["SiT-S/4"]()
    # 4x fewer tokens: the linear layers cost 4x less, attention 16x less
    assert 4.0 < forward_flops(s2) / forward_flops(s4) < 4.4
