"""Training end to end on the digits data: exact resume after a real SIGTERM, DDP with 2 gloo processes against one
process, partially written checkpoints, the official checkpoint format."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sit_workbench.config import digits_config, save_config
from sit_workbench.checkpoint import clean_partial_checkpoints, latest_checkpoint, list_checkpoints, load_sit, load_state_dict
from sit_workbench.run import export_official, import_official
from sit_workbench.train import read_log, train

BIN = Path(sys.executable).parent
TINY = dict(depth=1, hidden_size=32, num_heads=2, warmup_steps=0, logging_steps=1, save_total_limit=None)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def write_config(path, **kw):
    cfg = digits_config(**{**TINY, **kw})
    save_config(cfg, path)
    return cfg


def weights(folder):
    return load_file(str(Path(folder) / "model.safetensors")), torch.load(Path(folder) / "ema.pt", weights_only=True)


def cli(*args, torchrun=0):
    cmd = [str(BIN / "sit-workbench"), *args]
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}", *cmd]
    return cmd


def test_resume_after_sigterm_is_bit_exact(tmp_path, sigterm_after):
    steps = 120
    write_config(tmp_path / "ref.yaml", max_steps=steps, save_steps=1000, output_dir=str(tmp_path / "ref"))
    write_config(tmp_path / "int.yaml", max_steps=steps, save_steps=1000, output_dir=str(tmp_path / "int"))
    subprocess.run(cli("train", "--config", str(tmp_path / "ref.yaml"), "--no-progress"), check=True, env=ENV,
                   capture_output=True)

    proc = subprocess.Popen(cli("train", "--config", str(tmp_path / "int.yaml"), "--no-progress"), env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = sigterm_after(proc, tmp_path / "int" / "log.jsonl", 10, poll=0.02)
    assert proc.returncode == 143, out   # EXIT_PREEMPTED: saved, not finished
    assert "preempted" in out and "SIGTERM" in out, out
    stopped = latest_checkpoint(tmp_path / "int")
    k = int(stopped.name.split("-")[1])
    assert 10 <= k < steps, out

    res = subprocess.run(cli("train", "--config", str(tmp_path / "int.yaml"), "--no-progress"), env=ENV,
                         capture_output=True, text=True, check=True)
    assert f"finished at step {steps}" in res.stdout
    (ma, ea), (mb, eb) = weights(tmp_path / "ref" / f"checkpoint-{steps}"), weights(tmp_path / "int" / f"checkpoint-{steps}")
    assert all(torch.equal(ma[n], mb[n]) for n in ma), "model weights differ after resume"
    assert all(torch.equal(ea[n], eb[n]) for n in ea), "EMA weights differ after resume"
    # the log has each step once, with the same losses as the uninterrupted run
    ref, got = read_log(tmp_path / "ref" / "log.jsonl"), read_log(tmp_path / "int" / "log.jsonl")
    assert [r["step"] for r in got] == list(range(1, steps + 1))
    assert [r["loss"] for r in got] == [r["loss"] for r in ref]


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_two_gloo_processes_match_one_process(tmp_path, fsdp):
    steps = 8
    write_config(tmp_path / "one.yaml", max_steps=steps, save_steps=steps, per_device_train_batch_size=32,
                 output_dir=str(tmp_path / "one"))
    write_config(tmp_path / "two.yaml", max_steps=steps, save_steps=steps, per_device_train_batch_size=16,
                 output_dir=str(tmp_path / "two"), fsdp=fsdp)
    subprocess.run(cli("train", "--config", str(tmp_path / "one.yaml"), "--no-progress"), check=True, env=ENV,
                   capture_output=True)
    res = subprocess.run(cli("train", "--config", str(tmp_path / "two.yaml"), "--no-progress", torchrun=2), env=ENV,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    one, two = read_log(tmp_path / "one" / "log.jsonl"), read_log(tmp_path / "two" / "log.jsonl")
    assert [r["step"] for r in two] == list(range(1, steps + 1))
    torch.testing.assert_close(torch.tensor([r["loss"] for r in two]), torch.tensor([r["loss"] for r in one]),
                               rtol=1e-5, atol=1e-6)
    (ma, ea), (mb, eb) = weights(tmp_path / "one" / f"checkpoint-{steps}"), weights(tmp_path / "two" / f"checkpoint-{steps}")
    for n in ma:
        torch.testing.assert_close(mb[n], ma[n], rtol=1e-4, atol=1e-5)


def test_partial_checkpoints_are_never_picked_up(tmp_path):
    out = tmp_path / "run"
    train(digits_config(**TINY, max_steps=4, save_steps=2, output_dir=str(out)), progress=False)
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    # a crash while writing leaves a temporary folder, or a folder without trainer_state.json
    shutil.copytree(out / "checkpoint-4", out / ".checkpoint-6.tmp-123")
    shutil.copytree(out / "checkpoint-4", out / "checkpoint-8")
    (out / "checkpoint-8" / "trainer_state.json").unlink()
    assert latest_checkpoint(out) == out / "checkpoint-4"
    res = train(digits_config(**TINY, max_steps=6, save_steps=2, output_dir=str(out)), progress=False)
    assert res["step"] == 6 and not list(out.glob(".checkpoint-*"))
    clean_partial_checkpoints(out)


def test_official_format_round_trip(tmp_path):
    out = tmp_path / "run"
    train(digits_config(**TINY, max_steps=2, save_steps=2, output_dir=str(out)), progress=False)
    ckpt = out / "checkpoint-2"
    pt = export_official(ckpt, tmp_path / "official.pt")
    blob = torch.load(pt, weights_only=False)
    assert set(blob) == {"model", "ema", "opt", "args"} and blob["args"].num_classes == 10
    m, e = weights(ckpt)
    assert all(torch.equal(blob["model"][k], m[k]) for k in m) and all(torch.equal(blob["ema"][k], e[k]) for k in e)
    # our loader reads it without unpickling code, preferring the EMA
    assert all(torch.equal(load_state_dict(pt)[k], e[k]) for k in e)


def test_import_official_checkpoint(tmp_path):
    from sit_workbench.model import SiT_models
    torch.manual_seed(0)
    net = SiT_models["SiT-S/8"](input_size=16, in_channels=4, num_classes=7, learn_sigma=True)
    ema = {k: v + 1 for k, v in net.state_dict().items()}
    torch.save({"model": net.state_dict(), "ema": ema}, tmp_path / "o.pt")
    folder = import_official(tmp_path / "o.pt", tmp_path / "imported", model="SiT-S/8")
    got = load_sit(folder)
    assert got.config["num_classes"] == 7 and got.config["learn_sigma"]
    assert all(torch.equal(got.state_dict()[k], v) for k, v in ema.items())
    got = load_sit(folder, prefer="model")
    assert all(torch.equal(got.state_dict()[k], v) for k, v in net.state_dict().items())


@pytest.mark.parametrize("cache", [False, True], ids=["vae-on-the-fly", "latent-cache"])
def test_latent_space_training_with_a_local_vae(tmp_path, cache, image_folder):
    """The ImageNet path at toy scale: images -> diffusers AutoencoderKL latents (a small random VAE saved to a
    folder, as a user's local copy of sd-vae-ft-ema would be) -> SiT; on the fly, or through the latent cache."""
    from sit_workbench.config import config_from_dict, config_to_dict
    from sit_workbench.latents import tiny_vae
    data = image_folder(tmp_path / "images")
    tiny_vae().save_pretrained(tmp_path / "vae")
    d = config_to_dict(digits_config(**TINY, max_steps=3, save_steps=3, per_device_train_batch_size=4))
    d["model_config"].update(vae_path=str(tmp_path / "vae"), input_size=4, in_channels=4, num_classes=2)
    d["dataset_config"].update(dataset_format="imagefolder", dataset_path=str(data), image_size=32, random_flip=True,
                               latent_cache=str(tmp_path / "latents") if cache else None)
    d["output_dir"] = str(tmp_path / "run")
    res = train(config_from_dict(d), progress=False)
    assert res["status"] == "finished" and res["step"] == 3
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in read_log(tmp_path / "run" / "log.jsonl"))
    assert load_sit(res["checkpoint"]).config["in_channels"] == 4
    if cache:
        assert (tmp_path / "latents" / "meta.json").is_file()
