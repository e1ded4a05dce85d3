"""Moved to :mod:`pixelformer.saved` (2026-12); this path still works for code written before, with a warning."""
import warnings

from .saved import *  # noqa: F401,F403
from .saved import __all__  # noqa: F401

warnings.warn("pixelformer.runs is now pixelformer.saved", DeprecationWarning, stacklevel=2)
