"""adam_proximal_prior_ (the ARD prior's step after a torch Adam step, the callbacks' path): the
compiled pass against the torch ops it replaces (mackay_ext.reference, the same math the pruner
used before), same process, same data; "copy" is one read and one write of the weight, the
floor of any in-place pass.

Run:  pytest bench/bench_adam_prior.py --benchmark-only
Writes bench/results/adam_prior.md. The pruner's own use of it is timed in a whole training step
by bench/bench_training.py ("adam + pruner").
"""
import math

import pytest
import torch

from mackay_ext import ops, reference
from conftest import DEVICES, best_seconds, synchronize

SIZES = {"lenet 300x784": (300, 784), "1M": (1024, 1024), "16M": (4096, 4096)}
GROUPS = {"per-weight": lambda rows, cols: (rows, cols), "per-input": lambda rows, cols: (1, cols)}
HYPER = dict(beta2=0.999, eps=1e-8, scale=1e-3 / 60000)


def make_inputs(shape, alpha_shape, device):
    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(shape, generator=generator) * 0.05).to(device)
    v = (torch.rand(shape, generator=generator) * 1e-6).to(device)
    alpha = (torch.rand(alpha_shape, generator=generator) * 100).to(device)
    alpha.view(-1)[::10] = math.inf   # a tenth pruned
    return weight, v, alpha


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("implementation", ["ext", "torch", "copy"])
@pytest.mark.parametrize("groups", list(GROUPS))
@pytest.mark.parametrize("size", list(SIZES))
def test_adam_prior(benchmark, record, device, size, groups, implementation):
    rows, cols = SIZES[size]
    weight0, v, alpha = make_inputs((rows, cols), GROUPS[groups](rows, cols), device)
    weight, source = weight0.clone(), weight0.clone()
    step = torch.tensor(100.0, device=device)

    def reset():
        weight.copy_(weight0)
        synchronize(device)

    def run():
        if implementation == "ext":
            ops.adam_proximal_prior_(weight, v, alpha, step, **HYPER)
        elif implementation == "torch":
            reference.adam_proximal_prior_(weight, v, alpha, step, **HYPER)
        else:
            weight.copy_(source)
        synchronize(device)

    rounds = 10 if device == "cpu" and size == "16M" else 40
    benchmark.pedantic(run, setup=reset, rounds=rounds, iterations=1, warmup_rounds=2)
    record("adam_prior", f"{device} {size} {groups}", implementation, best_seconds(benchmark), baseline="ext")
