"""A cache of VAE latents for latent diffusion: the posterior of every training image, encoded once.

DiT encodes its training set once before training (its ``extract_features.py``) instead of running the VAE encoder
at every step. Here ``task.latent.cache=true`` (or ``tools/cache_latents.py``) writes the posterior mean and standard
deviation of every training image to ``<dir>/<dataset>-<size>px.pt`` with a manifest naming the VAE, its config,
the dataset, the image size and the subset; training samples from the cached posterior (a fresh draw every step, as
encoding would give) and refuses a cache whose manifest differs from the run's. With ``data.augment=flip`` (DiT's
recipe) the cache also holds the posterior of every image's mirror image, and each step takes one of the two at
random (seeded per sample, like the pixel-space flip); other augmentations cannot be cached.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import DictConfig

from .checkpoint import fsync_and_replace
from .data import ImageTensorDataset
from .errors import UserError

__all__ = ["cache_file", "cache_manifest", "encode_posteriors", "latent_training_set", "read_cache", "write_cache"]

CACHE_FORMAT = "pixelformer-latents/1"


def cache_manifest(cfg: DictConfig, img_size: int, vae: Any, images: int) -> dict[str, Any]:
    """What the cached latents depend on: the VAE (name and a digest of its config), the data, its subset and
    whether mirror images are held."""
    # the latents are cached unscaled: the scaling factor is applied when they are drawn, so it is not part of the key
    vae_config = json.dumps({k: v for k, v in dict(vae.config).items() if not k.startswith("_")
                             and k != "scaling_factor"}, sort_keys=True, default=str)
    weights = hashlib.sha256()  # a retrained VAE at the same path has the same config but not the same latents
    for tensor in vae.state_dict().values():
        weights.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return {"format": CACHE_FORMAT, "vae": str(cfg.task.latent.vae),
            "vae_config": hashlib.sha256(vae_config.encode()).hexdigest()[:16],
            "vae_weights": weights.hexdigest()[:16], "dataset": cfg.data.name,
            "img_size": img_size, "train_subset": cfg.data.train_subset, "subset_seed": cfg.data.subset_seed,
            "limit_train": cfg.data.limit_train, "images": images, "flips": cfg.data.augment == "flip",
            "permute_pixels": cfg.data.get("permute_pixels")}


def cache_file(cfg: DictConfig, img_size: int) -> Path:
    """``task.latent.cache_dir``, else ``<data.root>/latent-cache`` (``runs/latent-cache`` for embedded data)."""
    folder = cfg.task.latent.cache_dir or (Path(cfg.data.root) / "latent-cache" if cfg.data.root else
                                           Path("runs") / "latent-cache")
    return Path(folder).expanduser() / f"{cfg.data.name}-{img_size}px.pt"


@torch.no_grad()
def encode_posteriors(vae: Any, dataset: ImageTensorDataset, to_signed_unit_interval: Callable[[torch.Tensor], torch.Tensor],
                      device: torch.device, batch_size: int = 64, flips: bool = False) -> torch.Tensor:
    """(N, 2 x latent channels, h, w) float32: the posterior mean and standard deviation of every image; with
    ``flips``, (N, 2, 2 x latent channels, h, w): the image's and its horizontal mirror's."""
    vae = vae.to(device)
    params = []
    for start in range(0, len(dataset), batch_size):
        images = torch.stack([dataset[i][0] for i in range(start, min(start + batch_size, len(dataset)))])
        views = [images, images.flip(-1)] if flips else [images]
        encoded = []
        for view in views:
            posterior = vae.encode(to_signed_unit_interval(view.to(device)).to(vae.dtype)).latent_dist
            encoded.append(torch.cat([posterior.mean, posterior.std], dim=1).float().cpu())
        params.append(torch.stack(encoded, dim=1) if flips else encoded[0])
    return torch.cat(params)


def _either_view(pair: torch.Tensor) -> torch.Tensor:
    """One of an image's two cached posteriors (itself, its mirror), drawn from the per-sample seeded generator."""
    return pair[int(torch.randint(2, (1,)))]


def write_cache(path: Path, params: torch.Tensor, labels: torch.Tensor, manifest: dict[str, Any]) -> None:
    """Atomically: a kill while writing leaves no half cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # two runs starting at once each write their own
    torch.save({"manifest": manifest, "params": params, "labels": labels}, tmp)
    fsync_and_replace(tmp, path)


def read_cache(path: Path, expected: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The cached posteriors and labels, after checking that the cache was made for this run's VAE and data."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        manifest = saved["manifest"]
    except Exception as e:  # noqa: BLE001 - unreadable or not a cache: named with the file
        raise UserError(f"latent cache {path} cannot be read ({type(e).__name__}): delete it to encode the latents "
                        f"again") from None
    changed = [k for k in expected if manifest.get(k) != expected[k]]
    if changed:
        k = changed[0]
        raise UserError(f"latent cache {path} was made with {k}={manifest.get(k)!r}, this run has {expected[k]!r}: "
                        f"delete it (it is encoded again), or set task.latent.cache_dir to another folder")
    return saved["params"], saved["labels"]


def latent_training_set(cfg: DictConfig, vae: Any, train_set: ImageTensorDataset,
                        to_signed_unit_interval: Callable[[torch.Tensor], torch.Tensor], device: torch.device,
                        write: bool = True, wait: Callable[[], None] = lambda: None) -> ImageTensorDataset:
    """The training split as cached posteriors, written first when missing (by the process with ``write``; the
    others ``wait`` for it)."""
    if cfg.data.augment not in ("none", "flip"):
        raise UserError(f"task.latent.cache=true stores each image's latent (and its mirror's with data.augment=flip), "
                        f"not data.augment={cfg.data.augment}: set data.augment=flip or none, or task.latent.cache=false "
                        f"to encode augmented images at every step")
    flips = cfg.data.augment == "flip"
    train_set = train_set.without_augmentation()
    img_size = int(train_set[0][0].shape[-1])
    path = cache_file(cfg, img_size)
    expected = cache_manifest(cfg, img_size, vae, len(train_set))
    if write and not path.exists():
        params = encode_posteriors(vae, train_set, to_signed_unit_interval, device, flips=flips)
        write_cache(path, params, train_set.labels.clone(), expected)
    wait()
    params, labels = read_cache(path, expected)
    return ImageTensorDataset(params, labels, normalize=lambda x: x, augment=_either_view if flips else None)
