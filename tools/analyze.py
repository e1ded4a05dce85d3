#!/usr/bin/env python
"""``pixelformer-analyze`` from a checkout without installing: the program is pixelformer/cli/analyze.py."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from pixelformer.cli.analyze import main  # noqa: E402,F401  (tests call main(argv) here)

if __name__ == "__main__":
    from pixelformer.cli import analyze_main
    analyze_main()
