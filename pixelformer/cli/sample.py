"""Sample from a trained dit checkpoint with its EMA weights.

    python tools/sample.py ckpt=runs/<run>/checkpoints/last.ckpt num_samples=64 cfg_scale=2 steps=50 sampler=dpm

Writes ``samples.png`` (one row per class) and ``samples.npz`` in the layout of the ADM evaluation suite
(guided-diffusion's ``evaluator.py``: ``arr_0`` uint8 N x H x W x C images, ``arr_1`` their class labels) into
``out=`` (default: the run directory). Options: ``sampler=dpm|ddim|ddpm`` (default dpm with ``cfg_scale=2.0``, as in
configs/task/dit.yaml), ``seed=0``, ``device=cpu|cuda|cuda:N``, ``class=K`` (only class K), ``batch_size=256``
(samples generated at once: bounds memory; the samples depend on it).
"""
from __future__ import annotations

import math
from pathlib import Path

from ..errors import UserError
from . import parse_kv, usage

OPTIONS = {"ckpt": "", "num_samples": "64", "cfg_scale": "2.0", "steps": "50", "sampler": "dpm", "seed": "0",
           "out": "", "device": "", "class": "", "batch_size": "256"}


def _int(opts: dict[str, str], key: str, minimum: int | None = None) -> int:
    try:
        value = int(opts[key])
    except ValueError:
        raise UserError(f"{key}={opts[key]} is not an integer") from None
    if minimum is not None and value < minimum:
        raise UserError(f"{key}={value} must be at least {minimum}")
    return value


def _device(name: str):
    """``device=`` as a torch device that exists on this machine (default: cuda if available, else cpu)."""
    import torch

    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"device={name} is not a device: use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserError(f"device={name} but CUDA is not available on this machine: use device=cpu")
        if device.index is not None and device.index >= count:
            raise UserError(f"device={name} but this machine has {count} CUDA device(s): use cuda:0 to "
                            f"cuda:{count - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device={name} but MPS is not available on this machine: use device=cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"device={name}: sampling runs on cpu, cuda or mps")
    return device


def _check_output_fits(num_samples: int, info, where: str) -> None:
    """Refuse a ``num_samples`` whose results cannot be held: generation goes ``batch_size`` at a time, but every
    sample is kept (float pixels, the grid picture's copy, the uint8 array saved to ``samples.npz``) until written."""
    import torch

    from ..runtime import available_memory, format_bytes

    per_sample = info.in_chans * info.img_size ** 2 * (4 + 4 + 1) + 8  # + its label
    needed, available = num_samples * per_sample, available_memory(torch.device("cpu"))
    if available is not None and needed > available:
        most = max(1, available // per_sample)
        raise UserError(f"num_samples={num_samples} keeps about {format_bytes(needed)} of {info.img_size}x"
                        f"{info.img_size}x{info.in_chans} samples in memory until they are written, but "
                        f"{format_bytes(available)} is available: use num_samples<={most:,} (run again with another "
                        f"seed= and out= for more)")


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(usage(__doc__, "sample"))
        return 0
    own, rest = parse_kv(argv, OPTIONS)
    if rest:
        raise UserError(f"unknown argument(s) {', '.join(rest)}; options: {', '.join(f'{k}=' for k in OPTIONS)}")
    if "ckpt" not in own:
        raise UserError(usage("tools/sample.py needs ckpt=PATH (a dit checkpoint)", "sample"))
    opts = {**OPTIONS, **own}
    num_samples, steps = _int(opts, "num_samples", 1), _int(opts, "steps", 1)
    seed, batch_size = _int(opts, "seed"), _int(opts, "batch_size", 1)
    class_id = _int(opts, "class") if opts["class"] else None
    try:
        cfg_scale = float(opts["cfg_scale"])
    except ValueError:
        raise UserError(f"cfg_scale={opts['cfg_scale']} is not a number") from None
    if not math.isfinite(cfg_scale):
        raise UserError(f"cfg_scale={opts['cfg_scale']} must be a finite number: 1.0 turns guidance off, larger "
                        f"values strengthen it")

    import numpy as np
    import torch

    from ..diffusion import SAMPLERS, sample_chunks
    from ..task import save_image_grid
    from ..tasks.dit import load_for_sampling

    if opts["sampler"] not in SAMPLERS:
        raise UserError(f"sampler={opts['sampler']}: choose one of {', '.join(SAMPLERS)}")
    device = _device(opts["device"])
    ckpt = Path(opts["ckpt"]).expanduser()
    module, info = load_for_sampling(ckpt, cfg_scale=cfg_scale)
    schedule = dict(module.scheduler.config)
    if steps > schedule["num_train_timesteps"]:
        raise UserError(f"steps={steps} exceeds the {schedule['num_train_timesteps']} timesteps this checkpoint was "
                        f"trained with: use steps<={schedule['num_train_timesteps']} (e.g. 50)")
    if class_id is not None and not 0 <= class_id < info.num_classes:  # num_classes itself is the null class
        raise UserError(f"class={class_id} is outside this checkpoint's classes: use 0 to {info.num_classes - 1}, "
                        f"or leave class= out for one row per class")
    _check_output_fits(num_samples, info, opts["out"] or str(ckpt.parent))
    module = module.to(device)
    if class_id is not None:
        labels = torch.full((num_samples,), class_id, device=device)
        per_row = min(num_samples, 8)
    else:  # one row per class
        per_row = math.ceil(num_samples / info.num_classes)
        labels = torch.arange(info.num_classes, device=device).repeat_interleave(per_row)[:num_samples]
    # one chunk of batch_size on the device at a time (pixelformer.diffusion.sample_chunks), decoded through the run's
    # VAE for a latent run
    images01 = torch.cat([((module.decode(generated) + 1) / 2).cpu() for _, _, generated in sample_chunks(
        module.denoiser, schedule, labels, module.sample_shape, steps, cfg_scale, opts["sampler"], info.num_classes,
        seed, batch_size)])
    out_dir = Path(opts["out"]) if opts["out"] else (ckpt.parent.parent if ckpt.parent.name == "checkpoints"
                                                      else ckpt.parent)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_image_grid(images01, out_dir / "samples.png", nrow=per_row)
    pixels = (images01 * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.savez(out_dir / "samples.npz", arr_0=pixels, arr_1=labels.cpu().numpy())
    print(f"wrote {out_dir / 'samples.png'} and {out_dir / 'samples.npz'} ({num_samples} samples, "
          f"{opts['sampler']} {steps} steps, guidance {cfg_scale})")
    return 0

