"""The programs' entry points in-process (the fast tier's check of them; the slow tier runs them as subprocesses), and
the old import paths kept for code written before the renames."""
from __future__ import annotations

import importlib
import sys
import warnings

import pytest

from pixelformer import UserError
from pixelformer.cli import cache_latents, train


def test_train_prints_its_help_and_the_composed_config(capsys):
    assert train.main(["--help"]) == 0
    assert "config groups (group=choice):" in capsys.readouterr().out
    assert train.main(["--cfg", "model=pit_mini", "optim.lr=0.004", "run.dir=/unused"]) == 0
    printed = capsys.readouterr().out
    assert "name: pit_mini" in printed and "lr: 0.004" in printed


def test_train_refuses_a_bad_key_in_one_line():
    with pytest.raises(UserError, match="optim.lrr"):
        train.main(["--cfg", "optim.lrr=1", "run.dir=/unused"])


def test_cache_latents_prints_its_help_and_needs_a_vae(capsys):
    assert cache_latents.main(["--help"]) == 0
    assert "posterior mean" in capsys.readouterr().out
    with pytest.raises(UserError, match=r"needs task.latent.vae=<AutoencoderKL folder or hub id>"):
        cache_latents.main(["logger=disabled"])


@pytest.mark.parametrize("old, new, name", [
    ("pixelformer.tasks.mae", "pixelformer.tasks.mae", "MAEPretrainer"),
    ("pixelformer.tasks.dit", "pixelformer.tasks.dit", "DiffusionTrainer"),
])
def test_renamed_classes_still_import_with_a_warning(old, new, name):
    module = importlib.import_module(old)
    with pytest.warns(DeprecationWarning, match=name):
        cls = getattr(module, name)
    assert cls is not None and cls.__module__ == new


def test_the_old_runs_module_still_imports_with_a_warning():
    sys.modules.pop("pixelformer.runs", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = importlib.import_module("pixelformer.runs")
    assert any("pixelformer.saved" in str(w.message) for w in caught)
    from pixelformer import saved
    assert all(getattr(old, name) is getattr(saved, name) for name in saved.__all__)
