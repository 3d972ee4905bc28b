"""mackay_update_: compiled kernel against the pure-PyTorch fallback, same process, same data.

Run:  pytest bench/bench_mackay_update.py --benchmark-only
Target (issue 2): at 16M float32 elements, per-weight alpha, rule "mackay", the extension is at
least 3x faster than the fallback on a 2-core CPU.
"""
import pytest
import torch

from mackay_ext import ops, reference
from conftest import DEVICES, best_seconds, synchronize

SIZES = {"1M": (1024, 1024), "16M": (4096, 4096)}
GROUPS = {"per-weight": lambda rows, cols: (rows, cols), "per-row": lambda rows, cols: (rows, 1)}
IMPLEMENTATIONS = {
    "ext": ops.mackay_update_,
    "torch": reference.mackay_update_,
}


def make_inputs(shape, alpha_shape, device):
    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(shape, generator=generator) * 0.05).to(device)
    curvature = (torch.rand(shape, generator=generator) * 1e-3).to(device)
    alpha = (torch.rand(alpha_shape, generator=generator) * 100).to(device)
    return weight, curvature, alpha


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("groups", list(GROUPS))
@pytest.mark.parametrize("size", list(SIZES))
def test_mackay_update(benchmark, record, device, size, groups, implementation):
    rows, cols = SIZES[size]
    weight0, curvature, alpha0 = make_inputs((rows, cols), GROUPS[groups](rows, cols), device)
    weight, alpha = weight0.clone(), alpha0.clone()
    update = IMPLEMENTATIONS[implementation]

    def reset():  # every round starts from the same state (pruning would make later rounds cheaper)
        weight.copy_(weight0)
        alpha.copy_(alpha0)
        synchronize(device)

    def run():
        update(weight, curvature, alpha, num_data=60000.0, rule="mackay", prune="alpha")
        synchronize(device)

    rounds = 10 if device == "cpu" and size == "16M" else 30
    benchmark.pedantic(run, setup=reset, rounds=rounds, iterations=1, warmup_rounds=1)
    record("mackay_update", f"{device} {size} {groups}", implementation, best_seconds(benchmark),
           baseline="ext")
