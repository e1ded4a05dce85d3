"""Datasets, augmentation and deterministic, resumable, sharded sampling.

Datasets: ``digits`` (scikit-learn's 8x8 digits, shipped with the package: the default, no download), ``cifar10`` /
``cifar100`` (the python-pickle format torchvision downloads, read from ``data.root``), ``fashion_mnist`` / ``mnist``
(28x28 grey, the four IDX files, gzipped or not; Debian's ``dataset-fashion-mnist`` package installs Fashion-MNIST's)
and ``imagefolder`` (``root/train/<class>/*.png`` and ``root/val/<class>/*`` or ``root/test/<class>/*``).

``data.train_subset=N`` keeps a stratified, seeded (``data.subset_seed``) subset of N training images: the same
images on every machine and for every ``run.seed``, so small-scale sweeps differ only in what they vary.

``data.permute_pixels=<seed>`` shuffles the pixel positions of every training and test image by one fixed random
permutation (after resizing and augmentation, the same for every channel): a pixel transformer without position
embeddings cannot tell, and the analysis (``pixelformer.analysis``) measures how much other models lose.

Data from elsewhere is checked before training: CIFAR pickles are read by an unpickler that builds numpy arrays
and plain containers only (a crafted file cannot run code) and their shapes and labels are validated; an image
folder needs at least two classes, and every file a run reads is opened once at start (unreadable ones are named and
the folder refused, not skipped).

Augmentation randomness is a pure function of (run seed, epoch, sample index): the sampler hands each sample its own
seed. A run resumed in the middle of an epoch therefore sees exactly the batches and crops that the uninterrupted run
saw, whatever the number of workers or processes, and data loading never draws from the global RNG that dropout and
masking use.
"""
from __future__ import annotations

import copy
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import has_file_allowed_extension
from torchvision.transforms import v2

from .errors import UserError, did_you_mean
from .memory import available_memory, format_bytes

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

__all__ = ["DATASETS", "DataInfo", "to_unit_interval", "DeviceTensorLoader", "ShardedEpochSampler", "build_datasets", "build_loader",
           "permute_pixels", "pixel_permutation"]


@dataclass
class DataInfo:
    """What a model and a task need to know about a dataset."""
    name: str
    num_classes: int
    in_chans: int
    img_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------ datasets
class ImageTensorDataset(Dataset):
    """Images held in memory as uint8 (N, C, H, W) with integer labels; small datasets are best kept this way.

    Args:
        images: uint8 images.
        labels: Integer labels.
        normalize: Deterministic uint8 -> float conversion, applied last.
        augment: Random augmentation on uint8 images, seeded per sample by the key the sampler passes.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, normalize: Callable,
                 augment: Optional[Callable] = None) -> None:
        self.images, self.labels, self.normalize, self.augment = images, labels, normalize, augment
        self._ready: Optional[torch.Tensor] = None
        self._on_device: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    @property
    def ready(self) -> Optional[torch.Tensor]:
        """Without augmentation every epoch sees the same tensors: they are converted once, on first use."""
        if self._ready is None and self.augment is None and self.images is not None:
            self._ready = self.normalize(self.images)
        return self._ready

    def without_augmentation(self) -> "ImageTensorDataset":
        """The same images, deterministic: for features of the training split (k-NN, linear probes)."""
        if self.augment is None:
            return self  # already deterministic; sharing it keeps one copy of its tensors (on the device too)
        plain = copy.copy(self)
        plain.augment, plain._ready, plain._on_device = None, None, None
        return plain

    def on_device(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The ready images and the labels on ``device``, copied there once (``data.on_device``)."""
        if self.ready is None:
            raise UserError("data.on_device=true needs the whole dataset in memory without augmentation (digits, "
                            "cifar10 or cifar100 with data.augment=none); set data.on_device=false")
        if self._on_device is None or self._on_device[0].device != torch.device(device):
            self._on_device = (self.ready.to(device), self.labels.to(device))
        return self._on_device

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])

    def __getitem__(self, key: tuple[int, int] | int) -> tuple[torch.Tensor, int]:
        seed, index = key if isinstance(key, tuple) else (0, key)
        if self.ready is not None:
            return self.ready[index], int(self.labels[index])
        image, label = self.load(index)
        if self.augment is not None:
            # Seeded per sample so that augmentation does not depend on loader order, workers or resumption. The
            # generator is driven directly: torch.manual_seed / fork_rng also touch every accelerator and are slow.
            generator = torch.default_generator
            saved = generator.get_state()
            generator.manual_seed(seed)
            try:
                image = self.augment(image)
            finally:
                generator.set_state(saved)
        return self.normalize(image), label


class ImageFileDataset(ImageTensorDataset):
    """An ``ImageFolder`` whose images are decoded, resized to ``img_size`` and turned into uint8 tensors."""

    def __init__(self, folder, img_size: int, in_chans: int, normalize: Callable,
                 augment: Optional[Callable] = None, limit: Optional[int] = None,
                 subset: Optional[tuple[int, int]] = None, max_image_pixels: Optional[int] = None) -> None:
        super().__init__(None, None, normalize, augment)
        self.folder = folder
        everything = torch.arange(len(folder.targets))
        if subset is not None:  # (size, seed): data.train_subset
            everything = stratified_subset(torch.tensor(folder.targets), *subset)
        # A limit takes evenly spaced files: ImageFolder lists them class by class.
        count = len(everything) if limit is None else min(limit, len(everything))
        self.indices = everything[torch.linspace(0, len(everything) - 1, count).round().long()].tolist()
        self.labels = torch.tensor(folder.targets)[self.indices]
        self.mode = {1: "L", 3: "RGB"}[in_chans]
        self.max_image_pixels = max_image_pixels
        self.decode = v2.Compose([
            v2.PILToTensor(), v2.Resize(img_size, antialias=True), v2.CenterCrop(img_size),
        ])

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        path = self.folder.samples[self.indices[index]][0]
        _allow_image_pixels(self.max_image_pixels)  # a loader worker started by spawn has PIL's default
        try:
            image, label = self.folder[self.indices[index]]  # read by load_image: 8-bit channels
            image = image.convert(self.mode)
        except (OSError, ValueError, SyntaxError) as e:  # what PIL raises for data that the start-up check passed
            raise UserError(f"cannot decode image {path} ({type(e).__name__}: {e}): remove or replace it, then "
                            f"resume=auto") from None
        return self.decode(image), label

    def check_files(self, where: Path) -> None:
        """Open every file this dataset will read and refuse the folder, naming the files, if any is not an image.

        PIL reads each header and ``verify()``-s the file (PNG checksums; a JPEG's header only), about 0.1-1 ms per
        file, on a few threads: far cheaper than decoding, and it catches non-image, empty and most broken files
        before training starts. A file that fails only when fully decoded stops the run in :meth:`load`, named.
        """
        from concurrent.futures import ThreadPoolExecutor

        from PIL import Image

        def unreadable(path: str) -> Optional[str]:
            """None for a readable image, else why not: "bomb <pixels>", "range <message>" or "broken"."""
            try:
                with Image.open(path) as image:
                    image.verify()
                    mode = image.mode
                if mode in ("F", "I"):  # 32-bit pixels, rare: decoded now, as their range decides how they are read
                    try:
                        load_image(path)
                    except UserError as e:
                        return f"range {e}"
                return None
            except Image.DecompressionBombError as e:  # "Image size (N pixels) exceeds limit of ..."
                pixels = re.search(r"\((\d+) pixels\)", str(e))
                return f"bomb {pixels.group(1) if pixels else 0}"
            except Exception:  # noqa: BLE001 - PIL raises many types for broken files
                return "broken"

        _allow_image_pixels(self.max_image_pixels)
        paths = [self.folder.samples[i][0] for i in self.indices]
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            found = [(path, why) for path, why in zip(paths, pool.map(unreadable, paths, chunksize=64)) if why]
        large = [(path, int(why.split()[1])) for path, why in found if why.startswith("bomb")]
        if large:
            # PIL refuses images above twice Image.MAX_IMAGE_PIXELS as possible decompression bombs: the files are
            # fine, only larger than the limit, so say so (they are resized to data.img_size anyway).
            biggest = max(pixels for _, pixels in large)
            limit = Image.MAX_IMAGE_PIXELS
            raise UserError(f"imagefolder {where}: {len(large)} of {len(paths)} files have more pixels than PIL "
                            f"opens by default (2 x Image.MAX_IMAGE_PIXELS = {2 * limit:,}, a guard against "
                            f"decompression bombs), e.g. {large[0][0]} ({large[0][1]:,} pixels): if you trust "
                            f"these files, set data.max_image_pixels={biggest} (or more), or shrink them")
        unusable = [why[len("range "):] for _, why in found if why.startswith("range")]
        if unusable:
            more = f" ({len(unusable) - 1} more such file(s))" if len(unusable) > 1 else ""
            raise UserError(f"imagefolder {where}: {unusable[0]}{more}")
        bad = [path for path, why in found if why == "broken"]
        if bad:
            more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
            raise UserError(f"imagefolder {where}: {len(bad)} of {len(paths)} files are not readable images: "
                            f"{', '.join(bad[:3])}{more}; remove or replace them")


def _allow_image_pixels(limit: Optional[int]) -> None:
    """``data.max_image_pixels``: raise PIL's decompression-bomb limit (process-wide) to ``limit`` pixels."""
    if limit is not None:
        from PIL import Image

        if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < limit:
            Image.MAX_IMAGE_PIXELS = limit


def load_image(path: str) -> PILImage:
    """An image file as PIL reads it, with 8-bit channels (:func:`to_8bit`): an image folder's loader, in place of
    torchvision's, which converts to RGB straight away."""
    from PIL import Image

    with open(path, "rb") as f:
        image = Image.open(f)
        image.load()
    return to_8bit(image, path)


def to_8bit(image: PILImage, path: str) -> PILImage:
    """``image`` with 8-bit channels: 16-bit integer images are scaled by 255 / 65535 and float images read as
    intensities in [0, 1] are scaled by 255; other modes are returned as they are (``convert`` handles them).

    PIL's ``convert("L" / "RGB")`` clips a 16-bit or float pixel to [0, 255] instead of rescaling it, which turns a
    16-bit PNG white and a [0, 1] float TIFF black: a constant image, trained on without a word.
    """
    import numpy as np
    from PIL import Image

    if image.mode not in ("I", "F") and not image.mode.startswith("I;16"):
        return image
    pixels = np.asarray(image)
    low, high = (float(pixels.min()), float(pixels.max())) if pixels.size else (0.0, 0.0)
    if image.mode == "F":
        if not (np.isfinite(pixels).all() and 0.0 <= low and high <= 1.0):
            raise UserError(f"cannot use image {path}: a float image is read as intensities in [0, 1], but its "
                            f"values run from {low:g} to {high:g}: rescale it to [0, 1] or save it as an 8-bit "
                            f"image")
        scaled = pixels * 255.0
    else:
        if low < 0 or high > 65535:  # a 32-bit integer image: its range is unknown
            raise UserError(f"cannot use image {path}: a {image.mode}-mode integer image with values from "
                            f"{low:g} to {high:g} has no known range (8- and 16-bit images are read): save it as an "
                            f"8-bit or 16-bit image")
        scaled = pixels.astype(np.float64) * (255.0 / 65535.0)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))  # 2-D uint8: mode "L"


def _digits(cfg: DictConfig, train: bool) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    # 0..16 grey levels -> 0..255 uint8, 17 distinct values, nothing lost.
    images = torch.from_numpy((digits.images * 255.0 / 16.0).round()).to(torch.uint8).unsqueeze(1)
    labels = torch.from_numpy(digits.target).long()
    # A fixed, stratified 80/20 split (1,437 / 360 images), the same on every machine.
    idx_train, idx_test = train_test_split(
        torch.arange(len(labels)).numpy(), test_size=0.2, random_state=0, stratify=labels.numpy()
    )
    idx = torch.from_numpy(idx_train if train else idx_test)
    return images[idx], labels[idx], [str(i) for i in range(10)]


def _cifar(cfg: DictConfig, train: bool, num_classes: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    folder_name = "cifar-10-batches-py" if num_classes == 10 else "cifar-100-python"
    if cfg.root is None:
        raise UserError(f"data.root is not set for {cfg.name}: pass data.root=/path/to/dir containing "
                        f"'{folder_name}' (add data.download=true to fetch it, needs internet)")
    root = Path(cfg.root).expanduser()
    folder = root if root.name == folder_name else root / folder_name
    files = ([f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]) if num_classes == 10 \
        else (["train"] if train else ["test"])
    meta_file = "batches.meta" if num_classes == 10 else "meta"
    missing = [f for f in files + [meta_file] if not (folder / f).is_file()]
    if missing and cfg.download:
        import torchvision
        cls = torchvision.datasets.CIFAR10 if num_classes == 10 else torchvision.datasets.CIFAR100
        cls(str(folder.parent), train=train, download=True)
        missing = [f for f in files + [meta_file] if not (folder / f).is_file()]
    if missing:
        raise UserError(
            f"{cfg.name} files not found: {folder} lacks {', '.join(missing)}. Put the extracted '{folder_name}' "
            f"folder (from https://www.cs.toronto.edu/~kriz/) under data.root={cfg.root}, or add data.download=true "
            f"(needs internet)"
        )
    # Read the pickles directly (torchvision's md5 check would reject re-packed or test files), through an unpickler
    # that builds numpy arrays and plain containers only: a crafted file cannot run code.
    label_key = "labels" if num_classes == 10 else "fine_labels"
    data, labels = [], []
    for name in files:
        images, batch_labels = _cifar_batch(folder / name, label_key, num_classes, cfg.name)
        data.append(images)
        labels.append(batch_labels)
    names = _cifar_names(folder / meta_file, "label_names" if num_classes == 10 else "fine_label_names", num_classes,
                         cfg.name)
    images = torch.cat(data).reshape(-1, 3, 32, 32)  # stored channel-major per image
    return images, torch.cat(labels), names


class _DataUnpickler(pickle.Unpickler):
    """Unpickles what CIFAR's python files hold (dicts, lists, strings, numbers, numpy arrays) and nothing else.

    ``pickle.load`` calls any importable function a file names, so a crafted dataset folder could run code; here
    every global outside numpy's array and scalar reconstruction is refused.
    """

    def __init__(self, file, path: Path) -> None:
        super().__init__(file, encoding="latin1")  # the original files were written by Python 2's cPickle
        self.path = path

    def find_class(self, module: str, name: str):
        allowed = _allowed_globals()
        if (module, name) not in allowed:
            raise UserError(f"refusing to read {self.path}: its pickle calls {module}.{name}, which a CIFAR data file "
                            f"never contains (only numpy arrays, lists, dicts, strings and numbers are read, so a "
                            f"data file cannot run code): use the original files from "
                            f"https://www.cs.toronto.edu/~kriz/")
        return allowed[(module, name)]


def _allowed_globals() -> dict[tuple[str, str], object]:
    """The globals that numpy arrays and scalars pickle with: ``numpy.core`` (numpy 1 and Python 2) or
    ``numpy._core`` (numpy 2) spellings, resolved from whichever this numpy has."""
    import codecs

    import numpy as np
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric
    allowed: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,  # bytes in protocol-2 pickles written by Python 3
    }
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{package}.multiarray", "scalar")] = multiarray.scalar
        if hasattr(numeric, "_frombuffer"):  # arrays in protocol-5 pickles
            allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


def _read_pickle(path: Path) -> object:
    try:
        with open(path, "rb") as f:
            return _DataUnpickler(f, path).load()
    except UserError:
        raise
    except Exception as e:  # truncated or foreign files: EOFError, UnpicklingError, ValueError, ...
        raise UserError(f"cannot read {path}: not a CIFAR python-pickle file ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}): replace it with the original file") from None


def _cifar_batch(path: Path, label_key: str, num_classes: int, dataset: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A CIFAR batch file's uint8 (N, 3072) pixels and labels, checked: one line naming the file if wrong."""
    import numpy as np

    entry = _read_pickle(path)
    if not isinstance(entry, dict) or "data" not in entry or label_key not in entry:
        found = sorted(map(str, entry)) if isinstance(entry, dict) else type(entry).__name__
        raise UserError(f"{path} is not a {dataset} batch: expected a dict with 'data' and '{label_key}', found "
                        f"{found}")
    data = entry["data"]
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072):
        found = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise UserError(f"{path}: 'data' must be an N x 3072 uint8 array (32x32x3 images), found {found}")
    try:
        labels = np.asarray(entry[label_key])
    except (ValueError, TypeError):
        labels = np.asarray([])  # ragged or otherwise not a flat list: reported below
    if labels.ndim != 1 or len(labels) != len(data) or (len(labels) and labels.dtype.kind not in "iu"):
        raise UserError(f"{path}: '{label_key}' must be a list of {len(data)} integer labels (one per image), found "
                        f"{labels.dtype} values of shape {labels.shape}")
    if len(labels) and not (0 <= labels.min() and labels.max() < num_classes):
        raise UserError(f"{path}: '{label_key}' holds labels from {labels.min()} to {labels.max()}, outside "
                        f"[0, {num_classes}) for {dataset}")
    if not (data.flags.writeable and data.flags.c_contiguous):  # protocol-5 arrays share the file's bytes
        data = np.array(data, order="C")
    return torch.from_numpy(data), torch.from_numpy(labels.astype(np.int64))


def _cifar_names(path: Path, key: str, num_classes: int, dataset: str) -> list[str]:
    meta = _read_pickle(path)
    names = meta.get(key) if isinstance(meta, dict) else None
    if not isinstance(names, list) or len(names) != num_classes or not all(isinstance(n, str) for n in names):
        raise UserError(f"{path} is not {dataset}'s meta file: expected '{key}', a list of {num_classes} class names")
    return names


# IDX (LeCun's MNIST format): big-endian int32 magic 0x0000080<ndim> for uint8 data, ndim int32 sizes, raw bytes.
_IDX_FILES = {True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
# Where distributions install the files: Debian/Ubuntu's package dataset-fashion-mnist.
IDX_SYSTEM_ROOTS = {"fashion_mnist": Path("/usr/share/datasets/fashion-mnist"), "mnist": Path("/usr/share/datasets/mnist")}
_TORCHVISION_FOLDER = {"fashion_mnist": "FashionMNIST", "mnist": "MNIST"}


def idx_root(cfg: DictConfig) -> Optional[Path]:
    """``data.root``, or the distribution's folder when ``data.root`` is unset and that folder exists."""
    if cfg.root is not None:
        return Path(cfg.root).expanduser()
    system = IDX_SYSTEM_ROOTS.get(cfg.name)
    return system if system is not None and system.is_dir() else None


def _find_idx(root: Path, name: str, dataset: str) -> Optional[Path]:
    """``root/name(.gz)``, also in torchvision's layout ``root/<FashionMNIST|MNIST>/raw/``."""
    for folder in (root, root / _TORCHVISION_FOLDER[dataset] / "raw"):
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def read_idx(path: Path, ndim: int) -> torch.Tensor:
    """A uint8 IDX file (gzipped if its name ends in ``.gz``) as a tensor; a wrong file is named in one line.

    Hand-written because torchvision's reader is private (``datasets.mnist.read_image_file``) and asserts instead of
    explaining; the format is 4 + 4 * ndim header bytes and raw data.
    """
    import gzip
    import struct
    import zlib

    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError; a corrupt stream a zlib.error
        raise UserError(f"cannot read {path} ({type(e).__name__}: {e}): replace it with the original file") from None
    expected = 0x0800 + ndim
    if len(raw) < 4 or struct.unpack(">i", raw[:4])[0] != expected:
        found = f"0x{struct.unpack('>i', raw[:4])[0]:08x}" if len(raw) >= 4 else "a file of under 4 bytes"
        raise UserError(f"{path} is not a uint8 IDX file with {ndim} dimension(s): magic number {found}, expected "
                        f"0x{expected:08x}; replace it with the original *-idx{ndim}-ubyte file")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise UserError(f"{path}: truncated IDX header ({len(raw)} bytes); replace it with the original file")
    shape = struct.unpack(f">{ndim}i", raw[4:header])
    count = 1
    for size in shape:
        count *= size
    if shape and shape[0] == 0 and len(raw) == header:
        raise UserError(f"{path} holds no {'images' if ndim == 3 else 'labels'} (its header declares 0): replace it "
                        f"with the original file")
    if min(shape) <= 0 or len(raw) - header != count:
        raise UserError(f"{path}: the header declares shape {tuple(shape)} ({count:,} bytes) but the file holds "
                        f"{len(raw) - header:,} data bytes; replace it with the original file")
    return torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8).reshape(shape)


def _idx(cfg: DictConfig, train: bool, num_classes: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    root = idx_root(cfg)
    names = _IDX_FILES[train]
    system = IDX_SYSTEM_ROOTS[cfg.name]
    if root is None or not all(_find_idx(root, n, cfg.name) for n in names):
        if cfg.download:
            import torchvision
            target = root if root is not None else Path("data")
            getattr(torchvision.datasets, _TORCHVISION_FOLDER[cfg.name])(str(target), train=train, download=True)
            root = target
        elif root is None:
            package = " (Debian/Ubuntu: apt-get install dataset-fashion-mnist)" if cfg.name == "fashion_mnist" else ""
            raise UserError(f"data.root is not set for {cfg.name} and {system} does not exist: pass data.root=DIR "
                            f"holding {names[0]}(.gz) and the other IDX files{package}, or add data.download=true "
                            f"(torchvision, needs internet)")
    found = [_find_idx(root, n, cfg.name) for n in names]
    if not all(found):
        missing = [n for n, p in zip(names, found) if p is None]
        package = " or apt-get install dataset-fashion-mnist (Debian/Ubuntu)" if cfg.name == "fashion_mnist" else ""
        raise UserError(f"{cfg.name} files not found under data.root={root}: no {', '.join(m + '(.gz)' for m in missing)}"
                        f"; put the four IDX files there, add data.download=true (torchvision, needs internet){package}")
    images, labels = read_idx(found[0], 3), read_idx(found[1], 1)
    if len(images) != len(labels):
        raise UserError(f"{found[0]} holds {len(images):,} images but {found[1]} {len(labels):,} labels: the two files "
                        f"must come from the same split")
    if len(labels) and int(labels.max()) >= num_classes:
        raise UserError(f"{found[1]}: labels go up to {int(labels.max())}, outside [0, {num_classes}) for {cfg.name}")
    if images.shape[1] != images.shape[2]:
        raise UserError(f"{found[0]}: images are {images.shape[1]}x{images.shape[2]}; square images are expected")
    if train:
        _check_idx_classes(found[1], labels, num_classes, cfg.name)
    classes = FASHION_MNIST_CLASSES if cfg.name == "fashion_mnist" else [str(i) for i in range(10)]
    return images.unsqueeze(1).contiguous(), labels.long(), list(classes)


def _check_idx_classes(path: Path, labels: torch.Tensor, num_classes: int, dataset: str) -> None:
    """Refuse training labels of a single class (accuracy would read 100 % whatever the model learns, as an image
    folder of one class is refused) and warn when some classes have no training image (they can never be
    predicted, yet the head and the metrics count them)."""
    present = sorted(int(c) for c in labels.unique())
    if len(present) < 2:
        raise UserError(f"{path}: every training label is {present[0] if present else 'absent'}: a classifier needs "
                        f"at least 2 classes; replace it with the original {dataset} labels file")
    missing = [c for c in range(num_classes) if c not in present]
    if missing:
        import warnings
        warnings.warn(f"{path}: {len(missing)} of the {num_classes} {dataset} classes have no training image "
                      f"(labels {', '.join(map(str, missing))}): they can never be predicted; if this file is not "
                      f"a deliberate subset, replace it with the original", stacklevel=3)


FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")


def stratified_subset(labels: torch.Tensor, size: int, seed: int, key: str = "data.train_subset") -> torch.Tensor:
    """Sorted indices of ``size`` samples drawn per class in proportion to the class counts, fixed by ``seed``.

    scikit-learn's stratified split does the drawing; the indices are sorted so the subset keeps the file's order.
    """
    from sklearn.model_selection import train_test_split

    total, classes = len(labels), int(labels.unique().numel())
    if size > total:
        raise UserError(f"{key}={size} is larger than the {total:,} training images: choose at most {total} "
                        f"(or null for all)")
    if size < classes:
        raise UserError(f"{key}={size} cannot hold one image of each of the {classes} classes: choose at least "
                        f"{classes}")
    if size == total:
        return torch.arange(total)
    counts = torch.bincount(labels - labels.min()) if total else torch.zeros(0, dtype=torch.long)
    if total - size < classes or int(counts[counts > 0].min()) < 2:
        # scikit-learn's split needs the left-out part to hold each class too, and every class twice: drawn here
        return _proportional_subset(labels, size, seed)
    picked, _ = train_test_split(torch.arange(total).numpy(), train_size=size, random_state=seed,
                                 stratify=labels.numpy())
    return torch.from_numpy(picked).sort().values


def _proportional_subset(labels: torch.Tensor, size: int, seed: int) -> torch.Tensor:
    """Sorted indices of ``size`` samples, each class's share in proportion to its count (largest remainders,
    ties by class) and at least one of each, the samples within a class drawn with ``seed``: the cases scikit-learn's
    stratified split refuses (a subset just below the whole set, a class of one image)."""
    generator = torch.Generator().manual_seed(seed)
    classes, counts = labels.unique(return_counts=True)
    exact = counts.double() * size / len(labels)
    share = exact.floor().long().clamp(min=1)
    order = sorted(range(len(classes)), key=lambda i: (-(exact[i] - exact[i].floor()).item(), i))
    while int(share.sum()) < size:  # hand out what the floors left, largest remainder first
        for i in order:
            if int(share.sum()) < size and share[i] < counts[i]:
                share[i] += 1
    while int(share.sum()) > size:  # the minimum of one per class overshot: take back from the largest shares
        i = int(torch.argmax(share - (share <= 1).long() * len(labels)))
        share[i] -= 1
    picked = []
    for cls, take in zip(classes, share.tolist()):
        members = torch.nonzero(labels == cls).flatten()
        picked.append(members[torch.randperm(len(members), generator=generator)[:take]])
    return torch.cat(picked).sort().values


@dataclass
class _Spec:
    num_classes: Optional[int]
    in_chans: int
    native_size: Optional[int]
    mean: Optional[tuple[float, ...]]  # None: measured on the training images
    std: Optional[tuple[float, ...]]


DATASETS: dict[str, _Spec] = {
    "digits": _Spec(10, 1, 8, None, None),
    "cifar10": _Spec(10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": _Spec(100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    # The usual per-dataset constants (training split), so a subset is normalised like the full set.
    "fashion_mnist": _Spec(10, 1, 28, (0.2860,), (0.3530,)),
    "mnist": _Spec(10, 1, 28, (0.1307,), (0.3081,)),
    "imagefolder": _Spec(None, 3, None, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


# ---------------------------------------------------------------------------------------------- transforms
def build_train_transform(cfg: DictConfig, info: DataInfo) -> Optional[Callable]:
    """Augmentation on uint8 (C, H, W) tensors, or None for ``augment=none``."""
    size, scale = info.img_size, (cfg.rrc_scale_min, 1.0)
    colour = info.in_chans == 3
    recipes: dict[str, list] = {
        "none": [],
        "flip": [v2.RandomHorizontalFlip()],
        "crop_flip": [v2.RandomCrop(size, padding=max(size // 8, 1)), v2.RandomHorizontalFlip()],
        "rrc_flip": [v2.RandomResizedCrop(size, scale=scale, antialias=True), v2.RandomHorizontalFlip()],
        # MoCo v3's recipe as used for PiT on CIFAR; hue/saturation/greyscale only make sense for colour images.
        "mocov3": [
            v2.RandomResizedCrop(size, scale=scale, antialias=True),
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2 if colour else 0, 0.1 if colour else 0)], p=0.8),
            *([v2.RandomGrayscale(p=0.2)] if colour else []),
            v2.RandomHorizontalFlip(),
        ],
        "randaugment": [
            v2.RandomResizedCrop(size, scale=scale, antialias=True), v2.RandomHorizontalFlip(),
            v2.RandAugment(num_ops=2, magnitude=9),
        ],
    }
    steps = recipes[cfg.augment]
    return v2.Compose(steps) if steps else None


def to_unit_interval(images: torch.Tensor, mean: Sequence[float] | torch.Tensor,
                     std: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Dataset-normalised images (B, C, H, W) back to pixel values in [0, 1]: ``images * std + mean``, clamped.
    ``mean`` / ``std``: per channel, as sequences (``DataInfo.mean``) or tensors broadcasting as (1, C, 1, 1)."""
    mean, std = (v if isinstance(v, torch.Tensor) else
                 torch.tensor(v, device=images.device, dtype=torch.float32).view(1, -1, 1, 1) for v in (mean, std))
    return (images * std + mean).clamp(0, 1)


def pixel_permutation(img_size: int, seed: int) -> torch.Tensor:
    """A fixed random permutation (img_size * img_size,) of the pixel positions in row-major order, the same for a
    seed on every machine (its own CPU generator: the global RNG is not touched)."""
    return torch.randperm(img_size * img_size, generator=torch.Generator().manual_seed(seed))


def permute_pixels(images: torch.Tensor, permutation: torch.Tensor) -> torch.Tensor:
    """(..., C, H, W) images whose pixel k (row-major) is the input's pixel ``permutation[k]``, in every channel
    alike: the pixels move, their colours stay together."""
    return images.flatten(-2)[..., permutation.to(images.device)].reshape(images.shape)


class _Normalize:
    """uint8 (..., C, H, W) -> float32 normalised with the dataset's mean and std, then with the pixels shuffled by
    ``permutation`` (``data.permute_pixels``), when one is given. Applied last, after resizing and augmentation, so a
    crop or flip acts on the real image and the shuffle is the same for every image."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...],
                 permutation: Optional[torch.Tensor] = None) -> None:
        self.mean = torch.tensor(mean).view(-1, 1, 1) * 255.0
        self.std = torch.tensor(std).view(-1, 1, 1) * 255.0
        self.permutation = permutation

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        image = (image.float() - self.mean) / self.std
        return image if self.permutation is None else permute_pixels(image, self.permutation)


def _normalizer(cfg: DictConfig, mean: tuple[float, ...], std: tuple[float, ...], size: int) -> _Normalize:
    seed = cfg.get("permute_pixels")  # absent from configs saved before the option existed
    return _Normalize(mean, std, None if seed is None else pixel_permutation(size, seed))


# ---------------------------------------------------------------------------------------------------- build
def build_datasets(cfg: DictConfig) -> tuple[ImageTensorDataset, ImageTensorDataset, DataInfo]:
    """Train and test datasets (yielding normalised float images and labels) and their :class:`DataInfo`."""
    if cfg.name not in DATASETS:
        hint = did_you_mean(cfg.name, DATASETS, n=2)
        raise UserError(f"unknown dataset {cfg.name!r}.{hint} Choices: {', '.join(DATASETS)}")
    spec = DATASETS[cfg.name]
    if cfg.name == "imagefolder":
        return _build_imagefolder(cfg, spec)
    if cfg.name == "digits":
        (x_train, y_train, names), (x_test, y_test, _) = _digits(cfg, True), _digits(cfg, False)
    elif cfg.name in IDX_SYSTEM_ROOTS:
        (x_train, y_train, names), (x_test, y_test, _) = _idx(cfg, True, spec.num_classes), \
            _idx(cfg, False, spec.num_classes)
    else:
        (x_train, y_train, names), (x_test, y_test, _) = _cifar(cfg, True, spec.num_classes), \
            _cifar(cfg, False, spec.num_classes)
    if cfg.train_subset is not None:
        keep = stratified_subset(y_train, cfg.train_subset, cfg.subset_seed)
        x_train, y_train = x_train[keep], y_train[keep]
    x_train, y_train = x_train[: cfg.limit_train], y_train[: cfg.limit_train]
    x_test, y_test = x_test[: cfg.limit_test], y_test[: cfg.limit_test]
    if x_test.shape[1:] != x_train.shape[1:]:
        # Checked now: the first evaluation would fail after training, before any checkpoint was written.
        raise UserError(f"{cfg.name} under data.root={cfg.root}: the test images are {_shape_text(x_test)} but the "
                        f"training images {_shape_text(x_train)}: the two splits must come from the same dataset; "
                        f"replace the mismatched files with the original ones")
    # Files of another size than the dataset's (an IDX file of 14x14 images) are their own native size.
    native = x_train.shape[-1]
    size = cfg.img_size or native
    if size != native:
        _check_resize_fits(cfg, size, len(x_train) + len(x_test), x_train.shape[1], native)
        x_train, x_test = _resize_uint8(x_train, size), _resize_uint8(x_test, size)
    if spec.mean is None:
        pixels = x_train.float().div(255.0).transpose(0, 1).reshape(x_train.shape[1], -1)
        mean, std = tuple(pixels.mean(1).tolist()), tuple(pixels.std(1).tolist())
    else:
        mean, std = spec.mean, spec.std
    info = DataInfo(cfg.name, spec.num_classes, spec.in_chans, size, mean, std, names)
    normalize = _normalizer(cfg, mean, std, size)
    train = ImageTensorDataset(x_train, y_train, normalize, build_train_transform(cfg, info))
    test = ImageTensorDataset(x_test, y_test, normalize)
    return train, test, info


def _shape_text(images: torch.Tensor) -> str:
    return f"{images.shape[-2]}x{images.shape[-1]}x{images.shape[1]}"


def _check_resize_fits(cfg: DictConfig, size: int, count: int, channels: int, native: int) -> None:
    """Refuse a ``data.img_size`` (``size``) whose resized in-memory dataset cannot fit in this machine's memory.

    Counts 5 bytes per pixel: the uint8 images and their float32 normalised copy, which is also less than the
    float32 temporaries of resizing the training split (most of the images) take at once.
    """
    needed = count * channels * size ** 2 * 5
    available = available_memory(torch.device("cpu"))
    if available is not None and needed > available:
        raise UserError(f"data.img_size={size} resizes the {count:,} {cfg.name} images ({native}x{native} "
                        f"native) to {size}x{size}, about {format_bytes(needed)} in memory, "
                        f"but {format_bytes(available)} is available: choose a smaller data.img_size")


def _resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    resized = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return resized.round().clamp(0, 255).to(torch.uint8)


def _printable(name: str) -> str:
    """A folder name as text: bytes that are not UTF-8 (kept by Python as lone surrogates, which cannot be encoded,
    drawn or logged) become U+FFFD."""
    return os.fsencode(name).decode("utf-8", errors="replace")


class LoopSafeImageFolder(ImageFolder):
    """torchvision's ``ImageFolder`` whose walk reads every folder once, and whose images keep their values
    (:func:`load_image`: a 16-bit or float image is rescaled to 8 bits, not clipped).

    ``ImageFolder`` follows folder links without remembering where it has been: a link inside a class folder that
    points back up is walked again and again (6 images counted as 246), and one that reaches another class's folder
    labels its images as this class. Here a link to a folder already read (the split, a class folder, an ancestor,
    or one linked twice) is skipped and listed in ``skipped_links``; links to folders outside the dataset are
    followed as before.
    """

    def __init__(self, root: str) -> None:
        self.skipped_links: list[tuple[str, str]] = []
        super().__init__(root, loader=load_image)

    def make_dataset(self, directory: str, class_to_idx: dict[str, int],  # type: ignore[override]
                     extensions: Optional[tuple[str, ...]] = None,
                     is_valid_file: Optional[Callable[[str], bool]] = None,
                     allow_empty: bool = False) -> list[tuple[str, int]]:
        if is_valid_file is None:
            def is_valid_file(path: str) -> bool:
                return has_file_allowed_extension(path, extensions)  # type: ignore[arg-type]
        directory = os.path.expanduser(directory)
        seen = {os.path.realpath(directory)} | {os.path.realpath(os.path.join(directory, c)) for c in class_to_idx}
        instances, found = [], set()
        for target_class in sorted(class_to_idx):
            walked = []
            for folder, dirs, files in os.walk(os.path.join(directory, target_class), followlinks=True):
                dirs.sort()  # which of two links to one folder is kept does not depend on the file system's order
                for name in list(dirs):
                    real = os.path.realpath(os.path.join(folder, name))
                    if real in seen:
                        dirs.remove(name)
                        self.skipped_links.append((os.path.join(folder, name), real))
                    else:
                        seen.add(real)
                walked.append((folder, files))
            for folder, files in sorted(walked):  # torchvision's order: folders by path, files by name
                for name in sorted(files):
                    path = os.path.join(folder, name)
                    if is_valid_file(path):
                        instances.append((path, class_to_idx[target_class]))
                        found.add(target_class)
        empty = set(class_to_idx) - found
        if empty and not allow_empty:  # torchvision's own message
            message = f"Found no valid file for the classes {', '.join(sorted(empty))}. "
            if extensions is not None:
                message += f"Supported extensions are: {', '.join(extensions)}"
            raise FileNotFoundError(message)
        return instances


def _build_imagefolder(cfg: DictConfig, spec: _Spec) -> tuple[ImageTensorDataset, ImageTensorDataset, DataInfo]:
    if cfg.root is None:
        raise UserError("data.root is not set for imagefolder: pass data.root=/path with train/ and val/ (or test/) "
                        "folders of one sub-folder per class")
    if cfg.img_size is None:
        raise UserError("data.img_size is required for imagefolder (e.g. data.img_size=28, the paper's ImageNet size)")
    root = Path(cfg.root).expanduser()
    test_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if not (root / "train").is_dir() or test_dir is None:
        raise UserError(f"imagefolder root {root} must contain train/ and val/ (or test/) folders, one sub-folder "
                        f"per class; found: {sorted(p.name for p in root.iterdir()) if root.is_dir() else 'no such directory'}")
    try:
        train_folder, test_folder = LoopSafeImageFolder(str(root / "train")), LoopSafeImageFolder(str(test_dir))
    except (FileNotFoundError, RuntimeError) as e:
        raise UserError(f"imagefolder {root}: {e}") from None
    skipped = train_folder.skipped_links + test_folder.skipped_links
    if skipped:
        import warnings
        shown = ", ".join(f"{link} -> {target}" for link, target in skipped[:3])
        warnings.warn(f"imagefolder {root}: skipped {len(skipped)} folder link(s) that lead to a folder read already "
                      f"(a loop, or another class's folder): {shown}{' ...' if len(skipped) > 3 else ''}; each "
                      f"folder is read once, under its own class", stacklevel=2)
    if train_folder.classes != test_folder.classes:
        raise UserError(f"imagefolder {root}: train/ and {test_dir.name}/ have different class folders")
    if len(train_folder.classes) < 2:
        # One label for every image: accuracy would read 100 % whatever the model learns.
        raise UserError(f"imagefolder {root}: train/ has {len(train_folder.classes)} class folder "
                        f"({', '.join(train_folder.classes)}); put the images in at least 2 class sub-folders")
    info = DataInfo(cfg.name, len(train_folder.classes), spec.in_chans, cfg.img_size, spec.mean, spec.std,
                    [_printable(name) for name in train_folder.classes])
    normalize = _normalizer(cfg, spec.mean, spec.std, cfg.img_size)
    subset = (cfg.train_subset, cfg.subset_seed) if cfg.train_subset is not None else None
    max_pixels = cfg.get("max_image_pixels")  # absent from configs saved before the option existed
    train = ImageFileDataset(train_folder, cfg.img_size, info.in_chans, normalize, build_train_transform(cfg, info),
                             cfg.limit_train, subset, max_pixels)
    test = ImageFileDataset(test_folder, cfg.img_size, info.in_chans, normalize, limit=cfg.limit_test,
                            max_image_pixels=max_pixels)
    train.check_files(root / "train")
    test.check_files(test_dir)
    return train, test, info


# ------------------------------------------------------------------------------------------------ sampling
class ShardedEpochSampler(Sampler):
    """Yields ``(sample_seed, index)`` keys: a per-epoch permutation, sharded over processes, resumable.

    Args:
        size: Dataset length.
        shuffle: Permute each epoch (seeded by ``seed`` and the epoch).
        seed: Run seed.
        rank: This process's rank.
        world_size: Number of processes; the permutation is padded (train) so that every rank gets as many samples.
        pad: Pad to a multiple of ``world_size`` (training); evaluation leaves shards uneven instead.
    """

    def __init__(self, size: int, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1,
                 pad: bool = True) -> None:
        self.size, self.shuffle, self.seed = size, shuffle, seed
        self.rank, self.world_size, self.pad = rank, world_size, pad
        self.epoch, self.skip = 0, 0

    def set_position(self, epoch: int, skip: int = 0) -> None:
        """Select the epoch's permutation and skip its first ``skip`` samples, counted over all shards (on resume:
        what every process together has trained on in this epoch, so a resume on another number of processes
        continues with the samples not yet seen).

        Deliberately not called ``set_epoch``: Fabric calls ``set_epoch(n)`` with its own count of loader passes.
        """
        self.epoch, self.skip = epoch, skip

    def _shard(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        rest = order[self.skip:]
        if self.pad and len(rest) % self.world_size:  # from the epoch's start, as an unskipped epoch pads
            rest += order[: self.world_size - len(rest) % self.world_size]
        return rest[self.rank:: self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        base = (self.seed * 100_003 + self.epoch) * (self.size + 1)
        for index in self._shard():
            yield (base + index) % (2 ** 63), index

    def __len__(self) -> int:
        return len(self._shard())


class DeviceTensorLoader:
    """Batches indexed out of images and labels that already live on the training device (``data.on_device``).

    A drop-in for the DataLoader of :func:`build_loader`: the same ``sampler`` (so ``set_position``, sharding and
    padding are unchanged), the same ``drop_last`` rule and ``len()``, and identical ``[images, labels]`` batches
    in the same order, without per-sample ``__getitem__``, collation or host-to-device copies.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, sampler: ShardedEpochSampler,
                 drop_last: bool) -> None:
        self.images, self.labels = images, labels
        self.batch_size, self.sampler, self.drop_last = batch_size, sampler, drop_last

    def __len__(self) -> int:
        count = len(self.sampler)
        return count // self.batch_size if self.drop_last else -(-count // self.batch_size)

    def __iter__(self) -> Iterator[list[torch.Tensor]]:
        # One small host-to-device copy of the epoch's order; each batch is then a gather on the device.
        order = torch.tensor([index for _, index in self.sampler], dtype=torch.long).to(self.images.device)
        end = len(order) - len(order) % self.batch_size if self.drop_last else len(order)
        for start in range(0, end, self.batch_size):
            batch = order[start: start + self.batch_size]
            yield [self.images.index_select(0, batch), self.labels.index_select(0, batch)]


def build_loader(dataset: Dataset, batch_size: int, train: bool, seed: int, rank: int, world_size: int,
                 num_workers: int, device: Optional[torch.device] = None) -> DataLoader | DeviceTensorLoader:
    """Batches of ``dataset`` in the sampler's order; with ``device``, a :class:`DeviceTensorLoader` whose batches
    are already on that device (the dataset needs a ``ready`` tensor: in memory, no augmentation)."""
    sampler = ShardedEpochSampler(len(dataset), shuffle=train, seed=seed, rank=rank, world_size=world_size,
                                  pad=train)
    per_rank = -(-len(dataset) // world_size)
    drop_last = train and per_rank > batch_size
    if device is not None:
        return DeviceTensorLoader(*dataset.on_device(device), batch_size, sampler, drop_last)
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
        drop_last=drop_last,
        persistent_workers=False,
        # Its own generator: creating a loader iterator must not draw from the global RNG (exact resume).
        generator=torch.Generator().manual_seed(seed),
    )
