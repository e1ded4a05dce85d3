"""What ``trainer.strategy=fsdp`` needs beyond Lightning's ``FSDPStrategy``.

* :class:`BlockFSDPStrategy`: one FSDP unit per transformer block (:func:`block_types` finds the block classes of
  whatever module is wrapped), so only one block's full parameters exist at a time during compute; and it runs on
  the CPU with gloo (Lightning's own strategy refuses the CPU accelerator, torch's FSDP does not), which is how the
  FSDP tests run on a machine without GPUs.
* :func:`is_sharded` and :func:`full_parameters`: where the trainer must see the full parameters (the EMA update).
* :class:`EqualBatches`: evaluation loaders that yield as many batches on every process, since each forward of an
  FSDP-wrapped module all-gathers the parameters of every unit and so needs every process.
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Iterator, Optional

import torch
from lightning.fabric.strategies import FSDPStrategy
from torch import nn

from .errors import UserError

if TYPE_CHECKING:
    from lightning.fabric import Fabric

__all__ = ["BlockFSDPStrategy", "EqualBatches", "block_types", "every_rank", "full_parameters", "is_sharded"]


def block_types(module: nn.Module) -> set[type[nn.Module]]:
    """The classes of the modules held in any ``blocks`` or ``*_blocks`` container (``nn.ModuleList`` or
    ``nn.Sequential``) inside ``module``: timm's ``Block`` of every backbone (DiT conditions them in place) and of
    MAE's decoder, the hourglass's level changes, and the blocks of any backbone registered later that keeps them in
    such a container."""
    found: set[type[nn.Module]] = set()
    for parent in module.modules():
        for name, child in parent.named_children():
            if (name == "blocks" or name.endswith("_blocks")) and isinstance(child, (nn.ModuleList, nn.Sequential)):
                found.update(type(block) for block in child)
    return found


class BlockFSDPStrategy(FSDPStrategy):
    """Lightning's ``FSDPStrategy`` with a wrap policy per transformer block and CPU support.

    A subclass, because Lightning refuses only its own class on the CPU (``type(strategy) is FSDPStrategy``); the
    CPU path hands torch's FSDP the CPU device (``device_id=torch.device("cpu")``), which it runs with gloo.
    Everything else (full-state-dict checkpoints, gradient clipping over the shards, no-sync accumulation) is
    Lightning's.
    """

    def setup_module(self, module: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        if any(isinstance(m, FullyShardedDataParallel) for m in module.modules()):
            return super().setup_module(module)  # wrapped by the caller: Lightning keeps that wrapping
        kwargs = dict(self._fsdp_kwargs)
        blocks = block_types(module)
        if blocks and "auto_wrap_policy" not in kwargs:
            kwargs["auto_wrap_policy"] = ModuleWrapPolicy(blocks)
        device = self.root_device
        total = sum(p.numel() for p in module.parameters())
        wrapped = FullyShardedDataParallel(
            module=module, cpu_offload=self.cpu_offload, mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=device if device.type == "cpu" else device.index, **kwargs)
        if self._activation_checkpointing_kwargs:
            from lightning.fabric.strategies.fsdp import _setup_activation_checkpointing

            _setup_activation_checkpointing(wrapped, self._activation_checkpointing_kwargs)
        if self.global_rank == 0:  # with use_orig_params each parameter is a view of this process's shard
            units = sum(isinstance(m, FullyShardedDataParallel) for m in wrapped.modules())
            held = sum(p.numel() for p in wrapped.parameters())
            names = ", ".join(sorted(t.__name__ for t in blocks)) or "none found"
            print(f"FSDP: {units} units ({units - 1} blocks of {names}, and one for the rest) over "
                  f"{self.world_size} processes; process 0 holds {held} of the {total} parameter values", flush=True)
        return wrapped


def fsdp_strategy(timeout: Any, on_cpu: bool, precision: str) -> BlockFSDPStrategy:
    """The strategy ``trainer.strategy=fsdp`` runs with: consolidated (full) state dicts, so a checkpoint is one file
    that loads on one process, like every other strategy's. On the CPU only ``trainer.precision=32-true``: Lightning's
    FSDP precision autocasts on CUDA only, so a mixed precision would run half-precision weights without autocast."""
    if on_cpu and precision != "32-true":
        raise UserError(f"trainer.strategy=fsdp on the CPU runs in full precision only, got trainer.precision="
                        f"{precision}: set trainer.precision=32-true (or train on GPUs)")
    return BlockFSDPStrategy(state_dict_type="full", timeout=timeout)


def is_sharded(module: nn.Module) -> bool:
    """Whether ``module`` (a Fabric-wrapped module or a plain one) holds FSDP units."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    return any(isinstance(m, FullyShardedDataParallel) for m in module.modules())


@contextlib.contextmanager
def full_parameters(module: nn.Module) -> Iterator[None]:
    """Inside the block, the original parameters of an FSDP-wrapped ``module`` are full (gathered from every
    process, read-only: nothing written to them is kept); a module that is not sharded is left as it is. A
    collective: every process enters it together."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    root: Optional[nn.Module] = next((m for m in module.modules() if isinstance(m, FullyShardedDataParallel)), None)
    if root is None:
        yield
        return
    with FullyShardedDataParallel.summon_full_params(root, writeback=False, recurse=True):
        yield


class EqualBatches:
    """An evaluation loader whose every process yields the same number of batches, without duplicated samples.

    Evaluation shards are uneven (``ShardedEpochSampler(pad=False)``: no sample is seen twice, so no metric counts
    one twice); a process one sample short of a batch boundary would run one forward fewer than the others, and
    under FSDP the others would wait for ever in that forward's all-gather. Such a process splits its last batch
    in two instead. The batches keep the sampler's order, so ``loader.sampler``'s per-sample keys still line up
    with the rows (:func:`pixelformer.task.seeded_batches`).

    Args:
        loader: The process's loader (its batches are lists or tuples of tensors, as ``build_loader``'s).
        size: Samples in the whole split.
        batch_size: The loader's batch size.
        rank: This process's rank.
        world_size: Number of processes.
        name: What the split is called in the error message.
    """

    def __init__(self, loader: Any, size: int, batch_size: int, rank: int, world_size: int, name: str) -> None:
        self.loader, self.sampler = loader, loader.sampler
        self.batches = -(-(-(-size // world_size)) // batch_size)  # those of the process with the most samples

        def short(r: int) -> tuple[int, bool]:  # process r's samples (dealt round-robin), and if it is a batch short
            mine = len(range(r, size, world_size))
            return mine, -(-mine // batch_size) < self.batches

        # Checked for every process on every process, so that all of them refuse together (none waits for ever).
        stuck = [r for r in range(world_size) if short(r)[1] and (short(r)[0] == 0 or batch_size == 1)]
        if stuck:  # no batch of two or more to split: that process would have to run a forward on nothing
            raise UserError(f"the {name} split's {size} images cannot be dealt to {world_size} FSDP processes in "
                            f"equally many batches of data.eval_batch_size={batch_size}: set data.eval_batch_size "
                            f"to 2 or more (and use at least {world_size} images)")
        self.split_last = short(rank)[1]

    def __len__(self) -> int:
        return self.batches

    def __getattr__(self, name: str) -> Any:  # anything else (dataset, batch_size, ...) is the loader's
        return getattr(self.__dict__["loader"], name)

    def __iter__(self) -> Iterator[Any]:
        if not self.split_last:
            yield from self.loader
            return
        previous = None
        for batch in self.loader:
            if previous is not None:
                yield previous
            previous = batch
        if previous is not None:
            cut = len(previous[0]) - 1
            yield type(previous)(t[:cut] for t in previous)
            yield type(previous)(t[cut:] for t in previous)


def every_rank(fabric: Fabric, value: Any) -> list[Any]:
    """``value`` of every process, in rank order, on every process (a collective; pickled objects)."""
    if fabric.world_size == 1:
        return [value]
    gathered: list[Any] = [None] * fabric.world_size
    torch.distributed.all_gather_object(gathered, value)
    return gathered
