"""Train a task: ``python tools/train.py [group=choice ...] [key=value ...]``.

Examples::

    python tools/train.py                                   # PiT-Mini classifier on the embedded digits
    python tools/train.py task=cls model=pit_tiny data=cifar100 data.root=~/data optim=pit_cifar
    python tools/train.py run.dir=runs/a resume=auto        # continue a run where it stopped, as configured
"""
from __future__ import annotations

from . import groups_help, usage

HELP = __doc__ + """
Top-level keys: run.dir, run.seed, resume (auto | PATH). A resumed run keeps its saved config; key=value
arguments may change only what pixelformer/run.py RESUMABLE_KEYS lists (loggers, evaluation and checkpoint
intervals, a longer run, ...). SIGTERM or Ctrl-C stops after the current step with a checkpoint (exit 143 / 130).
Sections: task.*, model.*, data.*, optim.*, trainer.*, logger.*; see pixelformer/config.py for every key, or
--cfg to print the composed config without training.
"""


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(usage(HELP, "train") + "\n" + groups_help())
        return 0
    from omegaconf import OmegaConf

    from ..engine import fit
    from ..run import compose_for_resume

    show_only = "--cfg" in argv
    # Resuming starts from the run's saved config, so `run.dir=X resume=auto` alone continues run X.
    cfg = compose_for_resume([a for a in argv if a != "--cfg"])
    if show_only:
        print(OmegaConf.to_yaml(cfg))
        return 0
    fit(cfg, show_config=True)  # printed once the run is set up: a bad config gets its error alone
    return 0

