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


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce")
    data_dir = SHARED_MNIST
    if not os.path.isdir(data_dir):
        data_dir = str(out / "mnist")
        fake_mnist(data_dir, n_train=900, n_test=200)
    result = subprocess.run([sys.executable, SCRIPT, "--data-dir", data_dir, "--smoke", "--seeds", "0", "1",
                             "--out", str(out), "--quiet"], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
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
