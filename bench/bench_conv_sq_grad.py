"""The exact Fisher of a conv layer, out += s sum_n G_n^2 (G_n: example n's weight gradient), in
one process: the fused CPU kernel (conv_sq_grad_accumulate_, backend "ext"), the pure-PyTorch
route (backend "torch": the convolution library's per-example gradients, or unfold + bmm on few
channels, then squared and summed), what a user would write (torch.func: vmap(grad) of the
layer, then squared and summed), and the batch's plain weight gradient (what training computes
anyway: the per-example products' arithmetic, done once for the sum).

Run:  pytest bench/bench_conv_sq_grad.py --benchmark-only
Layers: LeNet-5-Caffe's two convs at batch 128, ResNet-20's conv shapes at 64 (CIFAR), a
depthwise conv; 1 thread and, where torch has them, 2. FisherAccumulator takes the kernel for
ungrouped convs on few channels or at most 256 positions (conv_curvature.FUSED_MAX_POSITIONS);
the other rows show why.
"""

import pytest
import torch
from conftest import interleaved, rounds_for, torch_threads
from torch.func import grad, vmap
from torch.nn import functional as F

from mackay_ext.conv_curvature import conv_sq_grad_accumulate_, takes_fused

# name -> (batch, in channels, size, out channels, kernel, stride, padding, groups)
LAYERS = {
    "lenet5 conv1 1x28x28->20 5x5": (128, 1, 28, 20, 5, 1, 0, 1),
    "lenet5 conv2 20x12x12->50 5x5": (128, 20, 12, 50, 5, 1, 0, 1),
    "resnet20 3x32x32->16 3x3": (64, 3, 32, 16, 3, 1, 1, 1),
    "resnet20 16x32x32->16 3x3": (64, 16, 32, 16, 3, 1, 1, 1),
    "resnet20 32x16x16->32 3x3": (64, 32, 16, 32, 3, 1, 1, 1),
    "resnet20 32x16x16->64 3x3 s2": (64, 32, 16, 64, 3, 2, 1, 1),
    "resnet20 64x8x8->64 3x3": (64, 64, 8, 64, 3, 1, 1, 1),
    "depthwise 96x16x16 3x3": (64, 96, 16, 96, 3, 1, 1, 96),
}
THREADS = [1, 2] if torch.get_num_threads() >= 2 else [1]
SCALE = 0.5
SECONDS_PER_CASE = 3.0


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("layer", list(LAYERS))
def test_conv_sq_grad(benchmark, record, threads, layer):
    batch, channels, size, out_channels, k, stride, padding, groups = LAYERS[layer]
    torch.manual_seed(0)
    x = torch.randn(batch, channels, size, size)
    out_size = (size + 2 * padding - k) // stride + 1
    delta = torch.randn(batch, out_channels, out_size, out_size)
    weight = torch.randn(out_channels, channels // groups, k, k)
    out = torch.zeros(out_channels, channels // groups * k * k)
    geometry = ((k, k), (stride, stride), (padding, padding), (1, 1))

    def one_example(w, xi, di):   # <delta_n, conv(x_n; w)>: its gradient in w is G_n
        return (F.conv2d(xi[None], w, None, stride, padding, 1, groups) * di[None]).sum()

    per_example = vmap(grad(one_example), in_dims=(None, 0, 0))
    steps = {
        "ext": lambda: conv_sq_grad_accumulate_(out, x, delta, *geometry, groups, SCALE, backend="ext"),
        "torch fallback": lambda: conv_sq_grad_accumulate_(out, x, delta, *geometry, groups, SCALE, backend="torch"),
        "vmap(grad) + square": lambda: out.add_(per_example(weight, x, delta).square_().sum(0).flatten(1), alpha=SCALE),
        "batch weight gradient": lambda: torch.ops.aten.convolution_backward(
            delta, x, weight, None, [stride] * 2, [padding] * 2, [1, 1], False, [0, 0], groups, [False, True, False]),
    }
    with torch_threads(threads):
        rounds = rounds_for(steps["torch fallback"], len(steps), SECONDS_PER_CASE)
        best = interleaved(benchmark, steps, rounds=rounds)
        fused = takes_fused(weight, x, delta, groups)
    row = f"cpu {threads} thr {layer} batch {batch}"
    for name, seconds in best.items():
        record("conv_sq_grad", row, name, seconds, baseline="torch fallback")
    record("conv_sq_grad", row, "ext", best["ext"], rounds=rounds, fisher_accumulator="fused" if fused else "torch route")
