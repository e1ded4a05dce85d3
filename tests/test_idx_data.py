"""Fashion-MNIST / MNIST from IDX files (gzipped or not) and the stratified training subset."""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from pixelformer.config import compose
from pixelformer.data import build_datasets, read_idx, stratified_subset
from pixelformer.errors import UserError


def write_idx(path: Path, array: np.ndarray, magic: int | None = None, gz: bool = False) -> Path:
    """An IDX file as the MNIST authors define it: big-endian int32 magic and sizes, then raw uint8."""
    magic = 0x0800 + array.ndim if magic is None else magic
    data = struct.pack(f">i{array.ndim}i", magic, *array.shape) + array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def write_fake_mnist(root: Path, n_train: int = 50, n_test: int = 20, gz: bool = False, seed: int = 0,
                     size: int = 28) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, size, size), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, size, size), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) * 3) % 10,
    }
    for name, array in arrays.items():
        write_idx(root / name, array, gz=gz)
    return arrays


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzipped"])
@pytest.mark.parametrize("dataset", ["fashion_mnist", "mnist"])
def test_idx_files_are_read_exactly(tmp_path, gz, dataset):
    arrays = write_fake_mnist(tmp_path, gz=gz)
    train, test, info = build_datasets(compose([f"data={dataset}", f"data.root={tmp_path}"]).data)
    assert (info.num_classes, info.in_chans, info.img_size) == (10, 1, 28)
    assert torch.equal(train.images, torch.from_numpy(arrays["train-images-idx3-ubyte"]).unsqueeze(1))
    assert torch.equal(train.labels, torch.from_numpy(arrays["train-labels-idx1-ubyte"]).long())
    assert torch.equal(test.images[:, 0], torch.from_numpy(arrays["t10k-images-idx3-ubyte"]))
    assert torch.equal(test.labels, torch.from_numpy(arrays["t10k-labels-idx1-ubyte"]).long())
    image, label = train[3]
    expected = (arrays["train-images-idx3-ubyte"][3] / 255.0 - info.mean[0]) / info.std[0]
    assert torch.allclose(image[0], torch.from_numpy(expected).float(), atol=1e-5) and label == 3


def test_torchvision_layout_and_img_size(tmp_path):
    """Files where torchvision's FashionMNIST(download=True) puts them are found; data.img_size resizes."""
    write_fake_mnist(tmp_path / "FashionMNIST" / "raw", gz=True)
    train, test, info = build_datasets(compose(["data=fashion_mnist", f"data.root={tmp_path}",
                                                "data.img_size=14"]).data)
    assert info.img_size == 14 and train.images.shape[1:] == (1, 14, 14) and test.images.shape[1:] == (1, 14, 14)


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzipped"])
def test_a_wrong_magic_number_is_named(tmp_path, gz):
    write_fake_mnist(tmp_path)
    (tmp_path / "train-images-idx3-ubyte").unlink()
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((5, 28, 28)), magic=0x0801, gz=gz)
    with pytest.raises(UserError, match=r"train-images-idx3-ubyte.*magic number 0x00000801, expected 0x00000803"):
        build_datasets(compose(["data=fashion_mnist", f"data.root={tmp_path}"]).data)


def test_truncated_and_mismatched_files_are_refused(tmp_path):
    path = write_idx(tmp_path / "x-idx3-ubyte", np.zeros((4, 28, 28)))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(UserError, match=r"declares shape \(4, 28, 28\)"):
        read_idx(path, 3)
    bad_gz = tmp_path / "y-idx1-ubyte.gz"
    bad_gz.write_bytes(b"not gzip at all")
    with pytest.raises(UserError, match="cannot read .*y-idx1-ubyte.gz"):
        read_idx(bad_gz, 1)
    write_fake_mnist(tmp_path / "d", n_train=50)
    write_idx(tmp_path / "d" / "train-labels-idx1-ubyte", np.zeros(49))
    with pytest.raises(UserError, match="50 images but .* 49 labels"):
        build_datasets(compose(["data=mnist", f"data.root={tmp_path / 'd'}"]).data)


def test_a_missing_root_names_both_ways_to_get_the_files(tmp_path, monkeypatch):
    import pixelformer.data as data

    monkeypatch.setitem(data.IDX_SYSTEM_ROOTS, "fashion_mnist", tmp_path / "not-installed")
    with pytest.raises(UserError) as err:
        build_datasets(compose(["data=fashion_mnist"]).data)
    message = str(err.value)
    assert "apt-get install dataset-fashion-mnist" in message and "data.download=true" in message
    assert "data.root" in message and "\n" not in message
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"no train-images-idx3-ubyte\(.gz\).*data.download=true"):
        build_datasets(compose(["data=fashion_mnist", f"data.root={tmp_path / 'empty'}"]).data)


def test_the_system_folder_is_the_default_root(tmp_path, monkeypatch):
    import pixelformer.data as data

    write_fake_mnist(tmp_path / "system", gz=True)
    monkeypatch.setitem(data.IDX_SYSTEM_ROOTS, "fashion_mnist", tmp_path / "system")
    train, _, info = build_datasets(compose(["data=fashion_mnist"]).data)
    assert len(train) == 50 and info.class_names[0] == "T-shirt/top"


# ------------------------------------------------------------------------------------------------ subsets
def test_the_subset_is_stratified_and_stable():
    labels = torch.tensor([0] * 600 + [1] * 300 + [2] * 100)
    picked = stratified_subset(labels, 100, seed=0)
    assert len(picked) == 100 and len(set(picked.tolist())) == 100
    assert labels[picked].bincount().tolist() == [60, 30, 10]  # the class proportions, exactly here
    assert torch.equal(picked, stratified_subset(labels, 100, seed=0))  # the same on every call
    assert not torch.equal(picked, stratified_subset(labels, 100, seed=1))
    assert torch.equal(picked, picked.sort().values)  # the files' order is kept


def test_train_subset_in_the_config_keeps_the_test_split_and_ignores_run_seed(tmp_path):
    write_fake_mnist(tmp_path, n_train=200, n_test=30)
    base = ["data=mnist", f"data.root={tmp_path}", "data.train_subset=40"]
    a, test, _ = build_datasets(compose(base + ["run.seed=0"]).data)
    b, _, _ = build_datasets(compose(base + ["run.seed=5"]).data)
    c, _, _ = build_datasets(compose(base + ["data.subset_seed=1"]).data)
    assert len(a) == 40 and len(test) == 30 and a.labels.bincount().tolist() == [4] * 10
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)


@pytest.mark.parametrize("size, message", [(500, "larger than the 200 training images"),
                                           (5, "one image of each of the 10 classes")])
def test_an_impossible_subset_is_refused(tmp_path, size, message):
    write_fake_mnist(tmp_path, n_train=200)
    with pytest.raises(UserError, match=f"data.train_subset={size}.*{message}"):
        build_datasets(compose(["data=mnist", f"data.root={tmp_path}", f"data.train_subset={size}"]).data)


def test_digits_take_a_subset_too():
    train, _, _ = build_datasets(compose(["data.train_subset=100"]).data)
    assert len(train) == 100 and train.labels.bincount().min() >= 9


# ------------------------------------------------------------------------------------ hostile files (docs/bad-input.md)
def test_labels_of_one_class_are_refused_and_missing_classes_warned(tmp_path):
    write_fake_mnist(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(50))
    with pytest.raises(UserError, match=r"train-labels-idx1-ubyte: every training label is 0: a classifier needs at "
                                        r"least 2 classes"):
        build_datasets(compose(["data=mnist", f"data.root={tmp_path}"]).data)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.arange(50) % 5)
    with pytest.warns(UserWarning, match=r"5 of the 10 mnist classes have no training image \(labels 5, 6, 7, 8, 9\)"):
        train, _, info = build_datasets(compose(["data=mnist", f"data.root={tmp_path}"]).data)
    assert info.num_classes == 10 and len(train) == 50  # a deliberate subset of classes still trains


def test_test_images_of_another_size_are_refused_before_training(tmp_path):
    # They used to pass and crash the first evaluation, after training and before any checkpoint.
    write_fake_mnist(tmp_path)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((20, 14, 14)))
    with pytest.raises(UserError, match=r"the test images are 14x14x1 but the training images 28x28x1: the two splits "
                                        r"must come from the same dataset"):
        build_datasets(compose(["data=mnist", f"data.root={tmp_path}", "data.img_size=16"]).data)


def test_images_of_another_size_without_img_size_keep_their_size(tmp_path):
    write_fake_mnist(tmp_path, size=14)
    train, test, info = build_datasets(compose(["data=fashion_mnist", f"data.root={tmp_path}"]).data)
    assert info.img_size == 14 and train.images.shape[1:] == (1, 14, 14) and test.images.shape[1:] == (1, 14, 14)


def test_a_corrupt_gzip_stream_is_named(tmp_path):
    write_fake_mnist(tmp_path)
    data = bytearray(gzip.compress((tmp_path / "train-images-idx3-ubyte").read_bytes()))
    (tmp_path / "train-images-idx3-ubyte").unlink()
    data[10:14] = b"\xff\xff\xff\xff"  # the deflate stream's first block: zlib.error, not an OSError
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"cannot read .*train-images-idx3-ubyte.gz \(error: Error -3 while "
                                        r"decompressing data: invalid block type\): replace it with the original"):
        build_datasets(compose(["data=mnist", f"data.root={tmp_path}"]).data)


def test_an_idx_file_of_no_images_says_so(tmp_path):
    write_fake_mnist(tmp_path)
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((0, 28, 28)))
    with pytest.raises(UserError, match=r"train-images-idx3-ubyte holds no images \(its header declares 0\)"):
        build_datasets(compose(["data=mnist", f"data.root={tmp_path}"]).data)


@pytest.mark.parametrize("size", [49, 45])
def test_a_subset_just_below_the_whole_set_is_stratified(tmp_path, size):
    # scikit-learn refuses a left-out part smaller than the number of classes ("test_size = 1 should be ...").
    write_fake_mnist(tmp_path)  # 50 images, 5 per class
    train, _, _ = build_datasets(compose(["data=mnist", f"data.root={tmp_path}", f"data.train_subset={size}"]).data)
    counts = torch.bincount(train.labels, minlength=10)
    assert len(train) == size and counts.min() >= 4 and counts.max() == 5
    again, _, _ = build_datasets(compose(["data=mnist", f"data.root={tmp_path}", f"data.train_subset={size}"]).data)
    assert torch.equal(again.labels, train.labels) and torch.equal(again.images, train.images)


def test_a_subset_with_a_class_of_one_image():
    labels = torch.tensor([0] * 10 + [1] * 10 + [2])
    picked = stratified_subset(labels, 12, seed=3)
    assert len(picked) == 12 and set(labels[picked].tolist()) == {0, 1, 2}
    assert torch.equal(picked, stratified_subset(labels, 12, seed=3))


@pytest.mark.parametrize("seed", ["-1", "4294967296"])
def test_a_subset_seed_outside_its_range_is_refused(seed):
    with pytest.raises(UserError, match=rf"data.subset_seed must be in \[0, 2\*\*32 - 1\] \(the seed of scikit-learn's "
                                        rf"stratified split\), got {seed}"):
        compose(["data.train_subset=20", f"data.subset_seed={seed}"])
