"""The command-line programs and their shared plumbing: help text, ``key=value`` parsing, user-error reporting.

Each program is one module here whose ``main(argv)`` does the work; it runs as a console script installed with the
package (``pixelformer-train``, ``pixelformer-eval``, ``pixelformer-sample``, ``pixelformer-sweep``,
``pixelformer-report``, ``pixelformer-cache-latents``, ``pixelformer-analyze``: setup.cfg) or, from a checkout, as
``python tools/<name>.py`` (a thin wrapper).
"""
from __future__ import annotations

import importlib
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Callable

from ..errors import UserError

__all__ = ["analyze_main", "cache_latents_main", "eval_main", "groups_help", "parse_kv", "prog", "report_main",
           "run_main", "sample_main", "sweep_main", "train_main", "usage"]


def prog(command: str) -> str:
    """How ``command`` was started: ``pixelformer-train`` as the console script, else ``python tools/train.py``."""
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return name if name == f"pixelformer-{command.replace('_', '-')}" else f"python tools/{command}.py"


def usage(text: str, command: str) -> str:
    """``text`` (a program's help or message, written for ``python tools/<command>.py``) as the user started it."""
    name = prog(command)
    if name.startswith("python "):
        return text
    return text.replace(f"python tools/{command}.py", name).replace(f"tools/{command}.py", name)


def groups_help() -> str:
    from ..config import GROUPS, group_choices

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


# ------------------------------------------------------------------------------------- console scripts (setup.cfg)
def _console_script(command: str) -> Callable[[], None]:
    """The ``pixelformer-<command>`` entry point: runs :func:`pixelformer.cli.<command>.main` through
    :func:`run_main`, importing the command's module only when it is started."""
    def entry_point() -> None:
        run_main(importlib.import_module(f"{__name__}.{command}").main)

    entry_point.__name__ = entry_point.__qualname__ = f"{command}_main"
    entry_point.__doc__ = f"``pixelformer-{command.replace('_', '-')}``: :func:`pixelformer.cli.{command}.main`."
    return entry_point


train_main = _console_script("train")
eval_main = _console_script("eval")
sample_main = _console_script("sample")
sweep_main = _console_script("sweep")
cache_latents_main = _console_script("cache_latents")
report_main = _console_script("report")
analyze_main = _console_script("analyze")
