"""Encode a dataset's training split with a VAE once, for latent diffusion:
``python tools/cache_latents.py data=... task.latent.vae=<AutoencoderKL folder or hub id> [key=value ...]``.

Writes the posterior mean and standard deviation of every training image to ``<task.latent.cache_dir, default
<data.root>/latent-cache>/<dataset>-<size>px.pt`` with a manifest (VAE, its config, dataset, size, subset), which a
``task=dit task.latent.vae=... task.latent.cache=true`` run with the same data then reads instead of encoding at every step
(pixelformer/latents.py). The arguments are those of the training command (task=dit is implied).
"""
from __future__ import annotations

from . import usage


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(usage(__doc__, "cache_latents"))
        return 0
    import time

    import torch

    from ..config import compose
    from ..data import build_datasets
    from ..errors import UserError
    from ..latents import cache_file, latent_training_set
    from ..task import get_task

    cfg = compose(["task=dit", *[a for a in argv if not a.startswith("task=")]])
    if cfg.task.latent.vae is None:
        raise UserError("tools/cache_latents.py needs task.latent.vae=<AutoencoderKL folder or hub id>")
    train_set, _, info = build_datasets(cfg.data)
    module = get_task("dit").build_module(cfg, info)
    path = cache_file(cfg, info.img_size)
    existed, start = path.exists(), time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cached = latent_training_set(cfg, module.vae, train_set, module.to_signed_unit_interval, device)
    what = "checked" if existed else f"wrote ({time.perf_counter() - start:.1f} s)"
    print(f"{what} {path}: {len(cached)} images of {cfg.data.name} {info.img_size}x{info.img_size} -> latents "
          f"{tuple(cached[0][0].shape[1:])} x {cached[0][0].shape[0] // 2} channels (mean and std)"
          + (", and the same for their mirror images (data.augment=flip)" if cfg.data.augment == "flip" else ""))
    return 0
