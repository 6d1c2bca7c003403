"""The widgets' logic without a browser: building the panel, the Generate handler run synchronously and in its
thread, errors as a message line, cancelling between network evaluations, one job at a time, debouncing with a fake
timer, the guidance explorer's shared noise and the scrubber's predictions."""
import io
import os
import shutil
import threading

import pytest
import torch
from PIL import Image

from sit_workbench import widgets as Wd
from sit_workbench.model import SiT
from sit_workbench.checkpoint import load_sit, save_pretrained
from pathlib import Path

from sit_workbench.errors import UserError
from sit_workbench.registry import methods
from sit_workbench.sample import Guidance, generate, rows_by_class
from sit_workbench.transport import Sampler, create_transport

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    "A digits checkpoint trained for a few seconds."
    from sit_workbench.config import digits_config
    from sit_workbench.train import train
    out = tmp_path_factory.mktemp("tiny") / "run"
    cfg = digits_config(depth=1, hidden_size=32, num_heads=2, warmup_steps=0, max_steps=30, save_steps=30,
                        output_dir=str(out))
    return train(cfg, progress=False)["checkpoint"]


@pytest.fixture(autouse=True)
def no_env_checkpoint(monkeypatch):
    monkeypatch.delenv(Wd.CHECKPOINT_ENV, raising=False)


def png_size(png): return Image.open(io.BytesIO(png)).size


def panel(ckpt, **kw):
    return Wd.SamplerPanel(checkpoint=ckpt, device="cpu", **{"per_class": 2, **kw})


# --- finding checkpoints -------------------------------------------------------------------------------------------

def test_default_checkpoint_from_the_project_root(ckpt, tmp_path, monkeypatch):
    (tmp_path / "settings.ini").write_text("[DEFAULT]\n")
    (tmp_path / "nbs").mkdir()
    monkeypatch.chdir(tmp_path / "nbs")                      # where a notebook's kernel runs
    assert Wd.default_checkpoint() is None
    p = Wd.SamplerPanel(device="cpu")
    assert p.checkpoint.value == "" and "make demo" in p.error
    assert p.run() is None and "make demo" in p.error        # a message, not an exception
    shutil.copytree(os.path.dirname(ckpt), tmp_path / "runs" / "digits")
    assert Wd.default_checkpoint().name == "checkpoint-30"
    p = Wd.SamplerPanel(device="cpu", per_class=1)
    assert p.checkpoint.value == "runs/digits/checkpoint-30" and p.error == ""
    assert p.run() is not None                               # the relative path is found from nbs/
    monkeypatch.setenv(Wd.CHECKPOINT_ENV, str(ckpt))
    assert Wd.default_checkpoint() == Wd.find_path(ckpt)


def test_run_folder_loads_its_latest_checkpoint(ckpt):
    loaded = Wd.load_checkpoint(os.path.dirname(ckpt))
    assert Path(loaded.location).name == "checkpoint-30" and loaded.vae is None
    assert Wd.load_checkpoint(ckpt) is Wd.load_checkpoint(ckpt)      # cached


def test_parse_classes():
    assert Wd.parse_classes("0-2, 5") == [0, 1, 2, 5]
    assert Wd.parse_classes(" 7 ") == [7]
    assert Wd.parse_classes("all", 4) == [0, 1, 2, 3]
    for bad, msg in (("", "none given"), ("a", "cannot read"), ("5-2", "cannot read"), ("-1", "do not exist"),
                     ("10", "this model has 10 classes")):
        with pytest.raises(ValueError, match=msg): Wd.parse_classes(bad, 10)
    assert Wd.guidance_scales(4, 4) == [1.0, 2.0, 3.0, 4.0]
    assert Wd.guidance_scales(3, 1) == [3.0]


# --- the panel -----------------------------------------------------------------------------------------------------

def test_panel_generates_what_generate_gives(ckpt):
    p = panel(ckpt, classes="0-9", cfg_scale=4.0, seed=3)
    res = p.run()
    assert p.error == "" and res.nfe == 50 and "NFE 50" in p.status.value and p.progress.value == 1.0
    assert png_size(p.image.value) == (6 * 22, 6 * 102) and p.image.width == str(6 * 22)   # fits 820 x 640
    # the same images as `sit-workbench sample --seed 3 --cfg-scale 4`: sample i is class i % 10; one row per class
    fn = Sampler(create_transport("Linear", "velocity")).sample_ode(sampling_method="heun2", num_steps=26)
    ref = generate(load_sit(ckpt), fn, torch.arange(10).repeat(2), Guidance(4.0, None, None), seed=3)
    assert torch.equal(res.images, rows_by_class(ref.images, 10)) and ref.nfe == 50
    before = p.image.value
    assert p.run() is not None and p.image.value == before    # same seed, same grid
    p.seed.value = 4
    assert p.run() is not None and p.image.value != before


def test_panel_defaults_come_from_the_run(ckpt, tmp_path):
    p = Wd.SamplerPanel(checkpoint=ckpt, device="cpu")       # the digits run: 10 classes, guidance 2, pixel space
    assert (p.classes.value, p.cfg_scale.value, p.cfg_channels.value) == ("0-9", 2.0, "all")
    run = str(Wd.find_path(ckpt).parent)                      # a run folder means its latest checkpoint
    assert Wd.run_defaults(run) == {"classes": "0-9", "cfg_scale": 2.0, "cfg_channels": None, "cfg_interval": (0.0, 1.0),
                                    "mode": "ODE", "method": "heun2", "num_steps": 26, "schedule": "uniform",
                                    "diffusion_form": "sigma", "diffusion_norm": 1.0, "last_step": "Mean"}
    assert (p.mode.value, p.method.value, p.num_steps.value, p.schedule.value) == ("ODE", "heun2", 26, "uniform")
    p.method.value = "dopri5"                                # an adaptive solver takes no time grid
    assert p.schedule.disabled and "schedule" not in p.request().sampler().to_dict()
    p.method.value, p.schedule.value = "dpm++2m", "shift:3"
    assert not p.schedule.disabled and p.request().sampler().to_dict()["schedule"] == "shift:3"
    p = Wd.SamplerPanel(checkpoint=ckpt, cfg_scale=5.0, classes="3", device="cpu")   # given values win
    assert (p.classes.value, p.cfg_scale.value) == ("3", 5.0)
    assert Wd.run_defaults(tmp_path / "nothing") == {}


def test_panel_options_reach_the_sampler(ckpt):
    p = panel(ckpt, classes="1", per_class=1)
    p.mode.value = "SDE"
    assert list(p.method.options) == methods("sde") and p.method.value == "Euler"
    assert not p.diffusion_form.disabled and p.eta.disabled
    p.num_steps.value, p.last_step.value = 10, None
    assert p.run().nfe == 9
    p.method.value, p.last_step.value = "Heun", "Mean"
    assert p.run().nfe == 2 * 9 + 1
    p.mode.value = "ODE"
    assert p.method.value == "heun2" and p.diffusion_form.disabled
    p.method.value, p.num_steps.value = "euler", 5
    assert p.run().nfe == 4
    p.method.value = "dopri5"                                  # adaptive: the progress follows t
    assert p.run() is not None and p.progress.value == 1.0
    spec = Wd.load_checkpoint(ckpt)
    assert Wd.with_request(spec, p.request()).guidance == Guidance(2.0, None, None)   # a pixel-space run: every channel
    p.cfg_interval.value, p.cfg_channels.value = (0.2, 0.8), 3
    assert Wd.with_request(spec, p.request()).guidance == Guidance(2.0, (0.2, 0.8), 3)
    assert p.run() is not None and p.error == ""


def test_generate_button_runs_in_a_thread(ckpt):
    p = panel(ckpt, classes="2-3")
    p.generate_button.click()
    job = p.jobs.current
    assert job is not None and job.thread is not threading.current_thread()
    assert p.jobs.wait(60) and not p.jobs.busy
    assert p.error == "" and png_size(p.image.value) == (8 * 22, 8 * 22) and p.cancel_button.disabled


@pytest.mark.parametrize("change, message", [
    (dict(checkpoint="/nonexistent/checkpoint"), "No checkpoint found"),
    (dict(checkpoint=""), "make demo"),
    (dict(classes="12"), "this model has 10 classes"),
    (dict(classes="one"), "cannot read"),
    (dict(mode="SDE", diffusion_form="w_KL_eta"), "measure L_t first"),
])
def test_errors_are_one_red_line(ckpt, change, message):
    p = panel(ckpt, classes="0")
    assert p.run() is not None
    before = p.image.value
    for k, v in change.items(): getattr(p, k).value = v
    p.generate_button.click(); p.jobs.wait(60)
    assert message in p.error and "\n" not in p.error and "Traceback" not in p.message.value
    assert 'class="sit-error"' in p.message.value and "color:#c62828" in p.message.value
    assert p.image.value == before and p.progress.bar_style == "danger"
    for k in change: setattr(getattr(p, k), "value", getattr(panel(ckpt), k).value)
    assert p.run() is not None and p.error == ""             # the panel still works


def test_guidance_without_a_null_class_is_refused(tmp_path):
    torch.manual_seed(0)
    m = SiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=10,
            class_dropout_prob=0.0, learn_sigma=False)
    save_pretrained(m, tmp_path / "m")
    p = Wd.SamplerPanel(checkpoint=str(tmp_path / "m"), classes="0", per_class=1, cfg_scale=4.0, device="cpu")
    assert p.run() is None and "no null class" in p.error
    p.cfg_scale.value = 1.0
    assert p.run() is not None and p.error == ""


def test_handler_errors_become_messages(ckpt):
    p = panel(ckpt)
    p._safe(lambda: 1 / 0)()
    assert p.error == "ZeroDivisionError: division by zero"
    p.clear_message()
    assert p.error == ""
    p.show_error(ValueError("<b>first</b>\nsecond"))
    assert p.error == "ValueError: <b>first</b>" and "&lt;b&gt;" in p.message.value


# --- cancelling and one job at a time -----------------------------------------------------------------------------

def test_a_cancelled_solve_stops_between_evaluations(ckpt):
    cancel, seen = threading.Event(), []
    def progress(frac, nfe):
        seen.append((frac, nfe))
        if nfe == 3: cancel.set()
    req = Wd.Request(checkpoint=ckpt, classes="0-1", per_class=1)
    with pytest.raises(Wd.Cancelled):
        Wd.sample_grid(req, cancel=cancel, on_progress=progress)
    assert [n for _, n in seen] == [1, 2, 3]                 # no evaluation after the cancel
    assert [f for f, _ in seen] == sorted(f for f, _ in seen) and seen[0][0] == 0.0


def test_cancel_button_stops_a_running_job(ckpt, monkeypatch):
    p = panel(ckpt, classes="0")
    assert p.run() is not None
    before = p.image.value
    started, release = threading.Event(), threading.Event()
    def slow_updater(bar, every=0.05):
        def update(frac, nfe):
            started.set(); release.wait(10)
        return update
    monkeypatch.setattr(Wd, "_progress_updater", slow_updater)
    p.seed.value = 9
    p.generate_button.click()
    assert started.wait(30) and not p.cancel_button.disabled
    p.cancel_button.click()
    release.set()
    assert p.jobs.wait(30)
    assert p.status.value == "cancelled" and p.error == "" and p.image.value == before
    assert p.progress.bar_style == "warning" and p.cancel_button.disabled


def test_a_new_job_cancels_the_running_one():
    jobs, log = Wd.Jobs(), []
    first_running, release = threading.Event(), threading.Event()
    def first(job):
        first_running.set(); release.wait(10)
        log.append(("first", job.cancel.is_set(), jobs.is_current(job)))
    def second(job): log.append(("second", job.cancel.is_set(), jobs.is_current(job)))
    j1 = jobs.submit(first)
    assert first_running.wait(10) and jobs.busy
    j2 = jobs.submit(second, background=False)
    release.set(); j1.thread.join(10)
    assert log == [("second", False, True), ("first", True, False)]   # the stale job may not touch the display
    assert j1.cancel.is_set() and not j2.cancel.is_set() and not jobs.busy


class FakeTimer:
    "threading.Timer's interface, fired by hand."
    made = []
    def __init__(self, delay, fn, args=(), kwargs=None):
        self.delay, self.fn, self.args, self.kwargs = delay, fn, args, kwargs or {}
        self.started = self.cancelled = False
        FakeTimer.made.append(self)
    def start(self): self.started = True
    def cancel(self): self.cancelled = True
    def fire(self):
        if not self.cancelled: self.fn(*self.args, **self.kwargs)


def test_debouncer_calls_once_after_the_last_trigger():
    FakeTimer.made = []
    calls = []
    d = Wd.Debouncer(lambda *a: calls.append(a), delay=0.4, timer=FakeTimer)
    for k in range(3): d(k)
    assert [t.cancelled for t in FakeTimer.made] == [True, True, False] and all(t.started for t in FakeTimer.made)
    for t in FakeTimer.made: t.fire()
    assert calls == [(2,)] and d.pending is None and FakeTimer.made[0].delay == 0.4
    d(5); d.cancel()
    assert FakeTimer.made[-1].cancelled and d.pending is None


def test_debouncer_with_real_timer():
    calls, done = [], threading.Event()
    d = Wd.Debouncer(lambda v: (calls.append(v), done.set()), delay=0.05)
    for v in range(5): d(v)
    assert done.wait(5)
    threading.Event().wait(0.2)
    assert calls == [4]


# --- the explorer and the scrubber --------------------------------------------------------------------------------

def test_explorer_debounces_the_slider_and_shares_the_noise(ckpt):
    FakeTimer.made = []
    p = panel(ckpt, classes="0-2", seed=1)
    ex = Wd.CFGExplorer(p, max_scale=3.0, columns=3, timer=FakeTimer)
    for v in (4.0, 5.0, 6.0): ex.max_scale.value = v      # moving the slider: one pending request, the last
    assert [t.cancelled for t in FakeTimer.made] == [True, True, False] and ex.result is None
    FakeTimer.made[-1].fire()
    assert ex.jobs.wait(60) and ex.error == ""
    assert ex.scales() == [1.0, 3.5, 6.0] and "1, 3.5, 6" in ex.scales_label.value
    imgs = ex.result.images
    assert imgs.shape == (9, 1, 8, 8) and png_size(ex.image.value)[0] == ex.result.nrow * 10 * 8 + 2 * 8
    # row r starts from the noise of sample (seed, r), the noise `sample` gives its sample r
    first = generate(load_sit(ckpt), Sampler(create_transport()).sample_ode(sampling_method="heun2", num_steps=26),
                     [0, 1, 2], Guidance(1.0, None, None), seed=1).images
    assert torch.allclose(imgs[0::3], first, atol=2e-3)
    # one row per class with the same noise: at scale 1 each column is the same as a row of single-scale runs
    req = p.request()
    alone = Wd.sample_guidance_row(req, [6.0]).images
    assert torch.allclose(imgs[2::3], alone, atol=2e-3)
    flat = Wd.sample_guidance_row(req, [1.0, 1.0]).images
    assert torch.allclose(flat[0::2], flat[1::2], atol=1e-5)
    ex.columns.value = 1                                    # the columns slider is debounced too
    FakeTimer.made[-1].fire(); ex.jobs.wait(60)
    assert ex.result.images.shape[0] == 3


def test_explorer_errors_are_messages(ckpt):
    p = panel(ckpt, classes="99")
    ex = Wd.CFGExplorer(p)
    assert ex.run() is None and "this model has 10 classes" in ex.error


def test_predicted_x1_matches_the_noise_route():
    torch.manual_seed(0)
    x, out = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    t = torch.full((4,), 0.4)
    for path in ("Linear", "GVP"):
        tr = create_transport(path, "velocity")
        eps = tr.path_sampler.velocity_to_noise(out, x, t)
        a = tr.path_sampler.compute_alpha_t(t.view(-1, 1, 1, 1))[0]
        s = tr.path_sampler.compute_sigma_t(t.view(-1, 1, 1, 1))[0]
        assert torch.allclose(Wd.predicted_x1(tr, out, x, t), (x - s * eps) / a, atol=1e-5)
    lin = create_transport("Linear", "velocity")
    t0 = torch.zeros(4)
    assert torch.allclose(Wd.predicted_x1(lin, out, x, t0), x + out)    # finite at the noise end: x0 + v


def test_scrubber_keeps_the_solve_and_moves_along_it(ckpt):
    p = panel(ckpt, classes="0-3")
    sc = Wd.TrajectoryScrubber(p, method="euler", num_steps=6)
    traj = sc.run()
    assert sc.error == "" and traj.x.shape == (6, 4, 1, 8, 8) and traj.nfe == 5 + 6
    assert torch.allclose(traj.t, torch.linspace(0, 1, 6))
    assert torch.allclose(traj.x1_hat[-1], traj.x[-1], atol=1e-5)    # at t = 1 the prediction is the state
    assert [o[0] for o in sc.t.options] == ["0.000", "0.200", "0.400", "0.600", "0.800", "1.000"]
    assert sc.t.value == 5 and not sc.t.disabled
    sc.t.value = 2
    assert "t = 0.400" in sc.figure.layout.annotations[0].text
    data = sc.plot.outputs[0]["data"]
    assert "application/vnd.plotly.v1+json" in data and len(data["application/vnd.plotly.v1+json"]["data"]) == 2
    sc.method.value = "euler"
    p.classes.value = "x"
    assert sc.run() is None and "cannot read" in sc.error


def test_scrubber_needs_a_fixed_step_method(ckpt):
    req = Wd.Request(checkpoint=ckpt, classes="0")
    with pytest.raises(UserError, match="fixed-step"):
        Wd.solve_trajectory(req, method="dopri5")


def test_panel_samples_with_the_stored_learned_solver(ckpt, tmp_path):
    """A learned solver stored beside the checkpoint (`fit-solver`) is what the panel's `learned` method samples with:
    the same pixels as our own path with that fit; at a guidance scale with no fit, a red line naming the command."""
    from sit_workbench.fit_solver import fit_solver
    from sit_workbench.registry import SamplerSpec
    from sit_workbench.run import load_model, read_run
    ck = tmp_path / "ck"
    shutil.copytree(ckpt, ck)
    fit_solver(ck, [4], n_fit=8, search_samples=4, evals=2, log=lambda *a, **k: None)
    p = panel(ck, classes="3,5", per_class=1, seed=0)
    assert "learned" in list(p.method.options)
    p.method.value, p.num_steps.value = "learned", 5
    res = p.run()
    assert p.error == "" and res.nfe == 4
    spec = read_run(ck)
    fn = SamplerSpec.create("ode", "learned", 5).build(spec.build_transport(), schedule_dir=ck / "schedules",
                                                       guidance=spec.guidance)
    ref = generate(load_model(spec), fn, torch.tensor([3, 5]), spec.guidance, seed=0)
    assert torch.equal(res.images, rows_by_class(ref.images, 2))
    p.cfg_scale.value = 3.0
    assert p.run() is None and "no learned solver fitted for guidance 3 at 4 NFE" in p.error and "fit-solver" in p.error
