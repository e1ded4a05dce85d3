"""Sample-quality metrics that run offline: Fréchet distance on features of an in-domain classifier.

No FID package ships Inception weights; they are downloaded on first use. A classifier trained by this project's
``cls`` task on the same data is an offline feature extractor (the "Fréchet classifier distance"), and its logits
also measure whether class-conditional samples show their class. torchmetrics' Inception FID remains available when
its weights file is already on disk.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .errors import UserError

__all__ = ["ClassifierFeatures", "build_fid", "load_classifier"]


class ClassifierFeatures(nn.Module):
    """A trained classifier seen as a feature extractor for images in [0, 1] (normalised internally).

    ``forward`` returns the pooled pre-logit features (what the Fréchet distance compares); ``logits`` the class
    scores. Always float32, whatever precision the classifier was trained or loaded in (e.g. inside a bf16-true
    run's ``init_module``), so that features do not depend on the run that measures them.
    """

    def __init__(self, backbone: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.backbone = backbone.float().eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.num_features = backbone.num_features

    def _tokens(self, images01: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features((images01.float() - self.mean) / self.std)

    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_head(self._tokens(images01), pre_logits=True).double()

    def logits(self, images01: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_head(self._tokens(images01))


def load_classifier(path: str | Path) -> ClassifierFeatures:
    """Load a ``cls`` checkpoint of this project as a :class:`ClassifierFeatures`."""
    from .checkpoint import read_checkpoint
    from .saved import load_run

    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"feature-extractor checkpoint {path} not found: train one with `python tools/train.py "
                        f"task=cls data=<the same data>` and pass its checkpoints/best.ckpt as task.classifier_ckpt")
    ckpt = read_checkpoint(path)
    config = ckpt.get("config", {})
    if config.get("task", {}).get("name") != "cls":
        raise UserError(f"{path} is not a classification checkpoint of this project (task "
                        f"{config.get('task', {}).get('name')!r}); FID features need one trained with task=cls")
    _, info, _, module = load_run(path, ckpt=ckpt)
    return ClassifierFeatures(module.backbone, info.mean, info.std)


def build_fid(features: str, classifier: Optional[ClassifierFeatures], inception_weights: Optional[str],
              image_shape: tuple[int, int, int], reset_real_features: bool = True):
    """A torchmetrics ``FrechetInceptionDistance`` on classifier features, or on Inception-v3 from a local file.

    It keeps running sums of the features (mean and covariance), so feeding it one batch of images (B, C, H, W) in
    [0, 1] at a time bounds memory by the batch, not the split. ``reset_real_features=False``: ``reset()`` drops
    only the generated images' statistics, so one pass over the real images serves several sets of samples.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    if features == "classifier":
        if classifier is None:
            raise UserError("FID on classifier features needs task.classifier_ckpt=<cls checkpoint>")
        return FrechetInceptionDistance(feature=classifier, normalize=True, input_img_size=image_shape,
                                        reset_real_features=reset_real_features)
    if features != "inception":
        raise UserError(f"unknown FID features {features!r}: use classifier or inception")
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        raise UserError("Inception FID needs the torch-fidelity package (pip install torch-fidelity) and its "
                        "weights file weights-inception-2015-12-05-6726825d.pth on disk (task.inception_weights=...); "
                        "or use task.fid_features=classifier, which works offline") from None
    if inception_weights is None or not Path(inception_weights).expanduser().is_file():
        raise UserError(f"Inception weights not found at {inception_weights!r}: download "
                        f"weights-inception-2015-12-05-6726825d.pth once and pass task.inception_weights=<path>; "
                        f"nothing is downloaded at run time")
    return FrechetInceptionDistance(feature=2048, normalize=True, reset_real_features=reset_real_features,
                                    feature_extractor_weights_path=str(Path(inception_weights).expanduser()))
