"""Heavier checks of sit_workbench.model: official parameter counts and key layout, checkpoint formats,
safe loading, download failure messages, guidance and attention numerics."""
import argparse
import json
import math
import os

import pytest
import torch

import sit_workbench.checkpoint as CK
import sit_workbench.model as M
from sit_workbench.model import SiT, SiT_models, Attention, count_params
from sit_workbench.checkpoint import load_into, load_sit, load_state_dict, save_pretrained, CheckpointDownloadError



@pytest.fixture(autouse=True)
def _inference_only():
    "These checks need no gradients; scoped per test so other test modules keep autograd."
    with torch.no_grad():
        yield

# Facts about the official checkpoints (github.com/willisma/SiT): parameter counts with default kwargs
# (input_size 32, in_channels 4, 1000 classes, learn_sigma True, class_dropout 0.1), pos_embed included.
OFFICIAL_COUNTS = {
    "SiT-S/2": 32_963_360,
    "SiT-B/2": 130_512_416,
    "SiT-L/2": 458_102_816,
    "SiT-XL/2": 675_129_632,
    "SiT-XL/4": 675_074_432,
    "SiT-XL/8": 675_683_072,
}

# SiT-XL/2 (256px) state-dict layout; `blocks.0.` repeats for blocks 0..27.
XL2_TOP = {
    "pos_embed": (1, 256, 1152),
    "x_embedder.proj.weight": (1152, 4, 2, 2),
    "x_embedder.proj.bias": (1152,),
    "t_embedder.mlp.0.weight": (1152, 256),
    "t_embedder.mlp.0.bias": (1152,),
    "t_embedder.mlp.2.weight": (1152, 1152),
    "t_embedder.mlp.2.bias": (1152,),
    "y_embedder.embedding_table.weight": (1001, 1152),
    "final_layer.linear.weight": (32, 1152),
    "final_layer.linear.bias": (32,),
    "final_layer.adaLN_modulation.1.weight": (2304, 1152),
    "final_layer.adaLN_modulation.1.bias": (2304,),
}
XL2_BLOCK = {
    "attn.qkv.weight": (3456, 1152),
    "attn.qkv.bias": (3456,),
    "attn.proj.weight": (1152, 1152),
    "attn.proj.bias": (1152,),
    "mlp.fc1.weight": (4608, 1152),
    "mlp.fc1.bias": (4608,),
    "mlp.fc2.weight": (1152, 4608),
    "mlp.fc2.bias": (1152,),
    "adaLN_modulation.1.weight": (6912, 1152),
    "adaLN_modulation.1.bias": (6912,),
}
TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)


def tiny(**kw):
    return SiT(**{**TINY, **kw})


def randomize_(model, std=0.1, seed=0):
    "Random values for every parameter but the fixed pos_embed, so that no branch is gated off."
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name != "pos_embed":
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def meta_model(name, **kw):
    with torch.device("meta"):
        return SiT_models[name](**kw)


def assert_same_tensors(a: dict, b: dict):
    assert list(a) == list(b) or set(a) == set(b), set(a) ^ set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------- architecture facts

@pytest.mark.parametrize("name", list(OFFICIAL_COUNTS))
def test_official_parameter_counts(name):
    assert count_params(meta_model(name)) == OFFICIAL_COUNTS[name]


def test_all_twelve_configs():
    expected = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6)}
    want = {f"SiT-{s}/{p}" for s in expected for p in (2, 4, 8)}
    assert set(SiT_models) == want
    for name in want:
        size, patch = name[4:].split("/")
        m = meta_model(name)
        depth, hidden, heads = expected[size]
        assert (len(m.blocks), m.pos_embed.shape[-1], m.num_heads, m.patch_size) == (depth, hidden, heads, int(patch))
        assert m.model_name == name
        # pass-through kwargs as in the official constructors
        m2 = meta_model(name, input_size=16, in_channels=3, num_classes=7, class_dropout_prob=0.0,
                        learn_sigma=False, mlp_ratio=2.0)
        assert m2.config["in_channels"] == 3 and m2.y_embedder.embedding_table.num_embeddings == 7
        assert m2.blocks[0].mlp.fc1.out_features == 2 * hidden
        assert m2.final_layer.linear.out_features == int(patch) ** 2 * 3
    # the named constructors exist at module level, like the official ones
    assert M.SiT_XL_2 is SiT_models["SiT-XL/2"] and M.SiT_S_8 is SiT_models["SiT-S/8"]


def test_xl2_keys_and_shapes():
    sd = meta_model("SiT-XL/2").state_dict()
    expected = dict(XL2_TOP)
    for i in range(28):
        expected.update({f"blocks.{i}.{k}": v for k, v in XL2_BLOCK.items()})
    assert set(sd) == set(expected), sorted(set(sd) ^ set(expected))[:10]
    for k, shape in expected.items():
        assert tuple(sd[k].shape) == shape, (k, tuple(sd[k].shape), shape)
    assert sum(math.prod(s) for s in expected.values()) == OFFICIAL_COUNTS["SiT-XL/2"]


def test_pos_embed_matches_official_table():
    pe = SiT_models["SiT-S/8"](input_size=128).pos_embed  # 16x16 grid, like XL/2 at 256px
    pe_xl = torch.from_numpy(M.sincos_2d(1152, 16)).float()
    assert pe.shape == (1, 256, 384) and not pe.requires_grad
    # reference values computed with the official get_2d_sincos_pos_embed(1152, 16)
    assert abs(pe_xl.double().sum().item() - 134598.94786477927) < 1e-2
    assert pe_xl[17, 1].item() == pytest.approx(0.8240513478391093, abs=1e-7)
    # token 2 is row 0, column 2: the first half of the channels encodes the column
    assert pe_xl[2, 0].item() == pytest.approx(math.sin(2.0), abs=1e-7)
    assert pe_xl[2, 576].item() == 0.0


def test_fresh_model_outputs_zero_and_matches_official_numbers():
    torch.manual_seed(0)
    m = tiny().eval()
    x, t, y = torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([0, 5, 10])
    assert torch.equal(m(x, t, y), torch.zeros(3, 4, 8, 8))
    # reference numbers produced by the official models.py with the same weights and inputs
    g = torch.Generator().manual_seed(0)
    for name, p in m.named_parameters():  # same parameter order as the official model
        if name != "pos_embed":
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    x = torch.randn(3, 4, 8, 8, generator=g)
    out = m(x, torch.tensor([0.1, 0.5, 0.9]), torch.tensor([0, 5, 10]))
    ref = [0.5325524806976318, -0.2556370496749878, 0.848242998123169, 0.08735194057226181,
           0.5985379219055176, 0.021506860852241516]
    torch.testing.assert_close(out.flatten()[:6], torch.tensor(ref), atol=1e-5, rtol=1e-5)
    assert out.double().abs().sum().item() == pytest.approx(562.6685766652226, rel=1e-5)
    cfg = m.forward_with_cfg(torch.cat([x[:1], x[:1]]), torch.tensor([0.5, 0.5]), torch.tensor([3, 10]), 4.0)
    assert cfg.double().sum().item() == pytest.approx(-75.26287375204265, rel=1e-5)
    assert cfg.double().abs().sum().item() == pytest.approx(355.6509525757283, rel=1e-5)


# ---------------------------------------------------------------- numerics

def test_sdpa_matches_explicit_softmax_attention():
    m = randomize_(tiny(), seed=3)
    x, t, y = torch.randn(4, 4, 8, 8), torch.rand(4), torch.tensor([1, 2, 3, 10])
    fused = m(x, t, y)
    for mod in m.modules():
        if isinstance(mod, Attention):
            mod.fused = False
    explicit = m(x, t, y)
    assert fused.abs().max() > 0.1  # the comparison is not trivially between zeros
    assert (fused - explicit).abs().max().item() < 1e-5


def test_attention_layout_matches_timm():
    timm_vit = pytest.importorskip("timm.models.vision_transformer")
    torch.manual_seed(0)
    ours = Attention(96, num_heads=6)
    ref = timm_vit.Attention(96, num_heads=6, qkv_bias=True)
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 17, 96)
    # an independent softmax(QK^T/sqrt(d))V with the (3, heads, head_dim) qkv layout
    qkv = ours.qkv(x).view(2, 17, 3, 6, 16)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    att = torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1) @ v
    manual = ours.proj(att.transpose(1, 2).reshape(2, 17, 96))
    assert (ours(x) - ref(x)).abs().max().item() < 1e-5
    assert (ours(x) - manual).abs().max().item() < 1e-5


def test_cfg_scale_one_is_conditional_forward():
    m = randomize_(tiny(), seed=4)
    z, lab = torch.randn(3, 4, 8, 8), torch.tensor([1, 2, 3])
    x, y = torch.cat([z, z]), torch.cat([lab, torch.full((3,), m.null_class)])
    t = torch.rand(3).repeat(2)
    out = m.forward_with_cfg(x, t, y, 1.0)
    full = m(x, t, y)
    assert torch.equal(out[:3], full[:3])               # same computation: bit-exact
    assert torch.equal(out[3:, :3], full[:3, :3])       # the guided half is duplicated
    assert (out[:3] - m(z, t[:3], lab)).abs().max().item() < 1e-5  # other batch size: rounding only
    # and with guidance on, channels 0-2 move, channel 3 (official quirk) keeps each half's own prediction
    g = m.forward_with_cfg(x, t, y, 3.0)
    assert (g[:3, :3] - full[:3, :3]).abs().max() > 1e-3
    assert torch.equal(g[:, 3:], full[:, 3:])
    gall = m.forward_with_cfg(x, t, y, 3.0, cfg_channels=None)
    torch.testing.assert_close(gall[:3], full[3:] + 3.0 * (full[:3] - full[3:]), atol=1e-5, rtol=1e-5)
    # guidance interval: t outside [0.9, 1] -> conditional prediction
    t2 = torch.tensor([0.1, 0.95, 0.5]).repeat(2)
    gi = m.forward_with_cfg(x, t2, y, 3.0, cfg_channels=None, cfg_interval=(0.9, 1.0))
    f2 = m(x, t2, y)
    assert torch.equal(gi[0], f2[0]) and torch.equal(gi[2], f2[2])
    assert (gi[1] - f2[1]).abs().max() > 1e-3


def test_forward_errors_are_clear():
    m = tiny()
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"x must have shape \(N, 4, 8, 8\).*got \(2, 4, 32, 32\)"):
        m(torch.randn(2, 4, 32, 32), t, y)
    with pytest.raises(ValueError, match=r"got \(2, 3, 8, 8\)"):
        m(torch.randn(2, 3, 8, 8), t, y)
    with pytest.raises(ValueError, match=r"t must be a scalar or have shape \(2,\)"):
        m(x, torch.rand(2, 1), y)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\].*\[0, 11\]"):
        m(x, t, torch.tensor([0, 11]))
    with pytest.raises(ValueError, match="even batch"):
        m.forward_with_cfg(torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([0, 1, 10]), 2.0)
    assert m(x, 0.5, y).shape == (2, 4, 8, 8)


# ---------------------------------------------------------------- checkpoints

def test_official_training_checkpoint_loads_and_prefers_ema(tmp_path):
    model, ema = randomize_(tiny(), seed=5), randomize_(tiny(), seed=6)
    opt = torch.optim.AdamW([p for p in tiny().parameters() if p.requires_grad], lr=1e-4)
    with torch.enable_grad():
        sum(p.sum() for g in opt.param_groups for p in g["params"]).backward()
    opt.step()
    args = argparse.Namespace(model="SiT-XL/2", image_size=64, num_classes=10, global_batch_size=256,
                              path_type="Linear", prediction="velocity", ckpt=None, wandb=False)
    path = tmp_path / "0010000.pt"
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "args": args}, path)

    sd = load_state_dict(path)
    assert_same_tensors(sd, ema.state_dict())
    assert_same_tensors(load_state_dict(path, prefer="model"), model.state_dict())
    fresh = tiny()
    fresh.load_state_dict(sd, strict=True)  # plain strict torch load works on the returned dict
    assert_same_tensors(fresh.state_dict(), ema.state_dict())
    # the released checkpoint is a raw state dict, possibly saved from a DDP wrapper
    raw = tmp_path / "raw.pt"
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, raw)
    assert_same_tensors(load_state_dict(raw), model.state_dict())


def test_load_sit_builds_zoo_model_from_pt(tmp_path):
    src = SiT_models["SiT-S/8"](input_size=16, num_classes=10, learn_sigma=False)
    randomize_(src, std=0.02, seed=7)
    torch.save({"model": src.state_dict(), "ema": src.state_dict()}, tmp_path / "s8.pt")
    m = load_sit(tmp_path / "s8.pt", model="SiT-S/8", input_size=16, num_classes=10, learn_sigma=False)
    assert isinstance(m, SiT) and not m.training and m.model_name == "SiT-S/8"
    assert not m.pos_embed.requires_grad and not any(p.is_meta for p in m.parameters())
    assert_same_tensors(m.state_dict(), src.state_dict())
    x, t, y = torch.randn(2, 4, 16, 16), torch.rand(2), torch.tensor([3, 10])
    assert torch.equal(m(x, t, y), src(x, t, y))
    with pytest.raises(ValueError, match=r"final_layer\.linear\.weight.*\(512, 384\).*\(256, 384\).*learn_sigma=False"):
        load_sit(tmp_path / "s8.pt", model="SiT-S/8", input_size=16, num_classes=10)
    with pytest.raises(ValueError, match="unknown model"):
        load_sit(tmp_path / "s8.pt", model="SiT-M/3")


def test_safetensors_round_trip_bit_exact(tmp_path):
    model = randomize_(SiT_models["SiT-S/8"](input_size=16, num_classes=10), std=0.02, seed=8)
    ema = randomize_(SiT_models["SiT-S/8"](input_size=16, num_classes=10), std=0.02, seed=9)
    d = save_pretrained(model, tmp_path / "run", ema=ema)
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "ema.safetensors", "model.safetensors"]
    cfg = json.loads((d / "config.json").read_text())
    assert cfg == {**model.config, "model_name": "SiT-S/8"}
    assert_same_tensors(load_state_dict(d / "model.safetensors"), model.state_dict())
    assert_same_tensors(load_state_dict(d), ema.state_dict())
    assert_same_tensors(load_state_dict(d, prefer="model"), model.state_dict())
    for prefer, ref in (("model", model), ("ema", ema)):
        m = load_sit(d, prefer=prefer)
        assert m.config == model.config and m.model_name == "SiT-S/8" and not m.training
        assert_same_tensors(m.state_dict(), ref.state_dict())
    # without ema only model.safetensors is written and prefer="ema" falls back to it
    d2 = save_pretrained(model, tmp_path / "noema")
    assert not (d2 / "ema.safetensors").exists()
    assert_same_tensors(load_state_dict(d2), model.state_dict())


def test_mismatched_shape_error_names_key_and_shapes(tmp_path):
    sd = randomize_(tiny(input_size=16)).state_dict()
    with pytest.raises(ValueError) as e:
        load_into(tiny(), sd)
    msg = str(e.value)
    assert "'pos_embed'" in msg and "(1, 16, 64)" in msg and "(1, 64, 64)" in msg and "input_size" in msg
    sd = tiny(learn_sigma=False).state_dict()
    with pytest.raises(ValueError, match=r"'final_layer\.linear\.weight': model expects \(32, 64\) but the checkpoint "
                                         r"has \(16, 64\).*learn_sigma=False"):
        load_into(tiny(), sd)
    with pytest.raises(ValueError, match=r"missing keys.*blocks\.2"):
        load_into(tiny(depth=3), tiny().state_dict())
    with pytest.raises(ValueError, match=r"unexpected keys.*'extra'"):
        load_into(tiny(), {**tiny().state_dict(), "extra": torch.zeros(1)})


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Custom:
    def __init__(self):
        self.w = torch.ones(2)


def test_pickle_with_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"model": {"pos_embed": torch.zeros(1)}, "payload": _Evil(marker)}, evil)
    with pytest.raises(ValueError, match="refuses to unpickle code") as e:
        load_state_dict(evil)
    assert "safetensors" in str(e.value)
    with pytest.raises(ValueError, match="refuses to unpickle code"):
        load_sit(evil, model="SiT-S/8")
    assert not marker.exists()
    custom = tmp_path / "custom.pt"
    torch.save({"ema": {"w": torch.ones(2)}, "obj": _Custom()}, custom)
    with pytest.raises(ValueError, match="refuses to unpickle code"):
        load_state_dict(custom)
    garbage = tmp_path / "garbage.pt"
    garbage.write_text("<html>not a checkpoint</html>")
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        load_state_dict(garbage)


def test_missing_path_and_failed_download_messages(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="nothing-here.pt"):
        load_state_dict(tmp_path / "nothing-here.pt")
    name = "SiT-XL-2-256x256.pt"
    monkeypatch.setitem(CK.PRETRAINED_URLS, name, "http://127.0.0.1:9/x.pt")
    monkeypatch.setenv("SIT_WORKBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    for fn in (lambda: load_state_dict(name), lambda: load_sit(name)):
        with pytest.raises(CheckpointDownloadError) as e:
            fn()
        msg = str(e.value)
        assert isinstance(e.value, ValueError)          # a UserError: the command line's one line
        assert "Could not download" in msg and "offline" in msg
        assert f"--ckpt /path/to/{name}" in msg and f"load_state_dict('/path/to/{name}')" in msg
    assert not any((tmp_path / "cache").glob("*.part"))  # no half-written files left behind
    # once present in the cache, the name resolves without any network access
    sd = tiny().state_dict()
    torch.save(sd, tmp_path / "cache" / name)
    assert_same_tensors(load_state_dict(name), sd)


def test_gradient_checkpointing_gives_the_same_gradients():
    with torch.enable_grad():
        torch.manual_seed(0)
        m = tiny()
        for p in m.parameters():
            torch.nn.init.normal_(p, std=0.05)
        m.train()
        x, t, y = torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([1, 2, 3])
        grads = []
        for flag in (False, True):
            m.zero_grad()
            m.gradient_checkpointing = flag
            torch.manual_seed(1)  # same class-dropout draw
            m(x, t, y).square().sum().backward()
            grads.append([p.grad.clone() for p in m.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_training_checkpoint_directory_with_ema_pt(tmp_path):
    m, e = tiny(), tiny()
    for p in e.parameters():
        torch.nn.init.normal_(p, std=0.05)
    save_pretrained(m, tmp_path)  # model.safetensors + config.json
    torch.save({k: v.clone() for k, v in e.state_dict().items()}, tmp_path / "ema.pt")
    got = load_state_dict(tmp_path)  # prefers the EMA
    assert all(torch.equal(got[k], v) for k, v in e.state_dict().items())
    got = load_state_dict(tmp_path, prefer="model")
    assert all(torch.equal(got[k], v) for k, v in m.state_dict().items())
