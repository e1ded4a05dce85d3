#!/usr/bin/env python
"""Sample from a trained dit checkpoint with its EMA weights.

    python tools/sample.py ckpt=runs/<run>/checkpoints/last.ckpt num_samples=64 cfg_scale=4 steps=50 sampler=ddim

Writes ``samples.png`` (one row per class) and ``samples.npz`` (``images`` uint8 N x H x W x C, ``labels``) into
``out=`` (default: the run directory). Options: ``sampler=ddim|dpm|ddpm``, ``seed=0``, ``device=cpu|cuda``,
``class=K`` (only class K).
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from pixelformer.cli import parse_kv, run_main  # noqa: E402
from pixelformer.errors import UserError  # noqa: E402

OPTIONS = {"ckpt": "", "num_samples": "64", "cfg_scale": "4.0", "steps": "50", "sampler": "ddim", "seed": "0",
           "out": "", "device": "", "class": ""}


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    own, rest = parse_kv(argv, OPTIONS)
    if rest:
        raise UserError(f"unknown argument(s) {', '.join(rest)}; options: {', '.join(f'{k}=' for k in OPTIONS)}")
    if "ckpt" not in own:
        raise UserError("tools/sample.py needs ckpt=PATH (a dit checkpoint)")
    opts = {**OPTIONS, **own}
    try:
        num_samples, steps, seed = int(opts["num_samples"]), int(opts["steps"]), int(opts["seed"])
        cfg_scale = float(opts["cfg_scale"])
    except ValueError as e:
        raise UserError(f"bad number: {e}") from None
    if num_samples < 1 or steps < 1:
        raise UserError("num_samples and steps must be positive")

    import numpy as np
    import torch
    from torchvision.utils import save_image

    from pixelformer.diffusion import SAMPLERS, sample
    from tasks.dit import load_for_sampling

    if opts["sampler"] not in SAMPLERS:
        raise UserError(f"sampler={opts['sampler']}: choose one of {', '.join(SAMPLERS)}")
    device = torch.device(opts["device"] or ("cuda" if torch.cuda.is_available() else "cpu"))
    ckpt = Path(opts["ckpt"]).expanduser()
    denoiser, info, schedule = load_for_sampling(ckpt)
    denoiser = denoiser.to(device)
    if opts["class"]:
        labels = torch.full((num_samples,), int(opts["class"]), device=device)
        per_row = min(num_samples, 8)
    else:  # one row per class
        per_row = math.ceil(num_samples / info.num_classes)
        labels = torch.arange(info.num_classes, device=device).repeat_interleave(per_row)[:num_samples]
    generator = torch.Generator(device).manual_seed(seed)
    images = sample(denoiser, schedule, labels, (info.in_chans, info.img_size, info.img_size), steps, cfg_scale,
                    opts["sampler"], info.num_classes, generator)
    images01 = ((images + 1) / 2).cpu()
    out_dir = Path(opts["out"]) if opts["out"] else (ckpt.parent.parent if ckpt.parent.name == "checkpoints"
                                                      else ckpt.parent)
    out_dir.mkdir(parents=True, exist_ok=True)
    scale = max(1, 32 // info.img_size)
    save_image(torch.nn.functional.interpolate(images01, scale_factor=scale, mode="nearest"),
               out_dir / "samples.png", nrow=per_row, padding=2, pad_value=1.0)
    pixels = (images01 * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.savez(out_dir / "samples.npz", images=pixels, labels=labels.cpu().numpy())
    print(f"wrote {out_dir / 'samples.png'} and {out_dir / 'samples.npz'} ({num_samples} samples, "
          f"{opts['sampler']} {steps} steps, guidance {cfg_scale})")
    return 0


if __name__ == "__main__":
    run_main(main)
