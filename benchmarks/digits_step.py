"""What makes a step of the digits zoo cheaper on a CPU (issue: studies at convergence need 8 cells x 10^4 steps).

One training step of the zoo's digits model (`Trainer.train_step`, as `train()` runs it: forward, loss, backward,
fused AdamW, EMA, the loss read back) in several configurations, each built from the zoo's own config with one thing
changed. Rounds are interleaved (A B C ..., then rotated) in one process, so a busy machine slows every configuration
alike; the table gives medians and the ratio of time per *image* to the default (fp32, one thread, batch 96), since
the batch-size rows change the images per step.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/digits_step.py --rounds 5 --steps 40

Configurations: `fp32` (the default), `fp32-2threads` (torch.set_num_threads(2) for that configuration; on a 2-core
machine two single-threaded processes use both cores for two zoo cells at once), `bf16` (CPU autocast to bfloat16),
`compile` (`torch_compile: true`), `batch-192` (twice the images per step, same learning rate).
"""
import argparse
import statistics
import tempfile
import time

import torch

from sit_workbench.config import digits_config
from sit_workbench.train import Trainer, init_distributed

CONFIGS = {
    "fp32": dict(),
    "fp32-2threads": dict(),
    "bf16": dict(bf16=True),
    "compile": dict(torch_compile=True),
    "batch-192": dict(per_device_train_batch_size=192),
}


def build(name):
    cfg = digits_config(path_type="Linear", prediction="velocity", lr_scheduler_type="constant",
                        output_dir=tempfile.mkdtemp(), **CONFIGS[name])
    tr = Trainer(cfg, init_distributed(), progress=False)
    tr.setup()
    return tr, tr._batches_forever(), cfg.per_device_train_batch_size


def timed(tr, batches, steps, threads):
    torch.set_num_threads(threads)
    t = time.perf_counter()
    for _ in range(steps): tr.train_step(batches)
    return (time.perf_counter() - t) / steps


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=40, help="steps per configuration per round")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    args = ap.parse_args()
    built = {n: build(n) for n in args.configs}
    for n, (tr, b, _) in built.items():   # warm-up (compile, allocator, optimizer state)
        timed(tr, b, 10, 2 if n == "fp32-2threads" else 1)
    times = {n: [] for n in args.configs}
    order = list(args.configs)
    for r in range(args.rounds):
        for n in order:
            tr, b, _ = built[n]
            times[n].append(timed(tr, b, args.steps, 2 if n == "fp32-2threads" else 1))
        order = order[1:] + order[:1]
    base = statistics.median(times["fp32"]) / built["fp32"][2] if "fp32" in times else None
    print(f"torch {torch.__version__}, {args.rounds} rounds x {args.steps} steps, interleaved")
    print("| configuration | ms / step | images / step | ms / image | time per image vs fp32 |")
    print("|---|---|---|---|---|")
    for n in args.configs:
        med, bs = statistics.median(times[n]), built[n][2]
        ratio = f"{med / bs / base:.2f}" if base else "-"
        print(f"| {n} | {med * 1000:.1f} | {bs} | {med / bs * 1000:.3f} | {ratio} |")


if __name__ == "__main__":
    main()
