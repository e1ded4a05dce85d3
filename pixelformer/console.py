"""What a run prints, readable anywhere: a progress bar in a terminal, plain lines in log files.

In a terminal (stderr is a TTY) the bar is tqdm's, on stderr, and every other line goes to stdout through
``tqdm.write``, so evaluation lines never collide with the bar. Elsewhere (log files, SLURM, CI) a carriage-return
bar would be one enormous line, so the run prints a plain line every ``trainer.log_every_steps`` steps instead. Either way a long evaluation
says it is still alive at least every ``HEARTBEAT_SECONDS``. Only rank 0 prints.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from typing import Any, Iterator, Mapping, Optional

from tqdm.auto import tqdm

__all__ = ["HEARTBEAT_SECONDS", "ProgressLog", "print_stderr", "write_stderr"]

HEARTBEAT_SECONDS = 30.0


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class ProgressLog:
    """Training progress and messages of one run; ``trainer.progress_bar=false`` keeps the lines, drops the bar."""

    def __init__(self, fabric: Any, trainer_cfg: Any) -> None:
        self.rank_zero = fabric.is_global_zero
        self.interactive = bool(trainer_cfg.progress_bar) and sys.stderr.isatty()
        self.bar: Optional[tqdm] = None
        self.total = self.first = 0
        self.started = time.monotonic()

    def start(self, total: int, initial: int) -> None:
        self.total, self.first, self.started = total, initial, time.monotonic()
        if self.rank_zero and self.interactive:
            self.bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True, file=sys.stderr)

    def advance(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def train(self, step: int, logged: Mapping[str, float]) -> None:
        """A step whose averages were just logged: the bar's postfix, or a plain line."""
        if self.bar is not None:
            self.advance(step)
            self.bar.set_postfix(loss=f"{logged['train/loss']:.4f}", lr=f"{logged['train/lr']:.2e}")
            return
        done, elapsed = step - self.first, time.monotonic() - self.started
        eta = elapsed / done * (self.total - step) if done > 0 else 0.0
        self.line(f"step {step}/{self.total} ({100 * step / max(self.total, 1):.0f}%) "
                  f"loss {logged['train/loss']:.4f} lr {logged['train/lr']:.2e} "
                  f"{logged.get('train/images_per_sec', 0):.0f} img/s elapsed {_duration(elapsed)} "
                  f"eta {_duration(eta)}")

    def line(self, message: str) -> None:
        if not self.rank_zero:
            return
        if self.bar is not None:
            self.bar.write(message, file=sys.stdout)  # clears the bar, prints, redraws it
        else:
            print(message, flush=True)

    @contextlib.contextmanager
    def waiting(self, what: str, every: float = HEARTBEAT_SECONDS) -> Iterator[None]:
        """Around a long call (an evaluation): a line ``<what>: 30 s ...`` every ``every`` seconds until it ends."""
        done = threading.Event()
        start = time.monotonic()

        def beat() -> None:
            while not done.wait(every):
                self.line(f"{what}: {time.monotonic() - start:.0f} s ...")

        thread = threading.Thread(target=beat, daemon=True) if self.rank_zero else None
        if thread is not None:
            thread.start()
        try:
            yield
        finally:
            done.set()
            if thread is not None:
                thread.join()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def write_stderr(text: str) -> None:
    """Write to fd 2 from a signal handler (print() is not safe there), ignoring a closed or broken stderr: a
    reader that went away (a dead parent, a closed pipe) must not stop the run from saving its checkpoint."""
    try:
        os.write(2, text.encode())
    except OSError:
        pass


def print_stderr(text: str) -> None:
    """Print one line to sys.stderr (so redirects and pytest's capture see it), ignoring a closed or broken stream,
    for the same reason as write_stderr; outside signal handlers only."""
    try:
        print(text, file=sys.stderr, flush=True)
    except (OSError, ValueError):  # ValueError: the stream was closed
        pass
