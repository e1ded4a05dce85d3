"""Training throughput of pixelformer's ``VisionTransformer`` against timm's, at pixel-token sequence lengths.

Run from the repository root::

    python benchmarks/throughput.py            # every row, both precisions (CPU: ~4 min on 2 idle cores)
    python benchmarks/throughput.py --quick    # PiT-Tiny and ViT-Tiny rows only, small batches (~1 min)
    python benchmarks/throughput.py --max-batch   # CUDA only: also search the largest batch at 1,024 / 4,096 tokens

One row per (model, image size, patch size, precision). A *training step* is forward + cross-entropy + backward +
AdamW step; fp32 runs plainly, bf16-mixed runs the forward and loss under ``torch.autocast(<device>, bfloat16)``.
Our model (``pixelformer.create_backbone``) and timm's ``VisionTransformer`` of the same shape, loaded with the same
weights, are timed in the same process, their steps interleaved (ABBA order) so that drift in machine load hits both.
Throughput is batch / median step time over the timed iterations, after warm-up steps.

What is counted as FLOPs (``forward_flops``): matrix multiplies only, FLOPs = 2 x multiply-accumulates (MACs). For
N tokens (pixels / patches + 1 CLS token), width D, MLP ratio r and depth L, one image's forward is

* patch embedding: 2 * N_patches * (C * p * p) * D
* per block: 2 * (3 + 1 + 2r) * N * D^2  (qkv, output projection, two MLP layers; = 24 N D^2 for r = 4)
  plus 4 * N^2 * D  (Q K^T and attention x V, each N^2 D MACs)
* head: 2 * D * num_classes

LayerNorm, softmax, GELU, residual adds, the loss and the optimizer are not counted. A training step is counted as
3 x forward (backward = 2 x forward: gradients with respect to activations and to weights). This is the convention of
the ecosystem notes' cost model; timm's and DiT's published numbers are MACs, i.e. half of this.

"Peak" is the best matmul throughput of the same device in the same run: a 2048 x 2048 (CUDA: 8192 x 8192)
``torch.matmul`` in fp32 and in bf16 (the dtype autocast feeds the matmuls in bf16-mixed). ``frac_peak`` = achieved /
that peak, i.e. an MFU against a measured rather than a datasheet peak.

Peak memory is the high-water mark of bytes held by live tensors during one training step: the static state
(parameters, AdamW moments, the input batch) plus the largest transient allocation seen during the step (gradients,
activations, autocast copies). On CUDA the transient part is ``torch.cuda.max_memory_allocated``; on CPU it is
replayed from the allocation events of ``torch.profiler.profile(profile_memory=True)``, which the c10 CPU allocator
reports for every tensor. See ``benchmarks/README.md``.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

try:
    import pixelformer
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import pixelformer

import timm
from timm.layers import Attention
from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer

from pixelformer import create_backbone
from pixelformer.runtime import cpu_name, tune_cpu_allocator

__all__ = [
    "BenchConfig", "TrainStep", "benchmark_config", "forward_flops", "train_flops_per_image", "matmul_peak",
    "loader_throughput", "attention_path_check", "default_configs", "main",
]

PRECISIONS = ("fp32", "bf16-mixed")
NUM_CLASSES = 100
IN_CHANS = 3
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
# A step's batch aims at this many training FLOPs (rounded down to a power of two, clamped to BATCH_RANGE), so that
# 64-token and 1,024-token rows each take a few seconds instead of differing by 30x.
STEP_FLOP_TARGET = {"cpu": 256e9, "cpu-quick": 48e9, "cuda": 32e12}
BATCH_RANGE = {"cpu": (2, 128), "cuda": (8, 2048)}
NOISY_SPREAD = 1.25  # slowest / fastest timed step above which a row's timing is flagged as noise-dominated


# ---------------------------------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class BenchConfig:
    """One row: a registered backbone name at an input size, patch size and precision.

    ``depth``, ``embed_dim`` and ``num_heads`` override the registered size (tests use a 1-block model).
    """

    model: str
    img: int
    patch: int
    precision: str
    batch: int | None = None
    depth: int | None = None
    embed_dim: int | None = None
    num_heads: int | None = None

    @property
    def tokens(self) -> int:
        """Patch tokens (pixels for a PiT), without the CLS token."""
        return (self.img // self.patch) ** 2


def default_configs(quick: bool) -> list[BenchConfig]:
    """PiT-Tiny/Small at 8, 16, 32 px (64 / 256 / 1,024 tokens) and ViT-Tiny with patch 2, 4, 8 at 32 px.

    ``quick`` keeps PiT-Tiny and ViT-Tiny only (PiT-Small at 1,024 tokens alone costs ~3x PiT-Tiny's whole set).
    """
    shapes: list[tuple[str, int, int]] = [("pit_tiny", img, 1) for img in (8, 16, 32)]
    if not quick:
        shapes += [("pit_small", img, 1) for img in (8, 16, 32)]
    shapes += [("vit_tiny", 32, patch) for patch in (2, 4, 8)]
    return [BenchConfig(name, img, patch, precision) for name, img, patch in shapes for precision in PRECISIONS]


# ------------------------------------------------------------------------------------------------------ FLOPs
def forward_flops(img: int, patch: int, in_chans: int, embed_dim: int, depth: int, num_classes: int,
                  mlp_ratio: float = 4.0, class_token: bool = True) -> int:
    """Matmul FLOPs (2 x MACs) of one image's forward pass; see the module docstring for what is counted."""
    patches = (img // patch) ** 2
    n = patches + int(class_token)
    d = embed_dim
    hidden = int(d * mlp_ratio)
    embed = 2 * patches * (in_chans * patch * patch) * d
    linear_macs = n * d * (3 * d) + n * d * d + 2 * n * d * hidden  # qkv, proj, fc1, fc2
    attn_macs = 2 * n * n * d  # Q K^T and attn @ V over all heads together
    head = 2 * d * num_classes
    return embed + depth * 2 * (linear_macs + attn_macs) + head


def train_flops_per_image(model: nn.Module, img: int, num_classes: int = NUM_CLASSES) -> int:
    """3 x ``forward_flops`` for a built pixelformer ``VisionTransformer`` (shape read off the model)."""
    mlp_ratio = model.blocks[0].mlp.fc1.out_features / model.embed_dim
    return 3 * forward_flops(img, model.patch_embed.patch_size, IN_CHANS, model.embed_dim, len(model.blocks),
                             num_classes, mlp_ratio=mlp_ratio, class_token=model.cls_token is not None)


# ----------------------------------------------------------------------------------------------------- models
def build_models(cfg: BenchConfig, device: torch.device) -> tuple[nn.Module, nn.Module, bool]:
    """Our backbone and timm's ``VisionTransformer`` of the same shape, holding the same weights.

    Returns (ours, timm, weights_shared): the last is False if timm no longer accepts our state dict key for key.
    """
    torch.manual_seed(0)
    ours = create_backbone(cfg.model, img_size=cfg.img, patch_size=cfg.patch, in_chans=IN_CHANS,
                           num_classes=NUM_CLASSES, depth=cfg.depth, embed_dim=cfg.embed_dim,
                           num_heads=cfg.num_heads)
    ref = TimmVisionTransformer(img_size=cfg.img, patch_size=cfg.patch, in_chans=IN_CHANS, num_classes=NUM_CLASSES,
                                embed_dim=ours.embed_dim, depth=len(ours.blocks),
                                num_heads=ours.blocks[0].attn.num_heads, class_token=True)
    result = ref.load_state_dict(ours.state_dict(), strict=False)
    shared = not result.missing_keys and not result.unexpected_keys
    return ours.to(device).train(), ref.to(device).train(), shared


def autocast_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    raise ValueError(f"unknown precision {precision!r}; choose from {PRECISIONS}")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# AdamW implementations: "fused" is what pixelformer's trainer uses (one kernel over all parameters), "for-loop" is
# torch's default on CPU, "foreach" its default on CUDA (one kernel per op across parameters).
ADAMW_KWARGS: dict[str, dict[str, bool]] = {
    "fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False},
}


class TrainStep:
    """A callable running one training step (forward, cross-entropy, backward, AdamW) of ``model`` on a fixed batch.

    The same class drives ours and timm's model, so both are timed by exactly the same code, with the same AdamW.
    """

    def __init__(self, model: nn.Module, batch: int, img: int, precision: str, device: torch.device,
                 adamw: str = "fused", in_chans: int = IN_CHANS, num_classes: int = NUM_CLASSES) -> None:
        self.model = model
        self.precision = precision
        self.device = device
        gen = torch.Generator().manual_seed(1)
        self.x = torch.randn(batch, in_chans, img, img, generator=gen).to(device)
        self.y = torch.randint(0, num_classes, (batch,), generator=gen).to(device)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, **ADAMW_KWARGS[adamw])

    def __call__(self) -> None:
        # Gradients are dropped first, so that a step starts holding only ``static_bytes`` and everything it
        # allocates (activations, then gradients) is seen by ``transient_peak_bytes``.
        self.optimizer.zero_grad(set_to_none=True)
        with autocast_context(self.precision, self.device):
            loss = F.cross_entropy(self.model(self.x), self.y)
        loss.backward()
        self.optimizer.step()

    def static_bytes(self) -> int:
        """Bytes of the state that lives across steps: parameters, optimizer moments and the input batch."""
        tensors = [*self.model.parameters(), self.x, self.y]
        for state in self.optimizer.state.values():
            tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
        return sum(t.numel() * t.element_size() for t in tensors)


# ----------------------------------------------------------------------------------------------------- timing
def time_interleaved(steps: dict[str, Callable[[], None]], warmup: int, iters: int, device: torch.device,
                     on_last_warmup: Callable[[str, Callable[[], None]], None] | None = None) -> dict[str, list[float]]:
    """Seconds of each timed call of each step, calling the steps in turn (ABBA order) so load drift hits all alike.

    ``on_last_warmup(name, step)``, if given, replaces the plain call on the last warm-up round (memory profiling
    rides on a step that is not timed anyway).
    """
    names = list(steps)
    for round_ in range(warmup):
        for name in names:
            if on_last_warmup is not None and round_ == warmup - 1:
                on_last_warmup(name, steps[name])
            else:
                steps[name]()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(iters):
        for name in (names if i % 2 == 0 else names[::-1]):
            synchronize(device)
            start = time.perf_counter()
            steps[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Send fd 2 to /dev/null: the profiler's C++ side prints start/stop lines there on every profiled step.

    Python exceptions still propagate with their messages; only text printed to stderr inside the block is lost.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "wb") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def transient_peak_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Largest increase of live tensor bytes over the level at the call's start, while ``fn()`` runs."""
    if device.type == "cuda":
        synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    allocations: list[tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            allocations.append((event.start_time_ns, event.extra_fields.alloc_size))
        stack.extend(event.children)
    level = peak = 0
    for _, size in sorted(allocations):
        level += size
        peak = max(peak, level)
    return peak


def matmul_peak(dtype: torch.dtype, device: torch.device, size: int | None = None, iters: int = 5) -> float:
    """Best-of-``iters`` FLOP/s of a ``size`` x ``size`` matmul in ``dtype`` (2 * size^3 FLOPs).

    ``size`` defaults to 2048 on CPU and 8192 on CUDA (2048^3 takes microseconds there, too short to time).
    """
    size = size or (8192 if device.type == "cuda" else 2048)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(device, dtype)
    b = torch.randn(size, size, generator=gen).to(device, dtype)
    torch.matmul(a, b)
    best = math.inf
    for _ in range(iters):
        synchronize(device)
        start = time.perf_counter()
        torch.matmul(a, b)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best


def loader_throughput(img: int, batch: int, num_batches: int = 50, device: torch.device | None = None,
                      on_device: bool = False) -> float:
    """Images/s of one shuffled epoch of the trainer's own training loader, batches delivered on ``device``.

    An in-memory, un-augmented dataset of ``img`` px images, as digits and CIFAR are held: by default through
    ``build_loader``'s DataLoader (per-sample indexing, default collation, then the copy to the device), with
    ``on_device`` through the ``data.on_device`` loader (the dataset copied to the device once, batches gathered
    there).
    """
    from pixelformer.data import ImageTensorDataset, build_loader

    device = device or torch.device("cpu")
    n = batch * num_batches
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, IN_CHANS, img, img), dtype=torch.uint8, generator=gen)
    dataset = ImageTensorDataset(images, torch.randint(0, NUM_CLASSES, (n,), generator=gen),
                                 normalize=lambda x: x.float().div(255))
    loader = build_loader(dataset, batch, train=True, seed=0, rank=0, world_size=1, num_workers=0,
                          device=device if on_device else None)
    synchronize(device)  # build_loader copied the dataset to the device for on_device: set-up, not epoch cost
    start = time.perf_counter()
    seen = 0
    for x, _ in loader:
        seen += x.to(device, non_blocking=True).shape[0]
    synchronize(device)
    return seen / (time.perf_counter() - start)


def paired_ratios(ours_times: Sequence[float], timm_times: Sequence[float]) -> dict[str, float]:
    """ours/timm speed ratio per timed round (timm's step time / ours, steps taken back to back), summarised.

    Pairing the i-th steps of the two models, which ran next to each other, cancels slow drift in machine load; the
    spread of the per-round ratios (min, quartiles, max) says how far a single number can be trusted.
    """
    ratios = sorted(t / o for o, t in zip(ours_times, timm_times))
    quartiles = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else ratios * 3
    return {"ratio_paired": statistics.median(ratios), "ratio_min": ratios[0], "ratio_q1": quartiles[0],
            "ratio_q3": quartiles[-1], "ratio_max": ratios[-1]}


# ------------------------------------------------------------------------------------------------- benchmarks
def pick_batch(flops_per_image: int, device: torch.device, quick: bool) -> int:
    """Largest power of two whose step costs at most the device's FLOP target, clamped to its batch range."""
    target = STEP_FLOP_TARGET["cpu-quick" if quick and device.type == "cpu" else device.type]
    low, high = BATCH_RANGE[device.type]
    batch = 2 ** max(0, int(math.floor(math.log2(max(target / flops_per_image, 1)))))
    return max(low, min(high, batch))


def benchmark_config(cfg: BenchConfig, device: torch.device, peaks: dict[str, float], warmup: int = 2,
                     iters: int = 5, memory: bool = True, quick: bool = False,
                     loader_cache: dict[tuple, float] | None = None) -> dict[str, Any]:
    """Time one configuration, ours against timm, and return its table row as a dict.

    ``peaks`` maps precision -> measured matmul FLOP/s; ``loader_cache`` avoids re-measuring the loader per row.
    """
    ours, ref, shared = build_models(cfg, device)
    flops = train_flops_per_image(ours, cfg.img)
    batch = cfg.batch or pick_batch(flops, device, quick)
    steps = {
        "ours": TrainStep(ours, batch, cfg.img, cfg.precision, device),
        "timm": TrainStep(ref, batch, cfg.img, cfg.precision, device),
    }
    peak_mem: dict[str, int] = {}

    def profile_memory(name: str, step: Callable[[], None]) -> None:
        peak_mem[name] = steps[name].static_bytes() + transient_peak_bytes(step, device)

    times = time_interleaved(steps, max(warmup, 1), iters, device, profile_memory if memory else None)
    seconds = {name: statistics.median(ts) for name, ts in times.items()}
    spread = max(max(ts) / min(ts) for ts in times.values())
    ours_ips, timm_ips = batch / seconds["ours"], batch / seconds["timm"]
    achieved = ours_ips * flops
    if loader_cache is None:
        loader_cache = {}
    key = (cfg.img, batch)
    if key not in loader_cache:
        loader_cache[key] = loader_throughput(cfg.img, batch, device=device)
        loader_cache[key + ("device",)] = loader_throughput(cfg.img, batch, device=device, on_device=True)
    return {
        "model": cfg.model, "img": cfg.img, "patch": cfg.patch, "tokens": cfg.tokens, "precision": cfg.precision,
        "batch": batch,
        "ours_img_s": ours_ips, "timm_img_s": timm_ips, "ratio": ours_ips / timm_ips,
        "train_gflop_per_img": flops / 1e9, "ours_tflop_s": achieved / 1e12,
        "frac_peak": achieved / peaks[cfg.precision],
        "ours_peak_mib": peak_mem.get("ours", float("nan")) / 2 ** 20,
        "timm_peak_mib": peak_mem.get("timm", float("nan")) / 2 ** 20,
        "loader_img_s": loader_cache[key], "on_device_loader_img_s": loader_cache[key + ("device",)],
        "spread": spread, "ratio_best": min(times["timm"]) / min(times["ours"]),
        **paired_ratios(times["ours"], times["timm"]),
        "ours_step_s": seconds["ours"], "timm_step_s": seconds["timm"],
        "ours_step_times": times["ours"], "timm_step_times": times["timm"], "weights_shared": shared,
        "depth": len(ours.blocks), "embed_dim": ours.embed_dim,
    }


def attention_path_check(device: torch.device, dim: int = 192, num_heads: int = 3,
                         token_counts: Sequence[int] = (256, 1024), batch: int = 4) -> list[dict[str, Any]]:
    """Which SDPA kernel the backbones' (timm's) ``Attention`` gets, and how its memory grows with the token count.

    For PiT-Tiny's attention (192 wide, 3 heads) at 256 and 1,024 pixel tokens (+ CLS), forward + backward run with
    SDPA restricted (``torch.nn.attention.sdpa_kernel``) to the flash / memory-efficient backends, to the math
    backend, and to flash / efficient with attention dropout 0.1. A restricted run raises when that backend cannot
    serve the call, so ``ok`` says which path is taken; ``peak_mib`` is the transient tensor memory of the
    fwd+bwd. A linear-memory kernel grows ~4x from 256 to 1,024 tokens, the math kernel (which stores the
    N x N attention matrix) towards 16x.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    variants = [
        ("flash/efficient", [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION], 0.0),
        ("math", [SDPBackend.MATH], 0.0),
        ("flash/efficient, attn_drop=0.1", [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION], 0.1),
    ]
    rows: list[dict[str, Any]] = []
    for precision in PRECISIONS:
        for label, backends, drop in variants:
            for tokens in token_counts:
                torch.manual_seed(0)
                attn = Attention(dim, num_heads, qkv_bias=True, attn_drop=drop).to(device).train()
                x = torch.randn(batch, tokens + 1, dim, device=device, requires_grad=True)

                def fwd_bwd() -> None:
                    with sdpa_kernel(backends), autocast_context(precision, device):
                        out = attn(x)
                    out.float().sum().backward()

                row: dict[str, Any] = {"precision": precision, "backends": label, "tokens": tokens, "batch": batch}
                try:
                    row["peak_mib"] = transient_peak_bytes(fwd_bwd, device) / 2 ** 20
                    row["ok"], row["error"] = True, ""
                except RuntimeError as err:
                    row["peak_mib"], row["ok"] = float("nan"), False
                    row["error"] = str(err).strip().splitlines()[0][:160]
                rows.append(row)
    for row in rows:  # growth from the smallest token count, per (precision, backends)
        base = next(r for r in rows if r["precision"] == row["precision"] and r["backends"] == row["backends"])
        row["growth_vs_first"] = row["peak_mib"] / base["peak_mib"] if base["ok"] and row["ok"] else float("nan")
    return rows


# ----------------------------------------------------------------------------------------------- token scaling
def token_scaling(device: torch.device, model: str = "pit_tiny", sizes: Sequence[int] = (16, 32, 48, 64),
                  precisions: Sequence[str] = PRECISIONS,
                  extrapolate: Sequence[int] = (28, 224)) -> list[dict[str, Any]]:
    """Peak memory of one training step per image (batch 1) against the token count, fitted and extrapolated.

    Activation memory of a transformer with a linear-memory attention kernel grows linearly with the tokens, so a
    least-squares line through the measured sizes predicts larger inputs: ``extrapolate`` lists image sizes (28 px is
    the paper's ImageNet PiT input, 224 px = 50,176 pixel tokens) whose rows are predictions, not measurements. FLOPs
    are exact counts; at 224 px attention's 4 N^2 D dwarfs the 24 N D^2 of the linear layers.
    """
    rows: list[dict[str, Any]] = []
    for precision in precisions:
        measured: list[tuple[int, float]] = []
        for img in sizes:
            torch.manual_seed(0)
            net = create_backbone(model, img_size=img, in_chans=IN_CHANS, num_classes=NUM_CLASSES).to(device).train()
            step = TrainStep(net, 1, img, precision, device)
            step()  # warm-up: optimizer state exists afterwards, as in every later step
            static = step.static_bytes()
            activations = transient_peak_bytes(step, device)
            measured.append((img * img, activations))
            rows.append({"model": model, "precision": precision, "img": img, "tokens": img * img,
                         "kind": "measured", "step_mib_per_image": (static + activations) / 2 ** 20,
                         "activation_mib_per_image": activations / 2 ** 20,
                         "train_tflop_per_image": train_flops_per_image(net, img) / 1e12})
            depth, width = len(net.blocks), net.embed_dim
            del net, step
            gc.collect()
        # Least-squares line: activation bytes = intercept + slope * tokens.
        slope, intercept = statistics.linear_regression(*zip(*measured))
        for img in extrapolate:
            tokens = img * img
            act = intercept + slope * tokens
            flops = 3 * forward_flops(img, 1, IN_CHANS, width, depth, NUM_CLASSES)
            rows.append({"model": model, "precision": precision, "img": img, "tokens": tokens,
                         "kind": "predicted", "step_mib_per_image": float("nan"),
                         "activation_mib_per_image": act / 2 ** 20, "train_tflop_per_image": flops / 1e12})
        for row in rows:
            if row["precision"] == precision:
                row["bytes_per_token_fit"] = slope
    return rows


# ------------------------------------------------------------------------------------------------ CUDA extras
def max_batch_search(model: str, img: int, device: torch.device, precision: str = "bf16-mixed",
                     start: int = 8, limit: int = 1 << 16) -> dict[str, Any]:
    """CUDA only: the largest power-of-two-then-bisected batch whose training step of our model fits in memory."""

    def one_step(batch: int) -> None:  # its own frame, so that its tensors are gone once it has raised
        torch.manual_seed(0)
        net = create_backbone(model, img_size=img, in_chans=IN_CHANS, num_classes=NUM_CLASSES).to(device).train()
        TrainStep(net, batch, img, precision, device)()
        synchronize(device)

    def fits(batch: int) -> bool:
        try:
            one_step(batch)
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            gc.collect()
            torch.cuda.empty_cache()

    low, high = 0, start
    while high <= limit and fits(high):
        low, high = high, high * 2
    while high - low > 1 and low > 0 and high - low > low // 16:  # bisect to ~6 % precision
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    result: dict[str, Any] = {"model": model, "img": img, "tokens": img * img, "precision": precision,
                              "max_batch": low}
    if low:
        torch.manual_seed(0)
        net = create_backbone(model, img_size=img, in_chans=IN_CHANS, num_classes=NUM_CLASSES).to(device).train()
        step = TrainStep(net, low, img, precision, device)
        seconds = statistics.median(time_interleaved({"ours": step}, warmup=2, iters=3, device=device)["ours"])
        result["img_s"] = low / seconds
        result["peak_mib"] = (step.static_bytes() + transient_peak_bytes(step, device)) / 2 ** 20
    torch.cuda.empty_cache()
    return result


# ------------------------------------------------------------------------------------------------------ output
TABLE_COLUMNS: list[tuple[str, str, str]] = [  # (key, header, format)
    ("model", "model", "{}"), ("img", "img", "{}"), ("patch", "patch", "{}"), ("tokens", "tokens", "{}"),
    ("precision", "precision", "{}"), ("batch", "batch", "{}"),
    ("ours_img_s", "ours img/s", "{:.2f}"), ("timm_img_s", "timm img/s", "{:.2f}"), ("ratio", "ours/timm", "{:.3f}"),
    ("ratio_q1", "paired q1", "{:.3f}"), ("ratio_q3", "paired q3", "{:.3f}"),
    ("ours_tflop_s", "TFLOP/s", "{:.4f}"), ("frac_peak", "frac peak", "{:.3f}"),
    ("ours_peak_mib", "ours MiB", "{:.0f}"), ("timm_peak_mib", "timm MiB", "{:.0f}"),
    ("loader_img_s", "loader img/s", "{:.0f}"), ("on_device_loader_img_s", "on-device img/s", "{:.0f}"),
    ("spread", "spread", "{:.2f}"),
]
SCALING_COLUMNS: list[tuple[str, str, str]] = [
    ("model", "model", "{}"), ("precision", "precision", "{}"), ("img", "img", "{}"), ("tokens", "tokens", "{}"),
    ("kind", "kind", "{}"), ("step_mib_per_image", "step MiB", "{:.0f}"),
    ("activation_mib_per_image", "activation MiB", "{:.0f}"), ("bytes_per_token_fit", "fit bytes/token", "{:.0f}"),
    ("train_tflop_per_image", "train TFLOP/img", "{:.3f}"),
]
ATTENTION_COLUMNS: list[tuple[str, str, str]] = [
    ("precision", "precision", "{}"), ("backends", "SDPA restricted to", "{}"), ("tokens", "tokens", "{}"),
    ("ok", "ok", "{}"), ("peak_mib", "fwd+bwd MiB", "{:.1f}"), ("growth_vs_first", "x vs 256", "{:.1f}"),
    ("error", "error", "{}"),
]


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """Fixed-width text table of ``rows`` (right-aligned numbers)."""
    cells = [[header for _, header, _ in columns]]
    cells += [[fmt.format(row[key]) for key, _, fmt in columns] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Scalar columns of ``rows`` as CSV (per-step time lists stay in the JSON)."""
    if not rows:
        return
    fields = [k for k, v in rows[0].items() if not isinstance(v, (list, tuple, dict))]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def environment(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = cpu_name()
    return {
        "device": device.type, "device_name": name, "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "timm": timm.__version__, "pixelformer": pixelformer.__version__,
        "python": platform.python_version(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


# -------------------------------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="PiT-Tiny + ViT-Tiny rows only, ~48 GFLOP batches, 2 warm-up + 3 timed steps")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results folder (default {DEFAULT_OUT})")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--precision", choices=(*PRECISIONS, "both"), default="both")
    p.add_argument("--models", nargs="*", default=None, help="only these backbone names (e.g. pit_tiny vit_tiny)")
    p.add_argument("--batch", type=int, default=None, help="one batch size for every row (default: FLOP target)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up steps per model (the last one profiles memory)")
    p.add_argument("--iters", type=int, default=None, help="timed steps per model (default 5, quick 3)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads(N); default: leave torch's default (all cores). On a machine shared "
                        "with other jobs, 1 thread can be several times faster than an oversubscribed 2")
    p.add_argument("--system-allocator", action="store_true",
                   help="leave glibc malloc at its defaults (default: tuned as the trainer does, for both models; "
                        "see pixelformer/runtime.py)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--no-attention-check", action="store_true", help="skip the SDPA path / memory check")
    p.add_argument("--no-scaling", action="store_true",
                   help="skip the memory-vs-tokens fit (PiT-Tiny, batch 1, up to 4,096 tokens; quick: up to 2,304)")
    p.add_argument("--max-batch", action="store_true",
                   help="CUDA only: largest batch of PiT-Tiny/Small at 1,024 and 4,096 tokens (bf16-mixed)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    iters = args.iters or (3 if args.quick else 5)
    if args.threads:
        torch.set_num_threads(args.threads)
    allocator_tuned = device.type == "cpu" and not args.system_allocator and tune_cpu_allocator()
    configs = [c for c in default_configs(args.quick)
               if (args.precision == "both" or c.precision == args.precision)
               and (args.models is None or c.model in args.models)]
    if args.batch:
        configs = [BenchConfig(**{**asdict(c), "batch": args.batch}) for c in configs]

    started = time.perf_counter()
    meta: dict[str, Any] = {**environment(device), "quick": args.quick, "warmup": args.warmup, "iters": iters,
                            "adamw": "fused", "cpu_allocator_tuned": allocator_tuned,
                            "loadavg_start": os.getloadavg()}
    print(f"# {meta['device_name']} ({device.type}, {meta['torch_threads']} threads), torch {meta['torch']}, "
          f"timm {meta['timm']}; load average {meta['loadavg_start'][0]:.2f} on {meta['cpu_count']} CPUs")
    print(f"# both models: fused AdamW, same weights, same batch; CPU allocator "
          f"{'tuned (as the trainer runs)' if allocator_tuned else 'system defaults'}")
    if device.type == "cpu" and meta["loadavg_start"][0] > (os.cpu_count() or 1) + 0.5:
        print("# WARNING: the machine is busy with other processes; absolute numbers are low and noisy "
              "(ours/timm stays fair: the two are interleaved)")
    peaks = {"fp32": matmul_peak(torch.float32, device), "bf16-mixed": matmul_peak(torch.bfloat16, device)}
    meta["matmul_peak_tflop_s"] = {k: v / 1e12 for k, v in peaks.items()}
    print("# matmul peak: " + ", ".join(f"{k} {v / 1e12:.3f} TFLOP/s" for k, v in peaks.items()), flush=True)

    rows: list[dict[str, Any]] = []
    loader_cache: dict[tuple, float] = {}
    for cfg in configs:
        t0 = time.perf_counter()
        row = benchmark_config(cfg, device, peaks, warmup=args.warmup, iters=iters, memory=not args.no_memory,
                               quick=args.quick, loader_cache=loader_cache)
        rows.append(row)
        print(f"# {cfg.model} img {cfg.img} patch {cfg.patch} {cfg.precision} batch {row['batch']}: "
              f"ours {row['ours_img_s']:.2f} img/s, timm {row['timm_img_s']:.2f} img/s "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)

    attention = [] if args.no_attention_check else attention_path_check(device)
    scaling = [] if args.no_scaling else token_scaling(device, sizes=(16, 32, 48) if args.quick else (16, 32, 48, 64))
    max_batch: list[dict[str, Any]] = []
    if args.max_batch:
        if device.type != "cuda":
            print("# --max-batch skipped: it searches GPU memory and needs CUDA")
        else:
            max_batch = [max_batch_search(m, img, device) for m in ("pit_tiny", "pit_small") for img in (32, 64)]

    meta["loadavg_end"] = os.getloadavg()
    meta["seconds"] = time.perf_counter() - started
    print()
    print(format_table(rows, TABLE_COLUMNS))
    noisy = sum(row["spread"] > NOISY_SPREAD for row in rows)
    if noisy:
        print(f"# {noisy} row(s) with spread (slowest / fastest timed step of either model) > {NOISY_SPREAD}: "
              f"their img/s and ours/timm are dominated by machine noise; rerun idle or with --threads 1")
    if attention:
        print("\nSDPA path of the backbones' attention (timm's; PiT-Tiny width 192, 3 heads, batch 4, fwd+bwd):")
        print(format_table(attention, ATTENTION_COLUMNS))
    if scaling:
        print("\nMemory of one training step per image vs tokens (PiT-Tiny, batch 1; 'predicted' rows extrapolate "
              "the measured activation bytes linearly):")
        print(format_table(scaling, SCALING_COLUMNS))
    if max_batch:
        print("\nLargest batch (CUDA):")
        print(format_table(max_batch, [(k, k, "{}" if k in ("model", "precision") else "{:.6g}")
                                       for k in max_batch[0]]))
    print(f"\n# {meta['seconds']:.0f} s; load average {meta['loadavg_end'][0]:.2f} at the end")

    args.out.mkdir(parents=True, exist_ok=True)
    stem = "throughput_quick" if args.quick else "throughput"
    result = {"meta": meta, "rows": rows, "attention": attention, "scaling": scaling, "max_batch": max_batch}
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2, default=str))
    write_csv(args.out / f"{stem}.csv", rows)
    write_csv(args.out / f"{stem}_attention.csv", attention)
    write_csv(args.out / f"{stem}_scaling.csv", scaling)
    print(f"# wrote {args.out / stem}.json / .csv / _attention.csv / _scaling.csv")
    return result


if __name__ == "__main__":
    main()
