"""Bad input, damaged files and faults through the real command line: every user error exits with status 2 and one
line naming the input, never a traceback; no image or metric is written from NaN; damaged checkpoints are skipped on
resume; a preempted run exits 143; a full disk is named and leaves the previous checkpoint intact."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sit_workbench.config import digits_config, save_config
from sit_workbench.errors import EXIT_PREEMPTED, CheckpointError, NonFiniteError, UserError
from sit_workbench.checkpoint import latest_checkpoint, list_checkpoints
from sit_workbench.train import train

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(depth=1, hidden_size=32, num_heads=2, warmup_steps=0, logging_steps=1, save_total_limit=None)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}


def cli(*args, timeout=300):
    "Run `sit-workbench ARGS` from this source tree; the completed process."
    cmd = [sys.executable, "-c", "from sit_workbench.cli import main; main()", *map(str, args)]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    "A tiny digits run with checkpoints at steps 2 and 4."
    out = tmp_path_factory.mktemp("run") / "run"
    train(digits_config(**TINY, max_steps=4, save_steps=2, output_dir=str(out)), progress=False)
    return out


def _nan_checkpoint(src, dst):
    shutil.copytree(src, dst)
    sd = load_file(str(dst / "model.safetensors"))
    sd = {k: torch.full_like(v, float("nan")) for k, v in sd.items()}
    save_file(sd, str(dst / "model.safetensors"))
    torch.save(sd, dst / "ema.pt")
    return dst


def _image_folder(root, classes=("a", "b", "c"), n=6):
    from PIL import Image
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(torch.full((8, 8), 40 * c + i, dtype=torch.uint8).numpy()).save(root / name / f"{i}.png")
    return root


def case_inputs(run, tmp):
    "(name, command-line arguments, the text the error must show) for each bad input."
    ck = run / "checkpoint-4"
    bad_yaml = tmp / "bad.yaml"; bad_yaml.write_text("max_steps: [1, 2\noutput_dir: x\n")
    trunc = tmp / "trunc.safetensors"; trunc.write_bytes((ck / "model.safetensors").read_bytes()[:3000])
    rand = tmp / "random.pt"; rand.write_bytes(torch.randint(0, 256, (5000,), generator=torch.Generator().manual_seed(0))
                                                 .to(torch.uint8).numpy().tobytes())
    damaged = tmp / "damaged-ckpt"; shutil.copytree(ck, damaged)
    (damaged / "model.safetensors").write_bytes((ck / "model.safetensors").read_bytes()[:3000])
    other = tmp / "other.yaml"
    save_config(digits_config(**{**TINY, "hidden_size": 64}, max_steps=6, output_dir=str(tmp / "other"),
                              resume_from_checkpoint=str(ck)), other)
    nan = _nan_checkpoint(ck, tmp / "nan-ckpt")
    folder = _image_folder(tmp / "three-classes")
    cls2, cls1 = tmp / "cls2.yaml", tmp / "cls1.yaml"
    for path, k in ((cls2, 2), (cls1, 1)):
        d = digits_config(**TINY, max_steps=2, output_dir=str(tmp / f"cls{k}-run"))
        d.dataset_config.dataset_format, d.dataset_config.dataset_path = "imagefolder", str(folder)
        d.model_config.num_classes = k
        save_config(d, path)
    small = ["--vae", "none", "--image-size", "8", "--model", "SiT-S/2", "--num-sampling-steps", "3",
             "--sampling-method", "euler", "--classes", "1"]
    return [
        ("yaml syntax error", ["train", "--config", bad_yaml], "bad.yaml is not valid YAML at line"),
        ("directory as --config", ["train", "--config", tmp], f"{tmp} is a directory"),
        ("missing --config", ["train", "--config", tmp / "nope.yaml"], "nope.yaml"),
        ("truncated .safetensors to sample", ["sample", "--ckpt", trunc, *small], "trunc.safetensors"),
        ("truncated .safetensors to export", ["export", damaged, tmp / "o.pt"], "model.safetensors"),
        ("random-bytes .pt to sample", ["sample", "--ckpt", rand, *small], "random.pt"),
        ("random-bytes .pt to import", ["import", rand, tmp / "imp"], "random.pt"),
        ("an SDE option for the ODE", ["sample-eval", ck, "--out-dir", tmp / "se", "--num-samples", "2", "--mode", "ode",
                                       "--diffusion-form", "sigma", "--no-eval"], "'diffusion_form'"),
        ("an ODE method for the SDE", ["sample-eval", ck, "--out-dir", tmp / "se", "--num-samples", "2", "--mode", "sde",
                                       "--sampling-method", "heun2", "--no-eval"], "is an ODE method"),
        ("resume from another model size", ["train", "--config", other, "--no-progress"], str(ck)),
        ("NaN weights to sample", ["sample", "--ckpt", nan, "--vae", "none", "--image-size", "8", "--classes", "1",
                                   "--sampling-method", "euler", "--num-sampling-steps", "3", "--out",
                                   tmp / "nan.png"], "nan-ckpt"),
        ("NaN weights to sample-eval", ["sample-eval", nan, "--out-dir", tmp / "nan-se", "--num-samples", "4",
                                        "--sampling-method", "euler", "--num-sampling-steps", "3"], "nan-ckpt"),
        ("3 class folders, num_classes 2", ["train", "--config", cls2, "--no-progress"], "num_classes"),
        ("3 class folders, num_classes 1", ["train", "--config", cls1, "--no-progress"], "three-classes"),
    ]


CASES = ["yaml syntax error", "directory as --config", "missing --config", "truncated .safetensors to sample",
         "truncated .safetensors to export", "random-bytes .pt to sample", "random-bytes .pt to import",
         "an SDE option for the ODE", "an ODE method for the SDE", "resume from another model size", "NaN weights to sample",
         "NaN weights to sample-eval", "3 class folders, num_classes 2", "3 class folders, num_classes 1"]


@pytest.fixture(scope="module")
def cases(run, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    found = {name: (args, shown) for name, args, shown in case_inputs(run, tmp)}
    assert list(found) == CASES
    return tmp, found


@pytest.mark.parametrize("name", CASES)
def test_bad_input_exits_2_naming_it(cases, name):
    tmp, found = cases
    args, shown = found[name]
    r = cli(*args)
    assert r.returncode == 2, f"exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert shown in r.stderr, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1].startswith(f"sit-workbench {args[0]}: error: "), r.stderr[-3000:]
    # nothing is written from NaN and no training step is taken on mismatched labels
    assert not (tmp / "nan.png").exists()
    assert not list((tmp / "nan-se").glob("*.npz")) and not (tmp / "nan-se" / "metrics.json").exists()
    assert not list_checkpoints(tmp / "cls2-run") and not list_checkpoints(tmp / "cls1-run")


# --- the Python API says the same ----------------------------------------------------------------------------------
def test_api_errors_are_value_errors():
    from sit_workbench.model import SiT
    from sit_workbench.transport import Sampler
    with pytest.raises(UserError, match="Sampler needs a Transport"):
        Sampler("nope")
    m = SiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=3)
    with pytest.raises(ValueError, match="y"):
        m(torch.randn(2, 1, 8, 8), torch.rand(2))


@pytest.mark.parametrize("how", ["ode-euler", "ode-heun2", "dopri5", "sde-euler", "sde-heun", "likelihood"])
def test_samplers_name_the_time_and_nfe_of_the_first_nan(how):
    from sit_workbench.transport import Sampler, create_transport
    s = Sampler(create_transport())
    calls = []
    def model(x, t):   # finite until its third evaluation
        calls.append(float(t.flatten()[0]))
        return x * float("nan") if len(calls) >= 3 else -x
    fn = {"ode-euler": lambda: s.sample_ode(sampling_method="euler", num_steps=5),
          "ode-heun2": lambda: s.sample_ode(sampling_method="heun2", num_steps=5),
          "dopri5": lambda: s.sample_ode(),
          "sde-euler": lambda: s.sample_sde(num_steps=5),
          "sde-heun": lambda: s.sample_sde(sampling_method="Heun", num_steps=5),
          "likelihood": lambda: s.sample_ode_likelihood(sampling_method="euler", num_steps=5)}[how]()
    with pytest.raises(NonFiniteError) as e:
        fn(torch.randn(2, 3), model)
    assert "network evaluation 3" in str(e.value) and f"t={calls[2]:.4g}" in str(e.value), str(e.value)


def test_a_diverging_sampler_is_named(monkeypatch):
    "Finite model outputs, a non-finite result: the sampler says so instead of returning NaN."
    from sit_workbench.transport import Sampler, create_transport
    fn = Sampler(create_transport()).sample_ode(sampling_method="euler", num_steps=3)
    with pytest.raises(NonFiniteError, match="result"):   # 3e38 + 0.5 * 3e38 overflows float32
        fn(torch.full((2, 3), 3e38), lambda x, t: torch.full_like(x, 3e38))


# --- sample-eval: its shards are reused only for what they were made for ----------------------------------------
def test_sample_eval_refuses_shards_of_another_checkpoint_or_seed(run, tmp_path):
    out = tmp_path / "se"
    common = ["--out-dir", out, "--num-samples", "6", "--shard-size", "3",
              "--sampling-method", "euler", "--num-sampling-steps", "3", "--no-eval"]
    r = cli("sample-eval", run / "checkpoint-2", *common)
    assert r.returncode == 0, r.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["seed"] == 0 and manifest["num_samples"] == 6 and len(manifest["checkpoint_sha256"]) == 64
    assert json.loads((out / "metrics.json").read_text())["measured"] == manifest
    first = (out / "samples.npz").read_bytes()
    for args, diff in (((run / "checkpoint-4", *common), "checkpoint"), ((run / "checkpoint-2", *common, "--seed", "1"),
                                                                        "seed")):
        r = cli("sample-eval", *args)
        assert r.returncode == 2 and "Traceback" not in r.stderr and diff in r.stderr and "--overwrite" in r.stderr, r.stderr
        assert (out / "samples.npz").read_bytes() == first
    # the same settings resume (nothing is redrawn); --overwrite starts afresh with the new checkpoint
    r = cli("sample-eval", run / "checkpoint-2", *common)
    assert r.returncode == 0 and (out / "samples.npz").read_bytes() == first, r.stderr[-3000:]
    r = cli("sample-eval", run / "checkpoint-4", *common, "--overwrite")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "samples.npz").read_bytes() != first
    assert json.loads((out / "manifest.json").read_text())["checkpoint"] == str(run / "checkpoint-4")


# --- damaged and partial checkpoints -------------------------------------------------------------------------------
def test_a_folder_left_by_a_kill_during_pruning_is_not_a_checkpoint(tmp_path, monkeypatch):
    import sit_workbench.checkpoint as T
    out = tmp_path / "run"
    train(digits_config(**TINY, max_steps=4, save_steps=2, output_dir=str(out)), progress=False)
    # what a kill during today's pruning left: a folder without scheduler.pt, its trainer_state.json still there
    (out / "checkpoint-4" / "scheduler.pt").unlink()
    assert list_checkpoints(out) == [out / "checkpoint-2"]
    # a kill in the middle of our pruning: the folder loses its marker before anything else
    shutil.rmtree(out / "checkpoint-4")
    train(digits_config(**TINY, max_steps=4, save_steps=2, output_dir=str(out)), progress=False)
    def killed(path, *a, **k): raise KeyboardInterrupt("killed")
    monkeypatch.setattr(T.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        T.prune_checkpoints(out, keep=1)
    monkeypatch.undo()
    assert (out / "checkpoint-2").is_dir() and list_checkpoints(out) == [out / "checkpoint-4"]
    res = train(digits_config(**{**TINY, "save_total_limit": 1}, max_steps=6, save_steps=2, output_dir=str(out)),
                progress=False)
    assert res["step"] == 6 and [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-6"]


def test_folders_written_before_the_marker_still_resume(tmp_path):
    out = tmp_path / "run"
    train(digits_config(**TINY, max_steps=2, save_steps=2, output_dir=str(out)), progress=False)
    (out / "checkpoint-2" / "complete.json").unlink()   # as today's code writes them
    assert list_checkpoints(out) == [out / "checkpoint-2"]
    res = train(digits_config(**TINY, max_steps=4, save_steps=2, output_dir=str(out)), progress=False)
    assert res["step"] == 4


@pytest.mark.parametrize("marker", [True, False], ids=["with-marker", "without-marker"])
def test_resume_skips_a_truncated_latest_checkpoint(tmp_path, marker):
    out = tmp_path / "run"
    train(digits_config(**TINY, max_steps=4, save_steps=2, output_dir=str(out)), progress=False)
    f = out / "checkpoint-4" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    if not marker: (out / "checkpoint-4" / "complete.json").unlink()
    save_config(digits_config(**TINY, max_steps=6, save_steps=2, output_dir=str(out)), tmp_path / "c.yaml")
    r = cli("train", "--config", tmp_path / "c.yaml", "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "checkpoint-4" in r.stderr and "skipping" in r.stderr, r.stderr
    assert f"resumed from {out / 'checkpoint-2'}" in r.stdout + r.stderr and "finished at step 6" in r.stdout


# --- preemption ----------------------------------------------------------------------------------------------------
def test_sigterm_saves_and_exits_143(tmp_path, sigterm_after):
    save_config(digits_config(**TINY, max_steps=100000, save_steps=100000, output_dir=str(tmp_path / "run")),
                tmp_path / "c.yaml")
    proc = subprocess.Popen([sys.executable, "-c", "from sit_workbench.cli import main; main()", "train", "--config",
                             str(tmp_path / "c.yaml"), "--no-progress"], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    out, err = sigterm_after(proc, tmp_path / "run" / "log.jsonl", 3)
    assert proc.returncode == EXIT_PREEMPTED == 143, out + err
    assert "preempted at step" in out and "Traceback" not in err, out + err
    assert latest_checkpoint(tmp_path / "run") is not None


# --- a full disk ---------------------------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    d = tmp_path / "disk"; d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(d)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    yield d
    import gc
    gc.collect()   # safetensors' memory maps of files on it
    if subprocess.run(["umount", str(d)], capture_output=True).returncode:
        subprocess.run(["umount", "-l", str(d)], check=False)


@pytest.mark.parametrize("precheck", [True, False], ids=["before-writing", "while-writing"])
def test_disk_full_during_training(small_disk, tmp_path, monkeypatch, precheck):
    import sit_workbench.errors as E
    out = small_disk / "run"
    if not precheck:   # the space check passes; the disk fills while the files are written
        monkeypatch.setattr(E, "check_space", lambda path, needed: None)
    with pytest.raises(E.DiskFullError) as e:
        train(digits_config(**TINY, max_steps=50, save_steps=1, output_dir=str(out)), progress=False)
    msg = str(e.value)
    assert str(out) in msg and "needs about" in msg and "MiB" in msg, msg
    assert not list(out.glob(".checkpoint-*")), "a temporary folder is left behind"
    good = list_checkpoints(out)
    assert good, "no checkpoint was written before the disk filled"
    load_file(str(good[-1] / "model.safetensors"))   # the previous checkpoint is intact


def test_disk_full_on_the_command_line(small_disk, run, tmp_path):
    (small_disk / "filler").write_bytes(b"\0" * (2 * 2**20 - 64 * 1024))
    r = cli("export", run / "checkpoint-4", small_disk / "official.pt")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert str(small_disk / "official.pt") in r.stderr and "needs about" in r.stderr, r.stderr
    assert [p.name for p in small_disk.iterdir()] == ["filler"]
    save_config(digits_config(**TINY, max_steps=3, save_steps=1, output_dir=str(small_disk / "run")), tmp_path / "c.yaml")
    r = cli("train", "--config", tmp_path / "c.yaml", "--no-progress")
    assert r.returncode == 2 and "Traceback" not in r.stderr and str(small_disk / "run") in r.stderr, r.stderr[-3000:]
