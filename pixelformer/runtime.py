"""Process-level settings that make CPU training faster without changing any result.

PyTorch's CPU allocator hands large tensors straight to glibc ``malloc``. With glibc's defaults, big blocks are
``mmap``-ed fresh and returned to the kernel when freed, and the heap is trimmed, so every training step page-faults
its activations in again: the kernel zeroes each 4 KiB page on first touch. Raising the mmap and trim thresholds
keeps freed memory in the process for the next step. On the development CPU this removed ~99 % of minor page faults
and made a PiT-Tiny step 0-9 % faster at 256 tokens and ~11 % at 64 tokens (``benchmarks/switches.py``). The
cost: the process's resident memory stays at its high-water mark instead of shrinking between steps.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

__all__ = ["tune_cpu_allocator", "cpu_allocator_tuned"]

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
