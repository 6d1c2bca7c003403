"""The README's main job, as a user runs it: `sit-workbench demo` trains on digits, samples and scores the samples.
It must finish within 5 minutes on 2 CPU cores, and the digits classifier must recognise >= 90% of the samples."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image


def test_digits_demo_meets_the_bars(tmp_path):
    env = {**os.environ, "SIT_WORKBENCH_CACHE": str(tmp_path / "cache")}
    start = time.perf_counter()
    res = subprocess.run([str(Path(sys.executable).parent / "sit-workbench"), "demo", "--output-dir",
                          str(tmp_path / "run"), "--figures", str(tmp_path / "fig"), "--no-progress"],
                         env=env, capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - start
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    summary = json.loads((tmp_path / "fig" / "digits_demo.json").read_text())
    assert summary["accuracy"] >= 0.90, summary
    assert seconds < 300, f"the demo took {seconds:.0f} s"
    assert f"{100 * summary['accuracy']:.1f}%" in res.stdout
    grid = Image.open(tmp_path / "fig" / "digits_samples.png")
    assert grid.size == (6 * (8 * 10 + 2), 6 * (10 * 10 + 2))      # 8 samples of each of 10 digits, 6x enlarged
    assert Image.open(tmp_path / "fig" / "digits_loss.png").size[0] > 300
