"""Fixtures and helpers shared by the test files (`from conftest import ...` for the plain helpers)."""
import math

import pytest
import torch

from sit_workbench.gaussian import GaussianMixture


# --- the longest test files first (their durations under `make test`), so that the two pytest-xdist workers of
# `make test-py` (`--dist loadfile --no-loadscope-reorder`: files handed out in this order) finish together ---------
LONGEST_FIRST = ("test_demo.py", "test_remeasure.py", "test_meanflow_study.py", "test_slurm.py", "test_checkpoint.py",
                 "test_guidance_study.py", "test_repa.py", "test_interrupts.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))     # stable: the rest keep their order


# --- the exact Gaussian-mixture field the transport and solver tests check samplers against ---------------------

PATHS = ("Linear", "GVP", "VP")
PREDICTIONS = ("velocity", "score", "noise")
GAUSS = GaussianMixture(means=[1.0, -0.5, 0.0], stds=[0.5, 1.5, 1.0])


def exact(tr):
    return GAUSS.model(tr.path_sampler, tr.model_type.name.lower())


def noise(n, seed=0, dtype=torch.float64):
    return torch.randn(n, GAUSS.dim, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def assert_moments(x, n_sigma=5.0, slack=0.0, what=""):
    """Sample mean and std equal the Gaussian's to within n_sigma Monte-Carlo standard errors (+ slack)."""
    n = x.shape[0]
    std = GAUSS.std()
    err_mean = (x.double().mean(0) - GAUSS.mean()).abs()
    err_std = (x.double().std(0) - std).abs()
    assert (err_mean <= n_sigma * std / math.sqrt(n) + slack).all(), f"{what}: mean off by {err_mean.tolist()}"
    assert (err_std <= n_sigma * std / math.sqrt(2 * n) + slack).all(), f"{what}: std off by {err_std.tolist()}"


class Strict:
    """The exact field, but raising if called outside [lo, hi]."""
    def __init__(self, tr, lo, hi):
        self.inner, self.lo, self.hi = exact(tr), min(lo, hi), max(lo, hi)
        self.seen = []

    def __call__(self, x, t, **kwargs):
        if (t < self.lo).any() or (t > self.hi).any():
            raise AssertionError(f"model called at t in [{float(t.min())}, {float(t.max())}], outside [{self.lo}, {self.hi}]")
        self.seen.append(float(t.min()))
        return self.inner(x, t)



@pytest.fixture
def image_folder():
    """A function writing a small ImageFolder under `root`: two classes ('cats', 'dogs') of coloured noise squares,
    `size` pixels (larger than the training resolution when resizing is under test), the same pixels every time."""
    def make(root, n_per_class=8, size=40):
        from PIL import Image
        g = torch.Generator().manual_seed(0)
        for c, name in enumerate(["cats", "dogs"]):
            (root / name).mkdir(parents=True)
            for i in range(n_per_class):
                arr = (torch.rand(size, size, 3, generator=g) * 100 + 100 * c).to(torch.uint8).numpy()
                Image.fromarray(arr).save(root / name / f"{i}.png")
        return root
    return make


@pytest.fixture
def sigterm_after():
    """A function that waits (up to 120 s) until the training run `proc` has written `lines` rows to its `log.jsonl`,
    sends it SIGTERM as a cluster's preemption would, and returns `proc.communicate()`."""
    import signal
    import time

    def stop(proc, log, lines, poll=0.05):
        deadline = time.time() + 120
        while time.time() < deadline and not (log.is_file() and len(log.read_text().splitlines()) >= lines):
            time.sleep(poll)
        proc.send_signal(signal.SIGTERM)
        return proc.communicate(timeout=120)
    return stop


@pytest.fixture(scope="session")
def tiny_digits_run(tmp_path_factory):
    """A function training (once per set of options) a tiny digits run of `steps` steps and returning its last
    checkpoint folder: one block of width 32, `overrides` as `digits_config` keys (e.g. path_type="GVP")."""
    made = {}

    def make(steps=20, **overrides):
        key = (steps, tuple(sorted(overrides.items())))
        if key not in made:
            from sit_workbench.config import digits_config
            from sit_workbench.train import train
            out = tmp_path_factory.mktemp("tiny") / "run"
            cfg = digits_config(**{"depth": 1, "hidden_size": 32, "num_heads": 2, "warmup_steps": 0, "max_steps": steps,
                                   "save_steps": steps, "output_dir": str(out), **overrides})
            res = train(cfg, progress=False)
            assert res["status"] == "finished"
            made[key] = res["checkpoint"]
        return made[key]
    return make
