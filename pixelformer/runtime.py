"""Process-level settings that make training faster: the CPU allocator, and the precision ``auto`` picks.

PyTorch's CPU allocator hands large tensors straight to glibc ``malloc``. With glibc's defaults, big blocks are
``mmap``-ed fresh and returned to the kernel when freed, and the heap is trimmed, so every training step page-faults
its activations in again: the kernel zeroes each 4 KiB page on first touch. Raising the mmap and trim thresholds
keeps freed memory in the process for the next step. On the development CPU this removed ~99 % of minor page faults,
and ``benchmarks/switches.py`` measured PiT-Mini and PiT-Tiny training steps 4-5 % faster than with glibc's defaults.
The cost: the process's resident memory stays at its high-water mark instead of shrinking between steps.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

__all__ = ["tune_cpu_allocator", "cpu_allocator_tuned", "auto_precision", "BF16_MIN_WIDTH_CPU"]

_logger = logging.getLogger(__name__)

# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Blocks up to 1 GiB come from the heap (a 1,024-token PiT-Tiny activation at batch 64 is 48 MiB). Some glibc
# versions refuse a threshold above HEAP_MAX_SIZE / 2 = 32 MiB; that cap is the fallback.
MMAP_THRESHOLDS = (2 ** 30, 32 * 2 ** 20)
TRIM_THRESHOLD = 2 ** 30

_tuned = False


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
    import torch

    if device_type == "cuda":
        return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"
    if device_type == "cpu":
        amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
        return "bf16-mixed" if amx and embed_dim >= BF16_MIN_WIDTH_CPU else "32-true"
    return "32-true"
