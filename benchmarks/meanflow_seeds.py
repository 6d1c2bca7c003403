"""MeanFlow fine-tunes against the flow model on fresh sampling noise: the recipe sweep (`meanflow_recipe.py`) and the
study chose and reported on sampling seed 0, so this measures the same checkpoints on other seeds. For each seed: the
flow model's converged digits-FID (Heun-250) and each MeanFlow checkpoint's at 1 and 2 steps, 1,000 balanced labels,
unguided, the same noise for every model of a seed (a paired comparison), and each one's ratio to the flow model.

    python benchmarks/meanflow_seeds.py --flow /path/to/zoo/full/linear-velocity/checkpoint-6000 \\
        earlier=/path/to/zoo/full/meanflow-finetune/checkpoint-1500 \\
        r100-cos=runs/meanflow-recipe/model-r100-cos/checkpoint-1500 --seeds 1 2
"""
import argparse
import json

import torch

from sit_workbench.evaluate import evaluate_digits_checkpoint

REFERENCE = {"sampling_method": "heun2", "num_steps": 126}   # the study's converged value: 250 evaluations


def fid(ck, sampler, seed, n):
    r = evaluate_digits_checkpoint(ck, n=n, sampler=sampler, cfg_scale=1.0, seed=seed, labels="balanced", bootstrap=20)
    return r["digits_fid"], r["digits_fid_std"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flow", required=True, help="the flow checkpoint the MeanFlow runs started from")
    ap.add_argument("meanflow", nargs="+", help="NAME=CHECKPOINT of each MeanFlow checkpoint")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2], help="sampling seeds (default 1 2)")
    ap.add_argument("--n", type=int, default=1000, help="samples per measurement (default 1000)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    runs = dict(a.split("=", 1) for a in args.meanflow)
    ratios = {(name, nfe): [] for name in runs for nfe in (1, 2)}
    for seed in args.seeds:
        f, fs = fid(args.flow, REFERENCE, seed, args.n)
        print(json.dumps({"seed": seed, "model": "flow, heun2 250 NFE", "digits_fid": round(f, 2), "std": round(fs, 2)}),
              flush=True)
        for name, ck in runs.items():
            for nfe in (1, 2):
                m, ms = fid(ck, {"sampling_method": "meanflow", "num_steps": nfe + 1}, seed, args.n)
                ratios[(name, nfe)].append(m / f)
                print(json.dumps({"seed": seed, "model": name, "nfe": nfe, "digits_fid": round(m, 2), "std": round(ms, 2),
                                  "ratio_to_flow": round(m / f, 3)}), flush=True)
    for (name, nfe), r in ratios.items():
        print(f"{name}, {nfe} step(s): ratio to the flow model {', '.join(f'{v:.2f}' for v in r)} "
              f"(seeds {', '.join(map(str, args.seeds))}; mean {sum(r) / len(r):.2f})")


if __name__ == "__main__":
    main()
