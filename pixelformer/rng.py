"""Random draws that know which process and which sample they belong to.

Two kinds of draw, two sources:

* **Training** draws (MAE masks, DiT timesteps, noise and label drops, VAE posterior samples, dropout, drop path)
  come from the process's global torch/numpy/Python streams. :func:`seed_process_streams` gives every process its
  own: rank 0 keeps the stream it was seeded with (``run.seed``, so one-process runs draw exactly what they always
  drew), rank ``r >= 1`` switches, once the model is built, to a stream seeded from ``(run.seed, r)``. Model
  initialisation happens before that switch and is therefore identical on every rank.
* **Evaluation** draws must not depend on how the test split is sharded over processes. Inside
  :func:`per_sample_seeds` (which :func:`pixelformer.task.mean_loss` opens with the sampler's per-sample keys),
  :func:`rand`, :func:`randn` and :func:`randint` draw each row of a batch from a generator seeded by that sample
  alone, so image ``i`` of the test split gets the same mask or noise with 1 process or 8.

Hand-written because neither torch nor Lightning has per-sample generators for a batched draw; the rows are drawn
on the CPU (a generator per row is cheap next to a forward pass) and moved, so they are the same on every device.
"""
from __future__ import annotations

import contextlib
import random
from contextvars import ContextVar
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

__all__ = ["per_sample_seeds", "rand", "randint", "randn", "randn_like", "rank_seed", "reseed_process_streams", "sample_generators",
           "seed_process_streams"]

_SAMPLE_SEEDS: ContextVar[Optional[tuple[int, ...]]] = ContextVar("pixelformer_sample_seeds", default=None)


def _mix(*entropy: int) -> int:
    """A well-mixed 63-bit seed of ``entropy`` (numpy's ``SeedSequence``: nearby inputs give unrelated streams)."""
    state = np.random.SeedSequence([e % 2 ** 63 for e in entropy]).generate_state(2, np.uint64)
    return int(state[0] >> np.uint64(1))


def _seed_all(s: int) -> None:
    torch.manual_seed(s)  # also seeds every CUDA device of this process
    np.random.seed(s % 2 ** 32)
    random.seed(s)


def rank_seed(seed: int, rank: int) -> int:
    """The seed of process ``rank``'s training stream: ``seed`` for rank 0, a mix of ``(seed, rank)`` for the
    others."""
    return seed if rank == 0 else _mix(seed, rank)


def seed_process_streams(seed: int, rank: int) -> None:
    """Give process ``rank`` its own torch (CPU and CUDA), numpy and Python streams, after the model is built.

    Rank 0 is left alone (it continues the ``seed`` stream it was started with); every other rank is reseeded from
    :func:`rank_seed`.
    """
    if rank != 0:
        _seed_all(rank_seed(seed, rank))


def reseed_process_streams(seed: int, rank: int, step: int) -> None:
    """A fresh stream for process ``rank`` from ``(seed, rank, step)``: a resume whose saved streams do not match
    the processes (another count of them) continues with these."""
    _seed_all(_mix(seed, rank, step, 1))


@contextlib.contextmanager
def per_sample_seeds(seeds: Optional[Sequence[int]]) -> Iterator[None]:
    """Within the block, :func:`rand`, :func:`randn` and :func:`randint` draw row ``i`` from a generator seeded by
    ``seeds[i]`` (one seed per sample of the batch); ``None`` leaves them on the process stream."""
    token = _SAMPLE_SEEDS.set(tuple(int(s) % 2 ** 63 for s in seeds) if seeds is not None else None)
    try:
        yield
    finally:
        _SAMPLE_SEEDS.reset(token)


def sample_generators() -> Optional[list[torch.Generator]]:
    """One fresh CPU generator per sample of the current :func:`per_sample_seeds` block, or ``None`` outside one."""
    seeds = _SAMPLE_SEEDS.get()
    return None if seeds is None else [torch.Generator().manual_seed(s) for s in seeds]


def _rows(shape: Sequence[int], draw, device: torch.device | str | None) -> Optional[torch.Tensor]:
    generators = sample_generators()
    if generators is None:
        return None
    if len(generators) != shape[0]:
        raise ValueError(f"per_sample_seeds holds {len(generators)} seeds for a draw of {shape[0]} rows")
    return torch.stack([draw(tuple(shape[1:]), g) for g in generators]).to(device)


def rand(shape: Sequence[int], device: torch.device | str | None = None,
         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``torch.rand(shape)``, drawn per sample inside :func:`per_sample_seeds` (``shape[0]`` = batch)."""
    rows = _rows(shape, lambda s, g: torch.rand(s, generator=g, dtype=dtype), device)
    return rows if rows is not None else torch.rand(tuple(shape), device=device, dtype=dtype)


def randn(shape: Sequence[int], device: torch.device | str | None = None,
          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``torch.randn(shape)``, drawn per sample inside :func:`per_sample_seeds` (``shape[0]`` = batch)."""
    rows = _rows(shape, lambda s, g: torch.randn(s, generator=g, dtype=dtype), device)
    return rows if rows is not None else torch.randn(tuple(shape), device=device, dtype=dtype)


def randn_like(x: torch.Tensor) -> torch.Tensor:
    """``torch.randn_like(x)`` (which follows ``x``'s memory layout), drawn per sample inside
    :func:`per_sample_seeds`."""
    rows = _rows(x.shape, lambda s, g: torch.randn(s, generator=g, dtype=x.dtype), x.device)
    return rows if rows is not None else torch.randn_like(x)


def randint(high: int, shape: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
    """``torch.randint(0, high, shape)``, drawn per sample inside :func:`per_sample_seeds`."""
    rows = _rows(shape, lambda s, g: torch.randint(0, high, s, generator=g), device)
    return rows if rows is not None else torch.randint(0, high, tuple(shape), device=device)
