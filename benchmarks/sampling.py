"""Sampling speed of SiT: images/s, NFE and network cost for Heun (`sample_ode(sampling_method="heun2")`), dopri5 and
Euler-Maruyama (`sample_sde`), without guidance and with classifier-free guidance computed three ways: the cond/uncond
halves in one batched forward (`forward_with_cfg`, what `generate` does), two separate forwards, and one batched
forward with a guidance interval (with and without skipping the unconditional half outside the interval).
Rounds interleaved (A B C, B C A, ...) in one process; medians and ratios.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/sampling.py                      # CPU: NFE x 0.04 (--nfe-scale)
    python benchmarks/sampling.py --nfe-scale 1 --batch 32 --size XL/2        # GPU: the full 250-NFE samplers

NFE: `sample_ode("heun2", num_steps=K)` evaluates the network 2 (K - 1) times (two per interval of the K-point grid),
so Heun-250 is `num_steps=126`; `sample_sde(num_steps=K)` evaluates it K - 1 times plus once for the last (Mean) step,
so Euler-Maruyama-250 is `num_steps=250`; dopri5 takes as many as its error control needs (`fn.nfe` reports them).
`--nfe-scale` < 1 runs the fixed-step samplers with proportionally fewer steps (the table says so); their cost is
linear in the NFE, so `images/s at full NFE` extrapolates from the measured time per evaluation. The weights are random
(speed does not depend on them), which also makes dopri5's NFE meaningless for a trained model: it is reported as run.
Guided rows double the batch (the official `[cond; uncond]` layout); `net images / NFE` counts the images the network
actually evaluated. On a GPU, model FLOPs utilisation (`--peak-tflops`, default by device name) is printed too.
"""
import argparse
import platform
import statistics
import sys
import time

import torch

from sit_workbench.model import SiT_models, forward_flops
from sit_workbench.transport import Sampler, create_transport

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}  # dense bf16


def random_sit(size, latent, seed=0):
    "A SiT with every weight random (the official init zeroes the adaLN and output layers: the output would be 0)."
    torch.manual_seed(seed)
    m = SiT_models[f"SiT-{size}"](input_size=latent)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name != "pos_embed": p.normal_(std=0.02)
    return m.to(DEVICE).eval()


def two_forward_cfg(m):
    "Guidance from two separate forwards (conditional, unconditional): the same output as `forward_with_cfg`."
    def f(x, t, y, cfg_scale, cfg_channels=3):
        n = x.shape[0] // 2
        cond, uncond = m(x[:n], t[:n], y[:n]), m(x[:n], t[:n], y[n:])
        k = cfg_channels
        guided = torch.cat([uncond[:, :k] + cfg_scale * (cond[:, :k] - uncond[:, :k]), cond[:, k:]], dim=1)
        return torch.cat([guided, torch.cat([guided[:, :k], uncond[:, k:]], dim=1)])
    return f


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="S/2")
    p.add_argument("--latent", type=int, default=32)
    p.add_argument("--batch", type=int, default=2, help="images per batch (guided rows evaluate twice as many)")
    p.add_argument("--nfe", type=int, default=250, help="NFE of the fixed-step samplers at full length")
    p.add_argument("--nfe-scale", type=float, default=None, help="run fixed-step samplers with NFE x this (default: 0.04 on CPU, 1 on GPU)")
    p.add_argument("--cfg-scale", type=float, default=4.0)
    p.add_argument("--cfg-interval", type=float, nargs=2, default=(0.3, 0.8), help="t_lo t_hi (t=0 noise, t=1 data)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--samplers", nargs="+", default=["heun", "em", "dopri5"])
    p.add_argument("--bf16", action="store_true", help="sample under bf16 autocast")
    p.add_argument("--peak-tflops", type=float)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice, the core count)")
    args = p.parse_args()
    if args.threads: torch.set_num_threads(args.threads)
    scale = args.nfe_scale if args.nfe_scale is not None else (1.0 if CUDA else 0.04)
    nfe = max(2, round(args.nfe * scale))
    nfe += nfe % 2   # heun2: an even NFE

    m = random_sit(args.size, args.latent)
    flops = forward_flops(m)
    evaluated = []
    m.x_embedder.register_forward_hook(lambda mod, inp, out: evaluated.append(inp[0].shape[0]))
    sampler = Sampler(create_transport())
    fns = {"heun": (f"Heun (heun2, {nfe} NFE)", sampler.sample_ode(sampling_method="heun2", num_steps=nfe // 2 + 1)),
           "em": (f"Euler-Maruyama ({nfe} NFE)", sampler.sample_sde(sampling_method="Euler", num_steps=nfe)),
           "dopri5": ("dopri5 (atol 1e-6, rtol 1e-3)", sampler.sample_ode(sampling_method="dopri5", num_steps=50))}
    g = torch.Generator().manual_seed(0)
    z = torch.randn(args.batch, 4, args.latent, args.latent, generator=g).to(DEVICE)
    labels = torch.randint(0, 1000, (args.batch,), generator=g).to(DEVICE)
    zz, yy = torch.cat([z, z]), torch.cat([labels, torch.full_like(labels, m.null_class)])
    lo, hi = args.cfg_interval
    guidance = {
        "none": ("no guidance", lambda fn: fn(z, m.forward, y=labels)),
        "batched": ("CFG, cond+uncond in one forward (default)",
                    lambda fn: fn(zz, m.forward_with_cfg, y=yy, cfg_scale=args.cfg_scale)),
        "two": ("CFG, two separate forwards", lambda fn: fn(zz, two_forward_cfg(m), y=yy, cfg_scale=args.cfg_scale)),
        "interval": (f"CFG in [{lo:g}, {hi:g}], uncond skipped outside (default)",
                     lambda fn: fn(zz, m.forward_with_cfg, y=yy, cfg_scale=args.cfg_scale, cfg_interval=(lo, hi))),
        "interval-plain": (f"CFG in [{lo:g}, {hi:g}], uncond computed everywhere",
                           lambda fn: fn(zz, m.forward_with_cfg, y=yy, cfg_scale=args.cfg_scale, cfg_interval=(lo, hi),
                                         skip_unguided=False)),
    }
    plan = {"heun": ["none", "batched", "two", "interval", "interval-plain"], "em": ["none", "batched", "two"],
            "dopri5": ["none", "batched"]}
    runs = [(s, gm) for s in args.samplers for gm in plan[s]]

    def run(s, gm):
        evaluated.clear()
        fn = fns[s][1]
        with torch.no_grad(), torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=args.bf16):
            if CUDA: torch.cuda.synchronize()
            t0 = time.perf_counter()
            guidance[gm][1](fn)
            if CUDA: torch.cuda.synchronize()
        return time.perf_counter() - t0, fn.nfe, sum(evaluated)

    device = torch.cuda.get_device_name() if CUDA else (platform.processor() or platform.machine())
    print(f"# {device}, {torch.get_num_threads()} threads, torch {torch.__version__}, SiT-{args.size} (random weights), "
          f"{args.batch} images of {args.latent}x{args.latent}x4, cfg scale {args.cfg_scale:g}"
          + (", bf16 autocast" if args.bf16 else "") + f", median of {args.rounds} interleaved rounds (order rotated); "
          + (f"fixed-step samplers run at {nfe} NFE instead of {args.nfe} (--nfe-scale {scale:g}); " if nfe != args.nfe else "")
          + f"forward {flops / 1e9:.2f} GFLOPs per image")
    with torch.no_grad():   # warm-up: one evaluation at each batch size the runs use
        m(z, torch.rand(args.batch, device=DEVICE), labels); m(zz, torch.rand(2 * args.batch, device=DEVICE), yy)
    times, info = {r: [] for r in runs}, {}
    for k in range(args.rounds):
        for r in runs[k % len(runs):] + runs[:k % len(runs)]:   # order rotated each round
            dt, n, imgs = run(*r)
            times[r].append(dt)
            info[r] = (n, imgs)
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if CUDA and k in torch.cuda.get_device_name()), None)
    print("| sampler | guidance | NFE | net images / NFE | s / batch | images / s | images / s at full NFE | "
          "time vs batched CFG | model TFLOP/s |" + (" MFU |" if CUDA else ""))
    print("|---|---|---|---|---|---|---|---|---|" + ("---|" if CUDA else ""))
    for s, gm in runs:
        med = statistics.median(times[(s, gm)])
        n, imgs = info[(s, gm)]
        ref = (s, "batched") if (s, "batched") in times else None
        ratio = f"{med / statistics.median(times[ref]):.2f}" if ref else "-"
        full = args.batch / (med * args.nfe / n) if s != "dopri5" else args.batch / med
        tf = flops * imgs / med / 1e12
        row = (f"| {fns[s][0]} | {guidance[gm][0]} | {n} | {imgs / n:.1f} | {med:.2f} | {args.batch / med:.3f} | "
               f"{full:.4f} | {ratio} | {tf:.3f} |")
        if CUDA: row += f" {100 * tf / peak:.1f}% |" if peak else " (give --peak-tflops) |"
        print(row)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
