"""The fine-tuning recipe sweep behind `studies.meanflow.RECIPE` (nbs/22_meanflow): one MeanFlow fine-tune of the
converged linear-velocity zoo model per candidate, each measured as the study measures (1,000 samples, balanced
labels, seed 0, unguided) at 1, 2 and 4 steps, at each quarter of the run.

    SIT_WORKBENCH_ZOO=/path/to/zoo python benchmarks/meanflow_recipe.py model-r25 meanflow_tangent=model
    SIT_WORKBENCH_ZOO=/path/to/zoo python benchmarks/meanflow_recipe.py data-r25 meanflow_tangent=data
    SIT_WORKBENCH_ZOO=/path/to/zoo python benchmarks/meanflow_recipe.py model-r75 meanflow_tangent=model meanflow_ratio=0.75
    SIT_WORKBENCH_ZOO=/path/to/zoo python benchmarks/meanflow_recipe.py model-r50-lr5 meanflow_tangent=model \
        meanflow_ratio=0.5 learning_rate=5e-4
    SIT_WORKBENCH_ZOO=/path/to/zoo python benchmarks/meanflow_recipe.py model-r100-cos meanflow_tangent=model \
        meanflow_ratio=1.0 lr_scheduler_type=cosine

Each run trains under `runs/meanflow-recipe/NAME` (1,500 steps, a quarter of the flow model's budget; the zoo must
hold the flow model, or it is trained first) and prints one JSON line per (steps, NFE).
"""
import json
import sys
import time

import torch
import yaml

from sit_workbench.evaluate import evaluate_digits_checkpoint
from sit_workbench.studies.meanflow import FLOW
from sit_workbench.studies.zoo import zoo_checkpoint, zoo_config
from sit_workbench.train import train

STEPS = 1500


def main(name, *overrides):
    torch.set_num_threads(1)
    extra = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in overrides)}
    cfg = zoo_config(FLOW, "full", STEPS, objective="meanflow", save_steps=STEPS // 4, warmup_steps=50,
                     output_dir=f"runs/meanflow-recipe/{name}", init_from=str(zoo_checkpoint(FLOW, "full")), **extra)
    t0 = time.time()
    train(cfg, progress=False)
    seconds = round(time.time() - t0)
    for q in range(1, 5):
        ck = f"{cfg.output_dir}/checkpoint-{STEPS // 4 * q}"
        for nfe in (1, 2, 4):
            r = evaluate_digits_checkpoint(ck, n=1000, sampler={"sampling_method": "meanflow", "num_steps": nfe + 1},
                                           cfg_scale=1.0, labels="balanced", bootstrap=20)
            print(json.dumps({"name": name, "steps": STEPS // 4 * q, "nfe": nfe, "digits_fid": round(r["digits_fid"], 2),
                              "digits_fid_std": round(r["digits_fid_std"], 2), "accuracy": round(r["accuracy"], 3),
                              "train_seconds": seconds}), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
