"""The CIFAR-10 / CIFAR-100 python-pickle loaders: tiny pickles written here in the official layout
(dicts of b"data" (N, 3072) uint8 and label lists), read back and compared with the raw arrays."""
import os
import pickle

import numpy as np
import pytest
import torch

from mackay_ext import data


def write_pickle(path, images, labels: dict):
    with open(path, "wb") as handle:
        pickle.dump({b"data": images, **{key: list(map(int, value)) for key, value in labels.items()}}, handle)


def fake_cifar100(directory, n_train=40, n_test=12, seed=0):
    """Raw arrays (train images, fine labels, test images, fine labels) written as cifar-100-python."""
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    arrays = []
    for name, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = rng.integers(0, 100, n)
        coarse = (fine + 7) % 20   # a different key with different values: the loader must pick fine
        write_pickle(os.path.join(directory, name), images, {b"fine_labels": fine, b"coarse_labels": coarse})
        arrays += [images, fine]
    return arrays


def unstandardise(splits, raw_test):
    """The affine map the loader applied, recovered from the test set, applied back to every split."""
    flat = splits.x_test.reshape(-1).double()
    raw = torch.from_numpy(raw_test.reshape(-1).astype(np.float64) / 255)
    scale = (raw[1] - raw[0]) / (flat[1] - flat[0])
    shift = raw[0] - scale * flat[0]
    return [(t.double() * scale + shift) for t in (splits.x_train, splits.x_val, splits.x_test)]


def test_cifar100_round_trip(tmp_path):
    x_train_raw, y_train_raw, x_test_raw, y_test_raw = fake_cifar100(tmp_path / "cifar-100-python")
    splits = data.load_cifar100(str(tmp_path / "cifar-100-python"))
    assert splits.name == "cifar100"
    assert splits.x_train.shape == (36, 3, 32, 32) and splits.x_val.shape == (4, 3, 32, 32)
    assert splits.x_test.shape == (12, 3, 32, 32)
    # standardised with the training part's statistics
    assert float(splits.x_train.mean()) == pytest.approx(0, abs=1e-5)
    assert float(splits.x_train.std()) == pytest.approx(1, abs=1e-5)
    train, val, test = unstandardise(splits, x_test_raw)
    expected_test = torch.from_numpy(x_test_raw.astype(np.float64) / 255).reshape(-1, 3, 32, 32)
    torch.testing.assert_close(test, expected_test, atol=1e-5, rtol=0)
    assert splits.y_test.tolist() == y_test_raw.tolist()
    # train + val hold every training image once, each with its fine label
    seen = {tuple(np.round(x.reshape(-1).numpy() * 255).astype(int)): int(y)
            for x, y in zip(torch.cat([train, val]), torch.cat([splits.y_train, splits.y_val]))}
    assert seen == {tuple(x.astype(int)): int(y) for x, y in zip(x_train_raw, y_train_raw)}


def test_a_subset_missing_classes_keeps_the_datasets_class_count(tmp_path):
    """Labels that stop at 89 (a subset, a test folder) still make a 100-class CIFAR-100: a model
    built from num_classes must have the dataset's outputs, not the subset's."""
    rng = np.random.default_rng(0)
    for name, n in (("train", 30), ("test", 10)):
        write_pickle(tmp_path / name, rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                     {b"fine_labels": rng.integers(0, 90, n)})
    splits = data.load_cifar100(str(tmp_path))
    assert int(splits.y_train.max()) < 90 and splits.num_classes == 100
    hand_built = data.Splits(splits.x_train, splits.y_train, splits.x_val, splits.y_val,
                             splits.x_test, splits.y_test, "mine")
    assert hand_built.num_classes == 1 + max(int(y.max()) for y in (splits.y_train, splits.y_val, splits.y_test))


def test_load_by_name_reads_cifar100(tmp_path):
    """data.load / the CLI's --dataset take "cifar100" like "cifar10" (it had only a loader function)."""
    _, _, _, y_test_raw = fake_cifar100(tmp_path / "cifar-100-python")
    splits = data.load("cifar100", str(tmp_path))
    assert splits.name == "cifar100" and splits.y_test.tolist() == y_test_raw.tolist()
    assert "cifar100" in data.DATASETS


@pytest.mark.parametrize("name, kwargs, message", [
    ("digits", dict(data_dir="data/mnist"), "the digits dataset comes with scikit-learn and reads no directory, "
                                            "got data_dir='data/mnist'"),
    ("cifar10", dict(download=True), "download=True fetches MNIST only; cifar10 must be unpacked"),
    ("cifar100", dict(download=True), "download=True fetches MNIST only; cifar100 must be unpacked"),
    ("digits", dict(download=True), "download=True fetches MNIST only; digits comes with scikit-learn"),
    ("svhn", {}, "unknown dataset 'svhn'; choose one of"),
])
def test_load_refuses_arguments_it_would_ignore(name, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        data.load(name, **kwargs)


def test_parent_directory_is_accepted(tmp_path):
    fake_cifar100(tmp_path / "cifar-100-python")
    assert len(data.load_cifar100(str(tmp_path)).x_test) == 12
    rng = np.random.default_rng(1)
    inner = tmp_path / "cifar-10-batches-py"
    inner.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        write_pickle(inner / name, rng.integers(0, 256, (10, 3072), dtype=np.uint8),
                     {b"labels": rng.integers(0, 10, 10)})
    assert data.load_cifar10(str(tmp_path)).x_train.shape == (45, 3, 32, 32)


def test_missing_directory_names_it(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(data.DatasetError, match=f"CIFAR-100 directory {missing} not found"):
        data.load_cifar100(str(missing))
    with pytest.raises(data.DatasetError, match=f"CIFAR-10 directory {missing} not found"):
        data.load_cifar10(str(missing))


def test_missing_file_names_it(tmp_path):
    fake_cifar100(tmp_path)
    os.remove(tmp_path / "test")
    with pytest.raises(data.DatasetError, match="CIFAR-100 file test not found in .*cifar-100-python.tar.gz"):
        data.load_cifar100(str(tmp_path))


@pytest.mark.parametrize("fault", ["junk", "labels out of range", "fewer labels", "coarse only"])
def test_bad_pickles(tmp_path, fault):
    fake_cifar100(tmp_path)
    images = np.zeros((4, 3072), dtype=np.uint8)
    if fault == "junk":
        (tmp_path / "train").write_bytes(b"not a pickle")
        match = "train: not a CIFAR-100 batch"
    elif fault == "labels out of range":
        write_pickle(tmp_path / "train", images, {b"fine_labels": [0, 1, 100, 2]})
        match = r"labels in \[0, 100\]; a CIFAR-100 batch has one label in 0..99"
    elif fault == "fewer labels":
        write_pickle(tmp_path / "train", images, {b"fine_labels": [0, 1, 2]})
        match = "4 images and 3 labels"
    else:
        write_pickle(tmp_path / "train", images, {b"coarse_labels": [0, 1, 2, 3]})
        match = "not a CIFAR-100 batch .*fine_labels"
    with pytest.raises(data.DatasetError, match=match):
        data.load_cifar100(str(tmp_path))


class RunsCode:
    """What a crafted pickle holds: unpickling it calls os.system (here, a harmless touch)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("where", ["data", "labels", "object-array"])
def test_a_crafted_batch_runs_no_code(tmp_path, where):
    """The batches are read by an unpickler that builds plain data and numpy arrays only: a
    pickle naming any other global is refused before anything in it is called."""
    marker = tmp_path / "ran"
    directory = tmp_path / "cifar-10-batches-py"
    directory.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 3]}
        if where == "data":
            entry[b"data"] = RunsCode(marker)
        elif where == "labels":
            entry[b"labels"] = [0, RunsCode(marker), 2, 3]
        else:
            entry[b"labels"] = np.array([0, RunsCode(marker), 2, 3], dtype=object)
        with open(directory / name, "wb") as handle:
            pickle.dump(entry, handle)
    with pytest.raises(data.DatasetError, match="posix.system|os.system") as error:
        data.load_cifar10(str(directory))
    assert "nothing in it was run" in str(error.value)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_batches_of_any_pickle_protocol_load(tmp_path, protocol):
    """The official files were written by Python 2's pickle (protocol 2), numpy arrays inside."""
    directory = tmp_path / "cifar-10-batches-py"
    directory.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {b"batch_label": b"x", b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, 4).tolist(), b"filenames": [b"a.png"] * 4}
        with open(directory / name, "wb") as handle:
            pickle.dump(entry, handle, protocol=protocol)
    assert data.load_cifar10(str(directory)).x_test.shape == (4, 3, 32, 32)
