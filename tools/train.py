#!/usr/bin/env python
"""Train a task: ``python tools/train.py [group=choice ...] [key=value ...]``.

Examples::

    python tools/train.py                                   # PiT-Mini classifier on the embedded digits
    python tools/train.py task=cls model=pit_tiny data=cifar100 data.root=~/data optim=pit_cifar
    python tools/train.py run.dir=runs/a resume=auto        # continue a run where it stopped, as configured
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from pixelformer.cli import groups_help, run_main  # noqa: E402

HELP = __doc__ + """
Top-level keys: run.dir, run.seed, resume (auto | PATH). A resumed run keeps its saved config; key=value
arguments may change only what pixelformer/rundir.py RESUMABLE_KEYS lists (loggers, evaluation and checkpoint
intervals, a longer run, ...). SIGTERM or Ctrl-C stops after the current step with a checkpoint (exit 143 / 130).
Sections: task.*, model.*, data.*, optim.*, trainer.*, logger.*; see pixelformer/config.py for every key, or
--cfg to print the composed config without training.
"""


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(HELP + "\n" + groups_help())
        return 0
    from omegaconf import OmegaConf

    from pixelformer.engine import fit
    from pixelformer.rundir import compose_for_resume

    show_only = "--cfg" in argv
    # Resuming starts from the run's saved config, so `run.dir=X resume=auto` alone continues run X.
    cfg = compose_for_resume([a for a in argv if a != "--cfg"])
    if show_only:
        print(OmegaConf.to_yaml(cfg))
        return 0
    fit(cfg, show_config=True)  # printed once the run is set up: a bad config gets its error alone
    return 0


if __name__ == "__main__":
    run_main(main)
