"""The per-step cost of representation alignment (REPA): our `Trainer.train_step` with and without the alignment term,
same model, same data, same batch, rounds interleaved (plain, REPA, REPA, plain, ...) in one process; medians and the
ratio REPA / plain per setting.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/repa_step.py                        # the digits study's setting
    OMP_WAIT_POLICY=PASSIVE python benchmarks/repa_step.py --settings digits s2-dinov2 --rounds 3

Settings:
- `digits`: the two arms of the study of nbs/21_repa.ipynb (`studies.repa.run_config`): the zoo's linear-velocity
  digits SiT (4 blocks of width 96, batch 96), REPA with the digits-classifier encoder, block 2, projector width 256.
- `s2-dinov2`: SiT-S/2 on 32x32x3 inputs (a 16x16 token grid, as SiT-XL/2 on 256 px latents), batch 32, REPA with
  DINOv2 ViT-B/14 (timm `vit_base_patch14_dinov2`, inputs resized to 224: 16x16 patch tokens), block 4, projector
  2048. The encoder has random weights (saved to a temporary file and loaded as a local weights file): the machine is
  offline, and the cost does not depend on the weights. Heavy on a CPU.

What a REPA step adds: the encoder's forward pass on the clean images (no gradient), the projector's forward and
backward, the cosine loss, the projector's AdamW step. With `--features-cache` the encoder runs once per image
beforehand (not timed) and the step reads cached features instead.
"""
import argparse
import os
import platform
import statistics
import tempfile
import time

import torch

from sit_workbench.config import digits_config
from sit_workbench.digits import load_digits_encoder
from sit_workbench.train import DistEnv, Trainer

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def digits_setting(repa, cache):
    "The study's two arms exactly (`studies.repa.run_config`), in a temporary folder."
    from sit_workbench.config import config_from_dict, config_to_dict
    from sit_workbench.data import DigitsDataset
    from sit_workbench.studies.repa import run_config
    d = config_to_dict(run_config("repa" if repa else "plain", 0, 10 ** 6, "full"))
    d.update(output_dir=tempfile.mkdtemp(prefix="repa_step_"), warmup_steps=0)
    if repa and cache: d.update(repa_feature_cache=os.path.join(d["output_dir"], "feats"))
    return config_from_dict(d), DigitsDataset("train")


def s2_dinov2_setting(repa, cache):
    tmp = tempfile.mkdtemp(prefix="repa_step_")
    kw = dict(input_size=32, patch_size=2, in_channels=3, hidden_size=384, depth=12, num_heads=6, num_classes=1000,
              learn_sigma=True, image_size=32, dataset_format="imagefolder", dataset_path=tmp,   # never read
              per_device_train_batch_size=32, learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0,
              max_steps=10 ** 6, ema_decay=0.9999, output_dir=tmp, dataloader_num_workers=0,
              dataloader_pin_memory=False, bf16=DEVICE.type == "cuda", tf32=DEVICE.type == "cuda")
    if repa:
        import timm
        from safetensors.torch import save_file
        torch.manual_seed(0)
        vit = timm.create_model("vit_base_patch14_dinov2", pretrained=False, num_classes=0, img_size=224)
        save_file(vit.state_dict(), os.path.join(tmp, "dinov2.safetensors"))
        kw.update(repa_encoder="vit_base_patch14_dinov2", repa_encoder_resolution=224, repa_block=4,
                  repa_lambda=0.5, repa_projector_dim=2048, repa_encoder_weights=os.path.join(tmp, "dinov2.safetensors"),
                  repa_feature_cache=os.path.join(tmp, "feats") if cache else None)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(32 * 4, 3, 32, 32, generator=g) * 2 - 1
    y = torch.randint(0, 1000, (32 * 4,), generator=g)
    return digits_config(**kw), torch.utils.data.TensorDataset(x, y)


SETTINGS = {"digits": digits_setting, "s2-dinov2": s2_dinov2_setting}


def sync():
    if DEVICE.type == "cuda": torch.cuda.synchronize()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", nargs="+", default=["digits"], choices=list(SETTINGS))
    p.add_argument("--steps", type=int, default=20, help="timed steps per round and arm")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--features-cache", action="store_true", help="REPA reads cached encoder features")
    args = p.parse_args()
    print(f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, device {DEVICE}"
          + (f" ({torch.cuda.get_device_name()})" if DEVICE.type == "cuda" else ""))
    for name in args.settings:
        trainers = {}
        for arm in ("plain", "repa"):
            cfg, ds = SETTINGS[name](arm == "repa", args.features_cache)
            enc = load_digits_encoder() if cfg.repa_encoder == "digits" else None   # passed in, as the CLI does
            tr = Trainer(cfg, env=DistEnv(device=DEVICE), dataset=ds, progress=False, encoder=enc).setup()
            batches = tr._batches_forever()
            with torch.enable_grad():
                for _ in range(2): tr.train_step(batches)   # warm-up: optimizer state, allocator, kernels
            trainers[arm] = (tr, batches)
        times, cpu = {"plain": [], "repa": []}, {"plain": [], "repa": []}
        for r in range(args.rounds):
            for arm in (("plain", "repa") if r % 2 == 0 else ("repa", "plain")):
                tr, batches = trainers[arm]
                sync(); t0, c0 = time.perf_counter(), time.process_time()
                with torch.enable_grad():
                    for _ in range(args.steps): tr.train_step(batches)
                sync(); times[arm].append((time.perf_counter() - t0) / args.steps)
                cpu[arm].append((time.process_time() - c0) / args.steps)
        med = {arm: statistics.median(v) for arm, v in times.items()}
        mcpu = {arm: statistics.median(v) for arm, v in cpu.items()}
        print(f"{name}: plain {1e3 * med['plain']:.1f} ms/step, REPA {1e3 * med['repa']:.1f} ms/step "
              f"(medians of {args.rounds} rounds of {args.steps} steps{', cached features' if args.features_cache else ''}); "
              f"ratio REPA / plain = {med['repa'] / med['plain']:.3f}")
        print(f"{name}: CPU time of the process: plain {1e3 * mcpu['plain']:.1f} ms/step, REPA {1e3 * mcpu['repa']:.1f} "
              f"ms/step; ratio REPA / plain = {mcpu['repa'] / mcpu['plain']:.3f} (on a busy machine, what a step costs)")


if __name__ == "__main__":
    main()
