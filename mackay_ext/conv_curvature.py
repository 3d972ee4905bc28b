"""Exact per-example squared gradients of convolution weights (docs/mathematics.md section 1, ef-exact):
G_n = delta_n unfold(x_n)^T per group of channels, summed over positions, for every example n
of a batch; FisherAccumulator adds up sum_n G_n^2.

Three routes to the same numbers:
  fused          conv_sq_grad_accumulate_ (CPU kernel): each thread squares one example's G_n
                 into its own running sum while it is in cache; nothing of the batch's size is
                 ever written.
  conv-backward  the convolution library's weight gradient with the examples as groups: all G_n
                 of a chunk of the batch at once, then squared and summed.
  unfold         F.unfold and bmm: the same for ungrouped layers on few input channels.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn import functional as F

from . import _extension
from ._validate import BACKENDS, check_choice

CHUNK_BYTES = 64 << 20  # bound on the per-example gradients held at once
# Ungrouped conv layers with fewer input channels than this (a first layer on 1 or 3 image
# channels) get their per-example gradients from F.unfold and bmm, which measured faster there
# (2 threads: 1x28x28 -> 20 5x5 filters, 2.9 ms against 3.5 ms); the rest from the convolution
# library's weight-gradient kernel with the batch as groups (16x32x32 -> 16 3x3: 2.6 ms against
# 21 ms; depthwise 96x16x16, 64 examples: 5.7 ms against 33 ms).
CONV_BACKWARD_MIN_CHANNELS = 8
# Ungrouped conv layers used once, float32/float64 on the CPU, take the fused kernel instead of
# either route above, which write every example's gradient to memory and read it back to square
# it (13 MB for LeNet-5's conv2 at batch 128, 69 MB for all of ResNet-20's convs at 64). In a
# training step (2 threads, interleaved with plain Adam steps) that made LeNet-5's ef-exact 1.72x
# -> 1.28x plain Adam's step and ResNet-20's 1.67x -> 1.42x. Except where the convolution
# library is faster still: wide layers (at least CONV_BACKWARD_MIN_CHANNELS inputs) on more than
# FUSED_MAX_POSITIONS output positions, whose long GEMMs it runs near the core's peak
# (ResNet-20's 16x32x32 convs, 64 examples: 2.1 ms against 3.5 ms), and grouped convs, where a
# GEMM per group and example is too small to pay for its call (depthwise, 96 channels at 16x16:
# 5.7 ms against 11 ms).
FUSED_CONV = True
FUSED_MAX_POSITIONS = 256

Pair = Sequence[int]


def numeric_padding(module) -> tuple[int, ...] | None:
    """A conv module's zero padding as numbers per spatial dimension: padding='valid' is 0,
    padding='same' (stride 1) pads dilation * (kernel - 1) in total, half on each side, so it
    is numeric where that total is even; None where it is not (an even kernel: torch pads one
    more on the right, which a symmetric padding cannot say)."""
    padding = module.padding
    if not isinstance(padding, str):
        return tuple(padding)
    if padding == "valid":
        return (0,) * len(module.kernel_size)
    totals = [d * (k - 1) for k, d in zip(module.kernel_size, module.dilation)]
    if any(total % 2 for total in totals):
        return None
    return tuple(total // 2 for total in totals)


def conv_sq_grad_accumulate_(out: torch.Tensor, input: torch.Tensor, grad_output: torch.Tensor,
                             kernel_size: Pair, stride: Pair = (1, 1), padding: Pair = (0, 0),
                             dilation: Pair = (1, 1), groups: int = 1, scale: float = 1.0,
                             backend: str = "ext", grad_sum: torch.Tensor | None = None) -> None:
    """out += scale * sum_n G_n^2 in place, G_n the weight gradient of example n of a Conv2d;
    grad_sum (out's shape, optional) += sum_n G_n, the batch's weight gradient, from the same
    products (FisherAccumulator uses it so that the training backward need not form its own).

    input [N, C, H, W] (the layer's input), grad_output [N, O, H', W'] (the loss's gradient at its
    output), out [O, C / groups * kh * kw] (the weight's shape, flattened; contiguous).
    backend: "ext" runs the extension's CPU kernel, which holds one running sum of out's size per
    thread (tensors on another device take the torch route); "torch" the per-example gradients
    of the convolution library, a chunk of the batch at a time (at most CHUNK_BYTES of them at
    once)."""
    check_choice("backend", backend, BACKENDS, "conv_sq_grad_accumulate_")
    geometry = [list(kernel_size), list(stride), list(padding), list(dilation)]
    if backend == "ext" and input.device.type == "cpu":
        _extension.require()
        torch.ops.mackay_ext.conv_sq_grad_accumulate_(out, input, grad_output, *geometry, groups, float(scale),
                                                      grad_sum)
        return
    if out.dim() != 2 or not out.is_contiguous():
        raise RuntimeError(f"conv_sq_grad_accumulate_: out must be a contiguous 2-D tensor "
                           f"[out_channels, in_channels / groups * kh * kw], got {tuple(out.shape)}")
    if grad_sum is out:
        raise RuntimeError("conv_sq_grad_accumulate_: grad_sum and out must be different tensors")
    if grad_sum is not None and (grad_sum.shape != out.shape or grad_sum.dtype != out.dtype
                                 or grad_sum.device != out.device):
        raise RuntimeError(f"conv_sq_grad_accumulate_: grad_sum must have out's shape {tuple(out.shape)}, "
                           f"dtype {out.dtype} and device {out.device}, got {tuple(grad_sum.shape)}, "
                           f"{grad_sum.dtype}, {grad_sum.device}")
    per_example = out.numel() * out.element_size()
    chunk = max(1, CHUNK_BYTES // max(per_example, 1))
    kernel_size, stride, padding, dilation = geometry
    for start in range(0, input.shape[0], chunk):
        grads = conv_per_example_grads(input[start:start + chunk], grad_output[start:start + chunk],
                                       groups, kernel_size, dilation, padding, stride)
        if grad_sum is not None:
            grad_sum.add_(grads.sum(0))
        out.add_(grads.square_().sum(0), alpha=scale)


def conv_per_example_grads(x, delta, groups, kernel_size, dilation, padding, stride) -> torch.Tensor:
    """Per-example weight gradients [C, out, in/groups * kh * kw] of a Conv2d over a chunk of C
    examples (x [C, in, H, W], delta [C, out, H', W']), by the conv-backward or unfold route."""
    if groups > 1 or x.shape[1] >= CONV_BACKWARD_MIN_CHANNELS:
        return _conv_backward_per_example(x, delta, groups, kernel_size, dilation, padding, stride)
    cols = F.unfold(x, kernel_size, dilation, padding, stride)         # [C, in * k, L]
    return torch.bmm(delta.flatten(2), cols.transpose(1, 2))            # [C, out, in * k]


def _conv_backward_per_example(x, delta, groups, kernel_size, dilation, padding, stride) -> torch.Tensor:
    """Per-example weight gradients as the weight gradient of one convolution whose groups are
    the examples: input [1, C in, H, W], output gradient [1, C out, H', W'], C * groups groups.
    The convolution library's own weight-gradient kernel, with no im2col copy of the input
    (F.unfold's copy is kh * kw times the input, and was most of ef-exact's cost on a ResNet)."""
    chunk, channels, out = x.shape[0], x.shape[1], delta.shape[1]
    # only the weight's shape is read: output_mask asks for the weight gradient alone
    weight = x.new_empty(1).expand(chunk * out, channels // groups, *kernel_size)
    grads = torch.ops.aten.convolution_backward(
        delta.reshape(1, chunk * out, *delta.shape[2:]), x.reshape(1, chunk * channels, *x.shape[2:]),
        weight, None, list(stride), list(padding), list(dilation), False, [0, 0], chunk * groups,
        [False, True, False])[1]
    return grads.reshape(chunk, out, -1)


def takes_fused(weight: torch.Tensor, x: torch.Tensor, delta: torch.Tensor, groups: int,
                sequence: bool = False) -> bool:
    """Whether the fused kernel serves a conv layer (see FUSED_CONV): ungrouped, float32 or
    float64 on the CPU, the extension loaded, few input channels or few positions, and its running
    sums (one per thread, each the weight's size) within CHUNK_BYTES. sequence: a Linear layer
    on inputs of 3 or more dimensions, as a kernel-1 convolution over the positions (the other
    route is bmm, which it beats at every size measured, or matches within 4%)."""
    if not (FUSED_CONV and groups == 1 and x.device.type == "cpu" and _extension.is_loaded()
            and x.dtype in (torch.float32, torch.float64) and weight.dtype == x.dtype == delta.dtype):
        return False
    if sequence:
        if x.dim() < 3 or x.shape[0] == 0:
            return False
    else:
        positions = delta[0, 0].numel() if delta.shape[0] and delta.shape[1] else 0
        if x.shape[1] >= CONV_BACKWARD_MIN_CHANNELS and positions > FUSED_MAX_POSITIONS:
            return False
    return torch.get_num_threads() * weight.numel() * weight.element_size() <= CHUNK_BYTES


if _extension.is_loaded():
    @torch.library.register_fake("mackay_ext::conv_sq_grad_accumulate_")
    def _conv_sq_grad_fake(out, input, grad_output, kernel_size, stride, padding, dilation, groups, scale,
                           grad_sum=None):
        return None
