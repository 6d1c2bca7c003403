"""One training step (forward, backward, AdamW step, EMA update, the loss read back to the host) of SiT-S/2 on
32x32x4 latents: our trainer's own `Trainer.train_step` in several configurations, beside the official code's step
(official `models.py` + its `transport` package's `training_losses` + AdamW + train.py's `update_ema`, as its train.py
does) and diffusers' `DiTTransformer2DModel` with the same loss, AdamW and diffusers' `EMAModel`. Same batch, same
inputs; rounds interleaved (A B C, B C A, ...) in one process; medians and ratios to our default configuration.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/train_step.py --official /path/to/willisma/SiT
    OMP_WAIT_POLICY=PASSIVE python benchmarks/train_step.py --official /path/to/willisma/SiT \
        --configs ours ours-compile ours-vae official-vae --rounds 3

Peak memory: each configuration is run again alone in a child process (`--memory-of NAME`, 2 steps, the first
builds the optimizer state). On a CPU it reports the process's peak resident set size during those steps (Linux
`VmHWM`, reset just before them through /proc/self/clear_refs) and its growth over the resident size just before them
(model, EMA and batch built): the growth is what a step adds (activations, gradients, AdamW moments, allocator
caches). On a GPU it reports `torch.cuda.max_memory_allocated` and its growth over `memory_allocated` instead.

The on-the-fly VAE rows encode 256x256 images with diffusers' `AutoencoderKL` built from the SD-VAE configuration
(`stabilityai/sd-vae-ft-ema`'s architecture) with random weights: the machine is offline, and the cost of encoding does
not depend on the weights. The official train.py encodes on the fly like the `official-vae` row.

On a GPU (`torch.cuda.is_available()`), TF32 and flash-attention configurations are added and the table gets model
FLOPs utilisation: `3 x forward FLOPs per image x images/s / peak FLOP/s` (`--peak-tflops`, default from the device
name). Those rows have never been run by the author of this script (no GPU was lent); nothing here is measured on a
GPU unless a table says so.
"""
import argparse
import ast
import collections
import contextlib
import copy
import importlib.util
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from sit_workbench.config import digits_config
from sit_workbench.model import SIT_SIZES, Attention, forward_flops
from sit_workbench.train import DistEnv, Trainer

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}  # dense bf16


def sd_vae():
    "The SD VAE's architecture (sd-vae-ft-ema config.json) with random weights: 256x256x3 -> 32x32x4."
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         block_out_channels=(128, 256, 512, 512), sample_size=256).to(DEVICE).eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------- ours
def ours(size, batch, latent, *, vae=False, **overrides):
    "A step of our Trainer, built as `train` builds it (same config path), fed one fixed batch."
    depth, hidden, heads = SIT_SIZES[size.split("/")[0]]
    tmp = tempfile.mkdtemp(prefix="train_step_")
    cfg = dict(input_size=latent, patch_size=int(size.split("/")[1]), in_channels=4, hidden_size=hidden, depth=depth,
               num_heads=heads, num_classes=1000, learn_sigma=True, class_dropout_prob=0.1, image_size=latent,
               dataset_format="imagefolder", dataset_path=tmp,   # never read: the batch is given
               per_device_train_batch_size=batch, learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0,
               max_steps=10 ** 6, ema_decay=0.9999, output_dir=tmp, dataloader_num_workers=0, dataloader_pin_memory=False)
    attn = overrides.pop("attention", "sdpa")
    opt_impl = overrides.pop("adamw", None)
    if opt_impl == "loop": overrides["optim"] = "adamw_torch"   # torch's default: one tensor at a time on a CPU
    cfg.update(overrides)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, latent, latent, generator=g)
    y = torch.randint(0, 1000, (batch,), generator=g)
    ds = torch.utils.data.TensorDataset(x, y)
    tr = Trainer(digits_config(**cfg), env=DistEnv(device=DEVICE), dataset=ds, progress=False).setup()
    if attn == "math":
        for m in tr.raw.modules():
            if isinstance(m, Attention): m.fused = False
    if opt_impl == "foreach":   # not a config choice on a CPU: the same AdamW, foreach implementation
        tr.opt = torch.optim.AdamW([p for p in tr.raw.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0,
                                   foreach=True)
        tr.sched = torch.optim.lr_scheduler.LambdaLR(tr.opt, lambda step: 1.0)
    if vae:   # raw images, encoded every step as train.py does
        tr.vae = sd_vae()
        batch_data = (torch.rand(batch, 3, 8 * latent, 8 * latent, generator=g) * 2 - 1, y)
    else:
        batch_data = (x, y)
    tr.model.train(); tr.ema.eval()
    batches = itertools.repeat(batch_data)
    return tr.raw, lambda: tr.train_step(batches)


# ---------------------------------------------------------------------------------------------- official
def _official_module(path, name, file):
    spec = importlib.util.spec_from_file_location(name, os.path.join(path, file))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _official_update_ema(path):
    "train.py's `update_ema`, taken from the file by its syntax tree (train.py itself imports the whole training stack)."
    tree = ast.parse(open(os.path.join(path, "train.py")).read())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "update_ema")
    ns = {"OrderedDict": collections.OrderedDict, "torch": torch}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), "official train.py", "exec"), ns)
    return torch.no_grad()(ns["update_ema"])


def official(path, size, batch, latent, *, vae=False):
    "train.py's step: training_losses, loss.mean(), zero_grad, backward, opt.step, update_ema, loss.item()."
    models = _official_module(path, "official_sit_models", "models.py")
    if path not in sys.path: sys.path.insert(0, path)
    from transport import create_transport   # the official package (the checkout is on sys.path)
    update = _official_update_ema(path)
    torch.manual_seed(0)
    model = models.SiT_models[f"SiT-{size}"](input_size=latent).to(DEVICE)
    ema = copy.deepcopy(model).requires_grad_(False)
    update(ema, model, decay=0)
    model.train(); ema.eval()
    transport = create_transport("Linear", "velocity", None, None, None)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, latent, latent, generator=g).to(DEVICE)
    y = torch.randint(0, 1000, (batch,), generator=g).to(DEVICE)
    enc = sd_vae() if vae else None
    images = (torch.rand(batch, 3, 8 * latent, 8 * latent, generator=g) * 2 - 1).to(DEVICE) if vae else None

    def step():
        if enc is not None:
            with torch.no_grad():
                lat = enc.encode(images).latent_dist.sample().mul_(0.18215)
        else:
            lat = x
        loss = transport.training_losses(model, lat, dict(y=y))["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        update(ema, model)
        return loss.item()
    return model, step


# ---------------------------------------------------------------------------------------------- diffusers
def diffusers_dit(size, batch, latent):
    "diffusers' DiT (learned-sigma outputs dropped) under our velocity loss, AdamW, diffusers' EMAModel."
    from diffusers import DiTTransformer2DModel
    from diffusers.training_utils import EMAModel
    from sit_workbench.transport import create_transport
    depth, hidden, heads = SIT_SIZES[size.split("/")[0]]
    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=hidden // heads, in_channels=4,
                                  out_channels=8, num_layers=depth, sample_size=latent, patch_size=int(size[-1]),
                                  num_embeds_ada_norm=1000, norm_type="ada_norm_zero").to(DEVICE).train()
    ema = EMAModel(model.parameters(), decay=0.9999)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    transport = create_transport()
    net = lambda xt, t, y: model(xt, timestep=t * 999, class_labels=y).sample[:, :4]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, latent, latent, generator=g).to(DEVICE)
    y = torch.randint(0, 1000, (batch,), generator=g).to(DEVICE)

    def step():
        loss = transport.training_losses(net, x, dict(y=y))["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.step(model.parameters())
        return loss.item()
    return model, step


# ---------------------------------------------------------------------------------------------- configurations
def configurations(args):
    s, b, l = args.size, args.batch, args.latent
    c = {
        "ours": ("ours: defaults (fp32, SDPA, fused AdamW, foreach EMA, latents)", lambda: ours(s, b, l)),
        "ours-adamw-loop": ("ours: AdamW one tensor at a time (`optim=adamw_torch` on a CPU)",
                            lambda: ours(s, b, l, adamw="loop")),
        "ours-adamw-foreach": ("ours: AdamW foreach", lambda: ours(s, b, l, adamw="foreach")),
        "ours-math-attn": ("ours: math attention (softmax(QK^T)V) instead of SDPA", lambda: ours(s, b, l, attention="math")),
        "ours-bf16": ("ours: bf16 autocast", lambda: ours(s, b, l, bf16=True)),
        "ours-ckpt": ("ours: activation checkpointing", lambda: ours(s, b, l, gradient_checkpointing=True)),
        "ours-compile": ("ours: torch.compile", lambda: ours(s, b, l, torch_compile=True)),
        "ours-vae": ("ours: on-the-fly VAE encoding of 256px images", lambda: ours(s, b, l, vae=True)),
        "official": ("official SiT train.py step", lambda: official(args.official, s, b, l)),
        "official-vae": ("official SiT train.py step, on-the-fly VAE (as train.py runs)",
                         lambda: official(args.official, s, b, l, vae=True)),
        "diffusers": ("diffusers DiTTransformer2DModel, same loss", lambda: diffusers_dit(s, b, l)),
    }
    if CUDA:   # GPU-only configurations (not run by the author: no GPU was lent)
        c["ours-tf32"] = ("ours: TF32 matmuls", lambda: ours(s, b, l, tf32=True))
        c["ours-bf16-flash"] = ("ours: bf16 + flash attention + torch.compile + TF32",
                                lambda: ours(s, b, l, bf16=True, tf32=True, torch_compile=True))
    return c


DEFAULT_CONFIGS = ["ours", "ours-adamw-loop", "ours-adamw-foreach", "ours-math-attn", "ours-bf16", "ours-ckpt",
                   "official", "diffusers"]


def sync():
    if CUDA: torch.cuda.synchronize()


@contextlib.contextmanager
def step_context(name):
    "GPU: TF32 only for the configurations that ask for it (the flags are global), flash attention only (no fallback)."
    if not CUDA:
        yield; return
    from torch.nn.attention import SDPBackend, sdpa_kernel
    tf32 = "tf32" in name or "flash" in name
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    with (sdpa_kernel(SDPBackend.FLASH_ATTENTION) if "flash" in name else contextlib.nullcontext()):
        yield
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False


def memory_of(args):
    "Child process: build one configuration, run 2 steps, print its peak memory as JSON."
    _, build = configurations(args)[args.memory_of]
    _, step = build()
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _proc_status("VmRSS")
        with open("/proc/self/clear_refs", "w") as f: f.write("5")   # reset the peak (VmHWM) to the current RSS
    with step_context(args.memory_of):
        for _ in range(2): step()
    sync()
    peak = torch.cuda.max_memory_allocated() if CUDA else _proc_status("VmHWM")
    print(json.dumps({"peak_mib": peak / 2 ** 20, "delta_mib": (peak - base) / 2 ** 20}))


def _proc_status(key):
    "A /proc/self/status memory line in bytes (Linux)."
    with open("/proc/self/status") as f:
        line = next(l for l in f if l.startswith(key + ":"))
    return int(line.split()[1]) * 1024


def peak_tflops(args):
    if args.peak_tflops: return args.peak_tflops
    name = torch.cuda.get_device_name() if CUDA else ""
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="S/2")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--latent", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--iters", type=int, default=1, help="steps per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per configuration")
    p.add_argument("--configs", nargs="+", default=None, help=f"default: {' '.join(DEFAULT_CONFIGS)}")
    p.add_argument("--official", help="a checkout of github.com/willisma/SiT (not vendored)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-configuration memory runs")
    p.add_argument("--peak-tflops", type=float, help="GPU peak dense bf16 TFLOP/s for MFU (default: by device name)")
    p.add_argument("--memory-of", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice, the core count)")
    args = p.parse_args()
    if args.threads: torch.set_num_threads(args.threads)
    if args.memory_of:
        return memory_of(args)
    all_configs = configurations(args)
    names = args.configs or (DEFAULT_CONFIGS + (["ours-tf32", "ours-bf16-flash"] if CUDA else []))
    if not args.official: names = [n for n in names if not n.startswith("official")]
    unknown = [n for n in names if n not in all_configs]
    if unknown: p.error(f"unknown configurations {unknown}; known: {list(all_configs)}")

    with torch.device("meta"):
        from sit_workbench.model import SiT_models
        flops = forward_flops(SiT_models[f"SiT-{args.size}"](input_size=args.latent))   # per image, forward
    device = torch.cuda.get_device_name() if CUDA else (platform.processor() or platform.machine())
    print(f"# {device}, {torch.get_num_threads()} threads, torch {torch.__version__}, SiT-{args.size}, batch {args.batch}, "
          f"{args.latent}x{args.latent}x4 latents, step = forward + backward + AdamW + EMA + loss to host, "
          f"median of {args.rounds} interleaved rounds (order rotated each round) of {args.iters} step(s) after {args.warmup} warm-up steps; "
          f"forward {flops / 1e9:.2f} GFLOPs per image")

    steps, params = {}, {}
    for n in names:
        model, step = all_configs[n][1]()
        t0 = time.perf_counter()
        with step_context(n):
            for _ in range(args.warmup): step()   # torch.compile compiles here
        sync()
        params[n], steps[n] = sum(p.numel() for p in model.parameters()), step
        print(f"#   built {n}: warm-up {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    times = {n: [] for n in names}
    for r in range(args.rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:   # A B C, B C A, ...: no fixed neighbours
            with step_context(n):
                sync(); t0 = time.perf_counter()
                for _ in range(args.iters): steps[n]()
                sync()
            times[n].append((time.perf_counter() - t0) / args.iters)
    mem = {}
    if not args.no_memory:
        base_cmd = [sys.executable, os.path.abspath(__file__), "--size", args.size, "--batch", str(args.batch),
                    "--latent", str(args.latent)] + (["--threads", str(args.threads)] if args.threads else []) + (["--official", args.official] if args.official else [])
        for n in names:
            out = subprocess.run(base_cmd + ["--memory-of", n], capture_output=True, text=True)
            lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
            mem[n] = json.loads(lines[-1]) if out.returncode == 0 and lines else None
    ref = "ours" if "ours" in times else names[0]
    base = statistics.median(times[ref])
    tflops = peak_tflops(args) if CUDA else None
    mem_head = "peak GPU memory MiB (growth in step)" if CUDA else "peak RSS MiB (growth in steps)"
    print(f"| configuration | parameters | ms / step | images / s | time vs {ref} | {mem_head} |"
          + (" MFU |" if CUDA else ""))
    print("|---|---|---|---|---|---|" + ("---|" if CUDA else ""))
    for n in names:
        med = statistics.median(times[n])
        m = mem.get(n)
        mtxt = f"{m['peak_mib']:.0f} ({m['delta_mib']:+.0f})" if m else ("-" if args.no_memory else "failed")
        row = (f"| {all_configs[n][0]} | {params[n]:,} | {1000 * med:.0f} | {args.batch / med:.2f} | "
               f"{med / base:.2f} | {mtxt} |")
        if CUDA:
            row += f" {100 * 3 * flops * args.batch / med / (tflops * 1e12):.1f}% |" if tflops else " (give --peak-tflops) |"
        print(row)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
