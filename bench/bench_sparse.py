"""Masked sparse matmul: csr_linear (compiled) against dense F.linear, torch.sparse CSR
(torch.sparse.mm) and the pure-PyTorch fallback, same weights, same process.

Run:  pytest bench/bench_sparse.py --benchmark-only
Targets (issue 5), 4096x4096 on a 2-core CPU: forward at 5% density and batch 256 >= 1.5x faster
than torch.sparse and >= 4x faster than dense; forward at 2% and batch 1 at least as fast as
torch.sparse; forward+backward at 5% and batch 256 >= 3x faster than dense forward+backward.
The session also writes the dense/CSR crossover density per shape and batch
(bench/results/sparse_crossover.md), which mackay_ext.sparse.CROSSOVER encodes.
"""
import warnings

import pytest
import torch
from torch.nn import functional as F

from conftest import DEVICES, _TABLES, best_seconds, synchronize
from mackay_ext import reference
from mackay_ext.csr import csr_linear, transpose_index

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")

SHAPES = {"lenet 300x784": (300, 784), "lenet 100x300": (100, 300), "4096x4096": (4096, 4096)}
DENSITIES = [0.5, 0.25, 0.1, 0.05, 0.02, 0.01]
BATCHES = [1, 256]
IMPLEMENTATIONS = ["ext", "dense", "torch.sparse", "fallback"]


def make_layer(shape, density, batch, device):
    generator = torch.Generator().manual_seed(0)
    out, inp = shape
    mask = torch.rand(out, inp, generator=generator) < density
    weight = (torch.randn(out, inp, generator=generator) * mask).to(device)
    csr = weight.to_sparse_csr()
    crow, col = csr.crow_indices().to(torch.int32), csr.col_indices().to(torch.int32)
    values = csr.values().clone()
    x = torch.randn(batch, inp, generator=generator).to(device)
    bias = torch.zeros(out, device=device)
    return weight, crow, col, values, x, bias


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_sparse_linear(benchmark, record, device, shape, density, batch, mode, implementation):
    weight, crow, col, values, x, bias = make_layer(SHAPES[shape], density, batch, device)
    backward = mode == "forward+backward"
    in_features = x.shape[1]
    if implementation == "ext":
        transposed = transpose_index(crow, col, in_features)
        values = values.requires_grad_(backward)

        def forward():
            return csr_linear(x, crow, col, values, bias, transposed=transposed, check_indices=False)
    elif implementation == "dense":
        weight = weight.requires_grad_(backward)

        def forward():
            return F.linear(x, weight, bias)
    elif implementation == "torch.sparse":
        w_csr = torch.sparse_csr_tensor(crow.long(), col.long(), values.clone(), weight.shape,
                                        requires_grad=backward)

        def forward():
            return torch.sparse.mm(w_csr, x.t()).t() + bias
    else:
        values = values.requires_grad_(backward)

        def forward():
            return reference.csr_linear(x, crow, col, values, bias)

    x.requires_grad_(backward)

    def run():
        y = forward()
        if backward:
            y.backward(torch.ones_like(y))
        synchronize(device)

    big = shape == "4096x4096"
    rounds = (5 if big else 30) if device == "cpu" else 50
    if implementation == "fallback" and big:
        rounds = 3
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1)
    record("sparse_linear", f"{device} {shape} d={density:.2f} B={batch} {mode}", implementation,
           best_seconds(benchmark), baseline="ext")


@pytest.fixture(scope="module", autouse=True)
def crossover_table():
    """After the module: for each shape, batch and mode, the highest density at which the CSR
    kernel still beats dense GEMM (the crossover), recorded as its own table."""
    yield
    rows = _TABLES.get("sparse_linear", {}).get("rows", {})
    found = {}
    for key, times in rows.items():
        device, *shape_words, density, batch, mode = key.split(" ")
        if "ext" in times and "dense" in times:
            name = (device, " ".join(shape_words), batch, mode)
            d = float(density[2:])
            if times["ext"] < times["dense"]:
                found[name] = max(found.get(name, 0.0), d)
            else:
                found.setdefault(name, 0.0)
    table = _TABLES["sparse_crossover"]
    for (device, shape, batch, mode), density in found.items():
        table["rows"][f"{device} {shape} {batch} {mode}"]["sparse wins up to density"] = density
