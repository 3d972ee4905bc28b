"""Cost of the exact diagonal curvature relative to a plain forward+backward, one process:
mackay_ext's FisherAccumulator (ef-exact, fisher-mc; compiled and torch backends), per-example
gradients by torch.func (vmap(grad)), and BackPACK's SumGradSquared / DiagGGNMC when
backpack-for-pytorch is installed (pip install backpack-for-pytorch; benchmark only).

Run:  pytest bench/bench_curvature.py --benchmark-only
All implementations of a model are timed round-robin in one loop (conftest.interleaved), so a
drift in the machine's speed cannot favour one of them.
Targets (issue 4), 2-core CPU, LeNet-300-100 at batch 128: ef-exact <= 1.6x a plain
forward+backward, >= 3x faster than torch.func, not slower than BackPACK.
"""
import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from conftest import DEVICES, interleaved
from mackay_ext import models
from mackay_ext.curvature import FisherAccumulator

try:
    import backpack
    from backpack.extensions import DiagGGNMC, SumGradSquared
except ImportError:
    backpack = None

MODELS = {"lenet-300-100": (1, 28, 28), "lenet-5-caffe": (1, 28, 28)}
IMPLEMENTATIONS = ["plain", "ef-exact", "ef-exact (torch)", "fisher-mc", "torch.func",
                   "backpack SumGradSquared", "backpack DiagGGNMC"]
BATCH = 128


def make_step(implementation, model, x, y, device):
    """A training step that also produces the curvature `implementation` estimates."""
    loss_fn = nn.CrossEntropyLoss()
    model = copy.deepcopy(model)
    if implementation in ("plain", "ef-exact", "ef-exact (torch)"):
        if implementation != "plain":
            FisherAccumulator(model, backend="torch" if "torch" in implementation else "ext")

        def step():
            model.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
        return step
    if implementation == "fisher-mc":
        accumulator = FisherAccumulator(model, mode="fisher-mc")

        def step():  # the training step's own backward, plus the sampled-label one
            model.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            accumulator.accumulate_mc(x)
        return step
    if implementation == "torch.func":
        params = {k: v.detach() for k, v in model.named_parameters()}
        per_example = vmap(grad(lambda p, xi, yi: loss_fn(functional_call(model, p, (xi[None],)), yi[None])),
                           in_dims=(None, 0, 0))

        def step():
            model.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()  # the training gradient
            return {k: (g ** 2).sum(0) for k, g in per_example(params, x, y).items()}
        return step
    extended = backpack.extend(model)
    extended_loss = backpack.extend(nn.CrossEntropyLoss())
    extension = SumGradSquared() if "SumGrad" in implementation else DiagGGNMC()

    def step():
        extended.zero_grad(set_to_none=True)
        with backpack.backpack(extension):
            extended_loss(extended(x), y).backward()
    return step


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("model_name", list(MODELS))
def test_curvature_overhead(benchmark, record, device, model_name):
    torch.manual_seed(0)
    model = models.create(model_name).to(device)
    x = torch.randn(BATCH, *MODELS[model_name], device=device)
    y = torch.randint(0, 10, (BATCH,), device=device)
    names = [n for n in IMPLEMENTATIONS if backpack is not None or not n.startswith("backpack")]
    steps = {name: make_step(name, model, x, y, device) for name in names}
    best = interleaved(benchmark, steps, rounds=30 if device == "cpu" else 100, device=device)
    for name, seconds in best.items():
        record("curvature", f"{device} {model_name} batch {BATCH}", name, seconds, baseline="plain")
