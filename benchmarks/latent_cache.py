#!/usr/bin/env python
"""Latent DiT training throughput: the VAE encoder at every step vs latents cached once (pixelformer/latents.py).

    python benchmarks/latent_cache.py [--steps 300] [--out /tmp/latent-cache-bench]

Builds a random diffusers AutoencoderKL (3 blocks of 32/64/64 channels, 2 layers each: 28x28x1 -> 7x7x4 latents;
random weights cost what trained ones do), then trains the same pit_mini denoiser on 6,400 Fashion-MNIST images
twice, one run after the other: encoding every batch, then from the cache (written first, timed apart). Prints the
training images/s of every logged window (set-up excluded) and the wall time of each command.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", default="/tmp/latent-cache-bench")
    opts = parser.parse_args()
    out = Path(opts.out)
    shutil.rmtree(out, ignore_errors=True)
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 3,
                  up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(32, 64, 64), layers_per_block=2,
                  latent_channels=4, norm_num_groups=32, sample_size=28).save_pretrained(out / "vae")
    data = ["data=fashion_mnist", "data.train_subset=6400"]
    common = ["tools/train.py", "task=dit", *data, "model=pit_mini", "data.batch_size=64",
              f"trainer.max_steps={opts.steps}", "trainer.log_every_steps=50", f"trainer.eval_every_steps={opts.steps}",
              f"task.latent.vae={out / 'vae'}", "logger=disabled", "trainer.progress_bar=false", "data.limit_test=256"]
    walls = {"encode every step": run([*common, f"run.dir={out / 'encode'}"])}
    walls["write the cache"] = run(["tools/cache_latents.py", *data, f"task.latent.vae={out / 'vae'}",
                                    f"task.latent.cache_dir={out / 'cache'}"])
    walls["from the cache"] = run([*common, "task.latent.cache=true", f"task.latent.cache_dir={out / 'cache'}",
                                   f"run.dir={out / 'cached'}"])
    print(f"{'run':<18} {'wall s':>7} {'img/s per window (set-up excluded)':<40} {'median':>7}")
    rates = {}
    for name, folder in (("encode every step", "encode"), ("write the cache", None), ("from the cache", "cached")):
        if folder is None:
            print(f"{name:<18} {walls[name]:>7.1f}")
            continue
        rows = [json.loads(line) for line in (out / folder / "metrics.jsonl").read_text().splitlines()]
        window = [r["train/images_per_sec"] for r in rows if "train/images_per_sec" in r]
        rates[name] = statistics.median(window)
        print(f"{name:<18} {walls[name]:>7.1f} {' '.join(f'{r:.0f}' for r in window):<40} {rates[name]:>7.0f}")
    print(f"cached / encoding: {rates['from the cache'] / rates['encode every step']:.2f}x training images/s")


if __name__ == "__main__":
    main()
