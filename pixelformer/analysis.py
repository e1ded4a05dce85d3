"""What a trained pixel (or patch) transformer learned: does it find locality without being given it?

The measurements of the ViT paper (Dosovitskiy et al., arXiv 2010.11929, figures 7 and 10), for any checkpoint:

* :func:`mean_attention_distance`: per block and head, the attention-weighted distance between a query's position
  and its keys' positions, in pixels of the input image (patch tokens sit at their patch's centre, so a PiT and a
  ViT are measured in the same unit);
* attention maps of a few query pixels per block, and attention rollout (Abnar & Zuidema, arXiv 2005.00928);
* :func:`pos_embed_similarity`: cosine similarity of every position's learned embedding with every other one;
* :func:`accuracy`: a classifier's accuracy on test images whose pixels are shuffled by one fixed permutation
  (``pixelformer.data.pixel_permutation``; ``data.permute_pixels`` trains on such images).

Attention weights are recomputed from each block's input (:func:`attention_weights`) rather than returned by the
attention modules, so that training keeps timm's fused ``scaled_dot_product_attention``, which never forms them.

:func:`analyze` runs everything on a saved run and writes ``<run>/analysis/`` (PNGs and ``analysis.json``);
``tools/analyze.py`` (``pixelformer-analyze``) is its command line.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from .errors import UserError
from .task import eval_mode

__all__ = ["AnalysisCfg", "Target", "accuracy", "analysis_target", "analyze", "attention_rollout",
           "attention_weights", "compare_distances", "mean_attention_distance", "parse_options", "pos_embed_similarity",
           "token_positions"]

#: Query pixels of the attention maps, as fractions of the image's (row, column): the centre, the four quarter
#: points, then three more; ``analysis.queries`` takes the first ones.
QUERY_PLACES = ((0.5, 0.5), (0.25, 0.25), (0.25, 0.75), (0.75, 0.25), (0.75, 0.75), (0.5, 0.125), (0.125, 0.5),
                (0.875, 0.875))
#: Attention held at once while averaging distances (bytes): images are taken in chunks that fit.
ATTENTION_BUDGET = 2 ** 29


# ------------------------------------------------------------------------------------------------ measurements
def attention_weights(model: nn.Module, images: torch.Tensor,
                      forward: Optional[Callable[[torch.Tensor], Any]] = None) -> list[torch.Tensor]:
    """Softmax attention of every block of ``model`` on ``images``: one (B, heads, T, T) float32 tensor per block,
    rows = queries, T = prefix (class, register) tokens + patch tokens, each row summing to 1.

    ``model`` has timm's layout (``blocks[i].attn`` a timm ``Attention``: a ViT, an MAE encoder, the DiT denoiser);
    ``forward(images)`` runs it (default ``model.forward_features``). A forward hook captures each ``attn``'s input
    and the weights are recomputed from it with the module's own ``qkv``, ``q_norm``/``k_norm`` and ``scale``:
    training keeps the fused kernel, which never materialises them. Runs in eval mode, without gradients.
    """
    attns = _attention_modules(model)
    inputs: list[Optional[torch.Tensor]] = [None] * len(attns)

    def capture(index: int, module: nn.Module, args: tuple, output: Any) -> None:
        inputs[index] = args[0].detach()

    hooks = [attn.register_forward_hook(lambda m, a, o, i=i: capture(i, m, a, o)) for i, attn in enumerate(attns)]
    try:
        with torch.no_grad(), eval_mode(model):
            (forward or model.forward_features)(images)
            return [_softmax_attention(attn, x) for attn, x in zip(attns, inputs)]
    finally:
        for hook in hooks:
            hook.remove()


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    """The attention modules of a backbone (the contract's ``attention_sites``; else those of ``model.blocks``),
    each checked to have timm's ``Attention`` layout."""
    if callable(getattr(model, "attention_sites", None)):
        attns = [site.attn for site in model.attention_sites()]
    else:
        attns = [getattr(block, "attn", None) for block in model.blocks]
    for i, attn in enumerate(attns):
        if not all(hasattr(attn, a) for a in ("qkv", "num_heads", "head_dim", "scale", "q_norm", "k_norm")):
            raise UserError(f"block {i} of {type(model).__name__} has no timm Attention (qkv, q_norm, k_norm, scale): "
                            f"its attention weights cannot be recomputed")
    return attns


def _softmax_attention(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What timm's ``Attention`` computes before weighting the values, from its input x (B, T, D); a
    ``LocalAttention`` (``dense_mask``) gives zero weight outside each query's neighbourhood, as it computes."""
    batch, tokens, _ = x.shape
    qkv = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    scores = (q.float() * attn.scale) @ k.float().transpose(-2, -1)
    if callable(getattr(attn, "dense_mask", None)):
        scores = scores.masked_fill(~attn.dense_mask(scores.device), float("-inf"))
    return scores.softmax(dim=-1)


def token_positions(grid: int, patch_size: int) -> torch.Tensor:
    """(grid * grid, 2) (row, column) of each patch token's centre in input pixels, tokens in row-major order:
    patch (i, j) -> (i * p + (p - 1) / 2, j * p + (p - 1) / 2). A pixel token (p = 1) sits on its pixel."""
    index = torch.arange(grid, dtype=torch.float32) * patch_size + (patch_size - 1) / 2
    rows, cols = torch.meshgrid(index, index, indexing="ij")
    return torch.stack([rows.flatten(), cols.flatten()], dim=1)


def mean_attention_distance(attn: torch.Tensor, positions: torch.Tensor, num_prefix_tokens: int = 0) -> torch.Tensor:
    """The ViT paper's mean attention distance per head (H,): sum_k a_qk * ||pos_q - pos_k||, averaged over the
    queries and the images of ``attn`` (B, H, T, T), in the unit of ``positions`` (N, 2) (input pixels from
    :func:`token_positions`).

    Prefix tokens (class, register) have no place in the image: they are dropped as queries and as keys, and each
    query's weights over the patch keys are renormalised to sum to 1, so the value is the distance at which a patch
    looks among patches, whatever share of its attention goes to the prefix.
    """
    patch = attn[:, :, num_prefix_tokens:, num_prefix_tokens:].float()
    patch = patch / patch.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    distances = torch.cdist(positions.float(), positions.float()).to(patch.device)  # (N, N)
    return (patch * distances).sum(dim=-1).mean(dim=(0, 2))


def attention_rollout(attns: Sequence[torch.Tensor]) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020) (B, T, T): how much each input token flows into each output token
    through all blocks. ``attns``: per block (B, T, T) attention averaged over heads; the residual connection is
    modelled as 0.5 * A + 0.5 * I, rows renormalised, and the blocks' matrices multiplied (last block on the left).
    """
    rollout = None
    for attn in attns:
        mixed = 0.5 * attn.float() + 0.5 * torch.eye(attn.shape[-1], device=attn.device)
        mixed = mixed / mixed.sum(dim=-1, keepdim=True)
        rollout = mixed if rollout is None else mixed @ rollout
    return rollout


def pos_embed_similarity(table: torch.Tensor) -> torch.Tensor:
    """Cosine similarity (N, N) of every position's embedding with every other one; ``table`` (N, D), patch rows
    only (without the prefix tokens' rows)."""
    unit = F.normalize(table.detach().float(), dim=-1)
    return unit @ unit.T


def accuracy(module: nn.Module, loader: Any, num_classes: int, permutation: Optional[torch.Tensor] = None,
             device: torch.device | str = "cpu") -> float:
    """Top-1 accuracy (%) of a classifier task module (``module((images, labels))["logits"]``) over ``loader``'s
    (images, labels) batches, with the images' pixels shuffled by ``permutation`` (H * W,) when given
    (:func:`pixelformer.data.permute_pixels`: one fixed permutation for every image and channel)."""
    from torchmetrics.classification import MulticlassAccuracy

    from .data import permute_pixels

    metric = MulticlassAccuracy(num_classes=num_classes, average="micro").to(device)
    with torch.no_grad(), eval_mode(module):
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            if permutation is not None:
                images = permute_pixels(images, permutation)
            metric.update(module((images, labels))["logits"].float(), labels)
    return 100.0 * metric.compute().item()


# ------------------------------------------------------------------------------------------- what is analysed
@dataclass
class Target:
    """The transformer of a task module that the analysis looks into.

    ``prepare(images)`` turns dataset images into its input (DiT: noised), ``forward(input)`` runs it;
    ``classifier`` is the task module when it returns logits (cls and other classifier tasks), else ``None``.
    """
    kind: str
    model: nn.Module
    patch_size: int
    grid: int
    num_prefix_tokens: int
    prepare: Callable[[torch.Tensor], torch.Tensor]
    forward: Callable[[torch.Tensor], Any]
    classifier: Optional[nn.Module]
    notes: list[str] = field(default_factory=list)


def analysis_target(task_name: str, module: nn.Module, sample: tuple[torch.Tensor, torch.Tensor],
                    timestep: Optional[int] = None) -> Target:
    """The transformer inside a task module: its ``backbone`` (cls, the MAE encoder, any task with a ViT backbone)
    or a pixel-space DiT ``denoiser``. ``sample``: one test batch, to see whether the module classifies (its output
    has ``"logits"``). A DiT is analysed at ``timestep`` (default: the middle of its schedule) on test images noised
    with a fixed seed, with the null label (the unconditional model that guidance starts from)."""
    from .models import DiT

    backbone, denoiser = getattr(module, "backbone", None), getattr(module, "denoiser", None)
    supported = ("analysis supports cls and mae checkpoints (the ViT backbone / encoder), pixel-space dit checkpoints "
                 "(the denoiser), and any task whose module has a ViT .backbone")
    if isinstance(denoiser, DiT):
        if getattr(module, "vae", None) is not None:
            raise UserError(f"task {task_name}: this dit run learns VAE latents (task.latent.vae), whose tokens are not "
                            f"pixels of the image; {supported}")
        steps = module.scheduler.config.num_train_timesteps
        t = steps // 2 if timestep is None else timestep
        if not 0 <= t < steps:
            raise UserError(f"analysis.timestep={t} is outside this run's schedule: use 0 to {steps - 1} "
                            f"(default {steps // 2}, the middle)")

        def noised(images: torch.Tensor) -> torch.Tensor:
            x0 = module.to_signed_unit_interval(images)
            noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0)).to(x0)  # the same noise always
            return module.scheduler.add_noise(x0, noise, torch.full((len(x0),), t, dtype=torch.long))

        def run(x: torch.Tensor) -> torch.Tensor:
            batch = len(x)
            return denoiser(x, torch.full((batch,), t, device=x.device),
                            torch.full((batch,), denoiser.num_classes, device=x.device))

        embed = denoiser.x_embedder
        return Target(task_name, denoiser.backbone, embed.patch_size, embed.grid_size, 0, noised, run, None,
                      [f"denoiser at timestep {t} of {steps} on test images noised with seed 0, null label "
                       f"(unconditional)"])
    if not (isinstance(backbone, nn.Module) and hasattr(backbone, "blocks") and hasattr(backbone, "patch_embed")):
        raise UserError(f"task {task_name}: its module has no ViT backbone or pixel DiT denoiser; {supported}")
    with torch.no_grad(), eval_mode(module), torch.random.fork_rng():  # a masking or noising forward draws at random
        out = module(sample)
    logits = out.get("logits") if isinstance(out, dict) else None
    classifier = module if isinstance(logits, torch.Tensor) and logits.ndim == 2 else None
    notes = [] if classifier is not None else [
        f"task {task_name} has no classifier: analysed its encoder on whole images (no masking)"]
    return Target(task_name, backbone, backbone.patch_embed.patch_size, backbone.patch_embed.grid_size,
                  backbone.num_prefix_tokens, lambda images: images, backbone.forward_features, classifier, notes)


def _sites(target: Target) -> list[tuple[nn.Module, torch.Tensor, int]]:
    """(attention module, (N, 2) positions of its tokens in input pixels, prefix tokens) per block: a backbone's
    ``attention_sites`` (each level of a hierarchical model on its own grid), else every block on the input grid."""
    if callable(getattr(target.model, "attention_sites", None)):
        return [(s.attn, token_positions(s.grid_size[0], s.stride), s.num_prefix_tokens)
                for s in target.model.attention_sites()]
    positions = token_positions(target.grid, target.patch_size)
    return [(block.attn, positions, target.num_prefix_tokens) for block in target.model.blocks]


def _pos_embed_kind(model: nn.Module) -> str:
    table = getattr(model, "pos_embed", None)
    return "none" if table is None else "learned" if isinstance(table, nn.Parameter) else "sincos"


# ------------------------------------------------------------------------------------------------ the command
@dataclass
class AnalysisCfg:
    """``analysis.*`` options of ``tools/analyze.py``."""
    images: int = 64  # first test images the attention distance averages over
    map_images: int = 3  # first test images whose attention maps are drawn
    queries: int = 4  # query pixels per map (QUERY_PLACES: centre, quarter points, ...), at most 8
    rollout: bool = True  # attention rollout as the maps' last column
    permute_seed: int = 0  # seed of the pixel permutation of the permutation accuracy
    batch_size: int = 256  # images per forward for the accuracies
    timestep: Optional[int] = None  # dit: noise level of the denoiser's input; None: the middle of the schedule
    weights: Optional[str] = None  # model | ema; None: ema when the checkpoint keeps one (what dit samples with)
    device: Optional[str] = None  # cpu, cuda, cuda:N; None: cuda when available
    out: Optional[str] = None  # output folder; None: <run>/analysis


def parse_options(args: Sequence[str]) -> AnalysisCfg:
    """``analysis.key=value`` arguments -> a checked :class:`AnalysisCfg` (a one-line error naming the key)."""
    dotlist = [a[len("analysis."):] for a in args]
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(AnalysisCfg), OmegaConf.from_dotlist(dotlist))
    except OmegaConfBaseException as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        key = getattr(e, "full_key", None)
        raise UserError(f"analysis option error: {first}" + (f" (key: analysis.{key})" if key else "")) from None
    opts = AnalysisCfg(**OmegaConf.to_container(cfg))
    for key, low, what in (("images", 1, "test images the attention distance averages over"),
                           ("map_images", 0, "test images whose attention maps are drawn"),
                           ("queries", 1, "query pixels per attention map"), ("batch_size", 1, "images per forward")):
        if getattr(opts, key) < low:
            raise UserError(f"analysis.{key}={getattr(opts, key)} must be at least {low} ({what}; default "
                            f"{getattr(AnalysisCfg, key)})")
    if opts.queries > len(QUERY_PLACES):
        raise UserError(f"analysis.queries={opts.queries}: use 1 to {len(QUERY_PLACES)} query pixels per map")
    if not 0 <= opts.permute_seed < 2 ** 63:
        raise UserError(f"analysis.permute_seed={opts.permute_seed} must be in [0, 2**63)")
    if opts.weights not in (None, "model", "ema"):
        raise UserError(f"analysis.weights={opts.weights}: choose model (training weights) or ema (averaged "
                        f"weights), or leave it out (ema where the checkpoint keeps it)")
    _device(opts.device)  # a bad device is refused before anything is loaded
    return opts


def _device(name: Optional[str]) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UserError(f"analysis.device={name} is not a device the analysis runs on: use cpu, cuda or cuda:N")
    if device.type == "cuda" and not (torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()):
        raise UserError(f"analysis.device={name} but this machine has {torch.cuda.device_count()} CUDA device(s): "
                        f"use analysis.device=cpu" + (" or cuda:0" if torch.cuda.is_available() else ""))
    return device


def analyze(ckpt: str | os.PathLike, overrides: Sequence[str] = (), opts: Optional[AnalysisCfg] = None,
            log: Callable[[str], None] = print) -> dict[str, Any]:
    """Analyse a saved run (a checkpoint file or a run directory; ``overrides`` change its config key by key, as
    for evaluation) and write ``analysis.json`` and the PNGs into ``opts.out`` (default ``<run>/analysis``).
    Returns the JSON's contents. W&B gets the numbers and pictures when the run's ``logger.wandb.mode`` (or
    ``WANDB_MODE``) is online or offline, in a new W&B run named ``<run>-analysis`` whose files go to the output
    folder."""
    from .checkpoint import read_checkpoint
    from .data import build_datasets
    from .saved import checkpoint_of, load_run

    opts = opts or AnalysisCfg()
    path = checkpoint_of(ckpt)
    if not path.is_file():
        raise UserError(f"ckpt={ckpt}: no such checkpoint file (pass <run>/checkpoints/best.ckpt or a run directory)")
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    out_dir = Path(opts.out).expanduser() if opts.out else run_dir / "analysis"
    device = _device(opts.device)
    saved = read_checkpoint(path)
    weights = opts.weights or ("ema" if isinstance(saved.get("ema"), dict) else "model")
    cfg, info, _, module = load_run(path, weights=weights, overrides=overrides, ckpt=saved)
    del saved
    module = module.float().to(device)
    _, test_set, _ = build_datasets(cfg.data)
    loader = torch.utils.data.DataLoader(test_set, batch_size=opts.batch_size, num_workers=cfg.data.num_workers)
    sample = tuple(t[:2].to(device) for t in next(iter(loader)))  # two images tell whether it classifies
    target = analysis_target(cfg.task.name, module, sample, opts.timestep)
    try:  # once the run is known to be analysable: a refused one leaves no empty folder behind
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the output folder {out_dir} ({e.strerror}): pass a writable "
                        f"analysis.out=PATH") from None
    images = _first_images(test_set, opts.images).to(device)
    positions = token_positions(target.grid, target.patch_size)
    report: dict[str, Any] = {
        "checkpoint": str(path), "task": cfg.task.name, "model": cfg.model.name, "weights": weights,
        "data": cfg.data.name, "img_size": info.img_size, "patch_size": target.patch_size,
        "data_permute_pixels": cfg.data.permute_pixels, "notes": target.notes,
    }
    files = _attention_distance(target, images, positions, report, out_dir)
    files += _attention_maps(target, images, positions, info, opts, report, out_dir)
    files += _pos_embed_similarity(target, positions, report, out_dir)
    report["permutation"] = _permutation_accuracy(target, cfg, info, loader, len(test_set), opts, device)
    report["files"] = [f.name for f in files]
    (out_dir / "analysis.json").write_text(json.dumps(report, indent=2) + "\n")
    _log_to_wandb(cfg, run_dir, out_dir, report, files)
    log(_summary(report, out_dir))
    return report


def _attention_distance(target: Any, images: torch.Tensor, positions: torch.Tensor, report: dict[str, Any],
                        out_dir: Path) -> list[Path]:
    """Mean attention distance per layer and head, over chunks of images whose attention fits the budget."""
    sites = _sites(target)
    depth, heads = len(sites), sites[0][0].num_heads
    tokens = target.num_prefix_tokens + target.grid ** 2
    chunk = max(1, ATTENTION_BUDGET // (depth * heads * tokens * tokens * 4))
    totals = torch.zeros(depth, heads, dtype=torch.float64)
    for start in range(0, len(images), chunk):
        batch = images[start:start + chunk]
        attns = attention_weights(target.model, target.prepare(batch), target.forward)
        for layer, ((_, where, prefix), attn) in enumerate(zip(sites, attns)):
            totals[layer] += mean_attention_distance(attn, where, prefix).double().cpu() * len(batch)
    distance = totals / len(images)
    uniform = torch.cdist(positions, positions).mean().item()  # what attention spread evenly would give
    report["attention_distance"] = {
        "unit": "pixels of the input image", "images": len(images), "per_layer_head": distance.tolist(),
        "mean_per_layer": distance.mean(dim=1).tolist(), "uniform_attention": uniform,
        "prefix_tokens": "excluded as queries and keys; each query's weights over patch keys renormalised",
    }
    return [_plot_distance(distance, uniform, report, out_dir / "attention_distance.png")]


def _attention_maps(target: Any, images: torch.Tensor, positions: torch.Tensor, info: Any, opts: AnalysisCfg,
                    report: dict[str, Any], out_dir: Path) -> list[Path]:
    """Attention maps of the first ``opts.map_images`` images, for the blocks on the input grid (a hierarchical
    model's coarser levels are measured by the distance, not drawn)."""
    from .data import to_unit_interval

    sites = _sites(target)
    pictures = to_unit_interval(images[:opts.map_images].cpu().float(), info.mean, info.std)
    on_input = [i for i, (_, where, _) in enumerate(sites) if len(where) == len(positions)]
    if len(on_input) < len(sites):
        report["notes"].append(f"attention maps show the {len(on_input)} of {len(sites)} blocks on the input grid"
                               + ("; no rollout across levels" if opts.rollout else ""))
    files = []
    for i, picture in enumerate(pictures):  # one image at a time: at 784 tokens, a ViT-B's attention is 350 MB
        attns = attention_weights(target.model, target.prepare(images[i:i + 1]), target.forward)
        files.append(_plot_maps(picture, [attns[j][0].mean(dim=0).cpu() for j in on_input], target,
                                opts if len(on_input) == len(sites) else dataclasses.replace(opts, rollout=False),
                                out_dir / f"attention_maps_{i}.png"))
    return files


def _pos_embed_similarity(target: Any, positions: torch.Tensor, report: dict[str, Any], out_dir: Path) -> list[Path]:
    """Cosine similarities of a learned position table (a fixed or absent one is skipped, with the reason)."""
    kind = _pos_embed_kind(target.model)
    if kind != "learned":
        report["pos_embed"] = {"kind": kind, "skipped": (
            "fixed 2D sin-cos table: its similarities show the formula, not something learned" if kind == "sincos"
            else "the model has no position embedding (model.pos_embed=none)")}
        return []
    table = target.model.pos_embed[0, target.num_prefix_tokens:]
    sim = pos_embed_similarity(table).cpu()
    report["pos_embed"] = {"kind": kind, **_similarity_summary(sim, positions, target.patch_size)}
    return [_plot_similarity(sim, target.grid, out_dir / "pos_embed_similarity.png")]


def _permutation_accuracy(target: Any, cfg: Any, info: Any, loader: Any, test_images: int, opts: AnalysisCfg,
                          device: torch.device) -> dict[str, Any]:
    """Test accuracy with the pixels in place and shuffled by one fixed permutation (classifiers only)."""
    from .data import pixel_permutation

    if target.classifier is None:
        return {"skipped": f"task {cfg.task.name} has no classifier to measure an accuracy with"}
    permutation = pixel_permutation(info.img_size, opts.permute_seed)
    plain = accuracy(target.classifier, loader, info.num_classes, device=device)
    shuffled = accuracy(target.classifier, loader, info.num_classes, permutation, device=device)
    return {"seed": opts.permute_seed, "test_images": test_images, "acc1": plain, "acc1_permuted": shuffled,
            "applied": ("on top of the run's own data.permute_pixels" if cfg.data.permute_pixels is not None
                        else "to the test images as the run saw them")}


def _first_images(dataset: Any, count: int) -> torch.Tensor:
    """The first ``count`` images of a dataset (a fixed set: the same for every checkpoint of a dataset)."""
    return torch.stack([dataset[i][0] for i in range(min(count, len(dataset)))])


def _similarity_summary(sim: torch.Tensor, positions: torch.Tensor, patch_size: int) -> dict[str, float]:
    """Scalars of a (N, N) similarity: mean over neighbouring positions (one patch apart) and over all pairs, and
    its correlation with the distance between positions (negative: nearby positions have similar embeddings)."""
    distance = torch.cdist(positions, positions) / patch_size
    off = ~torch.eye(len(sim), dtype=torch.bool)
    neighbours = (distance - 1).abs() < 1e-6
    correlation = torch.corrcoef(torch.stack([sim[off], distance[off]]))[0, 1].item()
    return {"mean_cosine_neighbours": sim[neighbours].mean().item(), "mean_cosine_all": sim[off].mean().item(),
            "correlation_with_distance": correlation}


# ------------------------------------------------------------------------------------------------------ pictures
def _draw_distance(ax: Any, distance: torch.Tensor, uniform: float, legend: bool = False) -> None:
    """The ViT paper's figure on ``ax``: one dot per head at its block's depth, the per-block mean as a line, and
    the distance uniform attention gives (dashed)."""
    depth, heads = distance.shape
    layers = torch.arange(1, depth + 1)
    ax.scatter(layers.repeat_interleave(heads).numpy(), distance.flatten().numpy(), s=14, alpha=0.7, label="head")
    ax.plot(layers.numpy(), distance.mean(dim=1).numpy(), color="black", lw=1, label="mean over heads")
    ax.axhline(uniform, color="grey", ls="--", lw=1, label="uniform attention")
    ax.set_xticks(layers.tolist())
    ax.set_xlabel("block")
    if legend:
        ax.legend(fontsize=7)


def _plot_distance(distance: torch.Tensor, uniform: float, report: dict[str, Any], path: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.6))
    ax = fig.subplots()
    _draw_distance(ax, distance, uniform, legend=True)
    ax.set(ylabel="mean attention distance (pixels)", ylim=(0, 1.1 * max(uniform, float(distance.max()))),
           title=f"{report['model']} p={report['patch_size']} on {report['data']} {report['img_size']}px")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def compare_distances(analyses: Sequence[str | os.PathLike], path: str | os.PathLike,
                      labels: Optional[Sequence[str]] = None) -> Path:
    """Runs side by side: one panel per run's ``analysis.json`` (or its run directory, whose ``analysis/`` holds
    it), mean attention distance per head vs depth on a shared y axis, each with its uniform-attention line."""
    from matplotlib.figure import Figure

    reports = []
    for item in analyses:
        item = Path(item).expanduser()
        found = next((c for c in (item, item / "analysis.json", item / "analysis" / "analysis.json") if c.is_file()),
                     None)
        if found is None:
            raise UserError(f"compare: {item} is neither an analysis.json nor a run analysed by tools/analyze.py "
                            f"(run tools/analyze.py ckpt={item} first)")
        reports.append(json.loads(found.read_text()))
    if labels is not None and len(labels) != len(reports):
        raise UserError(f"compare: {len(labels)} labels for {len(reports)} runs; give one label per run")
    names = labels or [f"{r['model']} p={r['patch_size']}" for r in reports]
    top = 1.1 * max(max(max(map(max, r["attention_distance"]["per_layer_head"])),
                        r["attention_distance"]["uniform_attention"]) for r in reports)
    fig = Figure(figsize=(3.2 * len(reports), 3.3))
    axes = fig.subplots(1, len(reports), squeeze=False)[0]
    for ax, report, name in zip(axes, reports, names):
        _draw_distance(ax, torch.tensor(report["attention_distance"]["per_layer_head"]),
                       report["attention_distance"]["uniform_attention"])
        ax.set(ylim=(0, top), title=f"{name}\n{report['data']} {report['img_size']}px")
    axes[0].set_ylabel("mean attention distance (pixels)")
    fig.tight_layout()
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _plot_maps(picture: torch.Tensor, attns: list[torch.Tensor], target: Target, opts: AnalysisCfg,
               path: Path) -> Path:
    """One row per query pixel: the image with the query marked, then its head-averaged attention over the patch
    keys in every block (and the rollout), drawn over the image; a patch's weight covers the patch's pixels."""
    from matplotlib.figure import Figure

    size, p, prefix = picture.shape[-1], target.patch_size, target.num_prefix_tokens
    columns = [(f"block {i + 1}", a) for i, a in enumerate(attns)]
    if opts.rollout:
        columns.append(("rollout", attention_rollout([a[None] for a in attns])[0]))
    shown = (picture.mean(0) if picture.shape[0] != 3 else picture.permute(1, 2, 0)).numpy()
    queries = [(min(int(r * size), size - 1), min(int(c * size), size - 1)) for r, c in QUERY_PLACES[:opts.queries]]
    fig = Figure(figsize=(1.3 * (len(columns) + 1), 1.3 * len(queries) + 0.3))
    axes = fig.subplots(len(queries), len(columns) + 1, squeeze=False)
    for row, (qr, qc) in enumerate(queries):
        token = prefix + (qr // p) * target.grid + qc // p
        axes[row, 0].imshow(shown, cmap="gray", vmin=0, vmax=1)
        axes[row, 0].set_title("query" if row == 0 else "", fontsize=7)
        for col, (name, attn) in enumerate(columns, start=1):
            weights = attn[token, prefix:].reshape(target.grid, target.grid)
            weights = weights.repeat_interleave(p, 0).repeat_interleave(p, 1)  # a patch's weight on its pixels
            axes[row, col].imshow(shown, cmap="gray", vmin=0, vmax=1)
            axes[row, col].imshow(weights.numpy(), cmap="inferno", alpha=0.65)
            if row == 0:
                axes[row, col].set_title(name, fontsize=7)
        for ax in axes[row]:
            ax.plot(qc, qr, marker="+", color="cyan", ms=6, mew=1.5)
            ax.set_axis_off()
    fig.suptitle(f"attention of query pixels ({target.kind}; mean over heads{', rollout' if opts.rollout else ''}; "
                 f"each map on its own colour scale)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _plot_similarity(sim: torch.Tensor, grid: int, path: Path) -> Path:
    """The ViT paper's grid of small maps: tile (i, j) is position (i, j)'s similarity with every position. Drawn
    as one mosaic image (one tile per position, a blank line between tiles), fast even for 32x32 positions."""
    from matplotlib.figure import Figure

    tiles = sim.reshape(grid, grid, grid, grid)  # (query row, query col, key row, key col)
    padded = F.pad(tiles, (0, 1, 0, 1), value=float("nan"))  # a NaN separator after every tile
    mosaic = padded.permute(0, 2, 1, 3).reshape(grid * (grid + 1), grid * (grid + 1))
    fig = Figure(figsize=(6, 5.4))
    ax = fig.subplots()
    image = ax.imshow(mosaic.numpy(), cmap="viridis", vmin=-1, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    ax.set_title("cosine similarity of position embeddings (tile = a position)", fontsize=8)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02)
    fig.savefig(path, dpi=max(110, math.ceil(grid * (grid + 1) / 5)))
    return path


# ----------------------------------------------------------------------------------------------- report, W&B
def _summary(report: dict[str, Any], out_dir: Path) -> str:
    dist = report["attention_distance"]
    lines = [f"mean attention distance (pixels; uniform attention {dist['uniform_attention']:.2f}), per block:"]
    lines += [f"  block {i + 1}: mean {m:.2f}  heads " + " ".join(f"{h:.2f}" for h in heads)
              for i, (m, heads) in enumerate(zip(dist["mean_per_layer"], dist["per_layer_head"]))]
    pe = report["pos_embed"]
    lines.append(f"position embedding ({pe['kind']}): " + (f"skipped: {pe['skipped']}" if "skipped" in pe else
                 f"neighbours' cosine {pe['mean_cosine_neighbours']:.3f}, all pairs {pe['mean_cosine_all']:.3f}, "
                 f"correlation with distance {pe['correlation_with_distance']:.3f}"))
    perm = report["permutation"]
    lines.append(f"pixel permutation: skipped: {perm['skipped']}" if "skipped" in perm else
                 f"pixel permutation (seed {perm['seed']}): acc1 {perm['acc1']:.2f} % -> {perm['acc1_permuted']:.2f} %"
                 f" on {perm['test_images']} test images")
    lines += [f"note: {n}" for n in report["notes"]]
    lines.append(f"wrote {out_dir / 'analysis.json'} and {len(report['files'])} PNGs in {out_dir}")
    return "\n".join(lines)


def _log_to_wandb(cfg: DictConfig, run_dir: Path, out_dir: Path, report: dict[str, Any], files: list[Path]) -> None:
    """The numbers and pictures to W&B when the run's logger is online or offline (``logger.wandb.mode=disabled``
    on the command line, or ``WANDB_MODE=disabled``, turns it off). A failing W&B only warns (SafeLogger)."""
    from .config import to_plain
    from .tracking import SafeLogger, build_loggers

    wandb_loggers = [lg for lg in build_loggers(cfg, out_dir, f"{run_dir.name}-analysis") if isinstance(lg, SafeLogger)]
    if not wandb_loggers:
        return
    metrics: dict[str, float] = {}
    dist = report["attention_distance"]
    for layer, (mean, heads) in enumerate(zip(dist["mean_per_layer"], dist["per_layer_head"]), start=1):
        metrics[f"analysis/attention_distance/block_{layer}"] = mean
        metrics.update({f"analysis/attention_distance/block_{layer}_head_{h}": v for h, v in enumerate(heads)})
    for key in ("acc1", "acc1_permuted"):
        if key in report["permutation"]:
            metrics[f"analysis/{key}"] = report["permutation"][key]
    for key in ("mean_cosine_neighbours", "mean_cosine_all", "correlation_with_distance"):
        if key in report["pos_embed"]:
            metrics[f"analysis/pos_embed/{key}"] = report["pos_embed"][key]
    for logger in wandb_loggers:
        logger.log_hyperparams(to_plain(cfg))
        logger.log_metrics(metrics, step=0)
        for path in files:
            logger.log_image(key=f"analysis/{path.stem}", images=[str(path)], step=0)
        logger.close()
