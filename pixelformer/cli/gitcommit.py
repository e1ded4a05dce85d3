"""Commit a finished result as soon as it exists: long sweeps and races outlive a working session only through what
is committed (``tools/sweep.py commit=true``, ``benchmarks/time_to_accuracy.py --commit``).

Hand-written because it is two git commands; GitPython would be a dependency for them.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

__all__ = ["commit_paths"]


def commit_paths(paths: Sequence[Path], message: str, cwd: Path, attempts: int = 10) -> bool:
    """Commit exactly ``paths`` (additions and removals) in the repository at ``cwd``; retried while another commit
    holds the index. True when committed or when there was nothing to commit; False (and a warning) otherwise."""
    names = [str(p) for p in paths]
    for attempt in range(attempts):
        add = subprocess.run(["git", "add", "-A", "--", *names], cwd=cwd, capture_output=True, text=True)
        if add.returncode == 0:
            staged = subprocess.run(["git", "diff", "--cached", "--quiet", "--", *names], cwd=cwd)
            if staged.returncode == 0:
                return True  # nothing changed since the last commit of these paths
            done = subprocess.run(["git", "commit", "-q", "-m", message, "--", *names], cwd=cwd, capture_output=True,
                                  text=True)
            if done.returncode == 0:
                return True
        if attempt + 1 < attempts:
            time.sleep(min(30, 2 * (attempt + 1)))
    print(f"warning: could not commit {', '.join(names)} (is {cwd} a git checkout?)", file=sys.stderr, flush=True)
    return False
