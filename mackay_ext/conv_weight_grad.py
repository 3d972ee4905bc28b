"""ef-exact on a conv layer without a weight gradient of the training backward's own.

The exact Fisher forms every example's weight gradient G_n (conv_curvature.py); the batch's
weight gradient is their sum. A training step with ef-exact used to have the convolution library
form that sum a second time, from the same inputs and output gradients: on ResNet-20 (2 threads,
batch 64) the convs' weight gradients are about a fifth of a plain Adam step. While a
FisherAccumulator captures, a conv layer it serves runs as ConvFromExamples: the same convolution
forward, and a backward that takes the weight's gradient from the accumulator (added up with the
squares, FisherAccumulator._accumulate), sums the output gradient for the bias's, and asks the
library for the input's only. Where the accumulator has none for the call (a module used twice
in one forward, records that did not pair), the backward asks the library for the weight's and
the bias's gradients too, so the gradients are the library's either way, up to the order of a
float sum.

Served: nn.Conv1d and nn.Conv2d themselves (not subclasses, which may compute differently),
numeric zero padding, float32/float64 on the CPU, weight requiring grad, no autocast, outside
torch.compile, and no forward of the instance's own (the module's forward attribute is set while
the accumulator is attached, and removed by its detach()).
"""
from __future__ import annotations

import torch
from torch import nn

from .copy_inert import own_forward

SERVED_TYPES = (nn.Conv1d, nn.Conv2d)


def can_serve(module: nn.Module) -> bool:
    """Whether the module's forward can be replaced while an accumulator captures (see above)."""
    return (type(module) in SERVED_TYPES and module.padding_mode == "zeros"
            and not isinstance(module.padding, str) and own_forward(module))


def serves_call(module: nn.Module, x) -> bool:
    """Whether this call of a served module runs as ConvFromExamples."""
    weight = module.weight
    return (isinstance(x, torch.Tensor) and x.dim() == len(module.stride) + 2   # batched input
            and torch.is_grad_enabled() and weight.requires_grad
            and not torch._C._are_functorch_transforms_active()   # torch.func: grad, vmap, jvp
            and _forward_ad_off(x, weight)
            and x.device.type == "cpu" and weight.device.type == "cpu"
            and weight.dtype in (torch.float32, torch.float64) and x.dtype == weight.dtype
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling())


def _forward_ad_off(*tensors) -> bool:
    """No dual tensor (torch.autograd.forward_ad) among `tensors`: the Function has no jvp."""
    from torch.autograd import forward_ad
    if forward_ad._current_level < 0:
        return True
    return all(forward_ad.unpack_dual(t).tangent is None for t in tensors)


class ConvFromExamples(torch.autograd.Function):
    """module's convolution of x; its backward takes the weight's gradient from
    accumulator.take_weight_grad(module, x, grad) when there is one, made from the very output
    gradient this backward receives."""

    @staticmethod
    def forward(ctx, x, weight, bias, module, accumulator):
        ctx.module, ctx.accumulator = module, accumulator
        # the geometry of this call (the module's attributes could change before the backward)
        ctx.geometry = (list(module.stride), list(module.padding), list(module.dilation), module.groups)
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return module._conv_forward(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        module = ctx.module
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        # a backward with create_graph=True (grad mode on here) gets the library's gradients,
        # which are differentiable again; the accumulator's are plain numbers
        taken = need_weight and not torch.is_grad_enabled()
        grad_weight = ctx.accumulator.take_weight_grad(module, x, grad) if taken else None
        grad_input = grad_bias = None
        need_bias = need_bias and ctx.has_bias
        if grad_weight is not None and need_bias:
            # summed here: asked for the bias's gradient, oneDNN runs its whole weight-gradient
            # pass (LeNet-5's second conv, batch 128: 6.6 ms for the bias alone, 0.06 ms as a
            # sum), which would undo what serving the weight's saves
            grad_bias, need_bias = grad.sum([0, *range(2, grad.dim())]), False
        mask = [need_input, need_weight and grad_weight is None, need_bias]
        if any(mask):
            stride, padding, dilation, groups = ctx.geometry
            grad_input, library_weight, library_bias = torch.ops.aten.convolution_backward(
                grad, x, weight, [weight.shape[0]] if ctx.has_bias else None, stride, padding, dilation,
                False, [0] * len(stride), groups, mask)
            if grad_weight is None:
                grad_weight = library_weight
            if need_bias:
                grad_bias = library_bias
        if grad_weight is not None:
            grad_weight = grad_weight.view_as(weight)
        return grad_input, grad_weight, grad_bias, None, None
