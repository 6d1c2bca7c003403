"""Smoke test of benchmarks/few_step.py on a tiny digits model (the diffusers wrapper reproduces our Euler, every row
has its fields and an honest NFE, guided, the learned solver is stored beside the checkpoint, and the zoo's
converged rung is required: the benchmark never trains), and `sample --preset fast` with and without a stored
learned solver (`fit-solver`)."""
import importlib.util
import math
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("few_step", ROOT / "benchmarks" / "few_step.py")
B = importlib.util.module_from_spec(spec); spec.loader.exec_module(B)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    "A tiny Linear velocity digits model trained for 20 steps, as `converged` returns it."
    from sit_workbench.checkpoint import load_sit
    from sit_workbench.config import digits_config
    from sit_workbench.train import train
    from sit_workbench.transport import transport_from_config
    cfg = digits_config(depth=1, hidden_size=32, num_heads=2, warmup_steps=0, max_steps=20, save_steps=20,
                        output_dir=str(tmp_path_factory.mktemp("few") / "run"))
    ck = train(cfg, progress=False)["checkpoint"]
    return load_sit(ck).eval(), transport_from_config(cfg.model_config), Path(ck), 20


def test_wrapper_reproduces_our_euler(loaded):
    w = B.check_wrapper(*loaded[:2], n=4, steps=3)
    assert w["nfe"] == 3 and w["max_abs_difference"] < 1e-4


def test_rows(loaded):
    """Every row has its fields and an honest NFE, guided and not; the learned solver is fitted and stored beside the
    checkpoint; diffusers' rows say how the fitted grid was given."""
    import argparse
    from sit_workbench.digits import DigitsClassifier
    torch.manual_seed(0)
    clf = DigitsClassifier().eval()                          # an untrained classifier: the plumbing, not the values
    model, tr, ck, steps = loaded
    args = argparse.Namespace(model=B.MODEL, n=6, n_fit=8, search_samples=4, choice_samples=4, evals=3, grid_evals=3, cache=None,
                              fit_diffusers_grids=False)
    rows, timing = B.guidance_rows(model, tr, ck, steps, 2.0, [4], args, clf, progress=False)
    assert (ck / "schedules" / "learned-cfg2.json").is_file() and timing["per_nfe"][4]["learned_fit_seconds"] > 0
    keys = {"model", "guidance", "grid", "implementation", "solver", "nfe", "calls", "rmse_to_reference",
            "rmse_unclamped", "digits_fid", "reference", "steps"}
    assert all(keys <= set(r) and r["steps"] == 20 and r["guidance"] == 2.0 for r in rows)
    few = [r for r in rows if r["nfe"] != 250]
    assert {(r["implementation"], r["grid"]) for r in few} == {(i, g) for i in ("ours", "diffusers") for g in ("own", "fitted")}
    assert all(r["nfe"] == 4 and r["calls"] <= 4 and math.isfinite(r["rmse_to_reference"]) for r in few)
    assert all(r["rmse_unclamped"] >= r["rmse_to_reference"] - 1e-7 for r in few)        # the clamp only brings closer
    solvers = {r["solver"] for r in few}
    assert {"learned", "abm3", "FlowMatchEuler", "FlowMatchHeun", "DPM-Solver++(2M)", "DPM-Solver++(3M)",
            "UniPC (bh2, order 2)"} <= solvers
    heun = next(r for r in few if r["solver"] == "FlowMatchHeun" and r["grid"] == "fitted")
    assert heun["calls"] == 3 and "every other time" in heun["grid_source"] and "after set_timesteps" in heun["custom_grid"]
    assert rows[0]["rmse_to_reference"] == 0.0                # the reference against itself


def test_exact_rows():
    rows = B.exact_rows([6], n=64, progress=False, n_fit=16, iters=3)
    assert {r["model"] for r in rows} == {f"digits mixture, {p} (exact)" for p in ("Linear", "GVP", "VP")}
    assert all(r["nfe"] == 6 and math.isfinite(r["nll_gap"]) and r["nll_gap_abs"] >= abs(r["nll_gap"]) for r in rows)
    opt = [r for r in rows if r["solver"] == "abm3, optimized"]
    assert len(opt) == 3 and all(r["fit_init"] in ("uniform", "logsnr") and len(r["grid"]) == 7 for r in opt)
    assert all(r["grid"] == sorted(r["grid"]) and r["grid"][0] == 0.0 for r in opt)


def test_the_converged_rung_is_required(tmp_path, monkeypatch):
    monkeypatch.setenv("SIT_WORKBENCH_ZOO", str(tmp_path))
    with pytest.raises(SystemExit, match="checkpoint-"):
        B.converged("linear-velocity")


def test_readmes_quote_the_committed_results():
    import json
    doc = json.loads((ROOT / "nbs" / "results" / "few_step.json").read_text())
    readme, bench = (ROOT / "README.md").read_text(), (ROOT / "benchmarks" / "README.md").read_text()
    assert f"{doc['seconds']} s; the wrapper" in bench
    lin = [r for r in doc["rows"] if r["model"] == "linear-velocity" and "guidance" in r and r["nfe"] != 250]
    e = lambda r: r["rmse_to_reference"]
    best = lambda g, n, impl: min((r for r in lin if (r["guidance"], r["nfe"], r["implementation"]) == (g, n, impl)), key=e)
    for g in {r["guidance"] for r in lin}:
        for n in {r["nfe"] for r in lin}:
            o, d = e(best(g, n, "ours")), e(best(g, n, "diffusers"))
            assert f"{o:.4f} / {d:.4f} = {o / d:.2f}" in bench, (g, n)
    few = readme[readme.index("*Few-step sampling*"):readme.index("*FLOPs.*")]
    assert f"{e(best(2.0, 8, 'ours')) / e(best(2.0, 8, 'diffusers')):.2f}x" in few
    fit = max(r["fit_seconds"] for r in lin if r["solver"] == "learned" and r["guidance"] != 1)
    assert fit <= 60 and f"at most {fit:.1f} s per NFE" in few and f"at most {fit:.1f} s per NFE" in bench
    assert "--preset fast" in readme and "fit-solver" in readme
    for p in ("Linear", "GVP", "VP"):
        rs = {r["nfe"]: r for r in doc["rows"] if r["model"] == f"digits mixture, {p} (exact)" and r["solver"] == "abm3, optimized"}
        assert rs[10]["nll_gap_abs"] <= 0.02
        assert f"{rs[10]['nll_gap_abs']:.4f}" in readme
        assert all(f"{rs[n]['nll_gap_abs']:.4f}" in bench for n in (6, 8, 10)), p


def _cli(*argv):
    import contextlib
    import io
    import sit_workbench.cli as C
    with contextlib.redirect_stdout(io.StringIO()) as out: C.main([str(a) for a in argv])
    return out.getvalue()


def test_preset_fast_uses_the_stored_fit(tiny_digits_run, tmp_path):
    """`sample --preset fast`: without a stored fit, abm3 at 8 NFE and the command that fits one; `fit-solver` stores
    one (printing the seconds per NFE); then `--preset fast` samples with it and says so; another guidance scale does
    not reuse it."""
    ck = tiny_digits_run(20)                                   # a digits run: guidance 2 in its run.json
    msg = _cli("sample", ck, "--preset", "fast", "--classes", "1", "--per-class", "2", "--out", tmp_path / "a.png")
    assert "ODE abm3, 9 points (8 network evaluations)" in msg, msg
    assert f"no learned solver stored for guidance 2 on all channels at 8 NFE" in msg, msg
    assert f"fit one with `sit-workbench fit-solver {ck} --nfe 8 --cfg-scale 2`" in msg, msg
    assert "2 samples, 8 network evaluations each" in msg, msg

    msg = _cli("fit-solver", ck, "--nfe", "8", "--n-fit", "16", "--search-samples", "8", "--evals", "4")
    assert "learned solver, 8 NFE, guidance 2 on all channels" in msg and "fitted in" in msg, msg
    assert (Path(ck) / "schedules" / "learned-cfg2.json").is_file()

    msg = _cli("sample", ck, "--preset", "fast", "--classes", "1", "--per-class", "2", "--out", tmp_path / "b.png")
    assert "ODE learned, 9 points (8 network evaluations) (preset fast: the learned solver stored for guidance 2" in msg, msg
    assert "learned-cfg2.json" in msg and "2 samples, 8 network evaluations each" in msg, msg

    msg = _cli("sample", ck, "--preset", "fast", "--cfg-scale", "3", "--classes", "1", "--per-class", "1",
               "--out", tmp_path / "c.png")
    assert "ODE abm3, 9 points" in msg and "--nfe 8 --cfg-scale 3`" in msg, msg


def test_learned_method_without_a_fit_says_how_to_make_one(tiny_digits_run, tmp_path, capsys):
    ck = tiny_digits_run(20)
    with pytest.raises(SystemExit):
        _cli("sample", ck, "--sampling-method", "learned", "--num-sampling-steps", "6", "--cfg-scale", "4",
             "--out", tmp_path / "x.png")
    err = capsys.readouterr().err
    assert "no learned solver fitted for guidance 4 at 5 NFE" in err and f"fit-solver {ck} --nfe 5 --cfg-scale 4" in err, err


@pytest.mark.parametrize("path", ["GVP", "VP"])
@pytest.mark.parametrize("prediction", ["velocity", "noise"])
def test_diffusers_see_any_path_as_the_linear_one(path, prediction):
    """`as_linear` turns a path's field into the Linear path's flow velocity: on a Gaussian mixture the GVP / VP
    exact field, seen through it, is the exact Linear field at the same state and Linear time (whatever the network
    predicts), and `linear_time` / `path_time` invert each other inside the sampling interval."""
    from sit_workbench.gaussian import GaussianMixture
    from sit_workbench.transport import create_transport
    gen = torch.Generator().manual_seed(0)
    gm = GaussianMixture(torch.randn(4, 6, dtype=torch.float64, generator=gen),
                         torch.rand(4, 6, dtype=torch.float64, generator=gen) * 0.5 + 0.2)
    tr, lin = create_transport(path, prediction), create_transport("Linear", "velocity")
    out = gm.model(tr.path_sampler, prediction)
    def velocity(x, t, rows):
        tt = torch.as_tensor(t, dtype=x.dtype).expand(len(x))
        return tr.velocity_from_output(out(x, tt), x, tt)
    exact = gm.model(lin.path_sampler, "velocity")
    seen = B.as_linear(tr, velocity)
    x = torch.randn(32, 6, dtype=torch.float64, generator=gen)
    t0, t1 = tr.check_interval(tr.train_eps, tr.sample_eps, sde=False, eval=True)
    for t_lin in (0.1, 0.3, 0.5, 0.8, 0.95):
        t = B.path_time(tr, t_lin)
        assert t0 < float(t) < t1 and abs(float(B.linear_time(tr, t)) - t_lin) < 1e-9
        want = exact(x, torch.full((32,), t_lin, dtype=torch.float64))
        assert torch.allclose(seen(x, torch.tensor(t_lin, dtype=torch.float64), None), want, atol=1e-6), t_lin
    assert float(B.path_time(tr, 0.0)) == t0 and float(B.path_time(tr, 1.0)) == t1
