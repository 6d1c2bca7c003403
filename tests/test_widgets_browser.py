"""The widgets as a person uses them: JupyterLab on localhost, nbs/12_widgets.ipynb opened in headless Chromium
(Debian's package, driven by Playwright), Run All Cells, the guidance slider moved with the keyboard, Generate
clicked; the grid must change and no error or traceback may appear. Saves a screenshot of the panel as
runs/figures/widgets.png (`make figures` sets SIT_WORKBENCH_FIGURES=figures for the README's).

Skipped when chromium or playwright is missing, unless CI is set (then it fails): `.ci/run` installs both."""
import io
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "nbs" / "12_widgets.ipynb"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOT = ROOT / os.environ.get("SIT_WORKBENCH_FIGURES", "runs/figures") / "widgets.png"


def _missing():
    missing = []
    if not Path(CHROMIUM).is_file(): missing.append("chromium (apt-get install -y chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("playwright (pip install playwright)")
    return missing


@pytest.fixture(scope="module")
def browser_ready():
    missing = _missing()
    if missing:
        msg = "the browser test needs " + " and ".join(missing)
        if os.environ.get("CI"): pytest.fail(msg + " (CI is set, so this is a failure: .ci/run installs them)")
        pytest.skip(msg)


def _checkpoint(lab):
    """A digits checkpoint in `lab/runs/digits`, as a path relative to `lab`: a copy of the demo's when `make demo`
    wrote one (real digits in the screenshot), else a small run trained here."""
    from sit_workbench.train import train
    from sit_workbench.checkpoint import latest_checkpoint
    found = latest_checkpoint(ROOT / "runs" / "digits") if (ROOT / "runs" / "digits").is_dir() else None
    if found is not None:
        shutil.copytree(found, lab / "runs" / "digits" / found.name,
                        ignore=shutil.ignore_patterns("optimizer.pt", "scheduler.pt"))
        return f"runs/digits/{found.name}"
    from sit_workbench.config import digits_config
    # a few hundred steps and a short EMA: enough for the labels (and so guidance) to change the samples
    cfg = digits_config(depth=1, hidden_size=32, num_heads=2, warmup_steps=0, max_steps=300, save_steps=300,
                        ema_decay=0.5, learning_rate=3e-3, output_dir=str(lab / "runs" / "digits"))
    return str(Path(train(cfg, progress=False)["checkpoint"]).relative_to(lab))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_lab(tmp, env, port, token):
    "JupyterLab from this venv, serving `tmp` (a copy of the notebook, so autosave never touches the repo)."
    settings = tmp / "lab-settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false",
                                                                           "checkForUpdates": False}))
    env = {**env, "JUPYTERLAB_SETTINGS_DIR": str(tmp / "lab-settings"),
           "JUPYTERLAB_WORKSPACES_DIR": str(tmp / "lab-workspaces"), "JUPYTER_RUNTIME_DIR": str(tmp / "runtime")}
    log = open(tmp / "jupyter.log", "w")
    cmd = [str(Path(sys.executable).parent / "jupyter"), "lab", "--no-browser", f"--ServerApp.token={token}",
           f"--port={port}", "--ServerApp.port_retries=0", "--ip", "127.0.0.1", "--allow-root",
           f"--ServerApp.root_dir={tmp / 'lab'}"]
    proc = subprocess.Popen(cmd, cwd=tmp / "lab", env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.time() + 90
    while time.time() < deadline:
        if proc.poll() is not None: break
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=2):
                return proc
        except OSError:
            time.sleep(0.5)
    _stop(proc)
    raise RuntimeError("JupyterLab did not start:\n" + (tmp / "jupyter.log").read_text()[-3000:])


def _stop(proc):
    "Terminate JupyterLab's process group (the server and its kernels)."
    if proc.poll() is None:
        try: os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError: return
        try: proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL); proc.wait(5)


def _pixels(png: bytes):
    from PIL import Image
    return np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.int16)


def _page_errors(page):
    "Error lines the page shows: the widgets' red messages, tracebacks and stderr in outputs, broken widgets."
    return page.evaluate("""() => {
        const out = [];
        document.querySelectorAll('.sit-error').forEach(e => { if (e.textContent.trim()) out.push('panel: ' + e.textContent.trim()); });
        document.querySelectorAll('.jp-OutputArea-output').forEach(e => {
            const t = e.textContent || '';
            if (e.getAttribute('data-mime-type') === 'application/vnd.jupyter.stderr' || /Traceback|Error displaying widget|Error:/.test(t))
                out.push('output: ' + t.trim().slice(0, 500));
        });
        return out;
    }""")


def _kernel_idle(port, token):
    "Whether the server has a notebook session whose kernel is idle."
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/sessions?token={token}", timeout=5) as r:
            sessions = json.loads(r.read())
    except OSError:
        return False
    return any(s.get("kernel") and s["kernel"].get("execution_state") == "idle" for s in sessions)


def _accept_kernel_dialog(page):
    "JupyterLab sometimes asks which kernel to start (when it opens the notebook before the kernel specs arrive)."
    dialog = page.locator(".jp-Dialog:has-text('Select Kernel') .jp-mod-accept")
    if dialog.count() and dialog.first.is_visible(): dialog.first.click()


def _wait(page, js, arg=None, timeout=120, what="", shot=None):
    "Poll `js` (a function of `arg`) until true; fail at once when an error shows up in the page, or after `timeout` s."
    deadline = time.time() + timeout
    while True:
        _accept_kernel_dialog(page)
        if page.evaluate(js, arg): return
        errors = _page_errors(page)
        if errors or time.time() > deadline:
            if shot is not None: page.screenshot(path=str(shot), full_page=True)
            pytest.fail(f"waiting for {what}: " + ("; ".join(errors) if errors else f"timed out after {timeout} s")
                        + (f" (screenshot: {shot})" if shot is not None else ""))
        page.wait_for_timeout(250)


def test_widgets_in_jupyterlab(browser_ready, tmp_path):
    from playwright.sync_api import sync_playwright
    start = time.perf_counter()
    # a small copy of the project: the notebook in nbs/, settings.ini marking the root, a checkpoint in runs/digits
    # (JupyterLab autosaves the notebook it runs: never the repository's)
    lab = tmp_path / "lab"
    (lab / "nbs").mkdir(parents=True)
    shutil.copy(NOTEBOOK, lab / "nbs" / NOTEBOOK.name)
    shutil.copy(ROOT / "settings.ini", lab / "settings.ini")
    ckpt = _checkpoint(lab)
    env = {**os.environ, "SIT_WIDGETS_CHECKPOINT": ckpt, "OMP_WAIT_POLICY": "PASSIVE"}
    port, token = _free_port(), secrets.token_hex(16)
    proc = _start_lab(tmp_path, env, port, token)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            try:
                page = browser.new_page(viewport={"width": 1500, "height": 1100})
                page.goto(f"http://127.0.0.1:{port}/lab/tree/nbs/{NOTEBOOK.name}?token={token}")
                page.wait_for_selector(".jp-NotebookPanel .jp-Cell", timeout=90_000)
                shot = tmp_path / "failure.png"
                # the notebook's kernel is up once the server lists its session with an idle kernel
                deadline = time.time() + 90
                while not _kernel_idle(port, token):
                    _accept_kernel_dialog(page)
                    if time.time() > deadline:
                        page.screenshot(path=str(shot), full_page=True)
                        pytest.fail(f"the notebook's kernel did not start (screenshot: {shot})")
                    page.wait_for_timeout(250)
                # Run > Run All Cells, as a person does it
                page.get_by_role("menuitem", name="Run", exact=True).click()
                page.get_by_role("menuitem", name="Run All Cells", exact=True).click()

                # the panel's grid, then the scrubber's plotly figure (the last cell) once everything ran
                _wait(page, "() => { const i = document.querySelector('.sit-panel img.sit-image');"
                            " return !!(i && i.complete && i.naturalWidth > 0) }", what="the panel's grid", shot=shot)
                _wait(page, "() => !!document.querySelector('.sit-scrubber-plot .js-plotly-plot')",
                      what="the scrubber's figure", shot=shot)
                assert _page_errors(page) == []
                image = page.locator(".sit-panel img.sit-image")
                status = page.locator(".sit-panel .sit-status")
                assert "NFE 50" in status.inner_text()
                before, before_src = _pixels(image.screenshot()), image.get_attribute("src")

                # move the guidance slider with the keyboard: 2 -> 6 in steps of 0.5
                readout = page.locator(".sit-guidance .widget-readout")
                old_readout = readout.inner_text()
                handle = page.locator(".sit-guidance .noUi-handle")
                handle.focus()
                for _ in range(8): page.keyboard.press("ArrowRight")
                _wait(page, "(old) => document.querySelector('.sit-guidance .widget-readout').textContent.trim() !== old",
                      old_readout.strip(), timeout=10, what="the guidance slider to move", shot=shot)
                assert float(readout.inner_text()) == pytest.approx(float(old_readout) + 4.0)

                page.locator(".sit-panel .sit-generate").click()
                _wait(page, "(old) => { const i = document.querySelector('.sit-panel img.sit-image');"
                            " return i.src !== old && i.complete && i.naturalWidth > 0 }", before_src, timeout=60,
                      what="a new grid after Generate", shot=shot)
                page.wait_for_timeout(300)
                after = _pixels(image.screenshot())
                assert before.shape == after.shape
                changed = float((before != after).mean())
                assert changed > 0.001, f"the grid did not change after moving the guidance slider ({changed:.4%})"
                assert "NFE 50" in status.inner_text()
                assert _page_errors(page) == []
                SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
                page.locator(".sit-panel").screenshot(path=str(SCREENSHOT))
            finally:
                browser.close()
    finally:
        _stop(proc)
    print(f"browser test: {time.perf_counter() - start:.0f} s, {changed:.1%} of the grid's pixels changed")
