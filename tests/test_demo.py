"""The README's main job, as a user runs it: `sit-workbench demo` trains on digits, samples and scores the samples.
The digits classifier must recognise >= 90% of the samples. (Its wall-clock time against the 300 s budget is a
benchmark, `benchmarks/demo_time.py`, not a test.)"""
import json
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image


def test_digits_demo_meets_the_bars(tmp_path):
    env = {**os.environ, "SIT_WORKBENCH_CACHE": str(tmp_path / "cache")}
    res = subprocess.run([str(Path(sys.executable).parent / "sit-workbench"), "demo", "--output-dir",
                          str(tmp_path / "run"), "--figures", str(tmp_path / "fig"), "--no-progress"],
                         env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    summary = json.loads((tmp_path / "fig" / "digits_demo.json").read_text())
    assert summary["accuracy"] >= 0.90, summary
    assert f"{100 * summary['accuracy']:.1f}%" in res.stdout
    grid = Image.open(tmp_path / "fig" / "digits_samples.png")
    assert grid.size == (6 * (8 * 10 + 2), 6 * (10 * 10 + 2))      # 8 samples of each of 10 digits, 6x enlarged
    assert Image.open(tmp_path / "fig" / "digits_loss.png").size[0] > 300
