"""Dataset loaders: digits, MNIST IDX files (real files when present, synthetic and corrupt
copies), the md5-verified download from a file:// mirror, CIFAR-10 pickles."""
import gzip
import hashlib
import os
import pickle
import shutil
import struct

import numpy as np
import pytest
import torch

from mackay_ext import data

SHARED_MNIST = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "mnist")


def write_idx(path, array, magic):
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as handle:
        handle.write(payload)


def fake_mnist(directory, n_train=120, n_test=40, gz=True):
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(0)
    suffix = ".gz" if gz else ""
    for split, n in (("train", n_train), ("t10k", n_test)):
        write_idx(os.path.join(directory, f"{split}-images-idx3-ubyte{suffix}"),
                  rng.integers(0, 256, (n, 28, 28)), data.IDX_IMAGES_MAGIC)
        write_idx(os.path.join(directory, f"{split}-labels-idx1-ubyte{suffix}"),
                  rng.integers(0, 10, (n,)), data.IDX_LABELS_MAGIC)


def test_digits_splits():
    d = data.load("digits")
    assert d.x_train.shape[1:] == (64,) and d.num_classes == 10
    assert len(d.x_train) + len(d.x_val) + len(d.x_test) == 1797
    assert len(d.x_test) == 359 and len(d.x_val) > 0
    assert abs(float(d.x_train.mean())) < 1e-4


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx_gzip_and_raw(tmp_path, gz):
    fake_mnist(tmp_path, gz=gz)
    d = data.load_mnist(str(tmp_path), val_fraction=0.25)
    assert d.x_train.shape == (90, 1, 28, 28) and d.x_val.shape == (30, 1, 28, 28)
    assert d.x_test.shape == (40, 1, 28, 28) and d.y_test.dtype == torch.int64


@pytest.mark.skipif(not os.path.isdir(SHARED_MNIST), reason="shared MNIST files not present")
def test_real_mnist_files():
    d = data.load_mnist(SHARED_MNIST)
    assert d.x_train.shape == (55000, 1, 28, 28) and d.x_val.shape == (5000, 1, 28, 28)
    assert d.x_test.shape == (10000, 1, 28, 28)
    assert torch.bincount(d.y_test).tolist()[:3] == [980, 1135, 1032]


def test_mnist_missing_directory_and_file(tmp_path):
    with pytest.raises(data.DatasetError, match="does not exist; pass --data-dir, the directory holding"):
        data.load_mnist(str(tmp_path / "nowhere"))
    (tmp_path / "a-file.gz").write_bytes(b"")   # a new user pointed --data-dir at one of the files
    with pytest.raises(data.DatasetError, match="a-file.gz is a file, not a directory"):
        data.load_mnist(str(tmp_path / "a-file.gz"))
    os.remove(tmp_path / "a-file.gz")
    fake_mnist(tmp_path)
    os.remove(tmp_path / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(data.DatasetError, match=r"t10k-labels-idx1-ubyte\[.gz\] not found in .*--download"):
        data.load_mnist(str(tmp_path))


@pytest.mark.parametrize("damage", ["truncate", "magic", "garbage", "count"])
def test_mnist_corrupt_copy(tmp_path, damage):
    source = SHARED_MNIST if os.path.isdir(SHARED_MNIST) else None
    if source:
        shutil.copytree(source, tmp_path / "mnist")
    else:
        fake_mnist(tmp_path / "mnist")
    target = tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz"
    os.chmod(target, 0o644)
    raw = gzip.decompress(target.read_bytes())
    if damage == "truncate":
        target.write_bytes(gzip.compress(raw[: len(raw) // 2]))
        message = "truncated or corrupt"
    elif damage == "magic":
        target.write_bytes(gzip.compress(struct.pack(">I", 0x801) + raw[4:]))
        message = "magic number"
    elif damage == "garbage":
        target.write_bytes(b"this is not gzip data at all")
        message = "cannot read"
    else:  # header says fewer images than there are labels
        images = np.frombuffer(raw[16:], dtype=np.uint8).reshape(-1, 28, 28)[:-1]
        write_idx(str(target), images, data.IDX_IMAGES_MAGIC)
        message = "labels"
    with pytest.raises(data.DatasetError, match=message):
        data.load_mnist(str(tmp_path / "mnist"))


def test_md5_check(tmp_path):
    fake_mnist(tmp_path)
    with pytest.raises(data.DatasetError, match="md5"):
        data.load_mnist(str(tmp_path), md5={"train-images-idx3-ubyte.gz": "0" * 32})


def test_download_from_file_mirror(tmp_path):
    mirror = tmp_path / "mirror"
    fake_mnist(mirror)
    md5s = {name: hashlib.md5((mirror / name).read_bytes()).hexdigest() for name in data.MNIST_MD5}
    target = tmp_path / "downloaded"
    data.download_mnist(str(target), mirrors=("file:///nonexistent/", mirror.as_uri() + "/"), md5s=md5s)
    assert sorted(os.listdir(target)) == sorted(md5s)
    assert len(data.load_mnist(str(target)).x_test) == 40
    bad = dict(md5s, **{"t10k-labels-idx1-ubyte.gz": "f" * 32})
    with pytest.raises(data.DatasetError, match="md5 mismatch"):
        data.download_mnist(str(tmp_path / "other"), mirrors=(mirror.as_uri() + "/",), md5s=bad)
    assert not (tmp_path / "other" / "t10k-labels-idx1-ubyte.gz").exists()


def test_cifar10_pickles(tmp_path):
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(tmp_path / name, "wb") as handle:
            pickle.dump({b"data": rng.integers(0, 256, (20, 3072), dtype=np.uint8),
                         b"labels": rng.integers(0, 10, 20).tolist()}, handle)
    d = data.load_cifar10(str(tmp_path))
    assert d.x_train.shape == (90, 3, 32, 32) and d.x_test.shape == (20, 3, 32, 32)
    (tmp_path / "test_batch").write_bytes(b"junk")
    with pytest.raises(data.DatasetError, match="not a CIFAR-10 batch"):
        data.load_cifar10(str(tmp_path))
    with pytest.raises(data.DatasetError, match="not found"):
        data.load_cifar10(str(tmp_path / "missing"))


@pytest.mark.parametrize("bad, message", [
    ({b"data": np.full((20, 3072), 300), b"labels": [0] * 20}, "pixels are not all uint8 values"),
    ({b"data": np.zeros((20, 3072), np.uint8), b"labels": [2.7] * 20}, "labels are not all int64 values"),
])
def test_cifar_values_a_cast_would_change_are_refused(tmp_path, bad, message):
    """A pixel of 300 used to wrap to 44 and a label of 2.7 to become 2, silently."""
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(tmp_path / name, "wb") as handle:
            pickle.dump(bad, handle)
    with pytest.raises(data.DatasetError, match=message):
        data.load_cifar10(str(tmp_path))


def test_idx_files_cut_inside_the_header_or_without_examples_are_named(tmp_path):
    fake_mnist(tmp_path, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    header = path.read_bytes()[:16]
    path.write_bytes(header[:12])
    with pytest.raises(data.DatasetError, match="12 bytes, but an IDX header of 3 dimensions takes 16"):
        data.load_mnist(str(tmp_path))
    path.write_bytes(header[:4] + struct.pack(">3I", 0, 28, 28))
    with pytest.raises(data.DatasetError, match=r"holds no examples \(header \(0, 28, 28\)\)"):
        data.load_mnist(str(tmp_path))


@pytest.mark.parametrize("load, kwargs, message", [
    ("digits", {"val_fraction": -0.2}, "load_digits: val_fraction must be a number in \\[0, 1\\), got -0.2"),
    ("digits", {"test_fraction": 1.0}, "load_digits: test_fraction must be a number in \\[0, 1\\), got 1.0"),
    ("digits", {"val_fraction": 0.5, "test_fraction": 0.5}, "val_fraction \\+ test_fraction must leave"),
    ("mnist", {"val_fraction": 1.0}, "load_mnist: val_fraction must be a number in \\[0, 1\\)"),
    ("mnist", {"pad": -1}, "load_mnist: pad must be an integer >= 0"),
])
def test_split_fractions_and_pad_are_checked(tmp_path, load, kwargs, message):
    """A negative fraction put most of the training set into validation, a whole one left none to
    train on (NaN after standardising), and a negative pad cropped the images: each is named."""
    fake_mnist(tmp_path)
    with pytest.raises(ValueError, match=message):
        if load == "digits":
            data.load_digits(**kwargs)
        else:
            data.load_mnist(str(tmp_path), **kwargs)


def test_num_classes_counts_every_split():
    """The CLI sizes the output layer from num_classes: a class only the test split has still
    needs its logit (training labels 0-2 and test labels 0-9 gave an IndexError at evaluation)."""
    y = torch.tensor([0, 1, 2, 1])
    splits = data.Splits(torch.zeros(4, 3), y, torch.zeros(2, 3), y[:2], torch.zeros(2, 3),
                         torch.tensor([9, 0]), "odd")
    assert splits.num_classes == 10


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset"):
        data.load("imagenet")


def test_random_shift_moves_each_image_by_its_own_offset():
    generator = torch.Generator().manual_seed(3)
    images = torch.randn(64, 2, 7, 5, dtype=torch.float64)
    shifted = data.random_shift(images, 2, fill=-9.0, generator=generator)
    assert shifted.shape == images.shape and shifted.dtype == images.dtype
    offsets = set()
    for image, moved in zip(images, shifted):
        # the only offset that explains `moved`: pad with the fill, then crop
        matches = []
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                padded = torch.nn.functional.pad(image, (2, 2, 2, 2), value=-9.0)
                crop = padded[:, 2 + dy:2 + dy + 7, 2 + dx:2 + dx + 5]
                if torch.equal(crop, moved):
                    matches.append((dy, dx))
        assert len(matches) == 1
        offsets.add(matches[0])
    assert len(offsets) > 10  # offsets differ between images


def test_random_shift_default_fill_is_the_background_and_seeded():
    # every image and channel has its own background level and a bright 2x2 "digit"
    background = -torch.arange(16, dtype=torch.float64).reshape(8, 2, 1, 1) - 1
    images = background.expand(8, 2, 6, 6).clone()
    images[:, :, 2:4, 2:4] = 3.0
    a = data.random_shift(images, 2, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(99)  # the global RNG plays no part
    b = data.random_shift(images, 2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    for image, shifted, level in zip(images, a, background):
        for channel in range(2):  # the border takes that channel's own minimum
            assert set(shifted[channel].unique().tolist()) == {float(level[channel]), 3.0}
    assert torch.equal(a.sum(dim=(2, 3)), images.sum(dim=(2, 3)))  # the digit stays whole
    assert torch.equal(data.random_shift(images, 0), images)
    assert data.random_shift(images[:0], 2).shape == (0, 2, 6, 6)


@pytest.mark.parametrize("bad, message", [(dict(images=torch.zeros(3, 28, 28)), "images must be"),
                                          (dict(max_shift=-1), "max_shift"),
                                          (dict(max_shift=1.5), "max_shift")])
def test_random_shift_rejects_bad_arguments(bad, message):
    arguments = dict(images=torch.zeros(2, 1, 4, 4), max_shift=1) | bad
    with pytest.raises(ValueError, match=message):
        data.random_shift(**arguments)
