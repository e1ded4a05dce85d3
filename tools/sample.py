#!/usr/bin/env python
"""``pixelformer-sample`` from a checkout without installing: the program is pixelformer/cli/sample.py."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from pixelformer.cli.sample import main  # noqa: E402,F401  (tests call main(argv) here)

if __name__ == "__main__":
    from pixelformer.cli import sample_main
    sample_main()
