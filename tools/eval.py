#!/usr/bin/env python
"""Evaluate a saved checkpoint on its test split: ``python tools/eval.py ckpt=PATH [out=PATH] [key=value ...]``.

The model and data are rebuilt from the config stored in the checkpoint; ``key=value`` changes it, e.g.
``data.img_size=16`` (a learned position embedding is resized to the new grid) or ``data.root=/elsewhere``.
Writes ``eval.json`` into the run directory (or ``out=``) and prints the metrics.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from pixelformer.cli import parse_kv, run_main  # noqa: E402
from pixelformer.errors import UserError  # noqa: E402


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    own, overrides = parse_kv(argv, {"ckpt": "checkpoint path", "out": "output json"})
    if "ckpt" not in own:
        raise UserError("tools/eval.py needs ckpt=PATH (e.g. ckpt=runs/<run>/checkpoints/best.ckpt)")
    from pixelformer.engine import evaluate_checkpoint

    ckpt = Path(own["ckpt"]).expanduser()
    metrics, cfg, info = evaluate_checkpoint(ckpt, overrides)
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    out = Path(own.get("out", run_dir / "eval.json"))
    report = {"checkpoint": str(ckpt), "data": cfg.data.name, "img_size": info.img_size, "metrics": metrics}
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    run_main(main)
