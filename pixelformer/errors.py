"""Errors that are the user's to fix: the command-line tools print their message without a traceback."""
from __future__ import annotations

import re
from typing import Iterable

_WORKER_TRACEBACK = "Original Traceback (most recent call last):"


class UserError(Exception):
    """A mistake in configuration, data or checkpoints, with a message that names the problem and the fix.

    Raised in a DataLoader worker, it is re-created in the main process from torch's text ("Caught UserError in
    DataLoader worker process 0. Original Traceback ..."); only the message itself is kept.
    """

    def __init__(self, message: object = "") -> None:
        text = str(message)
        if _WORKER_TRACEBACK in text:
            last = text.rstrip().splitlines()[-1]
            text = re.sub(r"^[\w.]*Error: ", "", last)
        super().__init__(text)


class CheckpointError(UserError):
    """A checkpoint that cannot be read or does not match the model it is loaded into."""


def did_you_mean(name: str, choices: Iterable[str], n: int = 3) -> str:
    """`` Did you mean: a, b?`` for the choices closest to ``name`` (difflib's ratio), or ``""`` when none is close:
    the one wording of suggestions in every "unknown ..." message."""
    import difflib

    close = difflib.get_close_matches(name, list(choices), n=n)
    return f" Did you mean: {', '.join(close)}?" if close else ""
