"""Why the dequantised held-out NLL of a digits model can get worse as it trains (nbs/14c_remeasure): the
probability-flow ODE's log-density of held-out test digits at the pixel lattice points themselves and at their
dequantised versions (U(-1/16, 1/16) per pixel, as `heldout_nll` scores them), per checkpoint of zoo runs, both in
bits/dim of the 1/8-wide level cells. A model that sharpens its density onto the 17 levels it was trained on scores
better at the lattice points and worse between them. Reads the checkpoints, writes nothing.

    SIT_WORKBENCH_ZOO=/work/zoo-runs PYTHONPATH=. python benchmarks/lattice_nll.py linear-velocity gvp-velocity
"""
import argparse
import math
import platform

import torch


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="zoo cells, e.g. linear-velocity gvp-velocity")
    p.add_argument("--setting", default="full", help="zoo setting (default full)")
    p.add_argument("--steps", type=int, nargs="+", default=[1500, 3000, 6000], help="checkpoints (training steps)")
    p.add_argument("--images", type=int, default=60, help="test digits scored (the first of the test split)")
    p.add_argument("--tol", type=float, default=1e-5, help="dopri5 atol = rtol")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from sit_workbench.checkpoint import load_sit
    from sit_workbench.digits import digits_arrays
    from sit_workbench.studies.measures import bits_per_dim, dequantise, ode_log_likelihood
    from sit_workbench.studies.zoo import zoo_config, zoo_dir
    from sit_workbench.transport import transport_from_config
    xte, yte = digits_arrays("test")
    x, y = torch.as_tensor(xte[:a.images]).double(), torch.as_tensor(yte[:a.images])
    dim = math.prod(x.shape[1:])
    print(f"# {platform.machine()}, {torch.get_num_threads()} thread(s), torch {torch.__version__}; "
          f"{a.images} test digits, dopri5 at {a.tol:g}", flush=True)
    print("| cell | steps | bpd at the lattice points | bpd dequantised | difference |")
    print("|---|---|---|---|---|")
    for name in a.models:
        for steps in a.steps:
            ck = zoo_dir(a.setting) / name / f"checkpoint-{steps}"
            if not ck.is_dir():
                print(f"| {name} | {steps} | no checkpoint at {ck} | | |", flush=True)
                continue
            model = load_sit(ck).eval()
            tr = transport_from_config(zoo_config(name, a.setting, steps).model_config)
            score = lambda pts: float(bits_per_dim(ode_log_likelihood(model, tr, pts, y, seed=0, atol=a.tol,
                                                                      rtol=a.tol)["logp"], dim).mean())
            on, between = score(x), score(dequantise(x, seed=0))
            print(f"| {name} | {steps} | {on:.3f} | {between:.3f} | {between - on:+.3f} |", flush=True)


if __name__ == "__main__":
    main()
