"""Process-level settings: the CPU allocator, the precision ``auto`` picks, a check that a run fits in memory, and
data-loader workers that leave SIGTERM/SIGINT to the main process.

PyTorch's CPU allocator hands large tensors straight to glibc ``malloc``. With glibc's defaults, big blocks are
``mmap``-ed fresh and returned to the kernel when freed, and the heap is trimmed, so every training step page-faults
its activations in again: the kernel zeroes each 4 KiB page on first touch. Raising the mmap and trim thresholds
keeps freed memory in the process for the next step. On the development CPU this removed ~99 % of minor page faults,
and ``benchmarks/switches.py`` measured PiT-Mini and PiT-Tiny training steps 4-5 % faster than with glibc's defaults.
The cost: the process's resident memory stays at its high-water mark instead of shrinking between steps.
"""
from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import functools
import logging
import multiprocessing
import os
import platform
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch

from .errors import UserError
from .memory import available_memory, format_bytes

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from .data import DataInfo

__all__ = [
    "BF16_MIN_WIDTH_CPU", "MemoryEstimate", "auto_precision", "available_memory", "check_fits_memory",
    "cpu_allocator_tuned", "cpu_name", "estimate_training_memory", "format_bytes", "leave_signals_to_main",
    "tune_cpu_allocator",
]

_logger = logging.getLogger(__name__)

# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Blocks up to 1 GiB come from the heap (a 1,024-token PiT-Tiny activation at batch 64 is 48 MiB). Some glibc
# versions refuse a threshold above HEAP_MAX_SIZE / 2 = 32 MiB; that cap is the fallback.
MMAP_THRESHOLDS = (2 ** 30, 32 * 2 ** 20)
TRIM_THRESHOLD = 2 ** 30

_tuned = False


def cpu_name() -> str:
    """The CPU's model name as /proc/cpuinfo gives it (what results and benchmarks record as the machine), else
    what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_allocator_tuned() -> bool:
    """Whether :func:`tune_cpu_allocator` has changed this process's malloc settings."""
    return _tuned


def tune_cpu_allocator() -> bool:
    """Keep freed tensor memory in the process (glibc only). Returns whether the settings took effect.

    Idempotent; a no-op (returning False) on other C libraries, on other systems, or when ``LD_PRELOAD`` already
    names an allocator (jemalloc / tcmalloc manage their own caches). Set ``PIXELFORMER_CPU_ALLOCATOR=system`` to
    leave malloc alone everywhere.
    """
    global _tuned
    if _tuned:
        return True
    if os.environ.get("PIXELFORMER_CPU_ALLOCATOR", "tuned") == "system":
        return False
    if not sys.platform.startswith("linux") or "malloc" in os.environ.get("LD_PRELOAD", ""):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and friends have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # Both thresholds are set explicitly, which also turns off glibc's dynamic adjustment of them.
    threshold = next((t for t in MMAP_THRESHOLDS if mallopt(_M_MMAP_THRESHOLD, t) == 1), None)
    if threshold is None or mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) != 1:
        return False
    _tuned = True
    _logger.debug("glibc malloc: mmap threshold %d, trim threshold %d", threshold, TRIM_THRESHOLD)
    return True


# benchmarks/switches.py on a 2-core Xeon with AMX: bf16-mixed ran a 64-wide PiT-Mini step at 0.52x the fp32 speed and
# a 192-wide PiT-Tiny step at 1.47-1.52x (256 and 1,024 tokens). Narrow models are dominated by autocast's casts and
# fp32 elementwise work; wide ones by matmuls, where AMX's bf16 peak is ~5x fp32's (measured 1.67 vs 0.32 TFLOP/s).
BF16_MIN_WIDTH_CPU = 192


def auto_precision(device_type: str, embed_dim: int) -> str:
    """What ``trainer.precision=auto`` becomes for a model of width ``embed_dim`` on ``device_type``.

    * CUDA: ``bf16-mixed`` where the GPU supports bfloat16 (the standard choice on tensor-core GPUs; not yet measured
      by this project's benchmarks), else ``32-true``.
    * CPU: ``bf16-mixed`` when the CPU has AMX tiles and the model is at least ``BF16_MIN_WIDTH_CPU`` wide (measured
      faster), else ``32-true`` (measured faster for narrow models; CPUs without AMX are not measured).
    """
    if device_type == "cuda":
        return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"
    if device_type == "cpu":
        amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
        return "bf16-mixed" if amx and embed_dim >= BF16_MIN_WIDTH_CPU else "32-true"
    return "32-true"


# ------------------------------------------------------------------------------------------------ memory check
@dataclass(frozen=True)
class MemoryEstimate:
    """What one training process needs, in bytes (see :func:`estimate_training_memory`)."""
    params: int  # number of backbone parameters
    tokens: int  # tokens per image, prefix tokens included
    weights: int  # parameters + optimizer state: alive all the time
    gradients: int
    activations: int  # stored for the backward pass of one micro-batch

    @property
    def total(self) -> int:
        """The peak of a step: backward frees the activations as it allocates the gradients, so the peak holds the
        weights and the larger of the two (all activations at the end of forward, all gradients at the end of
        backward)."""
        return self.weights + max(self.activations, self.gradients)


# Elements of activation per token and block of a pre-norm block in training, in units of the width D: the inputs
# of norm1, qkv, the attention output and proj (D each), q/k/v (3D), norm2's input and output (2D): 8D, plus the
# MLP's hidden layer before and after GELU (2 x mlp_ratio x D). For PiT-Tiny (D=192, mlp_ratio 4, 12 blocks) in
# fp32: (8 + 8) x 192 x 12 x 4 B = 147 KB per token, against the 149 KB that throughput.py measured (docs/performance.md,
# "Memory and tokens"). The fused attention kernel keeps memory linear in tokens (per head, one log-sum-exp value).
_BLOCK_ACTIVATIONS = 8


def _bytes_per_element(precision: str) -> tuple[int, int]:
    """(parameter bytes, activation bytes) for a Fabric precision; mixed precision counts its activations as 16-bit
    (measured: 86 KB per token against fp32's 149, so 2 bytes is a lower bound)."""
    if precision == "bf16-true":
        return 2, 2
    if precision in ("bf16-mixed", "16-mixed"):
        return 4, 2
    return 4, 4


def estimate_training_memory(cfg: DictConfig, info: "DataInfo") -> Optional[MemoryEstimate]:
    """An estimate, from below, of the peak memory of one process training ``cfg.model`` on ``info``'s images.

    Counts the backbone's parameters (built on the meta device: no memory, no initialisation), the optimizer's state
    (AdamW: 2 values per parameter, SGD with momentum: 1), the gradients, and the activations that backward needs:
    ``batch x tokens x depth x D x (8 + 2 x mlp_ratio)`` elements (with ``trainer.grad_checkpointing``, each block's
    input plus one block's worth), plus ``batch x heads x tokens² x depth x 2`` when attention dropout forces the
    unfused kernel. Measured on CPU for PiT-Tiny, it is 0.86-0.98x the real peak (tests/test_bad_input.py). What a
    task adds (an MAE decoder, DiT's conditioning and EMA copy) is not counted, so the estimate errs low. Returns
    None where the model cannot be built (its own build then reports why).
    """
    from .models import create_backbone

    overrides = {k: v for k, v in cfg.model.items() if k != "name" and v is not None}
    try:
        with torch.device("meta"):
            backbone = create_backbone(cfg.model.name, img_size=info.img_size, in_chans=info.in_chans,
                                       num_classes=info.num_classes, **overrides)
    except Exception:  # noqa: BLE001 - any build problem is reported, with context, by the task's real build
        return None
    if not hasattr(backbone, "blocks") or not hasattr(backbone, "patch_embed"):
        return None
    params = sum(p.numel() for p in backbone.parameters())
    param_bytes, act_bytes = _bytes_per_element(cfg.trainer.precision)
    optimizer_states = 2 if cfg.optim.name == "adamw" else int(cfg.optim.momentum > 0)
    weights, gradients = params * param_bytes * (1 + optimizer_states), params * param_bytes
    if cfg.trainer.strategy == "fsdp":  # parameters, gradients and optimizer state are sharded over processes
        shards = cfg.trainer.devices * cfg.trainer.num_nodes
        weights, gradients = weights // shards, gradients // shards
    tokens = backbone.patch_embed.num_patches + getattr(backbone, "num_prefix_tokens", 0)
    depth, width = len(backbone.blocks), backbone.embed_dim
    if depth == 0:
        return MemoryEstimate(params, tokens, weights, gradients, 0)
    block = backbone.blocks[0]
    per_block = width * (_BLOCK_ACTIVATIONS + 2 * block.mlp.fc1.out_features / width)
    stored = width * depth + per_block if cfg.trainer.grad_checkpointing else per_block * depth
    if (cfg.model.attn_drop_rate or 0) > 0:  # the math kernel stores the attention matrix (and its dropout)
        attention = block.attn.num_heads * tokens * 2
        stored += attention if cfg.trainer.grad_checkpointing else attention * depth
    activations = int(cfg.data.batch_size * tokens * stored * act_bytes)
    return MemoryEstimate(params, tokens, weights, gradients, activations)


def check_fits_memory(cfg: DictConfig, info: "DataInfo", device: torch.device) -> Optional[MemoryEstimate]:
    """Refuse, before the model is built, a run whose estimated training memory exceeds what ``device`` has.

    The estimate errs low (:func:`estimate_training_memory`), so a refused run would certainly run out of memory;
    one that passes may still. On CPU, the ``trainer.devices`` processes of this machine share its memory.
    ``trainer.memory_check=false`` skips the check. Returns the estimate (None where skipped or unknown).
    """
    if not cfg.trainer.get("memory_check", True):
        return None
    estimate = estimate_training_memory(cfg, info)
    available = available_memory(torch.device(device))
    if estimate is None or available is None:
        return None
    processes = cfg.trainer.devices if torch.device(device).type == "cpu" else 1
    needed = estimate.total * processes
    if needed <= available:
        return estimate
    per_process = f" per process, x{processes} processes" if processes > 1 else ""
    peak = "activations" if estimate.activations >= estimate.gradients else "gradients"
    if (estimate.weights + estimate.gradients) * processes > available:
        fixes = "use a smaller model (its weights, gradients and optimizer state alone do not fit)"
    else:
        options = ["lower data.batch_size", "use a smaller data.img_size or model"]
        if not cfg.trainer.grad_checkpointing:
            options.append("set trainer.grad_checkpointing=true")
        if cfg.trainer.precision == "32-true":
            options.append("set trainer.precision=bf16-mixed")
        fixes = ", ".join(options[:-1]) + " or " + options[-1]
    raise UserError(
        f"model {cfg.model.name} ({estimate.params / 1e6:.1f} M parameters) on {info.img_size}x{info.img_size} "
        f"images ({estimate.tokens:,} tokens) at data.batch_size={cfg.data.batch_size} in {cfg.trainer.precision} "
        f"needs about {format_bytes(needed)} to train ({format_bytes(estimate.weights)} of weights and optimizer "
        f"state + {format_bytes(max(estimate.activations, estimate.gradients))} of {peak}{per_process}), but "
        f"{device} has {format_bytes(available)} available: {fixes} (trainer.memory_check=false skips this check)"
    )


# ------------------------------------------------------------------------------------------ loader workers
_WORKER_EXIT_HOOK = False


def _ignore_stop_signals(inner: Optional[Any], worker_id: int) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.set_wakeup_fd(-1)  # the forked copy of the main process's wakeup socket belongs to its signal watchdog
    if inner is not None:
        inner(worker_id)


def _kill_workers_at_exit() -> None:
    # multiprocessing's own exit hook ends daemonic children with SIGTERM and then waits for them: a worker that
    # ignores SIGTERM (below) and was not shut down by its loader (e.g. the run died of a worker's error) would make
    # the interpreter wait for ever. Registered after that hook, this one runs first.
    workers = [child for child in multiprocessing.active_children() if child.daemon]
    if workers:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would report these kills as worker failures
        for worker in workers:
            worker.kill()
            worker.join()


def leave_signals_to_main(loader: Any) -> Any:
    """Make ``loader``'s worker processes ignore SIGTERM/SIGINT: the main process stops them once it has saved.

    SLURM signals every process of a job and a terminal every process of its group; a worker ended by the signal
    would make the main process fail (torch's SIGCHLD handler) before it saves.
    """
    global _WORKER_EXIT_HOOK
    if getattr(loader, "num_workers", 0) > 0:
        loader.worker_init_fn = functools.partial(_ignore_stop_signals, loader.worker_init_fn)
        if not _WORKER_EXIT_HOOK:
            atexit.register(_kill_workers_at_exit)
            _WORKER_EXIT_HOOK = True
    return loader
