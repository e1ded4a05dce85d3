"""How much memory a new allocation can still get, and byte counts for messages (data loading and the run's memory
check both ask; kept apart so that neither imports the other)."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import torch

__all__ = ["available_memory", "format_bytes"]


def _cgroup_available() -> Optional[int]:
    """Memory left under this process's cgroup limit (containers), not counting reclaimable page cache."""
    root = Path("/sys/fs/cgroup")
    try:
        if (root / "memory.max").is_file():  # cgroup v2
            limit_text, stat_file, used_key = (root / "memory.max").read_text().strip(), root / "memory.stat", "anon"
        elif (root / "memory" / "memory.limit_in_bytes").is_file():  # cgroup v1
            limit_text = (root / "memory" / "memory.limit_in_bytes").read_text().strip()
            stat_file, used_key = root / "memory" / "memory.stat", "total_rss"
        else:
            return None
        if limit_text == "max" or int(limit_text) >= 2 ** 60:
            return None
        stat = dict(line.split() for line in stat_file.read_text().splitlines() if len(line.split()) == 2)
        return max(int(limit_text) - int(stat.get(used_key, 0)), 0)
    except (OSError, ValueError):
        return None


def available_memory(device: torch.device) -> Optional[int]:
    """Bytes that a new allocation can still get on ``device``, or None where that is not known.

    CPU: ``MemAvailable`` of /proc/meminfo, or less under a cgroup limit. CUDA: the device's free memory plus what
    PyTorch's caching allocator holds unused.
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type != "cpu":
        return None
    try:
        meminfo = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    found = re.search(r"^MemAvailable:\s+(\d+) kB", meminfo, re.MULTILINE)
    if not found:
        return None
    available = int(found.group(1)) * 1024
    limit = _cgroup_available()
    return min(available, limit) if limit is not None else available


def format_bytes(count: float) -> str:
    """1536 -> '1.5 KiB'; binary units up to TiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"
