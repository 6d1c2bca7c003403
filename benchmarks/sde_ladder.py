"""Whether the w_t study's SDE ladder converges on a score cell before the study measures 40 rows with it.

    SIT_WORKBENCH_ZOO=/path/to/zoo python benchmarks/sde_ladder.py --model linear-score --steps 12000

The study's own measurement (`diffusion_coefficient.converged_sde`: Euler-Maruyama up `SDE_LADDERS['full']`, 100 to
1,000 steps on a uniform grid, the same noise and balanced labels, the rungs walked until two agree) of one zoo
checkpoint, per w_t column: the digits-FID at each rung, where it converged, and the seconds. An ODE ladder on a
uniform grid did not converge by 1,000 NFE for the score cells (benchmarks/ladder_grid.py), and Euler-Maruyama is of
lower order; this tells whether the SDE needs a grid of its own there.
"""
import argparse
import dataclasses
import time

import torch

from sit_workbench.studies.diffusion_coefficient import COLUMNS, converged_sde
from sit_workbench.studies.remeasure import seed_model
from sit_workbench.studies.zoo import SETTINGS, checkpoint_velocity_loss


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="linear-score", help="zoo cell (default linear-score)")
    ap.add_argument("--steps", type=int, default=None, help="its rung (default: the studies' rung)")
    ap.add_argument("--n", type=int, default=1000, help="samples per rung (default 1000: the study's)")
    ap.add_argument("--columns", nargs="+", default=["sigma_t", "w_KL"], choices=list(COLUMNS), help="w_t columns")
    a = ap.parse_args()
    torch.set_num_threads(1)
    s = dataclasses.replace(SETTINGS["full"], num_samples=a.n)
    model, transport, ck = seed_model(a.model, "full", 0, a.steps)
    print(f"{a.model} ({ck}), {a.n} samples, Euler-Maruyama on a uniform grid, torch {torch.__version__}")
    for col in a.columns:
        t = time.time()
        r = converged_sde(model, transport, col, s, checkpoint_velocity_loss(ck) if col == "w_KL,eta" else None)
        fids = ", ".join(f"{k} steps {v:.2f}" for k, v in r["sde_fids"].items())
        print(f"{col:12s} {fids}; {'converged' if r['sde_converged'] else 'not converged'} at {r['sde_nfe']} steps "
              f"({time.time() - t:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
