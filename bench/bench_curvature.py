"""Cost of the exact diagonal curvature relative to a plain forward+backward, one process:
mackay_ext's FisherAccumulator (ef-exact, fisher-mc; compiled and torch backends), per-example
gradients by torch.func (vmap(grad)), and BackPACK's SumGradSquared / DiagGGNMC when
backpack-for-pytorch is installed (pip install backpack-for-pytorch; benchmark only).

Run:  pytest bench/bench_curvature.py --benchmark-only
Targets (issue 4), 2-core CPU, LeNet-300-100 at batch 128: ef-exact <= 1.6x a plain
forward+backward, >= 3x faster than torch.func, not slower than BackPACK.
"""
import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from conftest import DEVICES, best_seconds, synchronize
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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("model_name", list(MODELS))
def test_curvature_overhead(benchmark, record, device, model_name, implementation):
    if implementation.startswith("backpack") and backpack is None:
        pytest.skip("backpack-for-pytorch is not installed")
    torch.manual_seed(0)
    model = models.create(model_name).to(device)
    x = torch.randn(BATCH, *MODELS[model_name], device=device)
    y = torch.randint(0, 10, (BATCH,), device=device)
    loss_fn = nn.CrossEntropyLoss()

    if implementation in ("plain", "ef-exact", "ef-exact (torch)"):
        if implementation != "plain":
            FisherAccumulator(model, backend="torch" if "torch" in implementation else "ext")

        def run():
            model.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            synchronize(device)
    elif implementation == "fisher-mc":
        accumulator = FisherAccumulator(model, mode="fisher-mc")

        def run():  # the training step's own backward, plus the sampled-label one
            model.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            accumulator.accumulate_mc(x)
            synchronize(device)
    elif implementation == "torch.func":
        params = {k: v.detach() for k, v in model.named_parameters()}

        def one(p, xi, yi):
            return loss_fn(functional_call(model, p, (xi[None],)), yi[None])

        per_example = vmap(grad(one), in_dims=(None, 0, 0))

        def run():
            model.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()       # the training gradient
            sums = {k: (g ** 2).sum(0) for k, g in per_example(params, x, y).items()}
            synchronize(device)
            return sums
    else:
        extended = backpack.extend(copy.deepcopy(model))
        extended_loss = backpack.extend(nn.CrossEntropyLoss())
        extension = SumGradSquared() if "SumGrad" in implementation else DiagGGNMC()

        def run():
            extended.zero_grad(set_to_none=True)
            with backpack.backpack(extension):
                extended_loss(extended(x), y).backward()
            synchronize(device)

    rounds = 20 if device == "cpu" else 100
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=2)
    record("curvature", f"{device} {model_name} batch {BATCH}", implementation,
           best_seconds(benchmark), baseline="plain")
