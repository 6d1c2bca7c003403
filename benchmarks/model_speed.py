"""Forward + backward time of our SiT against diffusers' DiTTransformer2DModel (and the official SiT models.py when a
checkout is given), same size, same batch, measured side by side in one run (rounds interleaved).

    python benchmarks/model_speed.py --sizes S/2 B/2 --batch 8 [--official /path/to/willisma/SiT]
"""
import argparse
import importlib.util
import platform
import statistics
import sys
import time

import torch

from sit_workbench.model import SIT_SIZES, SiT_models


def ours(size, latent):
    return SiT_models[f"SiT-{size}"](input_size=latent)


def diffusers_dit(size, latent):
    from diffusers import DiTTransformer2DModel
    depth, hidden, heads = SIT_SIZES[size.split("/")[0]]
    return DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=hidden // heads, in_channels=4,
                                 out_channels=8, num_layers=depth, sample_size=latent, patch_size=int(size[-1]),
                                 num_embeds_ada_norm=1000, norm_type="ada_norm_zero")


def official(path):
    spec = importlib.util.spec_from_file_location("official_sit_models", f"{path}/models.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return lambda size, latent: mod.SiT_models[f"SiT-{size}"](input_size=latent)


def step_fn(name, model, x, t, y):
    if name == "diffusers DiT":
        return lambda: model(x, timestep=t * 999, class_labels=y).sample.square().mean().backward()
    return lambda: model(x, t, y).square().mean().backward()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["S/2"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--latent", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--iters", type=int, default=3, help="steps per round")
    p.add_argument("--official", help="a checkout of github.com/willisma/SiT (not vendored)")
    args = p.parse_args()
    impls = {"ours": ours, "diffusers DiT": diffusers_dit}
    if args.official: impls["official SiT"] = official(args.official)
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"batch {args.batch}, {args.latent}x{args.latent}x4 latents, forward+backward, median of {args.rounds} rounds")
    print("| model | implementation | parameters | ms / step | time vs ours |")
    print("|---|---|---|---|---|")
    for size in args.sizes:
        torch.manual_seed(0)
        x, t = torch.randn(args.batch, 4, args.latent, args.latent), torch.rand(args.batch)
        y = torch.randint(0, 1000, (args.batch,))
        models = {n: f(size, args.latent).train() for n, f in impls.items()}
        steps = {n: step_fn(n, m, x, t, y) for n, m in models.items()}
        times = {n: [] for n in models}
        for n in models: steps[n]()  # warm-up
        for _ in range(args.rounds):
            for n, f in steps.items():
                t0 = time.perf_counter()
                for _ in range(args.iters): f()
                times[n].append((time.perf_counter() - t0) / args.iters)
        base = statistics.median(times["ours"])
        for n, m in models.items():
            med = statistics.median(times[n])
            print(f"| SiT-{size} | {n} | {sum(p.numel() for p in m.parameters()):,} | {1000 * med:.0f} | {med / base:.2f} |")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
