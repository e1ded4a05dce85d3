"""The token budget of a run: how many pixel tokens each training step pays for (``cfg.recipe``).

Three levers, each a key of its own (``configs/recipe/``): random token dropping (``recipe.token_drop``: timm's
``PatchDropout`` in a classifier's backbone, a partial reconstruction in MAE's decoder), progressive resolution
(``recipe.low_res_scale`` for the first ``recipe.low_res_frac`` of the steps: the batch is resized and the backbone
takes the smaller grid with the same parameters) and a final phase at every token and full size
(``recipe.full_frac``), so that the model is evaluated the way it last trained. The plan of a step is a function of
the step and the run's length alone, so a run resumed in the middle of a phase continues it exactly; nothing here is
saved in checkpoints.

A task says which levers its training accepts (``Task.recipe_levers``), a backbone which parts of the contract it has
(``token_drop``, ``train_size``); a lever on a task or backbone without it is refused in one line when the run is
built. Hand-written because no library schedules token counts over training (timm's ``PatchDropout`` has one rate).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch.nn.functional as F
from torch import nn

from .errors import UserError

__all__ = ["StepPlan", "TokenBudget", "check_recipe", "levers_in_use", "token_drop_target"]

LEVER_TASKS = {"token_drop": "cls drops tokens in its backbone, mae in its decoder; dit predicts every token's "
               "noise", "low_res": "cls, mae and dit train with it"}


def token_drop_target(module: nn.Module) -> nn.Module:
    """What takes a run's token drop: the task module itself where it defines ``set_token_drop`` (MAE: its
    decoder), else its backbone (timm's ``PatchDropout``, the backbone contract's ``token_drop`` part)."""
    return module if callable(getattr(module, "set_token_drop", None)) else module.backbone


@dataclass(frozen=True)
class StepPlan:
    """What one training step sees: the share of tokens dropped and the image side (``None``: the data's)."""
    token_drop: float
    img_size: Optional[int]


def levers_in_use(recipe: Mapping[str, Any]) -> list[str]:
    """The levers a recipe turns on: ``token_drop`` and / or ``low_res``."""
    return [name for name, on in (("token_drop", recipe["token_drop"] > 0),
                                  ("low_res", recipe["low_res_scale"] is not None and recipe["low_res_frac"] > 0)) if on]


class TokenBudget:
    """The plan of every step of a run of ``total_steps`` on ``img_size`` images whose tokens are ``patch_size``
    pixels on a side; :meth:`apply` sets a step's plan on the backbone and resizes its images."""

    def __init__(self, recipe: Mapping[str, Any], total_steps: int, img_size: int, patch_size: int) -> None:
        self.recipe, self.total_steps, self.img_size = recipe, total_steps, img_size
        self.full_from = total_steps - math.floor(recipe["full_frac"] * total_steps)  # first step of the last phase
        self.low_res_until = 0  # steps before this one are at low resolution
        self.low_img_size: Optional[int] = None
        if "low_res" in levers_in_use(recipe):
            side = max(patch_size, round(recipe["low_res_scale"] * img_size / patch_size) * patch_size)
            if side < img_size:
                self.low_img_size = side
                self.low_res_until = min(math.ceil(recipe["low_res_frac"] * total_steps), self.full_from)

    @property
    def active(self) -> bool:
        return self.recipe["token_drop"] > 0 or self.low_img_size is not None

    def plan(self, step: int) -> StepPlan:
        """The plan of the step that follows ``step`` optimizer steps."""
        if step >= self.full_from:
            return StepPlan(0.0, None)
        rate = self.recipe["token_drop"]
        if self.recipe["token_drop_schedule"] == "linear":
            rate *= 1 - step / self.full_from
        return StepPlan(rate, self.low_img_size if step < self.low_res_until else None)

    def apply(self, module: nn.Module, batch: Any, step: int) -> Any:
        """Set step ``step``'s plan on the task ``module`` (its :func:`token_drop_target` and its backbone); returns
        ``batch`` with its images (the first element) resized."""
        plan, backbone = self.plan(step), module.backbone
        if self.recipe["token_drop"] > 0:
            token_drop_target(module).set_token_drop(plan.token_drop)
        if self.low_img_size is not None:
            backbone.set_train_size(plan.img_size)
            if plan.img_size is not None:
                images = F.interpolate(batch[0], size=(plan.img_size, plan.img_size), mode="bilinear",
                                       antialias=True, align_corners=False)  # antialiased: a true downsample
                batch = (images, *batch[1:])
        return batch

    def restore(self, module: nn.Module) -> None:
        """The task module's backbone at its full size (evaluation, checkpoints read by other tools)."""
        if self.low_img_size is not None:
            module.backbone.set_train_size(None)

    def describe(self) -> str:
        """One line for the run's start."""
        parts = []
        if self.recipe["token_drop"] > 0:
            how = "linearly to 0" if self.recipe["token_drop_schedule"] == "linear" else "constant"
            parts.append(f"token drop {self.recipe['token_drop']:.0%} ({how}) until step {self.full_from}")
        if self.low_img_size is not None:
            parts.append(f"{self.low_img_size}x{self.low_img_size} images until step {self.low_res_until}")
        if self.full_from < self.total_steps:
            parts.append(f"every token at full size from step {self.full_from}")
        return f"recipe={self.recipe['name']}: " + "; ".join(parts)


def check_recipe(recipe: Mapping[str, Any], task_name: str, task_levers: tuple[str, ...], module: nn.Module,
                 model_name: str, img_size: int) -> None:
    """Refuse, in one line each, a lever the task's training or the task ``module``'s backbone cannot follow, before
    training."""
    from .models import require

    backbone = module.backbone
    for lever in levers_in_use(recipe):
        key = "recipe.token_drop" if lever == "token_drop" else "recipe.low_res_scale"
        if lever not in task_levers:
            raise UserError(f"{key}={recipe[key.split('.')[1]]}: task={task_name} does not train with the "
                            f"{lever.replace('_', ' ')} lever ({LEVER_TASKS[lever]}); set {key}="
                            f"{'0' if lever == 'token_drop' else 'null'} or recipe=plain")
        if lever == "low_res":
            require(backbone, ["train_size"], task_name, model_name)
        elif token_drop_target(module) is backbone:
            require(backbone, ["token_drop"], task_name, model_name)
    if "low_res" in levers_in_use(recipe):
        budget = TokenBudget(recipe, 1, img_size, backbone.patch_embed.patch_size)
        if budget.low_img_size is not None:
            try:
                backbone.set_train_size(budget.low_img_size)
            except ValueError as e:
                raise UserError(f"recipe.low_res_scale={recipe['low_res_scale']} gives {budget.low_img_size}x"
                                f"{budget.low_img_size} images, which model={model_name} cannot take ({e}); pick "
                                f"another scale") from None
            finally:
                backbone.set_train_size(None)
