"""Why the re-measurement walks a Linear or GVP score cell's NFE ladder on a shifted time grid (`remeasure.ladder_grid`).

    SIT_WORKBENCH_ZOO=/path/to/zoo python benchmarks/ladder_grid.py --model linear-score --steps 12000

Heun from the same noise and balanced labels at 50-500 NFE on each time grid, against Heun with 1,001 points (2,000
NFE) on the uniform grid: the RMS pixel distance of the clamped samples. A score (or noise) model's output becomes a
velocity through a division by alpha_t; on Linear and GVP alpha_t vanishes at the noise end (t = 0), so the
probability-flow ODE is stiff there, a uniform grid spends its steps evenly and converges slowly, and SD3's time shift
s > 1 (`shift:s`) crowds them toward t = 0. On SBDM-VP alpha_t'/alpha_t stays below 10 and the uniform grid wins.
Prints one row per grid, and the ratio of each grid's distance to the uniform grid's at the same NFE.
"""
import argparse
import time

import torch

from sit_workbench.registry import SamplerSpec
from sit_workbench.sample import generate


def main():
    import sys; sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from few_step import converged
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="linear-score", help="zoo cell (default linear-score)")
    ap.add_argument("--steps", type=int, default=None, help="its rung (default: the studies' rung)")
    ap.add_argument("--n", type=int, default=100, help="samples (default 100, balanced labels, noise seed 0)")
    ap.add_argument("--grids", nargs="+", default=["uniform", "shift:2", "shift:4", "shift:8"],
                    help="time grids (`solvers.time_grid` schedules); the uniform one is always measured")
    ap.add_argument("--points", type=int, nargs="+", default=[26, 51, 126, 251], help="Heun time points (NFE = 2 (points - 1))")
    a = ap.parse_args()
    torch.set_num_threads(1)
    model, tr, ck, steps = converged(a.model, steps=a.steps)
    y = torch.arange(a.n) % model.num_classes
    def solve(schedule, pts):
        g = generate(model, SamplerSpec.create("ode", "heun2", pts, schedule=schedule).build(tr), y, None, seed=0, batch_size=a.n)
        return g.samples.float().clamp(-1, 1)
    t = time.time()
    ref = solve("uniform", 1001)
    print(f"{a.model} at {steps:,} steps, {a.n} samples; reference: Heun, 1,001 uniform points (2,000 NFE), {time.time() - t:.0f} s")
    grids = ["uniform", *(g for g in a.grids if g != "uniform")]          # the uniform grid: the ratios' baseline
    rms = {g: {2 * (p - 1): float(((solve(g, p) - ref) ** 2).mean().sqrt()) for p in a.points} for g in grids}
    nfes = [2 * (p - 1) for p in a.points]
    print("| grid | " + " | ".join(f"{n} NFE" for n in nfes) + " |")
    print("|---|" + "---|" * len(nfes))
    for g, r in rms.items():
        print(f"| {g} | " + " | ".join(f"{r[n]:.4f}" + ("" if g == "uniform" else f" ({r[n] / rms['uniform'][n]:.2f}x)")
                                       for n in nfes) + " |")
    return rms


if __name__ == "__main__":
    main()
