#!/usr/bin/env python
"""Train a task: ``python tools/train.py [group=choice ...] [key=value ...]``.

Examples::

    python tools/train.py                                   # PiT-Mini classifier on the embedded digits
    python tools/train.py task=cls model=pit_tiny data=cifar100 data.root=~/data optim=pit_cifar
    python tools/train.py run.dir=runs/a resume=auto        # continue a run where it stopped
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from pixelformer.cli import groups_help, run_main  # noqa: E402

HELP = __doc__ + """
Top-level keys: run.dir, run.seed, resume (auto | PATH).
Sections: task.*, model.*, data.*, optim.*, trainer.*, logger.*; see pixelformer/config.py for every key, or
--cfg to print the composed config without training.
"""


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(HELP + "\n" + groups_help())
        return 0
    from lightning.fabric.utilities.rank_zero import rank_zero_only
    from omegaconf import OmegaConf

    from pixelformer.config import compose
    from pixelformer.engine import fit

    show_only = "--cfg" in argv
    cfg = compose([a for a in argv if a != "--cfg"])
    if show_only:
        print(OmegaConf.to_yaml(cfg))
        return 0
    if rank_zero_only.rank == 0:  # once, not per process (read from the launcher's environment)
        print(OmegaConf.to_yaml(cfg), end="---\n")
    fit(cfg)
    return 0


if __name__ == "__main__":
    run_main(main)
