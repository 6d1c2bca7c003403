"""How sure is each ratio of benchmarks/few_step.py? For each guidance and NFE of the model's rows in its results
(`--results`: nbs/results/few_step.json, the Linear model, by default; a `--model` run's file for another cell), our best row and diffusers' best row (over both grids) are solved again from the same
held-out noise and labels, the recorded RMS distances are checked to be reproduced, and the ratio ours/diffusers is
bootstrapped over the held-out samples (the same resampled samples for both: a paired interval).

    SIT_WORKBENCH_ZOO=/path/to/zoo OMP_WAIT_POLICY=PASSIVE python benchmarks/few_step_spread.py --cache runs/few-cache
    SIT_WORKBENCH_ZOO=/path/to/zoo python benchmarks/few_step_spread.py --cache runs/few-cache \
        --results nbs/results/few_step_vp-velocity.json --out runs/few_step_spread_vp-velocity.json

It also prints how much of each row's squared error its 5 worst samples carry (at few steps a handful of samples,
whose few-step solve lands on another shape than the reference's, dominate the RMS distance), and the ratio for the
typical sample: the median sample's distance, ours over diffusers'.
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from few_step import Batch, converged, ours, theirs
from sit_workbench.registry import SamplerSpec
from sit_workbench.sample import Guidance
from sit_workbench.solvers import schedule_dir
from sit_workbench.studies.zoo import machine


def best_rows(rows, model):
    "{(guidance, nfe): (our best row, diffusers' best row)} of zoo cell `model` by `rmse_to_reference`, over both grids."
    out = {}
    for r in rows:
        if r["model"] != model or r["nfe"] == 250: continue
        k, side = (r["guidance"], r["nfe"]), int(r["implementation"] == "diffusers")
        pair = out.setdefault(k, [None, None])
        if pair[side] is None or r["rmse_to_reference"] < pair[side]["rmse_to_reference"]: pair[side] = r
    return {k: tuple(v) for k, v in sorted(out.items()) if None not in v}


def solve_row(model, tr, ck, row, batch, g):
    "The held-out samples of `row`, made again as benchmarks/few_step.py made them."
    nfe, grid = row["nfe"], row.get("grid_times")
    if row["implementation"] == "diffusers":
        if row["grid"] == "own": return theirs(model, tr, row["solver"], batch, g, nfe, shift=row["shift"])[0]
        return theirs(model, tr, row["solver"], batch, g, nfe, grid=torch.tensor(grid, dtype=torch.float64))[0]
    if row["grid"] == "own" or row["solver"] == "learned":
        spec = SamplerSpec.create("ode", row["solver"], nfe + 1)
    else:
        spec = SamplerSpec.create("ode", row["solver"], nfe + 1, schedule=[float(t) for t in grid])
    return ours(model, tr, spec, batch, g, schedule_dir(ck))[0]


def per_sample(x, ref):
    "Each sample's mean squared pixel distance to the reference, both clamped to [-1, 1]."
    return ((x.clamp(-1, 1) - ref.clamp(-1, 1)) ** 2).flatten(1).mean(1).double()


def paired_ratio(ea, eb, draws=2000, seed=0):
    "RMS(a) / RMS(b) and its 95% bootstrap interval, resampling the same samples for both."
    rng = np.random.default_rng(seed)
    a, b = ea.numpy(), eb.numpy()
    idx = rng.integers(0, len(a), size=(draws, len(a)))
    r = np.sqrt(a[idx].mean(1) / b[idx].mean(1))
    return float(np.sqrt(a.mean() / b.mean())), float(np.percentile(r, 2.5)), float(np.percentile(r, 97.5))


def worst_share(e, k=5): return float(e.sort().values[-k:].sum() / e.sum())


def median_ratio(ea, eb):
    "The typical sample's distance, ours over diffusers': the RMS distance of the median sample of each."
    return float((ea.median() / eb.median()).sqrt())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default="nbs/results/few_step.json", help="few_step.py's results (read only)")
    ap.add_argument("--cache", default=None, help="folder of few_step.py's Heun-250 references (default: made here)")
    ap.add_argument("--draws", type=int, default=2000, help="bootstrap draws (default 2000)")
    ap.add_argument("--out", default="runs/few_step_spread.json", help="where the table goes (default runs/)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    res = json.loads(Path(args.results).read_text())
    (name, steps), = res["zoo_steps"].items()            # the one zoo cell the results were measured on
    model, tr, ck, steps = converged(name, steps=steps)
    if Path(res["checkpoint"]).resolve() != Path(ck).resolve():
        raise SystemExit(f"{args.results} was measured on {res['checkpoint']}, the zoo holds {ck}")
    start, out, batches = time.time(), [], {}
    for (scale, nfe), (mine, best_d) in best_rows(res["rows"], name).items():
        g = Guidance(float(scale), None, None)
        if scale not in batches: batches[scale] = Batch(model, tr, res["n"], 0, g, name, args.cache, True)   # one reference a scale
        held = batches[scale]
        ea, eb = (per_sample(solve_row(model, tr, ck, r, held, g), held.ref) for r in (mine, best_d))
        for r, e in ((mine, ea), (best_d, eb)):   # the recorded distance is reproduced
            if abs(float(e.mean().sqrt()) - r["rmse_to_reference"]) > 0.01 * r["rmse_to_reference"]:
                raise SystemExit(f"{r['solver']} ({r['grid']}), guidance {scale:g}, {nfe} NFE: RMS "
                                 f"{float(e.mean().sqrt()):.5f}, recorded {r['rmse_to_reference']:.5f}")
        ratio, lo, hi = paired_ratio(ea, eb, args.draws)
        row = {"guidance": scale, "nfe": nfe, "ours": f"{mine['solver']} ({mine['grid']})",
               "diffusers": f"{best_d['solver']} ({best_d['grid']})", "ratio": round(ratio, 3),
               "ratio_lo": round(lo, 3), "ratio_hi": round(hi, 3), "worst5_share_ours": round(worst_share(ea), 3),
               "worst5_share_diffusers": round(worst_share(eb), 3), "median_sample_ratio": round(median_ratio(ea, eb), 3)}
        out.append(row)
        print(f"guidance {scale:g}, {nfe:2d} NFE: ours/diffusers {ratio:.3f} [{lo:.3f}, {hi:.3f}]  "
              f"({row['ours']} vs {row['diffusers']}; 5 worst of {res['n']} samples carry "
              f"{row['worst5_share_ours']:.0%} / {row['worst5_share_diffusers']:.0%} of the squared error; the median "
              f"sample's ratio {row['median_sample_ratio']:.3f})", flush=True)
    doc = {"results": args.results, "model": name, "steps": steps, "measured": res["date"], "machine": machine(), "date": time.strftime("%Y-%m-%d"),
           "n": res["n"], "draws": args.draws, "seconds": round(time.time() - start), "rows": out}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
