"""Export -> import of the official format round-trips every size bit-exactly: SiT-S/2, SiT-XL/2 and the digits model."""
import json

import pytest
import torch
from safetensors.torch import save_file

from sit_workbench.checkpoint import load_sit, load_state_dict
from sit_workbench.run import export_official, import_official
from sit_workbench.config import config_to_dict, digits_config
from sit_workbench.model import SiT, SiT_models, infer_model_name


def _checkpoint_folder(folder, net, dtype=torch.float32, seed=0):
    """A checkpoint folder as the trainer writes it (model.safetensors, ema.pt, config.json, trainer_state.json), with
    random weights of `net`'s shapes (a meta model: no memory until the tensors are drawn) in `dtype`."""
    g = torch.Generator().manual_seed(seed)
    model = {k: torch.randn(v.shape, generator=g).mul_(0.02).to(dtype) for k, v in net.state_dict().items()}
    ema = {k: torch.randn(v.shape, generator=g).mul_(0.02).to(dtype) for k, v in net.state_dict().items()}
    folder.mkdir(parents=True)
    save_file(model, str(folder / "model.safetensors"))
    torch.save(ema, folder / "ema.pt")
    config = dict(net.config)
    if infer_model_name(config): config["model_name"] = infer_model_name(config)
    (folder / "config.json").write_text(json.dumps(config))
    cfg = config_to_dict(digits_config())
    cfg["model_config"].update({k: v for k, v in net.config.items() if k in cfg["model_config"]})
    (folder / "trainer_state.json").write_text(json.dumps({"step": 7, "config": cfg}))
    return model, ema


def _round_trip(tmp_path, net, dtype=torch.float32):
    model, ema = _checkpoint_folder(tmp_path / "checkpoint-7", net, dtype)
    pt = export_official(tmp_path / "checkpoint-7", tmp_path / "official.pt")
    for f in ("model.safetensors", "ema.pt"): (tmp_path / "checkpoint-7" / f).unlink()   # SiT-XL/2: GBs of disk each
    out = import_official(pt, tmp_path / "imported")          # no --model: the architecture comes from the file
    pt.unlink()
    assert json.loads((out / "config.json").read_text()) == json.loads((tmp_path / "checkpoint-7" / "config.json").read_text())
    got_model, got_ema = load_state_dict(out, prefer="model"), load_state_dict(out, prefer="ema")
    assert set(got_model) == set(model) == set(got_ema)
    for k in model:  # bit-exact (bf16 -> fp32 is exact)
        assert torch.equal(got_model[k], model[k].float()), k
        assert got_ema[k].dtype == ema[k].dtype and torch.equal(got_ema[k], ema[k]), k
    return out


def test_round_trip_digits(tmp_path):
    cfg = digits_config().model_config
    with torch.device("meta"):
        net = SiT(input_size=cfg.input_size, patch_size=cfg.patch_size, in_channels=cfg.in_channels,
                  hidden_size=cfg.hidden_size, depth=cfg.depth, num_heads=cfg.num_heads, num_classes=cfg.num_classes,
                  learn_sigma=cfg.learn_sigma)
    out = _round_trip(tmp_path, net)
    m = load_sit(out)          # a custom size: 4 heads, which no tensor shows, come from what export recorded
    assert m.config == net.config and m.num_heads == 4


def test_round_trip_s2(tmp_path):
    with torch.device("meta"): net = SiT_models["SiT-S/2"](input_size=16, num_classes=10)
    out = _round_trip(tmp_path, net)
    assert load_sit(out).model_name == "SiT-S/2"


def test_round_trip_xl2(tmp_path):
    "SiT-XL/2 at 256 px (675M parameters), in bf16 to halve the memory; the import holds it in fp32 (exact)."
    with torch.device("meta"): net = SiT_models["SiT-XL/2"]()
    _round_trip(tmp_path, net, dtype=torch.bfloat16)


def test_import_without_a_record_reads_the_tensors(tmp_path):
    with torch.device("meta"): net = SiT_models["SiT-B/4"](input_size=8, in_channels=1, num_classes=3, learn_sigma=False)
    sd = {k: torch.randn(v.shape) for k, v in net.state_dict().items()}
    torch.save({"model": sd, "ema": sd}, tmp_path / "raw.pt")
    assert load_sit(import_official(tmp_path / "raw.pt", tmp_path / "out")).config == net.config
    # a custom size without a record: the number of heads cannot be read off the tensors
    with torch.device("meta"): odd = SiT(input_size=8, in_channels=1, hidden_size=96, depth=3, num_heads=4)
    torch.save({k: torch.randn(v.shape) for k, v in odd.state_dict().items()}, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match="number of attention heads"):
        import_official(tmp_path / "odd.pt", tmp_path / "odd")
