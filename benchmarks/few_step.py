"""Few-step sampling where users sample, guided and unguided: our solvers (abm3 and the other multistep solvers of
`sit_workbench.solvers`, and the `learned` solver fitted for the model and its guidance) beside diffusers' flow
schedulers at their best, driving the converged digits Linear velocity model at equal NFE.

    SIT_WORKBENCH_ZOO=/path/to/zoo OMP_WAIT_POLICY=PASSIVE python benchmarks/few_step.py --keep-rows  # nbs/results/few_step.json
    python benchmarks/few_step.py --n 32 --n-fit 32 --guidance 2 --nfe 6 --no-exact --out /tmp/few.json   # quick

For each guidance scale (`--guidance`, default 1 = unguided, 2 = the run's default, 4; classifier-free guidance on
every channel: ours through `generate` and `Guidance`, diffusers' schedulers fed the same combination
`uncond + w (cond - uncond)` of the same network's two outputs at each step) and each NFE (`--nfe`):

* the reference is our Heun-250 solve (`heun2`, 126 points) from the same noise and labels, with the same guidance;
  `rmse_to_reference` is the RMS pixel distance to it with both clamped to [-1, 1] (the images a user gets),
  `rmse_unclamped` without the clamp;
* every configuration is chosen on fitting noise (seed 1, `--n-fit` samples; the searches on its first
  `--search-samples`) and reported on held-out noise (seed 0, `--n` samples);
* `grid` is "own" or "fitted". Own: ours on the uniform grid; diffusers' schedulers at their best shift of `SHIFTS`
  (chosen on fitting noise). Fitted: the learned solver with its own fit (`fit_solver`: grid and per-step weights,
  shared or per dimension as a held-back part of the fitting noise decides, `fit_dim_ridge`; its first velocity,
  from pure noise, an affine stand-in fitted to the network there, `fit_first_step`, so it takes one more step for
  the same NFE; stored beside the checkpoint and run from there through `SamplerSpec("learned")`); every other
  solver, ours and diffusers', on the better, on fitting noise, of our two fitted grids: abm3's (searched for it with
  `search_schedule`) and the learned solver's where it evaluates the network (`grid_source` says which;
  FlowMatchHeun, two evaluations a step, takes every other time). diffusers' schedulers take it through `set_timesteps(sigmas=...)` where they accept custom
  sigmas, else it is set on the scheduler after `set_timesteps` (`custom_grid` says which);
  `--fit-diffusers-grids` also searches a grid for each diffusers scheduler itself, from there;
* the learned solver's fit seconds per NFE are printed and recorded (`fit_seconds`), apart from the reference.

diffusers' sigma = 1 is noise and its flow velocity is noise - data, so its scheduler is fed t = 1 - sigma and the
negated velocity; the wrapper is checked by reproducing our Euler from the same noise. The exact Gaussian-mixture
rows (NLL gaps of few-step solves of the digits mixture's exact fields) are unchanged; `--keep-rows` keeps the rows
of the previous results file that this run does not remake (the exact rows with `--no-exact`, and every other
model's rows).

`--model` runs the same comparison on another zoo cell (GVP and VP paths; velocity or noise prediction). diffusers'
flow schedulers assume the Linear path, so they see the cell's path through a change of variables that keeps its
probability flow (`as_linear`: `x_lin = x / (alpha_t + sigma_t)` at the Linear time of the same log-SNR; checked
against the exact Linear field of a Gaussian mixture in `tests/test_few_step.py`); the wrapper check is then that
FlowMatchEuler with 250 steps lands on our Heun-250 solve.
"""
import argparse
import json
import time
from pathlib import Path

import torch

from sit_workbench.evaluate import digits_metrics, sample_nll
from sit_workbench.fit_solver import REFERENCE_NAME, fit_solver, model_velocity, reference_solve
from sit_workbench.registry import SamplerSpec
from sit_workbench.sample import Guidance, generate, random_labels, sample_noise
from sit_workbench.interpolants import LinearPath
from sit_workbench.solvers import _t_of_lambda, data_prediction, optimize_schedule, schedule_dir, search_schedule
from sit_workbench.studies.path_length import digits_mixture
from sit_workbench.studies.zoo import ZOO, final_steps, machine, zoo_config, zoo_dir
from sit_workbench.transport import Sampler, create_transport

REFERENCE = ("heun2, 126 points (250 NFE)", dict(sampling_method="heun2", num_steps=126))
assert REFERENCE[0] == REFERENCE_NAME
MODEL = "linear-velocity"
OURS_OWN = ("abm3", "dpm++2m", "dpm++3m", "unipc")     # on the uniform grid
SHIFTS = (0.35, 0.5, 0.7, 1.0)                         # diffusers' shift, chosen on fitting noise (1.5 and 3 never won)


def converged(name, setting="full", steps=None):
    """`(model, transport, checkpoint, steps)`: zoo model `name` at its converged rung (`final_steps`; `steps`: another
    rung, for a quick look), loaded from the zoo; a `SystemExit` naming the folder when the zoo does not hold it (a
    benchmark never trains)."""
    steps = final_steps(name, setting) if steps is None else int(steps)
    ck = Path(zoo_config(name, setting, steps).output_dir) / f"checkpoint-{steps}"
    if not (ck / "trainer_state.json").is_file():
        raise SystemExit(f"the zoo has no {ck} ({name} at its converged rung, {steps} steps): point SIT_WORKBENCH_ZOO "
                         f"at the zoo that holds it (now {zoo_dir(setting)}), or train it with `sit-workbench study "
                         f"convergence --setting {setting}`")
    from sit_workbench.checkpoint import load_sit          # read only: no lock, no training (zoo_model may train)
    from sit_workbench.transport import transport_from_config
    return load_sit(ck).eval(), transport_from_config(zoo_config(name, setting, steps).model_config), ck, steps


# --- diffusers' flow schedulers ---------------------------------------------------------------------------------
def diffusers_schedulers():
    """name -> (make(shift), evaluations per step (Heun: 2), how it takes a custom grid). DPM-Solver++'s
    `set_timesteps(timesteps=...)` builds VP sigmas and fails with `use_flow_sigmas`; FlowMatchHeun's takes only a
    step count: both get the grid set on the scheduler after `set_timesteps`."""
    from diffusers import (DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler,
                           UniPCMultistepScheduler)
    flow = dict(use_flow_sigmas=True, prediction_type="flow_prediction")
    injected = "no custom flow grid through set_timesteps: sigmas set on the scheduler after set_timesteps"
    return {
        "FlowMatchEuler": (lambda s: FlowMatchEulerDiscreteScheduler(shift=s), 1, "set_timesteps(sigmas=...)"),
        "FlowMatchHeun": (lambda s: FlowMatchHeunDiscreteScheduler(shift=s), 2, injected),
        "DPM-Solver++(2M)": (lambda s: DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2,
                                                                   flow_shift=s, **flow), 1, injected),
        "DPM-Solver++(3M)": (lambda s: DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=3,
                                                                   flow_shift=s, **flow), 1, injected),
        "UniPC (bh2, order 2)": (lambda s: UniPCMultistepScheduler(solver_order=2, solver_type="bh2", flow_shift=s,
                                                                   **flow), 1, "set_timesteps(sigmas=...)"),
    }


def is_linear(transport): return isinstance(transport.path_sampler, LinearPath)


def _coefs(path, t):
    t = torch.as_tensor(t, dtype=torch.float64)
    (a, da), (s, ds) = path.compute_alpha_t(t), path.compute_sigma_t(t)
    return a, da, s, ds


def linear_time(transport, t):
    """Our time `t` on the transport's path as the Linear path's (what diffusers' flow schedulers assume: sigma = 1 -
    t_lin): `x = alpha_t data + sigma_t noise` is `(alpha_t + sigma_t) x_lin`, `x_lin` on the Linear path at
    `t_lin = alpha_t / (alpha_t + sigma_t)` (the same log-SNR)."""
    a, _, s, _ = _coefs(transport.path_sampler, t)
    return a / (a + s)


def path_time(transport, t_lin):
    "The inverse of `linear_time`: the path's time of the Linear time `t_lin`, within the sampling interval."
    t0, t1 = transport.check_interval(transport.train_eps, transport.sample_eps, sde=False, eval=True)
    t_lin = torch.as_tensor(t_lin, dtype=torch.float64)
    if float(t_lin) <= 0: return torch.tensor(t0, dtype=torch.float64)
    if float(t_lin) >= 1: return torch.tensor(t1, dtype=torch.float64)
    return _t_of_lambda(transport.path_sampler, torch.log(t_lin / (1 - t_lin)), t0, t1)


def as_linear(transport, velocity):
    """`velocity(x, t, rows)` of any path as the Linear path's flow velocity `(x_lin, t_lin, rows) -> data - noise`:
    the state is scaled to the path (`x = (alpha_t + sigma_t) x_lin`), the path's velocity `alpha'_t data + sigma'_t
    noise` and the state give data and noise, and `data - noise` is the Linear path's velocity. The same probability
    flow, in other coordinates: a Gaussian-mixture test checks it against the exact Linear field."""
    path = transport.path_sampler
    def vel(x_lin, t_lin, rows):
        t = path_time(transport, t_lin)
        a, da, s, ds = (c.to(x_lin.dtype) for c in _coefs(path, t))
        x = (a + s) * x_lin
        v = velocity(x, t.to(x_lin.dtype), rows)
        data = (ds * x - s * v) / (ds * a - s * da)
        return data - (x - a * data) / s
    return vel


def _set_grid(scheduler, ts):
    "Give `scheduler` the grid `ts` (t = 0 noise ... 1 data; sigma = 1 - t), as its API allows."
    from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler, UniPCMultistepScheduler
    sig = (1 - torch.as_tensor(ts, dtype=torch.float64)[:-1]).numpy()
    if isinstance(scheduler, (FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler)):
        scheduler.set_timesteps(sigmas=sig)              # (UniPC moves a first sigma of 1 to 1 - 1e-6 itself)
        return
    sig[0] = min(sig[0], 1 - 1e-6)                       # as UniPC does: log(alpha) at sigma = 1 is -inf in the update
    scheduler.set_timesteps(len(sig))
    s = torch.tensor(sig, dtype=torch.float32)
    if isinstance(scheduler, FlowMatchHeunDiscreteScheduler):     # what its set_timesteps does with its own sigmas
        scheduler.timesteps = torch.cat([s[:1], s[1:].repeat_interleave(2)]) * scheduler.config.num_train_timesteps
        s = torch.cat([s, torch.zeros(1)])
        scheduler.sigmas = torch.cat([s[:1], s[1:-1].repeat_interleave(2), s[-1:]])
    else:                                                         # DPM-Solver++: sigmas and the timesteps they index
        scheduler.sigmas = torch.cat([s, torch.zeros(1)])
        scheduler.timesteps = s * scheduler.config.num_train_timesteps


@torch.no_grad()
def run_diffusers(scheduler, velocity, z, nfe, per_step=1, grid=None):
    """Drive a diffusers flow scheduler with `velocity(x, t)` (t = 1 - sigma, velocity negated) within `nfe`
    evaluations (Heun: `(nfe + 1) // 2` steps, `2 steps - 1` evaluations); `grid`: our times instead of its own
    sigmas. Returns (x, evaluations)."""
    steps = nfe if per_step == 1 else (nfe + 1) // 2
    if grid is None: scheduler.set_timesteps(steps)
    else: _set_grid(scheduler, grid)
    x, calls = z.clone(), 0
    for t in scheduler.timesteps:
        sigma = float(t) / scheduler.config.num_train_timesteps
        v = velocity(x, torch.tensor(1 - sigma)); calls += 1
        x = scheduler.step(-v, t, x).prev_sample
    return x, calls


def check_wrapper(model, transport, n=64, steps=10):
    """On the Linear path: diffusers' FlowMatchEuler on sigmas 1, 1 - 1/K, ..., 1/K through the wrapper equals our Euler
    on K + 1 points. On another path (seen through `as_linear`, where Euler is another method): FlowMatchEuler on 250
    steps of the path's own sampling interval lands on our Heun-250 solve (`rmse_to_heun250`; its own sigmas would
    evaluate past a VP path's last time, 1 - eps, whose log-SNR a 1/250 sigma exceeds)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    y = random_labels(n, model.num_classes, seed=0)
    z = sample_noise(range(n), (model.in_channels, model.input_size, model.input_size), seed=0)
    if not is_linear(transport):
        ref = reference_solve(model, transport, z, y)[-1]
        t0, t1 = transport.check_interval(transport.train_eps, transport.sample_eps, sde=False, eval=True)
        x, nfe = theirs(model, transport, "FlowMatchEuler", _Fixed(z, y), None, 250,
                        grid=torch.linspace(t0, t1, 251, dtype=torch.float64))
        return {"rmse_to_heun250": rmse_unclamped(x, ref), "nfe": nfe}
    fn = Sampler(transport).sample_ode(sampling_method="euler", num_steps=steps + 1)
    with torch.no_grad(): mine = fn(z, model.forward, y=y)[-1]
    v = model_velocity(model, transport, y)
    got, nfe = run_diffusers(FlowMatchEulerDiscreteScheduler(shift=1.0), lambda x, t: v(x, t, torch.arange(n)), z,
                             steps, grid=torch.linspace(0, 1, steps + 1, dtype=torch.float64))
    return {"max_abs_difference": float((mine - got).abs().max()), "nfe": nfe}


# --- the measurement -------------------------------------------------------------------------------------------
def rmse(a, b): return float(((a.clamp(-1, 1) - b.clamp(-1, 1)) ** 2).mean().sqrt())
def rmse_unclamped(a, b): return float(((a - b) ** 2).mean().sqrt())


class Batch:
    """Noise, labels and the Heun-250 reference (every state) of one seed, with the guidance `g`; `name` (the zoo cell)
    keys the cached reference, so it has no default: a wrong one would compare against another model's solve."""
    def __init__(self, model, transport, n, seed, g, name, cache=None, progress=False):
        self.z = sample_noise(range(n), (model.in_channels, model.input_size, model.input_size), seed=seed)
        self.y = random_labels(n, model.num_classes, seed=seed)
        f = None if cache is None else Path(cache) / f"ref-{name}-n{n}-seed{seed}-cfg{g.scale:g}.pt"
        start, self.cached = time.time(), f is not None and f.is_file()
        if self.cached:
            d = torch.load(f)
            self.path, self.seconds = (d, None) if torch.is_tensor(d) else (d["path"], d["seconds"])
        else:
            self.path = reference_solve(model, transport, self.z, self.y, g)
            self.seconds = time.time() - start
            if f is not None: f.parent.mkdir(parents=True, exist_ok=True); torch.save({"path": self.path, "seconds": self.seconds}, f)
        self.ref = self.path[-1]
        if progress: print(f"  reference, seed {seed}, {n} samples, {g.describe()}: "
                           + ("read from the cache" if self.cached else f"{self.seconds:.0f} s"), flush=True)

    def sub(self, m): return self.z[:m], self.y[:m], self.ref[:m]


def ours(model, tr, spec, b, g, sdir, m=None):
    "Our solve of `spec` (a `SamplerSpec`) from the batch's noise through `generate` (the first `m` samples)."
    z, y, _ = b.sub(m or len(b.z))
    fn = spec.build(tr, schedule_dir=sdir, guidance=g)
    return generate(model, fn, y, g, noise=z).samples, fn.nfe


class _Fixed:
    "Noise and labels given (no reference): what `theirs` reads of a `Batch`."
    def __init__(self, z, y): self.z, self.y = z, y
    def sub(self, m): return self.z[:m], self.y[:m], None


def theirs(model, tr, name, b, g, nfe, shift=1.0, grid=None, m=None):
    """A diffusers scheduler's solve from the batch's noise with the same guided velocity (the first `m` samples). On
    a path other than Linear the schedulers see it through `as_linear`: the noise is scaled so the first evaluation
    is at the path's own start, and a grid of our times is mapped to Linear times (`linear_time`)."""
    make, per_step, _ = diffusers_schedulers()[name]
    z, y, _ = b.sub(m or len(b.z))
    v, rows = model_velocity(model, tr, y, g), torch.arange(len(z))
    if is_linear(tr):
        return run_diffusers(make(shift), lambda x, t: v(x, t, rows), z, nfe, per_step, grid)
    a, _, s, _ = _coefs(tr.path_sampler, path_time(tr, 0.0))
    lin = as_linear(tr, v)
    return run_diffusers(make(shift), lambda x, t: lin(x, t, rows), z / float(a + s), nfe, per_step,
                         None if grid is None else linear_time(tr, grid))


def heun_grid(ts):
    "A grid of NFE steps as FlowMatchHeun's grid of about half as many: every other time."
    return ts[::2] if (len(ts) - 1) % 2 == 0 else torch.cat([ts[:-1:2], ts[-1:]])


def guidance_rows(model, tr, ck, steps, scale, nfes, args, clf, progress=True):
    "Every row for one guidance scale: fits and choices on the fitting batch, rows on the held-out batch."
    g = Guidance(float(scale), None, None)          # classifier-free guidance on every channel (pixel space)
    sdir = schedule_dir(ck)
    t0, t1 = tr.check_interval(tr.train_eps, tr.sample_eps, sde=False, eval=True)
    fit = Batch(model, tr, args.n_fit, 1, g, args.model, args.cache, progress)
    held = Batch(model, tr, args.n, 0, g, args.model, args.cache, progress)
    m, c, rows, info = args.search_samples, args.choice_samples, [], {}
    def add(solver, impl, grid, x, calls, nfe, **extra):
        met = digits_metrics((x.clamp(-1, 1) + 1) / 2, held.y, clf, bootstrap=20)
        rows.append({"model": args.model, "guidance": float(scale), "solver": solver, "implementation": impl, "grid": grid,
                     "nfe": nfe, "calls": calls, "rmse_to_reference": rmse(x, held.ref),
                     "rmse_unclamped": rmse_unclamped(x, held.ref), "digits_fid": met["digits_fid"],
                     "digits_fid_std": met["digits_fid_std"], "accuracy": met["accuracy"], "reference": REFERENCE[0],
                     "n": args.n, "n_fit": args.n_fit, "steps": steps, **extra})
        if progress: print(json.dumps({k: v for k, v in rows[-1].items() if k != "grid_times"}), flush=True)
    add("heun2 (reference)", "ours", "own", held.ref, 250, 250)
    fit_err = lambda x, k: rmse(x, fit.ref[:k])
    for nfe in nfes:
        # the learned solver: fitted on the whole fitting batch (grid searched on its first m), stored beside the checkpoint
        res = fit_solver(ck, [nfe], guidance=g, n_fit=args.n_fit, seed=1, search_samples=m, evals=args.evals,
                         progress=False, reference=fit.path, log=(print if progress else (lambda *a, **k: None)))
        learned, linfo = res[nfe]
        fit_seconds = round(linfo["seconds"] + res.get("affine_start_seconds", 0.0), 2)    # its affine first step included
        print(f"fit seconds, guidance {scale:g}, {nfe} NFE: {fit_seconds:.1f} s (learned solver, {args.n_fit} "
              f"noises; the Heun-250 reference of the fitting noise is made once for all NFEs)", flush=True)
        # abm3's grid, searched on the first m fitting noises
        start = time.time()
        spec_of = lambda ts, meth="abm3": SamplerSpec.create("ode", meth, nfe + 1, schedule=[float(t) for t in ts])
        grid_abm3, ginfo = search_schedule(lambda ts: fit_err(ours(model, tr, spec_of(ts), fit, g, sdir, m)[0], m),
                                           nfe + 1, t0, t1, evals=args.grid_evals)
        abm3_seconds = time.time() - start
        grid_learned = learned.times(t0, t1)
        if learned.start is not None:      # for the others: where it evaluates the network (not its stand-in step)
            grid_learned = torch.cat([grid_learned[:1], grid_learned[2:]])
        cands = {"abm3's searched grid": grid_abm3, "the learned solver's grid": grid_learned}
        def choose(err_of, heun=False):
            "The better of our fitted grids on the first `c` fitting noises: (name, grid, {name: rms})."
            cs = {k + ", every other time": heun_grid(v) for k, v in cands.items()} if heun else cands
            tried = {k: err_of(v) for k, v in cs.items()}
            best = min(tried, key=tried.get)
            return best, cs[best], {k: round(v, 5) for k, v in tried.items()}
        # ours on held-out noise: every solver on the uniform grid and on the better of the fitted grids
        for meth in OURS_OWN:
            add(meth, "ours", "own", *ours(model, tr, SamplerSpec.create("ode", meth, nfe + 1), held, g, sdir), nfe=nfe)
            which, grid, tried = choose(lambda ts: fit_err(ours(model, tr, spec_of(ts, meth), fit, g, sdir, c)[0], c))
            add(meth, "ours", "fitted", *ours(model, tr, spec_of(grid, meth), held, g, sdir), nfe=nfe, grid_source=which,
                grids_tried=tried, grid_times=[round(float(t), 5) for t in grid],
                **({"grid_search_seconds": round(abm3_seconds, 1), "grid_search_rms": ginfo["objective"]} if meth == "abm3" else {}))
        add("learned", "ours", "fitted", *ours(model, tr, SamplerSpec.create("ode", "learned", nfe + 1), held, g, sdir),
            nfe=nfe, grid_source="its own fit", grid_times=[round(float(t), 5) for t in grid_learned],
            fit_rms=linfo["rms"], fit_seconds=fit_seconds, fit_evals=linfo["evals"],
            fit_dim_ridge=linfo["dim_ridge"], fit_rms_validation=linfo["rms_validation"],
            fit_first_step="affine" if learned.start is not None else "network", fit_affine_start=linfo["affine_start"],
            fit_first_step_search=linfo["first_step_search"])
        # diffusers: the best shift, and the better of our fitted grids, both chosen on the first c fitting noises
        for name, (_, per_step, how) in diffusers_schedulers().items():
            start = time.time()
            shifts = {s: fit_err(theirs(model, tr, name, fit, g, nfe, shift=s, m=c)[0], c) for s in SHIFTS}
            best = min(shifts, key=shifts.get)
            add(name, "diffusers", "own", *theirs(model, tr, name, held, g, nfe, shift=best), nfe=nfe, shift=best,
                shifts_tried={str(k): round(v, 5) for k, v in shifts.items()})
            which, grid, tried = choose(lambda ts: fit_err(theirs(model, tr, name, fit, g, nfe, grid=ts, m=c)[0], c),
                                        heun=per_step == 2)
            if args.fit_diffusers_grids:
                grid, dinfo = search_schedule(lambda ts: fit_err(theirs(model, tr, name, fit, g, nfe, grid=ts, m=m)[0], m),
                                              len(grid), t0, t1, init=(grid,), evals=args.grid_evals)
                which = f"searched for {name}, from {which}"
            add(name, "diffusers", "fitted", *theirs(model, tr, name, held, g, nfe, grid=grid), nfe=nfe,
                grid_source=which, custom_grid=how, grid_times=[round(float(t), 5) for t in grid], grids_tried=tried,
                choice_seconds=round(time.time() - start, 1))
        info[nfe] = {"learned_fit_seconds": fit_seconds, "abm3_grid_seconds": round(abm3_seconds, 1)}
    r1 = lambda v: None if v is None else round(v, 1)
    return rows, {"reference_seconds": {"fit": r1(fit.seconds), "held_out": r1(held.seconds)},
                  "per_nfe": info}


# --- exact Gaussian-mixture fields (unchanged) -----------------------------------------------------------------
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


def kept_rows(out, made_models):
    """The rows of the previous results file whose model this run did not measure, each marked with the date it was
    measured (its own mark if it was kept before, else that file's date), and those dates."""
    if not out.is_file(): return [], None
    old = json.loads(out.read_text())
    keep = [{**r, "measured": r.get("measured", old.get("date"))} for r in old["rows"] if r["model"] not in made_models]
    return keep, ", ".join(sorted({r["measured"] for r in keep}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=512, help="held-out samples per row (noise seed 0; default 512)")
    ap.add_argument("--n-fit", type=int, default=256, help="fitting samples (noise seed 1; default 256)")
    ap.add_argument("--search-samples", type=int, default=64,
                    help="fitting samples the searches (grids, shifts) run on: the first of the fitting batch (default 64)")
    ap.add_argument("--choice-samples", type=int, default=32,
                    help="fitting samples the choices (diffusers' shift, which fitted grid) are made on (default 32)")
    ap.add_argument("--evals", type=int, default=30, help="solves of the learned solver's grid search per NFE (default 30)")
    ap.add_argument("--grid-evals", type=int, default=16, help="solves of abm3's grid search per NFE (default 16)")
    ap.add_argument("--nfe", type=int, nargs="+", default=[4, 6, 8, 10, 12, 16], help="NFE budgets (default 4 6 8 10 12 16)")
    ap.add_argument("--guidance", type=float, nargs="+", default=[1.0, 2.0, 4.0],
                    help="classifier-free guidance scales, 1 = none (default 1 2 4; 2 is the run's)")
    ap.add_argument("--fit-diffusers-grids", action="store_true",
                    help="also search a grid for each diffusers scheduler itself (default: the better of ours)")
    ap.add_argument("--setting", default="full", help="zoo setting (default full: the converged zoo)")
    ap.add_argument("--model", default=MODEL, choices=sorted(ZOO), help=f"zoo cell (default {MODEL})")
    ap.add_argument("--steps", type=int, default=None,
                    help="the cell's rung to use (default its converged rung; another one is for a quick look only)")
    ap.add_argument("--cache", default=None, help="folder to keep the Heun-250 references in between runs (default: none)")
    ap.add_argument("--no-exact", action="store_true", help="skip the exact Gaussian-mixture rows")
    ap.add_argument("--keep-rows", action="store_true",
                    help="keep the previous results' rows of models this run does not measure (marked 'measured')")
    ap.add_argument("--out", default="nbs/results/few_step.json", help="results JSON (default nbs/results/few_step.json)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from sit_workbench.studies.zoo import _classifier
    model, tr, ck, steps = converged(args.model, args.setting, args.steps)
    t_start, clf = time.time(), _classifier()
    wrapper = check_wrapper(model, tr)
    print("wrapper check (diffusers FlowMatchEuler vs our " + ("euler" if is_linear(tr) else "heun2, 250 NFE") + "):",
          wrapper, flush=True)
    rows, timing = [], {}
    for scale in args.guidance:
        r, timing[f"{scale:g}"] = guidance_rows(model, tr, ck, steps, scale, args.nfe, args, clf)
        rows += r
    made = {args.model}
    if not args.no_exact:
        exact = exact_rows([6, 8, 10], 5 * args.n, True)
        rows += exact; made |= {r["model"] for r in exact}
    out = Path(args.out)
    kept, kept_date = kept_rows(out, made) if args.keep_rows else ([], None)
    doc = {"study": "few_step", "machine": machine(), "date": time.strftime("%Y-%m-%d"), "reference": REFERENCE[0],
           "zoo": str(zoo_dir(args.setting)), "zoo_steps": {args.model: steps}, "checkpoint": str(ck),
           "wrapper_check": wrapper, "n": args.n, "n_fit": args.n_fit, "search_samples": args.search_samples,
           "choice_samples": args.choice_samples, "evals": args.evals, "grid_evals": args.grid_evals, "guidance": args.guidance, "shifts": list(SHIFTS),
           "timing": timing, "seconds": round(time.time() - t_start),
           "kept": {"from": kept_date, "models": sorted({r["model"] for r in kept})} if kept else None,
           "rows": rows + kept}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print("wrote", out)


if __name__ == "__main__":
    main()
