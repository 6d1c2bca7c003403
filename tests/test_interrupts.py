"""Ctrl-C and SIGTERM end every long command with one line and status 130 / 143, no traceback, no partial file where
a complete one is expected; `sample-eval` and `train` continue where they stopped when run again."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from sit_workbench.errors import EXIT_PREEMPTED

ENV_EXTRA = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _default_sigint():
    """In the child, before exec: Ctrl-C as a terminal delivers it, even where this test runs with SIGINT ignored (a
    shell's background job, nohup), which the child would inherit and Python then leaves ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(*argv):
    return subprocess.Popen([sys.executable, "-c", "from sit_workbench.cli import main; main()", *map(str, argv)],
                            env={**os.environ, **ENV_EXTRA}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)


def _wait_for(pred, proc, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not pred():
        time.sleep(0.05)
    assert pred(), "the condition never held before the command ended"


def _partial_files(folder: Path):
    return [p.name for p in folder.rglob("*") if ".tmp" in p.name]


@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, EXIT_PREEMPTED, "terminated")])
def test_sample_eval_stops_cleanly_and_resumes(tiny_digits_run, tmp_path, sig, code, word):
    ck, out = tiny_digits_run(steps=10), tmp_path / "eval"
    argv = ("sample-eval", ck, "--out-dir", out, "--num-samples", 60, "--shard-size", 5, "--num-sampling-steps", 200,
            "--no-eval", "--device", "cpu")
    proc = _start(*argv)
    _wait_for(lambda: (out / "samples_0000000.npz.sha256").is_file(), proc)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr
    assert word in stderr and "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert _partial_files(out) == [] and not (out / "samples.npz").exists()
    done = sorted(p.name for p in out.glob("samples_*.npz"))
    res = subprocess.run([sys.executable, "-c", "from sit_workbench.cli import main; main()", *map(str, argv[:-5]),
                          "--no-eval", "--device", "cpu", "--num-sampling-steps", "5"], capture_output=True, text=True)
    assert res.returncode == 2 and "other settings" in res.stderr          # another sampler: refused, not mixed in
    proc = _start(*argv)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    with np.load(out / "samples.npz") as f: assert f["arr_0"].shape == (60, 8, 8, 3)
    assert all(f"wrote {name}" not in stdout for name in done), stdout   # the finished shards were kept


def test_ctrl_c_in_train_is_one_line_and_the_run_resumes(tmp_path):
    from sit_workbench.config import digits_config, save_config
    cfg = digits_config(depth=1, hidden_size=32, num_heads=2, warmup_steps=0, max_steps=100000, save_steps=5,
                        output_dir=str(tmp_path / "run"))
    save_config(cfg, tmp_path / "c.yaml")
    proc = _start("train", "--config", tmp_path / "c.yaml", "--no-progress")
    _wait_for(lambda: (tmp_path / "run" / "checkpoint-5" / "complete.json").is_file(), proc)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted" in stderr and "Traceback" not in stderr, stderr
    res = subprocess.run([sys.executable, "-c", "from sit_workbench.cli import main; main()", "train", "--config",
                          str(tmp_path / "c.yaml"), "--set", "max_steps=12", "--no-progress"], capture_output=True,
                         text=True, env={**os.environ, **ENV_EXTRA})
    assert res.returncode == 0 and "finished at step 12" in res.stdout, res.stdout + res.stderr
