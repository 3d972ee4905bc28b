"""Datasets: MNIST (IDX files), CIFAR-10 and CIFAR-100 (python pickles), scikit-learn's bundled 8x8 digits.

Every loader returns a `Splits` of float tensors: train / val (held out from the training data)
/ test. Images are scaled to [0, 1] and standardised with the training set's mean and std.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import struct
import urllib.request
from dataclasses import dataclass

import numpy as np
import torch

from ._files import UnsafeFileError, load_data_pickle

MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# md5 of the canonical gzip files (Y. LeCun's distribution, mirrored by the URLs below).
MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC = 0x00000803, 0x00000801
DATASETS = ("digits", "mnist", "mnist32", "cifar10", "cifar100")
CLASSES = {"digits": 10, "mnist": 10, "mnist32": 10, "cifar10": 10, "cifar100": 100}


class DatasetError(RuntimeError):
    """A dataset is missing, incomplete or corrupt; the message says where we looked."""


@dataclass
class Splits:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    name: str
    classes: int | None = None   # the dataset's own class count (the loaders set it), if known
    # (mean, std) the loaders standardised the inputs with, x = (pixels in [0, 1] - mean) / std:
    # a deployed model wants its inputs the same way
    standardisation: tuple[float, float] | None = None

    @property
    def num_classes(self) -> int:
        """The dataset's class count where the loader knows it (a CIFAR-100 subset whose labels
        stop at 89 still has 100 classes), else one more than the largest label of any split (a
        class the training split lacks still needs its output, or evaluating the test split
        would index past the logits)."""
        seen = 1 + max((int(y.max().item()) for y in (self.y_train, self.y_val, self.y_test) if len(y)),
                       default=-1)
        return max(seen, self.classes or 0)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def check_shift(value, where: str, name: str) -> None:
    """A shift in whole pixels: an int >= 0 (bool rejected)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{where}: {name} must be an int >= 0, got {value!r}")


def random_shift(images: torch.Tensor, max_shift: int, *, fill: float | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Training augmentation: each image of a (N, C, H, W) batch moved by its own random whole-pixel
    offset in [-max_shift, max_shift] along both axes. The uncovered border gets `fill`, by default
    the minimum of each channel of each image (the background of MNIST-like digits, also after
    standardising; for photographs pass a fill).
    Offsets are drawn on the CPU from `generator`, so a seeded generator gives the same batch on
    every device."""
    if images.dim() != 4:
        raise ValueError(f"random_shift: images must be (N, C, H, W), got shape {tuple(images.shape)}")
    check_shift(max_shift, "random_shift", "max_shift")
    if max_shift == 0 or images.numel() == 0:
        return images.clone()
    n, c, h, w = images.shape
    k = max_shift
    background = (images.amin(dim=(2, 3)) if fill is None
                  else images.new_full((n, c), float(fill)))
    padded = background.view(n, c, 1, 1).expand(n, c, h + 2 * k, w + 2 * k).clone()
    padded[:, :, k:k + h, k:k + w] = images
    dy, dx = torch.randint(0, 2 * k + 1, (2, n), generator=generator).to(images.device)
    rows = dy[:, None] + torch.arange(h, device=images.device)  # (N, H) rows of padded to read
    cols = dx[:, None] + torch.arange(w, device=images.device)
    batch = torch.arange(n, device=images.device)[:, None, None, None]
    channel = torch.arange(c, device=images.device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


def _md5(path: str) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _find_idx(directory: str, stem: str) -> str:
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx")):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    raise DatasetError(
        f"MNIST file {stem}[.gz] not found in {os.path.abspath(directory)}. Point --data-dir at a "
        "directory with the four IDX files (train/t10k images and labels, gzip or raw), or pass "
        "download=True (mackay-ext prune --download) to fetch them from a mirror.")


def read_idx(path: str, expected_magic: int, md5: str | None = None) -> np.ndarray:
    """Read one IDX file (gzip or raw), checking its magic number, header and size."""
    if md5 is not None and _md5(path) != md5:
        raise DatasetError(f"{path}: md5 {_md5(path)} does not match the expected {md5}")
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as error:
        raise DatasetError(f"{path}: cannot read ({error}); the file is corrupt or truncated") from error
    if len(data) < 8:
        raise DatasetError(f"{path}: {len(data)} bytes is too short for an IDX header")
    magic = struct.unpack(">I", data[:4])[0]
    if magic != expected_magic:
        raise DatasetError(f"{path}: IDX magic number {magic:#010x}, expected {expected_magic:#010x} "
                           "(wrong or corrupt file)")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{path}: {len(data)} bytes, but an IDX header of {ndim} dimensions takes "
                           f"{header} (truncated or corrupt)")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = header + int(np.prod(dims))
    if len(data) != expected:
        raise DatasetError(f"{path}: {len(data)} bytes but the header {dims} says {expected} "
                           "(truncated or corrupt)")
    if dims and dims[0] == 0:
        raise DatasetError(f"{path}: the file holds no examples (header {dims})")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def download_mnist(directory: str, mirrors=MNIST_MIRRORS, md5s: dict[str, str] = MNIST_MD5) -> None:
    """Fetch the four MNIST files into `directory` from the first mirror that has them (any
    urllib URL: https://, file://); every file is md5-verified before it is kept."""
    os.makedirs(directory, exist_ok=True)
    for name, md5 in md5s.items():
        target = os.path.join(directory, name)
        if os.path.isfile(target) and _md5(target) == md5:
            continue
        errors = []
        for mirror in mirrors:
            partial = target + ".part"
            try:
                with urllib.request.urlopen(mirror + name, timeout=60) as response, open(partial, "wb") as out:
                    shutil.copyfileobj(response, out)
            except OSError as error:
                errors.append(f"{mirror}: {error}")
                continue
            if _md5(partial) != md5:
                errors.append(f"{mirror}: md5 mismatch")
                os.remove(partial)
                continue
            os.replace(partial, target)
            break
        else:
            raise DatasetError(f"could not download {name}: " + "; ".join(errors))


def _check_fraction(name: str, value, where: str) -> None:
    """A share of the examples: a number in [0, 1) (a split that takes all of them leaves none to
    train on)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"{where}: {name} must be a number in [0, 1), got {value!r}")


def _split_val(x, y, val_fraction, seed):
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=generator)
    n_val = int(round(len(x) * val_fraction))
    val, train = order[:n_val], order[n_val:]
    return x[train], y[train], x[val], y[val]


def _standardise(x_train, *others):
    """The splits standardised with the training set's mean and std, then (mean, std)."""
    mean, std = x_train.mean(), x_train.std().clamp_min(1e-8)
    return [(t - mean) / std for t in (x_train, *others)], (float(mean), float(std))


def _finish(name, x_train, y_train, x_test, y_test, val_fraction, seed) -> Splits:
    _check_fraction("val_fraction", val_fraction, f"load {name}")
    x_train, y_train, x_val, y_val = _split_val(x_train, y_train, val_fraction, seed)
    (x_train, x_val, x_test), standardisation = _standardise(x_train, x_val, x_test)
    return Splits(x_train, y_train, x_val, y_val, x_test, y_test, name, classes=CLASSES[name],
                  standardisation=standardisation)


def load_mnist(directory: str, *, val_fraction: float = 1 / 12, seed: int = 0,
               download: bool = False, md5: dict[str, str] | None = None, pad: int = 0) -> Splits:
    """MNIST from a directory of IDX files (the layout of LeCun's site, gzip or raw).
    Images are (N, 1, 28 + 2 pad, 28 + 2 pad): pad=2 gives the 32x32 images CIFAR networks take
    ("mnist32", the border is background). 5,000 of the 60,000 training images are held out."""
    _check_fraction("val_fraction", val_fraction, "load_mnist")
    if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
        raise ValueError(f"load_mnist: pad must be an integer >= 0 (pixels of background around each "
                         f"image), got {pad!r}")
    if download:
        download_mnist(directory)
    if not os.path.isdir(directory):
        what = "is a file, not a directory" if os.path.exists(directory) else "does not exist"
        raise DatasetError(f"MNIST directory {os.path.abspath(directory)} {what}; pass --data-dir, the "
                           "directory holding MNIST's four files (e.g. ../shared/data/mnist), or fetch them "
                           "into it with mackay-ext prune --download")
    arrays = {}
    for key, stem in MNIST_FILES.items():
        path = _find_idx(directory, stem)
        magic = IDX_IMAGES_MAGIC if key.endswith("images") else IDX_LABELS_MAGIC
        arrays[key] = read_idx(path, magic, (md5 or {}).get(os.path.basename(path)))
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.shape[0] != labels.shape[0] or images.shape[1:] != (28, 28):
            raise DatasetError(f"MNIST {split}: {images.shape[0]} images of {images.shape[1:]} but "
                               f"{labels.shape[0]} labels (expected 28x28 images, one label each)")
        if labels.max() > 9:
            raise DatasetError(f"MNIST {split}: label {labels.max()} out of range 0..9")

    def images(a):
        x = torch.from_numpy(a.astype(np.float32) / 255.0).unsqueeze(1)
        return torch.nn.functional.pad(x, (pad,) * 4) if pad else x   # 0 is the background

    def labels(a):
        return torch.from_numpy(a.astype(np.int64))

    return _finish("mnist32" if pad == 2 else "mnist", images(arrays["train_images"]),
                   labels(arrays["train_labels"]),
                   images(arrays["test_images"]), labels(arrays["test_labels"]), val_fraction, seed)


def _cifar_root(directory: str, folder: str, first_file: str, what: str) -> str:
    """Where the pickles are: `directory` itself, or its `folder` subdirectory (the top folder of
    the official archive, so --data-dir may name the folder it was unpacked into)."""
    if not os.path.isdir(directory):
        raise DatasetError(f"{what} directory {os.path.abspath(directory)} not found; point --data-dir "
                           f"at the unpacked {folder} folder (python version of the dataset)")
    inner = os.path.join(directory, folder)
    if not os.path.isfile(os.path.join(directory, first_file)) and os.path.isfile(os.path.join(inner, first_file)):
        return inner
    return directory


def _exact(values, dtype, what: str) -> np.ndarray:
    """values as `dtype`, refused where the cast would change any of them (a pixel of 300 would
    wrap to 44, a label of 2.7 become 2)."""
    array = np.asarray(values)
    cast = array.astype(dtype)
    if array.dtype != cast.dtype and not np.array_equal(cast, array):
        raise DatasetError(f"{what} are not all {np.dtype(dtype).name} values (a corrupt or foreign file)")
    return cast


def _cifar_pickle(directory: str, name: str, label_key: bytes, num_classes: int, what: str,
                  archive: str, folder: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One pickle of the python version of CIFAR: images (N, 3, 32, 32) in [0, 1], labels (N,)."""
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        raise DatasetError(f"{what} file {name} not found in {os.path.abspath(directory)}; "
                           f"unpack {archive} there (the {folder} folder)")
    try:
        entry = load_data_pickle(path)   # builds plain data only: a crafted batch cannot run code
        data = _exact(entry[b"data"], np.uint8, f"{what} {name}: pixels").reshape(-1, 3, 32, 32)
        targets = _exact(entry[label_key], np.int64, f"{what} {name}: labels")
    except UnsafeFileError as error:
        raise DatasetError(f"{path}: not a {what} batch: {error}") from None
    except Exception as error:  # a corrupt pickle can raise almost anything
        raise DatasetError(f"{path}: not a {what} batch ({error})") from error
    if len(targets) != len(data) or (len(targets) and not 0 <= targets.min() <= targets.max() < num_classes):
        raise DatasetError(f"{path}: {len(data)} images and {len(targets)} labels in "
                           f"[{targets.min(initial=0)}, {targets.max(initial=0)}]; a {what} batch has one "
                           f"label in 0..{num_classes - 1} per image")
    return torch.from_numpy(data.astype(np.float32) / 255.0), torch.from_numpy(targets)


def load_cifar10(directory: str, *, val_fraction: float = 0.1, seed: int = 0) -> Splits:
    """CIFAR-10 from its python-pickle directory (data_batch_1..5, test_batch); (N, 3, 32, 32).
    5,000 of the 50,000 training images are held out for validation."""
    directory = _cifar_root(directory, "cifar-10-batches-py", "data_batch_1", "CIFAR-10")

    def batch(name):
        return _cifar_pickle(directory, name, b"labels", 10, "CIFAR-10", "cifar-10-python.tar.gz",
                             "cifar-10-batches-py")

    parts = [batch(f"data_batch_{i}") for i in range(1, 6)]
    x_train = torch.cat([p[0] for p in parts])
    y_train = torch.cat([p[1] for p in parts])
    x_test, y_test = batch("test_batch")
    return _finish("cifar10", x_train, y_train, x_test, y_test, val_fraction, seed)


def load_cifar100(directory: str, *, val_fraction: float = 0.1, seed: int = 0) -> Splits:
    """CIFAR-100 (the 100 fine labels) from its python-pickle directory (files train and test, as in
    cifar-100-python.tar.gz); (N, 3, 32, 32). 5,000 of the 50,000 training images are held out
    for validation; standardised like CIFAR-10 (the training set's mean and std)."""
    directory = _cifar_root(directory, "cifar-100-python", "train", "CIFAR-100")
    where = ("CIFAR-100", "cifar-100-python.tar.gz", "cifar-100-python")
    x_train, y_train = _cifar_pickle(directory, "train", b"fine_labels", 100, *where)
    x_test, y_test = _cifar_pickle(directory, "test", b"fine_labels", 100, *where)
    return _finish("cifar100", x_train, y_train, x_test, y_test, val_fraction, seed)


def load_digits(*, val_fraction: float = 0.15, test_fraction: float = 0.2, seed: int = 0) -> Splits:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, no download): flat (N, 64)."""
    _check_fraction("val_fraction", val_fraction, "load_digits")
    _check_fraction("test_fraction", test_fraction, "load_digits")
    if val_fraction + test_fraction >= 1:
        raise ValueError(f"load_digits: val_fraction + test_fraction must leave training images, got "
                         f"{val_fraction} + {test_fraction}")
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as error:
        raise DatasetError("the digits dataset needs scikit-learn (pip install scikit-learn)") from error
    bunch = sklearn_digits()
    x = torch.tensor(bunch.data, dtype=torch.float32) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.int64)
    generator = torch.Generator().manual_seed(1234)  # a fixed test split, whatever the seed
    order = torch.randperm(len(x), generator=generator)
    n_test = int(round(len(x) * test_fraction))
    test, rest = order[:n_test], order[n_test:]
    return _finish("digits", x[rest], y[rest], x[test], y[test], val_fraction / (1 - test_fraction), seed)


def load(name: str, data_dir: str | None = None, *, seed: int = 0, download: bool = False) -> Splits:
    """Load a dataset by name: "digits" (scikit-learn's, reads no directory), "mnist", "mnist32"
    (MNIST padded to 32x32), "cifar10", "cifar100" (their python pickles). `download` fetches
    MNIST only; the CIFAR archives must be unpacked into data_dir."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}")
    if name == "digits" and data_dir is not None:
        raise ValueError(f"load: the digits dataset comes with scikit-learn and reads no directory, "
                         f"got data_dir={data_dir!r}; pass data_dir=None (or name='mnist')")
    if download and name not in ("mnist", "mnist32"):
        raise ValueError(f"load: download=True fetches MNIST only; {name} "
                         + ("comes with scikit-learn" if name == "digits" else
                            "must be unpacked into data_dir from its python archive"))
    if name == "digits":
        return load_digits(seed=seed)
    if name in ("mnist", "mnist32"):
        return load_mnist(data_dir or "data/mnist", seed=seed, download=download,
                          pad=2 if name == "mnist32" else 0)
    if name == "cifar10":
        return load_cifar10(data_dir or "data/cifar-10-batches-py", seed=seed)
    return load_cifar100(data_dir or "data/cifar-100-python", seed=seed)
