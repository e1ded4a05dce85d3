"""Evaluate a saved checkpoint on its test split: ``python tools/eval.py ckpt=PATH [out=PATH] [key=value ...]``.

The model and data are rebuilt from the config stored in the checkpoint; ``key=value`` changes it, e.g.
``data.img_size=16`` (a learned position embedding is resized to the new grid) or ``data.root=/elsewhere``.
Writes ``eval.json`` into the run directory (or ``out=``, whose folder is created if missing) and prints
the metrics; for a classifier (``cls``, ``linprobe``) also the accuracy of each class, whose confusion matrix
``eval.json`` holds under ``details``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import UserError
from . import parse_kv, usage


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(usage(__doc__, "eval"))
        return 0
    own, overrides = parse_kv(argv, {"ckpt": "checkpoint path", "out": "output json"})
    if "ckpt" not in own:
        raise UserError(usage("tools/eval.py needs ckpt=PATH (e.g. ckpt=runs/<run>/checkpoints/best.ckpt)", "eval"))
    from ..engine import evaluate_checkpoint

    ckpt = Path(own["ckpt"]).expanduser()
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    out = Path(own["out"]).expanduser() if "out" in own else run_dir / "eval.json"
    if "out" in own and ckpt.is_file():  # before evaluating, which takes a while: create a missing folder
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"out={own['out']}: cannot create its folder {out.parent} ({e.strerror}): pass a "
                            f"writable path") from None
        if out.is_dir():
            raise UserError(f"out={own['out']} is a directory: pass a file path, e.g. out={out / 'eval.json'}")
    details: dict[str, Any] = {}
    metrics, cfg, info = evaluate_checkpoint(ckpt, overrides, details=details)
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    if rank_zero_only.rank != 0:  # trainer.devices=N: every process evaluated its shard; one writes and prints
        return 0
    report = {"checkpoint": str(ckpt), "data": cfg.data.name, "img_size": info.img_size, "metrics": metrics,
              **({"details": details} if details else {})}
    try:
        out.write_text(json.dumps(report, indent=2) + "\n")
    except OSError as e:
        raise UserError(f"cannot write {out} ({e.strerror}): pass a writable out=PATH") from None
    print(json.dumps({k: v for k, v in report.items() if k != "details"}, indent=2))  # the matrix: in the file
    if "per_class_acc1" in details:
        print(per_class_table(details))
    print(f"wrote {out}")
    return 0


def per_class_table(details: dict[str, Any]) -> str:
    """Per-class top-1 on the test split, one class a line: name, accuracy and the class's test images."""
    counts = [sum(row) for row in details["confusion_matrix"]]
    width = max(len(name) for name in details["class_names"])
    lines = [f"  {name:>{width}}: " + (f"{acc:5.1f} %" if acc is not None else "    - ") + f"  ({n} test images)"
             for name, acc, n in zip(details["class_names"], details["per_class_acc1"], counts)]
    return "per-class top-1 (test split):\n" + "\n".join(lines)
