"""The exact-Fisher GEMM on squared operands, out += s (a*a)^T (b*b), three ways in one process:
the compiled op (sq_gemm_accumulate_, backend "ext"), the pure-PyTorch fallback (backend "torch":
`out.addmm_((a*a).t(), b*b)`, squares made on every call) and addmm_ alone on operands squared
beforehand (the GEMM's own cost, a floor neither of the others can go under).

Run:  pytest bench/bench_sq_gemm.py --benchmark-only   (test_sq_gemm_with_bias: bench/results/sq_gemm_bias.*)
Layers: LeNet-300-100's 300x784 and 100x300, 1024x1024, 4096x4096 and a transformer MLP's
4096x11008 (out x in); batches 1, 32, 128, 1024 (issue 17) and 8, 16 (either side of the op's
switch from its register-blocked pass to the GEMM); 1 thread and, where torch has them, 2.
The three are timed round-robin (conftest.interleaved); one `out` is shared so all see the same
caches. Target (issue 17): ext <= torch fallback everywhere, and below it where the squares'
memory traffic matters.
"""
import pytest
import torch
from conftest import DEVICES, interleaved, rounds_for, torch_threads

from mackay_ext.curvature import sq_gemm_accumulate_

LAYERS = [(300, 784), (100, 300), (1024, 1024), (4096, 4096), (4096, 11008)]
BATCHES = [1, 8, 16, 32, 128, 1024]
THREADS = [1, 2] if torch.get_num_threads() >= 2 else [1]
SCALE = 0.5
SECONDS_PER_CASE = 3.0  # rounds are sized so a case takes about this long on the CPU


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("layer", LAYERS, ids=lambda s: f"{s[0]}x{s[1]}")
def test_sq_gemm(benchmark, record, device, threads, batch, layer):
    if device == "cuda" and threads != THREADS[0]:
        pytest.skip("CPU threads do not change a GPU run")
    torch.manual_seed(0)
    out_features, in_features = layer
    a = torch.randn(batch, out_features, device=device)  # per-example output gradients
    b = torch.randn(batch, in_features, device=device)   # layer inputs
    a_sq, b_sq = a * a, b * b
    out = torch.zeros(out_features, in_features, device=device)
    steps = {
        "ext": lambda: sq_gemm_accumulate_(out, a, b, SCALE, backend="ext"),
        "torch fallback": lambda: sq_gemm_accumulate_(out, a, b, SCALE, backend="torch"),
        "addmm on squares": lambda: out.addmm_(a_sq.t(), b_sq, alpha=SCALE),
    }
    with torch_threads(threads):
        rounds = rounds_for(steps["torch fallback"], len(steps), SECONDS_PER_CASE, device)
        best = interleaved(benchmark, steps, rounds=rounds, device=device)
    row = f"{device} {threads} thr {out_features}x{in_features} batch {batch:4d}"
    for name, seconds in best.items():
        record("sq_gemm", row, name, seconds, baseline="torch fallback")
    record("sq_gemm", row, "ext", best["ext"], rounds=rounds)


BIAS_LAYERS = [(300, 784), (100, 300), (10, 100), (1024, 1024)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("batch", [32, 128])
@pytest.mark.parametrize("layer", BIAS_LAYERS, ids=lambda s: f"{s[0]}x{s[1]}")
def test_sq_gemm_with_bias(benchmark, record, device, threads, batch, layer):
    """A Linear layer's weight and bias shares, as FisherAccumulator adds them: one call with
    bias_out, against the same op followed by the bias's three torch ops (square, sum, add_: what
    the accumulator did before bias_out), and the torch fallback with bias_out."""
    if device == "cuda" and threads != THREADS[0]:
        pytest.skip("CPU threads do not change a GPU run")
    torch.manual_seed(0)
    out_features, in_features = layer
    a = torch.randn(batch, out_features, device=device)
    b = torch.randn(batch, in_features, device=device)
    out = torch.zeros(out_features, in_features, device=device)
    bias = torch.zeros(out_features, device=device)

    def then_torch_ops():
        sq_gemm_accumulate_(out, a, b, SCALE, backend="ext")
        bias.add_(a.square().sum(0), alpha=SCALE)
    steps = {
        "ext with bias_out": lambda: sq_gemm_accumulate_(out, a, b, SCALE, backend="ext", bias_out=bias),
        "ext, then the bias in torch": then_torch_ops,
        "torch fallback with bias_out": lambda: sq_gemm_accumulate_(out, a, b, SCALE, backend="torch", bias_out=bias),
    }
    with torch_threads(threads):
        rounds = rounds_for(steps["ext, then the bias in torch"], len(steps), 1.0, device)
        best = interleaved(benchmark, steps, rounds=rounds, device=device)
    row = f"{device} {threads} thr {out_features}x{in_features} batch {batch:4d}"
    for name, seconds in best.items():
        record("sq_gemm_bias", row, name, seconds, baseline="ext, then the bias in torch")
