"""One optimizer step: MacKayAdam (compiled), its foreach fallback, torch.optim.Adam(fused=True)
and Adam(foreach=True), same parameters, same process.

Run:  pytest bench/bench_optim.py --benchmark-only
The implementations are timed round-robin in one loop (conftest.interleaved).
Targets (issue 3): 2-core CPU at 16M: ext >= 4x faster than the fallback and <= 1.5x the time
of fused Adam; H100/H200: effective bandwidth >= 75% of a device-to-device copy (same run).
Effective bandwidth counts 40 B/param for the MacKay step with per-weight alpha and curvature
(read w g m v h alpha, write w m v h) and 28 B/param for plain Adam, in float32; in bfloat16
(row "... bfloat16": parameters, gradients and moments in bfloat16, alpha and the curvature
float32) 26 and 14 B/param; in float16 the moments are float32 too (34 B/param).
Table optimizer_overhead: the same 100-tensor list with 16 values a tensor, where a step is all
host work (Python, the op's argument checks, launches); "+ OneCycleLR": a scheduler changing lr
and betas after every step, as per-step schedules do.
"""
import pytest
import torch

from mackay_ext.optim import MacKayAdam
from conftest import DEVICES, interleaved

SIZES = {"1M": 1 << 20, "16M": 1 << 24, "64M": 1 << 26}
NUM_WEIGHTS, BIAS_SIZE = 50, 1024  # ~100 tensors: 50 weight matrices and 50 bias vectors
IMPLEMENTATIONS = ["ext", "torch", "adam-fused", "adam-foreach", "copy"]


def make_params(total, device, dtype=torch.float32):
    """50 weights sharing `total` minus the biases, and 50 biases (a model-like list)."""
    per_weight = (total - NUM_WEIGHTS * BIAS_SIZE) // NUM_WEIGHTS
    cols = 512
    weights = [torch.nn.Parameter(torch.randn(per_weight // cols, cols, device=device, dtype=dtype) * 0.02)
               for _ in range(NUM_WEIGHTS)]
    biases = [torch.nn.Parameter(torch.zeros(BIAS_SIZE, device=device, dtype=dtype)) for _ in range(NUM_WEIGHTS)]
    for p in weights + biases:
        p.grad = torch.randn_like(p) * 1e-3
    return weights, biases


def make_optimizer(name, weights, biases):
    if name in ("ext", "torch"):
        optimizer = MacKayAdam([{"params": weights}, {"params": biases, "ard": False}], lr=1e-4,
                               num_data=60000, batch_size=128, backend=name)
        for w in weights:  # per-weight precisions, 1% already pruned
            alpha = optimizer.ard_state(w)["alpha"]
            alpha.uniform_(0.0, 100.0)
            alpha.view(-1)[::100] = float("inf")
        return optimizer
    fused = name == "adam-fused"
    return torch.optim.Adam(weights + biases, lr=1e-4, fused=fused, foreach=not fused)


def bytes_moved(name, weights, biases):
    ard = sum(w.numel() for w in weights)
    plain = sum(b.numel() for b in biases)
    size = weights[0].element_size()   # alpha stays float32: 4 B
    if name == "copy":
        return 2 * size * (ard + plain)
    if name not in ("ext", "torch"):
        return 7 * size * (ard + plain)
    # weight read and written, gradient read, the curvature read and written (float32 for a
    # bfloat16 or float16 weight); exp_avg and exp_avg_sq read and written, in float32 for a
    # float16 weight (mackay_ext._follow)
    half = weights[0].dtype in (torch.bfloat16, torch.float16)
    moment = 4 if weights[0].dtype == torch.float16 else size
    curvature = 4 if half else size
    return (3 * size + 2 * curvature + 4 * moment + 4) * ard + (3 * size + 4 * moment) * plain


def make_step(implementation, total, device, dtype=torch.float32):
    weights, biases = make_params(total, device, dtype)
    if implementation == "copy":  # the memory system's ceiling: read 4 B + write 4 B per param
        flat = torch.cat([p.detach().reshape(-1) for p in weights + biases])
        target = torch.empty_like(flat)
        return (lambda: target.copy_(flat)), bytes_moved(implementation, weights, biases)
    optimizer = make_optimizer(implementation, weights, biases)
    optimizer.step()  # state creation stays out of the timing
    return optimizer.step, bytes_moved(implementation, weights, biases)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size", list(SIZES))
def test_optimizer_step(benchmark, record, device, size):
    steps, moved = {}, {}
    for name in IMPLEMENTATIONS:
        steps[name], moved[name] = make_step(name, SIZES[size], device)
    rounds = {"1M": 30, "16M": 10, "64M": 4}[size] if device == "cpu" else 50
    best = interleaved(benchmark, steps, rounds=rounds, device=device)
    for name, seconds in best.items():
        record("optimizer_step", f"{device} {size}", name, seconds, baseline="ext",
               GBps=moved[name] / seconds / 1e9)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_optimizer_step_half_precision(benchmark, record, device, dtype):
    """16M parameters whose values, gradients and Adam state are bfloat16 or float16."""
    steps, moved = {}, {}
    for name in IMPLEMENTATIONS:
        steps[name], moved[name] = make_step(name, SIZES["16M"], device, getattr(torch, dtype))
    best = interleaved(benchmark, steps, rounds=10 if device == "cpu" else 50, device=device)
    for name, seconds in best.items():
        record("optimizer_step", f"{device} 16M {dtype}", name, seconds, baseline="ext",
               GBps=moved[name] / seconds / 1e9)


OVERHEAD_IMPLEMENTATIONS = ["ext", "torch", "adam-fused", "adam-foreach"]


def make_tiny_step(implementation, device, scheduled):
    """A step over 50 weights of 4x4 and 50 biases of 16: the time is the host's."""
    weights = [torch.nn.Parameter(torch.randn(4, 4, device=device) * 0.02) for _ in range(NUM_WEIGHTS)]
    biases = [torch.nn.Parameter(torch.zeros(16, device=device)) for _ in range(NUM_WEIGHTS)]
    for p in weights + biases:
        p.grad = torch.randn_like(p) * 1e-3
    optimizer = make_optimizer(implementation, weights, biases)
    optimizer.step()
    if not scheduled:
        return optimizer.step
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=10 ** 6)

    def step():
        optimizer.step()
        scheduler.step()
    return step


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scheduled", [False, True], ids=["constant lr", "OneCycleLR"])
def test_optimizer_step_overhead(benchmark, record, device, scheduled):
    steps = {name: make_tiny_step(name, device, scheduled) for name in OVERHEAD_IMPLEMENTATIONS}
    best = interleaved(benchmark, steps, rounds=300, device=device)
    row = f"{device} 100 tensors x 16" + (" + OneCycleLR" if scheduled else "")
    for name, seconds in best.items():
        record("optimizer_overhead", row, name, seconds, baseline="ext")
