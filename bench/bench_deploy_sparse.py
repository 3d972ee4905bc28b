"""Deployment latency of a sparsified LeNet-300-100 against the same weights dense.

Run:  python bench/bench_deploy_sparse.py [--threads 1]   (one process, one run, about 20 s)
Target (issue 12, item 4): the sparsified model is never slower than dense at any batch size.

Two masks, both about 1.25% of the weights kept: the same density in every layer, and one shaped
like MacKay's results (the 784x300 layer sparsest). Each model is timed in eval mode under
torch.no_grad and with autograd on (a user who forgets no_grad), the implementations
interleaved round by round so that drift of a shared machine hits them alike; the table gives
median milliseconds and sparse / dense (below 1.00x: the sparse model is faster).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import platform
import statistics
import time

import torch

from mackay_ext import models
from mackay_ext.sparse import SparseLinear, sparsify

MASKS = {"uniform 1.25%": (0.0125, 0.0125, 0.0125), "per layer 1% / 3% / 20%": (0.01, 0.03, 0.20)}
BATCHES = (1, 8, 256)


def pruned_lenet(densities, seed=0):
    torch.manual_seed(seed)
    model = models.create("lenet-300-100").eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer, density in zip((model[1], model[3], model[5]), densities):
            layer.weight.mul_(torch.rand(layer.weight.shape, generator=generator) < density)
    return model


def median_ms(functions, rounds):
    times = {name: [] for name in functions}
    for _ in range(rounds):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=300, help="timed calls of each model per case")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for both models (default: torch's); 1 on a busy machine, "
                             "where a descheduled worker thread costs milliseconds")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# sparsified vs dense LeNet-300-100 ({platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__})\n")
    print("| mask | kept | paths | autograd | batch | dense ms | sparse ms | sparse / dense |")
    print("|---|---|---|---|---|---|---|---|")
    for mask_name, densities in MASKS.items():
        dense = pruned_lenet(densities)
        kept = sum(int((m.weight != 0).sum()) for m in dense if isinstance(m, torch.nn.Linear))
        total = sum(m.weight.numel() for m in dense if isinstance(m, torch.nn.Linear))
        sparse = sparsify(copy.deepcopy(dense)).eval()
        paths = "/".join(m.path for m in sparse if isinstance(m, SparseLinear))
        for grad in (False, True):
            for batch in BATCHES:
                x = torch.randn(batch, 1, 28, 28)
                with contextlib.nullcontext() if grad else torch.no_grad():
                    torch.testing.assert_close(sparse(x), dense(x), rtol=1e-4, atol=1e-4)
                    for _ in range(20):  # warm-up
                        dense(x), sparse(x)
                    ms = median_ms({"dense": lambda: dense(x), "sparse": lambda: sparse(x)},
                                   args.rounds if batch < 256 else args.rounds // 3)
                print(f"| {mask_name} | {100 * kept / total:.2f}% | {paths} | {'on' if grad else 'off'} "
                      f"| {batch} | {ms['dense']:.3f} | {ms['sparse']:.3f} | {ms['sparse'] / ms['dense']:.2f}x |")


if __name__ == "__main__":
    main()
