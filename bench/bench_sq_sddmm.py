"""The exact Fisher of a Linear layer at its kept weights only, out[o, c] += s sum_n a[n, o]^2
b[n, c]^2 at a pattern (sq_sddmm_accumulate_, the pattern in column blocks as the pruner builds it), against what would be used instead, in one
process:
  ext dense          sq_gemm_accumulate_ over the whole layer (what FisherAccumulator runs above
                     kept_pattern.MAX_SPARSE_DENSITY, and what it ran at every density before)
  torch fallback     backend "torch": the dense product on squares, added at the pattern
  torch sampled_addmm  torch.sparse.sampled_addmm on a CSR tensor of the pattern (the layout it
                     takes), squares made on every call, its values added into out (torch's SDDMM)
Layers: LeNet-300-100's 300x784 and 100x300, LeNet-5-Caffe's 500x800, 1024x1024; batches 32 and
128; kept fractions 1% to 50% (random patterns: a pruned network's columns die together, which
only helps the sparse kernel); 1 thread and 2. Round-robin (conftest.interleaved).

Run:  pytest bench/bench_sq_sddmm.py --benchmark-only     (about 3 minutes; bench/results/sq_sddmm.*)
"""
import warnings

import pytest
import torch
from conftest import interleaved, rounds_for, torch_threads

from mackay_ext.curvature import sq_gemm_accumulate_, sq_sddmm_accumulate_
from mackay_ext.kept_pattern import blocked_csr

LAYERS = [(300, 784), (100, 300), (500, 800), (1024, 1024)]
BATCHES = [32, 128]
DENSITIES = [0.01, 0.05, 0.1, 0.2, 0.3, 0.5]
THREADS = [1, 2] if torch.get_num_threads() >= 2 else [1]
SCALE = 0.5
SECONDS_PER_CASE = 1.0


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("layer", LAYERS, ids=lambda s: f"{s[0]}x{s[1]}")
def test_sq_sddmm(benchmark, record, threads, batch, density, layer):
    torch.manual_seed(0)
    out_features, in_features = layer
    a = torch.randn(batch, out_features)   # per-example output gradients
    b = torch.randn(batch, in_features)    # layer inputs
    kept = torch.rand(out_features, in_features) < density
    crow = torch.zeros(out_features + 1, dtype=torch.int64)
    crow[1:] = kept.sum(1).cumsum(0)
    rows, col = kept.nonzero().unbind(1)
    blocked = blocked_csr(kept, 4 * threads)   # as kept_pattern.build makes it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # torch's "sparse CSR is beta" notice
        pattern = torch.sparse_csr_tensor(crow, col.contiguous(), torch.zeros(len(col)), (out_features, in_features))
    out = torch.zeros(out_features, in_features)

    def sampled_addmm():
        values = torch.sparse.sampled_addmm(pattern, (a * a).t(), b * b, beta=0.0, alpha=SCALE).values()
        out.index_put_((rows, col), values, accumulate=True)

    steps = {
        "ext sparse": lambda: sq_sddmm_accumulate_(out, a, b, *blocked, SCALE, backend="ext"),
        "ext dense": lambda: sq_gemm_accumulate_(out, a, b, SCALE, backend="ext"),
        "torch fallback": lambda: sq_sddmm_accumulate_(out, a, b, *blocked, SCALE, backend="torch"),
        "torch sampled_addmm": sampled_addmm,
    }
    with torch_threads(threads):
        rounds = rounds_for(steps["torch fallback"], len(steps), SECONDS_PER_CASE, low=5, high=100)
        best = interleaved(benchmark, steps, rounds=rounds)
    row = f"{threads} thr {out_features}x{in_features} batch {batch:3d} kept {100 * density:4.0f}%"
    for name, seconds in best.items():
        record("sq_sddmm", row, name, seconds, baseline="ext dense")
