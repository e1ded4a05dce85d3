"""Files from elsewhere (datasets, checkpoints) never run code or read the environment when pixelformer opens them."""
import os
import pickle

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from pixelformer import CheckpointError, UserError
from pixelformer.checkpoint import read_checkpoint
from pixelformer.config import DataCfg, compose, compose_saved, to_plain
from pixelformer.data import build_datasets
from conftest import tiny_cfg, write_fake_cifar


def data_cfg(**kwargs):
    return OmegaConf.merge(OmegaConf.structured(DataCfg), kwargs)


class Payload:
    """Unpickling an instance calls ``function(*args)``: here, creating a marker file through the shell or Python."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


class CustomObject:
    """A harmless class of the test module: still not plain data."""


def payloads(marker):
    return {
        "posix.system": Payload(os.system, f"touch {marker}"),
        "builtins.exec": Payload(exec, f"open({str(marker)!r}, 'w').close()"),
        "numpy.save": Payload(np.save, str(marker), np.zeros(1)),  # numpy, but not an array constructor
    }


# ---------------------------------------------------------------------------------------------- CIFAR pickles
@pytest.mark.parametrize("where", ["data", "labels", "meta"])
@pytest.mark.parametrize("name", ["posix.system", "builtins.exec", "numpy.save"])
def test_cifar_file_with_code_is_refused_and_runs_nothing(tmp_path, where, name):
    folder = write_fake_cifar(tmp_path, 10)
    marker = tmp_path / "ran"
    payload = payloads(marker)[name]
    target = folder / ("batches.meta" if where == "meta" else "data_batch_3")
    entry = pickle.loads(target.read_bytes())
    entry["label_names" if where == "meta" else where] = payload
    target.write_bytes(pickle.dumps(entry))
    with pytest.raises(UserError) as info:
        build_datasets(data_cfg(name="cifar10", root=str(tmp_path)))
    message = str(info.value)
    assert message.startswith(f"refusing to read {target}: its pickle calls {name},") and "\n" not in message
    assert not marker.exists() and not marker.with_suffix(".npy").exists()


@pytest.mark.parametrize("protocol,numpy_module", [(0, "numpy.core"), (2, "numpy.core"), (0, "numpy._core"),
                                                   (2, "numpy._core"), (4, "numpy._core"), (5, "numpy._core")])
def test_cifar_files_of_every_pickle_protocol_still_load(tmp_path, protocol, numpy_module):
    # The original files are Python 2 pickles naming numpy.core (protocols 0-2, whose GLOBAL opcodes are text);
    # files re-saved by numpy 2 name numpy._core; protocol 5 stores arrays through numpy's _frombuffer.
    folder = write_fake_cifar(tmp_path, 100, n_train=12, n_test=6)
    for name in ("train", "test", "meta"):
        entry = pickle.loads((folder / name).read_bytes())
        if name == "train":
            entry["fine_labels"] = [np.int64(3)] * 12  # numpy scalars pickle through multiarray.scalar
        raw = pickle.dumps(entry, protocol=protocol)
        if numpy_module == "numpy.core":  # respell the module as older numpy and Python 2 files do
            raw = raw.replace(b"numpy._core", b"numpy.core")
            assert name == "meta" or b"numpy.core.multiarray" in raw
        (folder / name).write_bytes(raw)
    train, test, info = build_datasets(data_cfg(name="cifar100", root=str(tmp_path)))
    original = pickle.loads((folder / "test").read_bytes())
    assert (len(train), len(test), info.class_names[:2]) == (12, 6, ["f0", "f1"])
    assert torch.equal(test.images.flatten(1), torch.from_numpy(np.asarray(original["data"])))
    assert train.labels.tolist() == [3] * 12 and test.labels.tolist() == list(original["fine_labels"])


def test_truncated_cifar_file_is_one_line(tmp_path):
    folder = write_fake_cifar(tmp_path, 10)
    (folder / "data_batch_4").write_bytes((folder / "data_batch_4").read_bytes()[:500])
    with pytest.raises(UserError, match=r"cannot read .*data_batch_4: not a CIFAR python-pickle file") as info:
        build_datasets(data_cfg(name="cifar10", root=str(tmp_path)))
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------------ checkpoints
def test_checkpoint_with_a_python_object_names_the_global(tmp_path):
    path = tmp_path / "custom.ckpt"
    torch.save({"model": {}, "extra": CustomObject()}, path)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    message = str(info.value)
    assert "(Unsupported global: GLOBAL test_security.CustomObject)" in message
    # one line, no terminal escape codes, and no advice to switch weights-only loading off
    assert "\n" not in message and "\x1b" not in message and "weights_only=False" not in message


def test_checkpoint_that_would_run_code_is_refused_without_running_it(tmp_path):
    path, marker = tmp_path / "evil.ckpt", tmp_path / "ran"
    torch.save({"model": {}, "config": Payload(os.system, f"touch {marker}")}, path)
    with pytest.raises(CheckpointError, match=r"unsupported GLOBAL posix.system whose module posix is blocked\)"):
        read_checkpoint(path)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------ interpolation
@pytest.mark.parametrize("text", ["${oc.env:HOME}", "${oc.env:HOME}/data", "a\\${x}", "\\\\${oc.env:HOME}", "${",
                                  "$HOME", "x\\y", "${oc.decode:'[1, 2]'}", "${run.dir}"])
@pytest.mark.slow
def test_stored_configs_are_read_literally(tmp_path, text):
    saved = to_plain(tiny_cfg(tmp_path / "run"))
    saved["data"]["root"] = text
    saved["run"]["dir"] = text
    cfg = compose_saved(saved, [])
    assert cfg.data.root == text and cfg.run.dir == text
    assert to_plain(cfg)["data"]["root"] == text  # and stays so when saved again


def test_stored_interpolation_is_not_expanded_by_the_eval_tool(tmp_path):
    from pixelformer.engine import evaluate_checkpoint

    saved = to_plain(tiny_cfg(tmp_path / "run"))
    saved["data"].update(name="cifar10", root="${oc.env:HOME}")
    path = tmp_path / "crafted.ckpt"
    torch.save({"config": saved, "model": {}}, path)
    with pytest.raises(UserError, match=r"cifar10 files not found: \$\{oc.env:HOME\}/cifar-10-batches-py lacks"):
        evaluate_checkpoint(path, [])


def test_the_user_may_interpolate_on_the_command_line(tmp_path, monkeypatch):
    monkeypatch.setenv("PIXELFORMER_TEST_ROOT", str(tmp_path))
    assert compose(["run.dir=${oc.env:PIXELFORMER_TEST_ROOT}/run"]).run.dir == f"{tmp_path}/run"
    saved = to_plain(tiny_cfg(tmp_path / "run"))
    cfg = compose_saved(saved, ["data.root=${oc.env:PIXELFORMER_TEST_ROOT}"])
    assert cfg.data.root == str(tmp_path)
