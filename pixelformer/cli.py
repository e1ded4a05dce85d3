"""Shared command-line plumbing for ``tools/*.py``: help text, ``key=value`` parsing, user-error reporting."""
from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Callable

from .errors import UserError

__all__ = ["groups_help", "parse_kv", "run_main"]


def groups_help() -> str:
    from .config import GROUPS, group_choices

    lines = ["config groups (group=choice):"]
    for group in GROUPS:
        lines.append(f"  {group:8s} {', '.join(group_choices(group))}")
    return "\n".join(lines)


def parse_kv(args: list[str], allowed: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """Split ``name=value`` arguments into the tool's own keys (``allowed``) and config overrides."""
    own, rest = {}, []
    for arg in args:
        key = arg.split("=", 1)[0]
        if key in allowed and "=" in arg:
            own[key] = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    return own, rest


def run_main(main: Callable[[list[str]], int | None]) -> None:
    """Run ``main(argv)``; a :class:`UserError` prints ``error: ...`` (no traceback) and exits with status 2, an
    interrupted run exits with 128 + its signal's number."""
    logging.basicConfig(level=os.environ.get("PIXELFORMER_LOG", "WARNING"))
    # Lightning attaches its own stderr handler to "lightning"; propagating as well would print each line twice.
    logging.getLogger("lightning").propagate = False
    warnings.filterwarnings("ignore", message=".*is tested and supported for lightning Fabric.*")
    try:
        code = main(sys.argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:
        # pixelformer.engine.TrainingInterrupted has saved a checkpoint, printed how to resume, and carries the exit
        # status of its signal; a bare Ctrl-C elsewhere stops without saving anything.
        if not hasattr(e, "exit_code"):
            print("interrupted", file=sys.stderr)
        sys.exit(getattr(e, "exit_code", 130))
    sys.exit(code or 0)
