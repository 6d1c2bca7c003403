"""Few-step samplers measured by their error: ours (multistep solvers and step schedules of `sit_workbench.solvers`)
beside diffusers' flow schedulers driving the same digits Linear velocity model, at equal NFE.

    SIT_WORKBENCH_ZOO=/path/to/zoo OMP_WAIT_POLICY=PASSIVE python benchmarks/few_step.py   # nbs/results/few_step.json
    python benchmarks/few_step.py --n 200 --iters 20 --nfe 6 8 --models linear-velocity --out /tmp/few.json  # quick

The models are the digits zoo's (`sit_workbench.studies.zoo`) at the rung where the convergence study found each
converged (`zoo_steps`, recorded in the results with every row); the zoo must already hold them (this script never
trains: it stops, naming the missing checkpoint).

Every sample starts from the same noise and label as its reference, the Heun-250 solve (`heun2`, 126 points) of the
same model; `rmse_to_reference` is the RMS pixel distance to it (data in [-1, 1], clamped as images are), and the
digits-FID (with its bootstrap error) is reported beside it. diffusers' sigma = 1 is noise and its flow velocity is
noise - data, so its scheduler is fed t = 1 - sigma and the negated velocity; the wrapper is checked by reproducing
our Euler from the same noise. Optimised schedules are fitted on a separate batch (noise seed 1) and saved beside
each checkpoint (`<checkpoint>/schedules/<name>.json`), or under `--schedules DIR` (`DIR/<model>-<steps>/<name>.json`). Exact Gaussian-mixture fields (the digits mixture) give the
NLL gap to the 250-NFE solve from the same noise, with `abm3` on a grid fitted to each field (seed 1, 256 samples).
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from sit_workbench.evaluate import digits_metrics, sample_nll
from sit_workbench.sample import random_labels, sample_noise
from sit_workbench.studies.path_length import digits_mixture
from sit_workbench.solvers import data_prediction, optimize_schedule, save_schedule, schedule_dir
from sit_workbench.transport import Sampler, create_transport
from sit_workbench.studies.zoo import final_steps, machine, zoo_config, zoo_dir

REFERENCE = ("heun2, 126 points (250 NFE)", dict(sampling_method="heun2", num_steps=126))
OURS = ("dpm++2m", "dpm++3m", "unipc", "abm3")
OPTIMIZED = ("abm3",)
MODELS = ("linear-velocity", "gvp-velocity", "vp-velocity", "vp-noise")   # the first is compared with diffusers


def converged(name, setting="full"):
    """`(model, transport, checkpoint, steps)`: zoo model `name` at its converged rung (`final_steps`), loaded from
    the zoo; a `SystemExit` naming the folder when the zoo does not hold it (a benchmark never trains)."""
    steps = final_steps(name, setting)
    ck = Path(zoo_config(name, setting, steps).output_dir) / f"checkpoint-{steps}"
    if not (ck / "trainer_state.json").is_file():
        raise SystemExit(f"the zoo has no {ck} ({name} at its converged rung, {steps} steps): point SIT_WORKBENCH_ZOO "
                         f"at the zoo that holds it (now {zoo_dir(setting)}), or train it with `sit-workbench study "
                         f"convergence --setting {setting}`")
    from sit_workbench.checkpoint import load_sit          # read only: no lock, no training (zoo_model may train)
    from sit_workbench.transport import transport_from_config
    return load_sit(ck).eval(), transport_from_config(zoo_config(name, setting, steps).model_config), ck, steps


def diffusers_schedulers():
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
    flow = dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=1.0)
    return {"DPM-Solver++(2M), flow, shift 1": lambda: DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, **flow),
            "UniPC (bh2, order 2), flow, shift 1": lambda: UniPCMultistepScheduler(solver_order=2, solver_type="bh2", **flow),
            "FlowMatchEuler, shift 1": lambda: FlowMatchEulerDiscreteScheduler(shift=1.0)}


@torch.no_grad()
def run_diffusers(scheduler, model, z, y, nfe, sigmas=None):
    "Drive a diffusers flow scheduler with our velocity model (t = 1 - sigma, velocity negated); returns (x, nfe)."
    scheduler.set_timesteps(nfe) if sigmas is None else scheduler.set_timesteps(sigmas=sigmas)
    x, calls = z.clone(), 0
    for t in scheduler.timesteps:
        sigma = float(t) / scheduler.config.num_train_timesteps
        v = model(x, torch.full((len(x),), 1 - sigma), y); calls += 1
        x = scheduler.step(-v, t, x).prev_sample
    return x, calls


def rmse(a, b): return float(((a.clamp(-1, 1) - b.clamp(-1, 1)) ** 2).mean().sqrt())


def sample_ours(transport, model, z, y, method, num_steps, schedule="uniform", sched_dir=None):
    fn = Sampler(transport).sample_ode(sampling_method=method, num_steps=num_steps, schedule=schedule, schedule_dir=sched_dir)
    with torch.no_grad(): x = fn(z, model.forward, y=y)[-1]
    return x, fn.nfe


def fit_schedules(name, transport, model, sdir, nfes, methods, n_fit, iters, progress):
    "Optimised grids for each method and NFE, fitted on a separate batch; saved in `sdir` (beside the checkpoint)."
    y = random_labels(n_fit, model.num_classes, seed=1)
    z = sample_noise(range(n_fit), (model.in_channels, model.input_size, model.input_size), seed=1)
    ref, _ = sample_ours(transport, model, z, y, REFERENCE[1]['sampling_method'], REFERENCE[1]['num_steps'])
    path = transport.path_sampler
    t0, t1 = transport.check_interval(transport.train_eps, transport.sample_eps, eval=True)
    pred = transport.model_type.name.lower()
    def denoise(x, t):
        tt = torch.as_tensor(t).to(torch.float32).expand(len(x))
        return data_prediction(path, pred, model(x, tt, y), x, tt.double())
    info = {}
    for m in methods:
        grids = {}
        for nfe in nfes:
            ts, inf = optimize_schedule(denoise, z, ref, path, t0, t1, nfe + 1, method=m, init="uniform", iters=iters,
                                        progress=progress)
            grids[nfe + 1] = ts; info[(m, nfe)] = inf
            if progress: print(f"  schedule {name} {m} NFE {nfe}: fit-batch rms {inf['rms_init']:.4f} -> {inf['rms']:.4f}", flush=True)
        save_schedule(sdir, m, grids, t0, t1, method=m, model=name, fit_samples=n_fit, iters=iters,
                      reference=REFERENCE[0])
    return info


def model_rows(name, loaded, nfes, n, n_fit, iters, clf, with_diffusers, progress, heun=True, schedules=None):
    """Rows of every solver at every NFE for one model; `loaded` is `converged(name)`'s `(model, transport, checkpoint,
    steps)`; the optimised grids go beside the checkpoint, or under `schedules/<name>-<steps>`."""
    model, transport, ck, steps = loaded
    sdir = schedule_dir(ck) if schedules is None else Path(schedules) / f"{name}-{steps}"
    y = random_labels(n, model.num_classes, seed=0)
    z = sample_noise(range(n), (model.in_channels, model.input_size, model.input_size), seed=0)
    ref, _ = sample_ours(transport, model, z, y, REFERENCE[1]['sampling_method'], REFERENCE[1]['num_steps'])
    fit = fit_schedules(name, transport, model, sdir, nfes, OPTIMIZED, n_fit, iters, progress)
    rows = []
    def add(solver, impl, x, nfe, **extra):
        m = digits_metrics((x.clamp(-1, 1) + 1) / 2, y, clf, bootstrap=20)
        rows.append({"model": name, "solver": solver, "implementation": impl, "nfe": nfe, "rmse_to_reference": rmse(x, ref),
                     "digits_fid": m["digits_fid"], "digits_fid_std": m["digits_fid_std"], "accuracy": m["accuracy"],
                     "reference": REFERENCE[0], "n": n, "steps": steps, **extra})
        if progress: print(json.dumps(rows[-1]), flush=True)
    add("heun2 (reference)", "ours", ref, 250)
    for nfe in nfes:
        if heun:
            for m in ("heun2", "midpoint"):
                add(m, "ours", *sample_ours(transport, model, z, y, m, nfe // 2 + 1))
        for m in OURS:
            add(f"{m}, uniform", "ours", *sample_ours(transport, model, z, y, m, nfe + 1))
        for m in OPTIMIZED:
            add(f"{m}, optimized", "ours", *sample_ours(transport, model, z, y, m, nfe + 1, f"optimized:{m}", sdir),
                fit_rms=fit[(m, nfe)]["rms"])
        if with_diffusers:
            for label, make in diffusers_schedulers().items():
                add(label, "diffusers", *run_diffusers(make(), model.forward, z, y, nfe))
    return rows


def check_wrapper(loaded, n=64, steps=10):
    "diffusers' FlowMatchEuler on sigmas 1, 1 - 1/K, ..., 1/K through the wrapper equals our Euler on K + 1 points."
    from diffusers import FlowMatchEulerDiscreteScheduler
    model, transport = loaded[:2]
    y = random_labels(n, model.num_classes, seed=0)
    z = sample_noise(range(n), (model.in_channels, model.input_size, model.input_size), seed=0)
    ours, _ = sample_ours(transport, model, z, y, "euler", steps + 1)
    theirs, nfe = run_diffusers(FlowMatchEulerDiscreteScheduler(shift=1.0), model.forward, z, y, steps,
                                sigmas=list(np.linspace(1, 0, steps + 1)[:-1]))
    return {"max_abs_difference": float((ours - theirs).abs().max()), "nfe": nfe}


EXACT = (("midpoint", "uniform"), ("abm3", "uniform"), ("dpm++3m", "uniform"), ("dpm++3m", "logsnr"), ("unipc", "logsnr"))


def fit_exact_grid(tr, field, dim, nfe, n_fit, iters):
    """`abm3`'s grid for `nfe` on an exact field, fitted on a separate batch (noise seed 1) from the uniform and from the
    log-SNR start; the start whose fit ends with the lower RMS on that batch wins (the measured batch is never seen)."""
    path = tr.path_sampler
    t0, t1 = tr.check_interval(tr.train_eps, tr.sample_eps, eval=True)
    z = torch.randn(n_fit, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref = Sampler(tr).sample_ode(**REFERENCE[1])(z, field)[-1]
    def denoise(x, t):
        t = torch.as_tensor(t).expand(len(x))
        return data_prediction(path, "velocity", field(x, t), x, t)
    return optimize_schedule(denoise, z, ref, path, t0, t1, nfe + 1, method="abm3", init=("uniform", "logsnr"), iters=iters)


def exact_rows(nfes, n, progress, n_fit=256, iters=60):
    """Exact digits-mixture fields: NLL per dimension of few-step solves against the 250-NFE solve from the same noise;
    `nll_gap` is the difference of the means, `nll_gap_abs` the mean of each sample's absolute difference (no
    cancellation between too concentrated and too spread samples)."""
    gm, rows = digits_mixture(), []
    for p in ("Linear", "GVP", "VP"):
        tr = create_transport(p, "velocity")
        field = gm.model(tr.path_sampler, "velocity")
        z = torch.randn(n, gm.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        ref = Sampler(tr).sample_ode(**REFERENCE[1])(z, field)[-1]
        nll_ref = sample_nll(gm, ref)
        for nfe in nfes:
            runs = [(f"{m}, {sch}", m, nfe // 2 + 1 if m == "midpoint" else nfe + 1, sch, {}) for m, sch in EXACT]
            ts, info = fit_exact_grid(tr, field, gm.dim, nfe, n_fit, iters)
            runs.append(("abm3, optimized", "abm3", nfe + 1, ts, {"fit_rms": info["rms"], "fit_init": info["init"],
                                                                   "grid": [round(float(t), 6) for t in ts]}))
            for label, m, k, sch, extra in runs:
                f = Sampler(tr).sample_ode(sampling_method=m, num_steps=k, schedule=sch)
                x = f(z, field)[-1]
                gap = sample_nll(gm, x) - nll_ref
                rows.append({"model": f"digits mixture, {p} (exact)", "solver": label, "implementation": "ours",
                             "nfe": f.nfe, "rmse_to_reference": float(((x - ref) ** 2).mean().sqrt()),
                             "nll_gap": float(gap.mean()), "nll_gap_abs": float(gap.abs().mean()),
                             "reference": REFERENCE[0], "n": n, **extra})
                if progress: print(json.dumps(rows[-1]), flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000, help="samples per measurement (default 1000)")
    ap.add_argument("--n-fit", type=int, default=128, help="samples of the schedule-fitting batch (default 128)")
    ap.add_argument("--iters", type=int, default=60, help="Adam iterations per optimised schedule (default 60)")
    ap.add_argument("--nfe", type=int, nargs="+", default=[6, 8, 10, 12, 16], help="NFE budgets (default 6 8 10 12 16)")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS,
                    help="zoo models (default: all four; linear-velocity at every NFE beside diffusers, the others at 6)")
    ap.add_argument("--setting", default="full", help="zoo setting (default full: the converged zoo)")
    ap.add_argument("--schedules", default=None,
                    help="folder for the optimised grids (default: beside each checkpoint, <checkpoint>/schedules)")
    ap.add_argument("--no-exact", action="store_true", help="skip the exact Gaussian-mixture rows")
    ap.add_argument("--out", default="nbs/results/few_step.json", help="results JSON (default nbs/results/few_step.json)")
    args = ap.parse_args()
    from sit_workbench.studies.zoo import _classifier
    loaded = {name: converged(name, args.setting) for name in args.models}     # all present before any work
    t_start, clf = time.time(), _classifier()
    wrapper = check_wrapper(loaded["linear-velocity"]) if "linear-velocity" in loaded else None
    print("wrapper check (diffusers FlowMatchEuler vs our euler):", wrapper, flush=True)
    rows = []
    for name, m in loaded.items():
        lin = name == "linear-velocity"
        rows += model_rows(name, m, args.nfe if lin else [6], args.n, args.n_fit, args.iters, clf, lin, True,
                           schedules=args.schedules)
    if not args.no_exact: rows += exact_rows([6, 8, 10], 5 * args.n, True, iters=args.iters)
    doc = {"study": "few_step", "machine": machine(), "date": time.strftime("%Y-%m-%d"), "reference": REFERENCE[0],
           "zoo": str(zoo_dir(args.setting)), "zoo_steps": {name: m[3] for name, m in loaded.items()},
           "wrapper_check": wrapper, "n": args.n, "n_fit": args.n_fit, "iters": args.iters,
           "seconds": round(time.time() - t_start), "rows": rows}
    out = Path(args.out); out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print("wrote", out)


if __name__ == "__main__":
    main()
