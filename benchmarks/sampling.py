#!/usr/bin/env python
"""DiT sampling throughput: DDIM 50 steps vs DPM-Solver++ 20 steps (and DDPM), with classifier-free guidance.

    python benchmarks/sampling.py [--quick] [--model pit_small] [--img 32] [--chans 3] [--batch 64]
    python benchmarks/sampling.py --ckpt runs/dit/checkpoints/last.ckpt      # a trained denoiser's shape and weights
                                                                             # (a latent run: VAE decoding included)

Prints images/s per sampler, measured in one process on the same denoiser (each network evaluation is one doubled
batch, for guidance), and the ratio to DDIM-50. Timings depend only on the network and the number of steps, not on
the weights, so an untrained denoiser of the right shape is a fair stand-in when no checkpoint is given.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pixelformer.diffusion import build_train_scheduler, sample  # noqa: E402
from pixelformer.models import create_dit  # noqa: E402

SETTINGS = (("ddim", 50), ("dpm", 20), ("ddpm", 50))


def time_sampler(model: torch.nn.Module, config: dict, labels: torch.Tensor, shape: tuple[int, int, int],
                 sampler: str, steps: int, repeats: int, null_label: int, decode=None) -> float:
    """Median seconds for one batch of samples (``decode``: a latent run's VAE decoding, timed with them)."""
    times = []
    for i in range(repeats + 1):  # the first run warms up
        generator = torch.Generator(labels.device).manual_seed(i)
        if labels.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(labels.device.type, dtype=torch.bfloat16, enabled=labels.device.type == "cuda"):
            generated = sample(model, config, labels, shape, steps, 2.0, sampler, null_label, generator)
            if decode is not None:
                decode(generated)
        if labels.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 1 repeat")
    parser.add_argument("--ckpt", help="a dit checkpoint (its EMA weights and shape)")
    parser.add_argument("--model", default="pit_small")
    parser.add_argument("--img", type=int, default=32)
    parser.add_argument("--chans", type=int, default=3)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.ckpt:
        from pixelformer.tasks.dit import load_for_sampling
        module, info = load_for_sampling(args.ckpt)
        model, config = module.denoiser, dict(module.scheduler.config)
        shape, classes, name = module.sample_shape, info.num_classes, args.ckpt  # a latent run: its latent shape
        decode = module.to(device).decode if module.vae is not None else None  # decoding counts in the time
    else:
        size = dict(depth=2, embed_dim=64, num_heads=2) if args.quick else {}
        img = 16 if args.quick else args.img
        model = create_dit(args.model, img_size=img, in_chans=args.chans, num_classes=args.classes, **size)
        config, shape, classes = dict(build_train_scheduler().config), (args.chans, img, img), args.classes
        name = f"{args.model} {img}x{img}x{args.chans}" + (" (quick: 2 blocks x 64)" if args.quick else "")
        decode = None
    model = model.to(device).eval()
    labels = torch.arange(args.batch, device=device) % classes
    repeats = 1 if args.quick else args.repeats
    print(f"denoiser: {name}; batch {args.batch}; guidance 2.0 (doubled batch); device {device}"
          + ("; latent run: VAE decoding included" if decode is not None else ""))
    print(f"{'sampler':<8} {'steps':>5} {'images/s':>10} {'vs ddim-50':>11}")
    base = None
    for sampler, steps in SETTINGS:
        seconds = time_sampler(model, config, labels, shape, sampler, steps, repeats, classes, decode)
        rate = args.batch / seconds
        base = base or rate
        print(f"{sampler:<8} {steps:>5} {rate:>10.1f} {rate / base:>10.2f}x")


if __name__ == "__main__":
    main()
