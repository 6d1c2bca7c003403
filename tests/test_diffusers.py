"SiT in diffusers: save / reload / sample round trips offline, against our own sampling path, and official checkpoints."
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sit_workbench.config import digits_config
from sit_workbench.registry import DEFAULT_SAMPLER
from sit_workbench.checkpoint import load_into, load_sit, load_state_dict
from sit_workbench.model import SiT, SiT_models
from sit_workbench.pipeline import (SiTPipeline, SiTScheduler, SiTTransformer2DModel, export_diffusers,
                                    read_card_data)
from sit_workbench.sample import Guidance, generate, sample_noise
from sit_workbench.train import train
from sit_workbench.transport import Sampler, create_transport


@pytest.fixture(scope="module")
def digits_ckpt(tmp_path_factory):
    "A digits run of a few steps (the demo's model and config, trained briefly)."
    out = tmp_path_factory.mktemp("digits")
    res = train(digits_config(max_steps=6, save_steps=6, warmup_steps=2, output_dir=str(out)), progress=False)
    return Path(res["checkpoint"])


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_digits_export_reload_same_pixels(digits_ckpt, tmp_path):
    "Done when: SiTPipeline.from_pretrained(<exported digits model>)(class_labels=[3], generator=...) = our pixels."
    dst = export_diffusers(digits_ckpt, tmp_path / "pipe")
    assert {p.name for p in dst.iterdir()} == {"model_index.json", "README.md", "transformer", "scheduler", "run.json"}
    pipe = _quiet(SiTPipeline.from_pretrained(dst))
    assert pipe.vae is None and isinstance(pipe.transformer, SiTTransformer2DModel)
    cfg = digits_config()
    # the scheduler carries the run's transport, guidance and sampler (the registry's default for a run of ours)
    sc = pipe.scheduler.config
    assert (sc.path_type, sc.prediction, sc.guidance_scale) == ("Linear", "velocity", cfg.model_config.cfg_scale)
    assert pipe.scheduler.spec == DEFAULT_SAMPLER
    # the EMA weights, keys unchanged
    ema = load_sit(digits_ckpt, prefer="ema")
    sd, ref = pipe.transformer.state_dict(), ema.state_dict()
    assert list(sd) == list(ref) and all(torch.equal(sd[k], ref[k]) for k in ref)

    images = pipe(class_labels=[3], generator=torch.Generator().manual_seed(0), output_type="np").images
    fn = DEFAULT_SAMPLER.build(create_transport())
    ours = generate(ema, fn, [3], Guidance(cfg.model_config.cfg_scale, None, None), seed=0).images
    assert images.shape == (1, 8, 8, 1)
    assert np.array_equal(images, ours.permute(0, 2, 3, 1).numpy())          # bit for bit
    pil = pipe(class_labels=["3"], generator=torch.Generator().manual_seed(0)).images[0]
    assert pil.size == (8, 8) and np.array_equal(np.asarray(pil), (images[0, :, :, 0] * 255).round().astype(np.uint8))

    # the card names path, prediction, sampler and training data, and survives a reload and a second save
    card = read_card_data(dst / "transformer")
    assert card["transport"]["path_type"] == "Linear" and card["sampler"]["sampling_method"] == "heun2"
    assert card["sampler"]["guidance"]["scale"] == cfg.model_config.cfg_scale
    assert card["training_data"].startswith("digits") and card["training_steps"] == 6
    assert "| training data | digits" in (dst / "README.md").read_text()
    pipe.save_pretrained(tmp_path / "again")
    assert read_card_data(tmp_path / "again") == read_card_data(dst)


def test_sampler_options_and_sde_reproducible(digits_ckpt, tmp_path):
    pipe = _quiet(SiTPipeline.from_pretrained(export_diffusers(digits_ckpt, tmp_path / "pipe")))
    ema = load_sit(digits_ckpt)
    g = lambda: torch.Generator().manual_seed(5)
    # sampling method, steps and guidance interval as call arguments = the same Sampler + forward_with_cfg by hand
    out = pipe(class_labels=[1, 2], num_inference_steps=4, sampling_method="euler", guidance_scale=3.0,
               guidance_interval=(0.0, 0.5), generator=g(), output_type="latent").images
    z = sample_noise(range(2), (1, 8, 8), seed=5)
    fn = Sampler(create_transport()).sample_ode(sampling_method="euler", num_steps=5)
    with torch.no_grad():
        hand = fn(torch.cat([z, z]), ema.forward_with_cfg, y=torch.tensor([1, 2, 10, 10]), cfg_scale=3.0,
                  cfg_channels=None, cfg_interval=(0.0, 0.5))[-1][:2]
    assert torch.equal(out, hand)
    # SDE: the same generator gives the same samples, and the global random state is left alone
    state = torch.get_rng_state()
    a = pipe(class_labels=[4], mode="SDE", num_inference_steps=5, generator=g(), output_type="latent").images
    assert torch.equal(torch.get_rng_state(), state)
    b = pipe(class_labels=[4], mode="SDE", num_inference_steps=5, generator=g(), output_type="latent").images
    c = pipe(class_labels=[4], mode="SDE", num_inference_steps=5, generator=torch.Generator().manual_seed(6),
             output_type="latent").images
    assert torch.equal(a, b) and not torch.equal(a, c)
    # any Sampler function can be passed in
    sde = Sampler(create_transport()).sample_sde(num_steps=4)
    d = pipe(class_labels=[4], sample_fn=sde, guidance_scale=1.0, generator=g(), output_type="latent").images
    assert d.shape == (1, 1, 8, 8) and torch.isfinite(d).all()


def _tiny_vae():
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, norm_num_groups=4, sample_size=8).eval()


def test_latent_model_with_local_vae(tmp_path):
    torch.manual_seed(1)
    net = SiT(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=1000).eval()
    for p in net.parameters(): torch.nn.init.normal_(p, std=0.1)
    vae = _tiny_vae()
    pipe = SiTPipeline(transformer=SiTTransformer2DModel.from_sit(net), vae=vae,
                       scheduler=SiTScheduler(guidance_scale=1.5, sampler={"sampling_method": "heun2", "num_steps": 4}))
    pipe.save_pretrained(tmp_path / "pipe")
    assert json.loads((tmp_path / "pipe" / "model_index.json").read_text())["vae"] == ["diffusers", "AutoencoderKL"]
    back = _quiet(SiTPipeline.from_pretrained(tmp_path / "pipe"))
    labels = back.get_label_ids(["golden retriever", "tench"])
    assert labels == [207, 0]
    images = back(class_labels=labels, generator=torch.Generator().manual_seed(0), output_type="pt").images
    fn = Sampler(create_transport()).sample_ode(sampling_method="heun2", num_steps=4)
    ours = generate(net, fn, labels, Guidance(1.5, None, None), vae=vae, seed=0).images
    assert images.shape == (2, 3, 8, 8) and torch.equal(images, ours)       # bit for bit, through the VAE
    assert read_card_data(tmp_path / "pipe")["latent"] is True


def _official_blob(seed):
    "A small official-format training checkpoint: {model, ema, opt, args} of a SiT-S/8 (16x16 latents, 10 classes)."
    torch.manual_seed(seed)
    m = SiT_models["SiT-S/8"](input_size=16, num_classes=10)
    e = SiT_models["SiT-S/8"](input_size=16, num_classes=10)
    return {"model": m.state_dict(), "ema": e.state_dict(), "opt": {}, "args": argparse.Namespace(model="SiT-S/8")}


def test_official_checkpoint_converts_and_loads_strict_both_ways(tmp_path):
    blob = _official_blob(0)
    pt = tmp_path / "official.pt"
    torch.save(blob, pt)
    dst = export_diffusers(pt, tmp_path / "pipe", model="SiT-S/8", vae=None)
    dm = SiTTransformer2DModel.from_pretrained(dst / "transformer")
    assert json.loads((dst / "scheduler" / "scheduler_config.json").read_text())["cfg_channels"] == 3
    assert json.loads((dst / "run.json").read_text())["sampler"]["sampling_method"] == "dopri5"   # the official sample.py's
    # official -> diffusers layout: the same keys in the same order, the EMA tensors exactly
    sd = dm.state_dict()
    assert list(sd) == list(blob["ema"]) and all(torch.equal(sd[k], blob["ema"][k]) for k in sd)
    # diffusers layout -> official: a plain SiT and an official .pt load it strictly
    plain = SiT_models["SiT-S/8"](input_size=16, num_classes=10)
    plain.load_state_dict(sd, strict=True)
    torch.save(sd, tmp_path / "back.pt")
    again = load_sit(tmp_path / "back.pt", model="SiT-S/8", input_size=16, num_classes=10)
    assert all(torch.equal(again.state_dict()[k], blob["ema"][k]) for k in sd)
    # the full-size layout is the official one: SiT-XL/2 keys and shapes (meta tensors, no memory)
    with torch.device("meta"):
        xl_dm = SiTTransformer2DModel(input_size=32, num_classes=1000)
        xl = SiT_models["SiT-XL/2"](input_size=32, num_classes=1000)
    assert [(k, v.shape) for k, v in xl_dm.state_dict().items()] == [(k, v.shape) for k, v in xl.state_dict().items()]
    assert sum(v.numel() for v in xl_dm.state_dict().values()) == 675129632


def test_from_pretrained_is_strict(tmp_path):
    torch.manual_seed(0)
    net = SiT(input_size=4, patch_size=2, in_channels=1, hidden_size=16, depth=2, num_heads=2, num_classes=10)
    SiTTransformer2DModel.from_sit(net).save_pretrained(tmp_path / "m")
    cfg_path = tmp_path / "m" / "config.json"
    good = json.loads(cfg_path.read_text())
    for change, word in [({"depth": 1}, "unexpected"), ({"depth": 3}, "missing"), ({"hidden_size": 32}, "size"),
                         ({"learn_sigma": False}, "size")]:
        cfg_path.write_text(json.dumps({**good, **change}))
        with pytest.raises(ValueError, match=word):
            SiTTransformer2DModel.from_pretrained(tmp_path / "m")
    cfg_path.write_text(json.dumps(good))
    assert SiTTransformer2DModel.from_pretrained(tmp_path / "m").config == net.config


def test_cli_export_format_diffusers(digits_ckpt, tmp_path, capsys):
    from sit_workbench.cli import main
    main(["export", str(digits_ckpt), str(tmp_path / "pipe"), "--format", "diffusers"])
    assert "wrote" in capsys.readouterr().out
    pipe = _quiet(SiTPipeline.from_pretrained(tmp_path / "pipe"))
    assert pipe(class_labels=[0], num_inference_steps=2, output_type="np").images.shape == (1, 8, 8, 1)
    main(["export", str(digits_ckpt), str(tmp_path / "official.pt")])       # the default format is unchanged
    assert set(load_state_dict(tmp_path / "official.pt")) == set(pipe.transformer.state_dict())


def test_push_to_hub_offline_fails_clearly(tmp_path):
    "With HF_HUB_OFFLINE=1 (read at import, as huggingface_hub does) a bogus repo gives a clear error at once."
    code = ("import torch\nfrom sit_workbench.model import SiT\nfrom sit_workbench.pipeline import *\n"
            "m = SiTTransformer2DModel.from_sit(SiT(input_size=4, patch_size=2, in_channels=1, hidden_size=16, depth=1,"
            " num_heads=2, num_classes=10))\n"
            "try:\n    m.push_to_hub('nobody-here/no-such-repo')\nexcept HubUploadError as e:\n    print('ERROR', e)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "ERROR cannot push" in res.stdout and "offline mode is on" in res.stdout and "no-such-repo" in res.stdout


def test_custom_class_names_survive_save_and_load(tmp_path):
    net = SiT(input_size=4, patch_size=2, in_channels=1, hidden_size=16, depth=1, num_heads=2, num_classes=3)
    names = {0: "cat, kitten", 1: "dog", 2: "bird"}
    pipe = SiTPipeline(transformer=SiTTransformer2DModel.from_sit(net), scheduler=SiTScheduler(), id2label=names)
    pipe.save_pretrained(tmp_path / "pipe")
    back = SiTPipeline.from_pretrained(tmp_path / "pipe")
    assert back.get_label_ids(["kitten", "bird", "cat"]) == [0, 2, 0]
    torch.save(net.state_dict(), tmp_path / "raw.pt")
    with pytest.raises(ValueError, match="unknown model 'SiT-Q/2'"):
        export_diffusers(tmp_path / "raw.pt", tmp_path / "x", model="SiT-Q/2")
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        export_diffusers(tmp_path / "nothing-here", tmp_path / "x")


def test_pipeline_samples_with_the_stored_learned_solver(digits_ckpt, tmp_path):
    """A learned solver stored beside the checkpoint (`fit-solver`) is what `sampling_method="learned"` samples with in
    the pipeline, the same pixels as our own path; export carries it (scheduler/schedules/) and the reloaded pipeline
    uses it; another guidance scale is not given it."""
    import shutil
    from sit_workbench.errors import UserError
    from sit_workbench.fit_solver import fit_solver
    from sit_workbench.registry import SamplerSpec
    from sit_workbench.run import load_model, read_run
    ck = tmp_path / "ck"
    shutil.copytree(digits_ckpt, ck)
    fit_solver(ck, [4], n_fit=8, search_samples=4, evals=2, log=lambda *a, **k: None)
    spec = read_run(ck)
    fn = SamplerSpec.create("ode", "learned", 5).build(spec.build_transport(), schedule_dir=ck / "schedules",
                                                       guidance=spec.guidance)
    ours = generate(load_model(spec), fn, [3, 5], spec.guidance, seed=0).images.permute(0, 2, 3, 1).numpy()
    kw = dict(class_labels=[3, 5], num_inference_steps=4, sampling_method="learned", output_type="np")
    got = _quiet(SiTPipeline.from_pretrained(ck))(generator=torch.Generator().manual_seed(0), **kw).images
    assert np.array_equal(got, ours)
    dst = export_diffusers(ck, tmp_path / "pipe")
    assert {p.name for p in (dst / "scheduler" / "schedules").iterdir()} == {"learned-cfg2.json"}
    again = _quiet(SiTPipeline.from_pretrained(dst))
    assert np.array_equal(again(generator=torch.Generator().manual_seed(0), **kw).images, ours)
    # the same steps and solver without a fit for that pipeline's guidance: the command that fits one
    with pytest.raises(UserError, match="no learned solver fitted for guidance 3 at 4 NFE"):
        again(guidance_scale=3.0, **kw)
    # without any fit (a checkpoint with no schedules/): the same message
    with pytest.raises(UserError, match="fit-solver"):
        _quiet(SiTPipeline.from_pretrained(digits_ckpt))(**kw)
