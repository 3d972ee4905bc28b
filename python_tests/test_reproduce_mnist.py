"""bench/reproduce_mnist.py, the smoke version: every row of the table is produced from a tiny
subset (the real MNIST files when present, synthetic IDX files otherwise) and the JSON/markdown
have the promised shape. The figures of a smoke run mean nothing; the full run is in bench/results."""
import json
import os
import subprocess
import sys

import pytest

from test_data import SHARED_MNIST, fake_mnist

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "bench", "reproduce_mnist.py")
METHODS = {"dense", "mackay-weight", "mackay-group", "paper", "magnitude (global L1)"}


def run_script(out, *args):
    data_dir = SHARED_MNIST
    if not os.path.isdir(data_dir):
        data_dir = str(out / "mnist")
        if not os.path.isdir(data_dir):
            fake_mnist(data_dir, n_train=900, n_test=200)
    result = subprocess.run([sys.executable, SCRIPT, "--data-dir", data_dir, "--smoke", "--out", str(out),
                             "--quiet", *args], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce")
    run_script(out, "--seeds", "0", "1")
    return out


def test_rows_for_every_model_and_method(smoke):
    rows = json.loads((smoke / "mnist_smoke.json").read_text())
    for model in ("lenet-300-100", "lenet-5-caffe"):
        measured = {r["method"]: r for r in rows if r["model"] == model and r["source"] == "measured"}
        assert set(measured) == METHODS
        for row in measured.values():
            assert row["seeds"] == [0, 1]
            assert 0 <= row["test_error"] <= 100 and 0 <= row["weights_kept"] <= 100
            for seed_row in row["per_seed"]:
                assert sum(layer["kept"] for layer in seed_row["layers"]) == seed_row["kept"]
                assert seed_row["compression"] == seed_row["total"] / max(seed_row["kept"], 1)
            assert row["compression"] == pytest.approx(
                sum(r["compression"] for r in row["per_seed"]) / 2)
            assert row["wall_seconds"] > 0
            assert row["augment_shift"] == 2  # every measured row trains on shifted images
        assert measured["dense"]["weights_kept"] == 100
        # the magnitude baseline is pruned to the sparsity of the MacKay row of the same seed
        for mackay, magnitude in zip(measured["mackay-weight"]["per_seed"],
                                     measured["magnitude (global L1)"]["per_seed"]):
            assert magnitude["kept"] == mackay["kept"]
        published = [r for r in rows if r["model"] == model and r["source"] != "measured"]
        assert any("Molchanov" in r["source"] for r in published)
        assert all({"test_error", "weights_kept", "compression"} <= set(r) for r in published)


def test_markdown_table(smoke):
    text = (smoke / "mnist_smoke.md").read_text()
    assert "Smoke run" in text and "| model | method | test error %" in text
    assert text.count("| lenet-5-caffe |") == 5 + 4  # measured and published rows
    assert "Hardware:" in text
    assert "random offset of up to ±2 pixels" in text


def test_rows_of_other_models_kept_only_with_the_same_augmentation(smoke, tmp_path):
    dense = next(r for r in json.loads((smoke / "mnist_smoke.json").read_text())
                 if r["model"] == "lenet-5-caffe" and r["method"] == "dense")
    earlier = [dict(dense, method=method, augment_shift=shift)
               for method, shift in (("same shift", 2), ("no shift", 0))]
    (tmp_path / "mnist_smoke.json").write_text(json.dumps(earlier))
    run_script(tmp_path, "--models", "lenet-300-100", "--seeds", "0")
    rows = json.loads((tmp_path / "mnist_smoke.json").read_text())
    lenet5 = {r["method"] for r in rows if r["model"] == "lenet-5-caffe" and r["source"] == "measured"}
    assert lenet5 == {"same shift"}
    assert any(r["model"] == "lenet-5-caffe" and "Molchanov" in r["source"] for r in rows)
    assert {r["method"] for r in rows if r["model"] == "lenet-300-100" and r["source"] == "measured"} == METHODS
