"""conv_sq_grad_accumulate_ (the fused CPU kernel of a conv layer's exact Fisher) and its torch
route against a float64 reference built from per-example convolution gradients by autograd, on
odd geometries, every float dtype, empty and non-contiguous inputs; opcheck; bad input."""

import pytest
import torch
from torch.nn import functional as F

from conftest import DEVICES

from mackay_ext import conv_curvature
from mackay_ext.conv_curvature import conv_sq_grad_accumulate_

# name -> (N, C, H, W, O, kernel, stride, padding, dilation, groups)
CASES = {
    "lenet-conv1": (13, 1, 28, 28, 20, (5, 5), (1, 1), (0, 0), (1, 1), 1),
    "odd": (7, 3, 9, 11, 5, (3, 2), (1, 1), (1, 0), (1, 1), 1),
    "strided-padded": (6, 4, 10, 7, 6, (3, 3), (2, 3), (2, 1), (1, 1), 1),
    "dilated": (5, 2, 12, 9, 3, (3, 2), (1, 2), (2, 1), (2, 3), 1),
    "pad-wider-than-kernel": (4, 2, 5, 5, 3, (2, 2), (3, 1), (3, 2), (1, 1), 1),
    "one-by-one": (9, 8, 4, 4, 7, (1, 1), (1, 1), (0, 0), (1, 1), 1),
    "grouped": (5, 6, 7, 6, 4, (3, 3), (1, 1), (1, 1), (1, 1), 2),
    "depthwise": (5, 4, 6, 6, 8, (3, 3), (2, 2), (1, 1), (1, 1), 4),
    "conv1d-as-2d": (8, 3, 1, 17, 5, (1, 3), (1, 2), (0, 2), (1, 2), 1),
    "one-example": (1, 3, 6, 6, 2, (3, 3), (1, 1), (0, 0), (1, 1), 1),
    # stride 1, output as wide as the input: the kernel's one-copy-a-row unfold
    "same-width-3x3": (6, 3, 8, 8, 4, (3, 3), (1, 1), (1, 1), (1, 1), 1),
    "same-width-dilated": (5, 2, 7, 9, 3, (3, 5), (1, 1), (2, 4), (2, 2), 1),
    "same-width-tall-padding": (4, 2, 5, 6, 3, (1, 3), (1, 1), (2, 1), (1, 1), 1),
    "same-width-one-column": (3, 2, 4, 1, 3, (3, 1), (1, 1), (1, 0), (1, 1), 1),
    "same-width-taller-than-input": (3, 2, 2, 5, 3, (5, 3), (1, 1), (4, 1), (1, 1), 1),
    "same-width-conv1d": (5, 3, 1, 13, 4, (1, 3), (1, 1), (0, 1), (1, 1), 1),
    "empty-batch": (0, 3, 6, 6, 2, (3, 3), (1, 1), (0, 0), (1, 1), 1),
}


def reference(x, delta, kernel, stride, padding, dilation, groups):
    """sum_n G_n^2 in float64, G_n the weight gradient of F.conv2d on example n alone."""
    out_channels, in_per_group = delta.shape[1], x.shape[1] // groups
    total = torch.zeros(out_channels, in_per_group * kernel[0] * kernel[1], dtype=torch.float64)
    for n in range(x.shape[0]):
        weight = torch.zeros(out_channels, in_per_group, *kernel, dtype=torch.float64, requires_grad=True)
        y = F.conv2d(x[n:n + 1].double(), weight, None, stride, padding, dilation, groups)
        (g,) = torch.autograd.grad(y, weight, delta[n:n + 1].double())
        total += g.reshape(out_channels, -1) ** 2
    return total


def inputs(case, dtype, generator_seed=0):
    n, c, h, w, o, kernel, stride, padding, dilation, groups = CASES[case]
    torch.manual_seed(generator_seed)
    x = torch.randn(n, c, h, w, dtype=dtype)
    out_h = (h + 2 * padding[0] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    out_w = (w + 2 * padding[1] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    delta = torch.randn(n, o, out_h, out_w, dtype=dtype)
    return x, delta, (kernel, stride, padding, dilation, groups)


def batch_gradient(x, delta, kernel, stride, padding, dilation, groups):
    """sum_n G_n in float64: the weight gradient of the whole batch, by the convolution library."""
    weight = torch.empty(delta.shape[1], x.shape[1] // groups, *kernel, dtype=torch.float64)
    grad = torch.ops.aten.convolution_backward(delta.double(), x.double(), weight, None, list(stride),
                                               list(padding), list(dilation), False, [0, 0], groups,
                                               [False, True, False])[1]
    return grad.reshape(delta.shape[1], -1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_grad_sum", [False, True], ids=["squares", "squares+grad_sum"])
@pytest.mark.parametrize("backend", ["ext", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_float64_reference(case, dtype, backend, with_grad_sum, device):
    """out += 0.5 sum_n G_n^2; with grad_sum, also grad_sum += sum_n G_n (unscaled). On CUDA both
    backends take the torch route (the kernel is the CPU's)."""
    x, delta, (kernel, stride, padding, dilation, groups) = inputs(case, dtype)
    geometry = (kernel, stride, padding, dilation, groups)
    start = torch.rand(delta.shape[1], x.shape[1] // groups * kernel[0] * kernel[1], dtype=dtype)
    out = start.to(device, copy=True)
    grad_sum = start.to(device, copy=True)
    conv_sq_grad_accumulate_(out, x.to(device), delta.to(device), kernel, stride, padding, dilation,
                             groups, 0.5, backend, grad_sum=grad_sum if with_grad_sum else None)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    expected = start.double() + 0.5 * reference(x, delta, *geometry)
    torch.testing.assert_close(out.cpu().double(), expected, rtol=tol, atol=tol)
    if with_grad_sum:
        # a signed sum cancels: its float32 error is relative to the size of its terms, not of the
        # sum (one entry of lenet-conv1 was off by 9e-5 of itself on an Intel Xeon, 3.7e-5 absolute)
        expected_sum = start.double() + batch_gradient(x, delta, *geometry)
        terms = start.double().abs() + batch_gradient(x.abs(), delta.abs(), *geometry)
        torch.testing.assert_close(grad_sum.cpu().double(), expected_sum, rtol=0,
                                   atol=tol * float(terms.max()))


@pytest.mark.parametrize("layout", ["channels_last", "sliced", "expanded"])
def test_non_contiguous_inputs(layout):
    x, delta, geometry = inputs("strided-padded", torch.float64)
    if layout == "channels_last":
        x, delta = x.contiguous(memory_format=torch.channels_last), delta.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":   # every other example of a batch twice as large
        x = torch.cat([x, x]).reshape(2, *x.shape).transpose(0, 1).reshape(-1, *x.shape[1:])[::2]
        delta = torch.stack([delta, torch.zeros_like(delta)], 1).reshape(-1, *delta.shape[1:])[::2]
    else:   # one example repeated: stride 0 along the batch
        x, delta = x[:1].expand(4, -1, -1, -1), delta[:1].expand(4, -1, -1, -1)
    assert not (x.is_contiguous() and delta.is_contiguous())
    out = torch.zeros(delta.shape[1], x.shape[1] * 9, dtype=torch.float64)
    conv_sq_grad_accumulate_(out, x, delta, *geometry)
    torch.testing.assert_close(out, reference(x, delta, *geometry), rtol=1e-12, atol=1e-12)


def test_same_sums_on_any_thread_count():
    """Each thread sums its own share of the examples: the split changes the rounding, never more."""
    x, delta, geometry = inputs("odd", torch.float32)
    results = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            out = torch.zeros(delta.shape[1], x.shape[1] * 6)
            conv_sq_grad_accumulate_(out, x, delta, *geometry)
            results.append(out)
    finally:
        torch.set_num_threads(threads)
    for out in results[1:]:
        torch.testing.assert_close(out, results[0], rtol=1e-5, atol=1e-6)


def test_opcheck():
    x, delta, (kernel, stride, padding, dilation, groups) = inputs("grouped", torch.float32)
    out = torch.zeros(delta.shape[1], x.shape[1] // groups * 9)
    torch.library.opcheck(torch.ops.mackay_ext.conv_sq_grad_accumulate_.default,
                          (out, x, delta, list(kernel), list(stride), list(padding), list(dilation), groups, 2.0))
    torch.library.opcheck(torch.ops.mackay_ext.conv_sq_grad_accumulate_.default,
                          (out, x, delta, list(kernel), list(stride), list(padding), list(dilation), groups, 2.0,
                           torch.zeros_like(out)))


def test_bad_input_names_the_argument():
    x, delta, (kernel, stride, padding, dilation, _) = inputs("odd", torch.float32)
    out = torch.zeros(delta.shape[1], x.shape[1] * 6)
    args = (kernel, stride, padding, dilation)
    with pytest.raises(RuntimeError, match="must be 4-D"):
        conv_sq_grad_accumulate_(out, x[0], delta, *args)
    with pytest.raises(RuntimeError, match="one entry per example"):
        conv_sq_grad_accumulate_(out, x, delta[:3], *args)
    with pytest.raises(RuntimeError, match="out must have shape"):
        conv_sq_grad_accumulate_(out.t().contiguous(), x, delta, *args)
    with pytest.raises(RuntimeError, match="spatial size"):
        conv_sq_grad_accumulate_(out, x, delta[..., :-1], *args)
    with pytest.raises(RuntimeError, match="must divide by groups"):
        conv_sq_grad_accumulate_(out, x, delta, *args, groups=2)
    with pytest.raises(RuntimeError, match="must be >= 1"):
        conv_sq_grad_accumulate_(out, x, delta, kernel, (0, 1), padding, dilation)
    with pytest.raises(RuntimeError, match="2 entries"):
        conv_sq_grad_accumulate_(out, x, delta, (3,), stride, padding, dilation)
    with pytest.raises(TypeError, match="must have out's dtype"):
        conv_sq_grad_accumulate_(out, x.double(), delta, *args)
    with pytest.raises(TypeError, match="float32 or float64"):
        conv_sq_grad_accumulate_(out.half(), x.half(), delta.half(), *args)
    with pytest.raises(RuntimeError, match="contiguous"):
        conv_sq_grad_accumulate_(torch.zeros(out.shape[1], out.shape[0]).t(), x, delta, *args)
    with pytest.raises(ValueError, match="backend"):
        conv_sq_grad_accumulate_(out, x, delta, *args, backend="cuda")
    for backend in ("ext", "torch"):
        with pytest.raises(RuntimeError, match="grad_sum must have out's shape"):
            conv_sq_grad_accumulate_(out, x, delta, *args, backend=backend, grad_sum=out[:1].clone())
        with pytest.raises((RuntimeError, TypeError), match="grad_sum must have out's dtype|dtype torch.float32"):
            conv_sq_grad_accumulate_(out, x, delta, *args, backend=backend, grad_sum=out.double())
    with pytest.raises(RuntimeError, match="grad_sum must be contiguous"):
        conv_sq_grad_accumulate_(out, x, delta, *args, grad_sum=torch.zeros(out.shape[1], out.shape[0]).t())
    with pytest.raises(RuntimeError, match="different tensors"):
        conv_sq_grad_accumulate_(out, x, delta, *args, grad_sum=out)


def test_routing_takes_the_kernel_where_it_measured_faster():
    """The fused kernel serves ungrouped float CPU convs on few channels or few positions; wide
    convs on many positions, grouped convs and other dtypes keep the convolution library's."""
    weight = torch.empty(20, 1, 5, 5)
    x, delta = torch.empty(4, 1, 28, 28), torch.empty(4, 20, 24, 24)
    assert conv_curvature.takes_fused(weight, x, delta, 1)
    wide, wide_x = torch.empty(16, 16, 3, 3), torch.empty(4, 16, 32, 32)
    assert not conv_curvature.takes_fused(wide, wide_x, torch.empty(4, 16, 32, 32), 1)
    assert conv_curvature.takes_fused(wide, wide_x[..., :16, :16], torch.empty(4, 16, 16, 16), 1)
    assert not conv_curvature.takes_fused(torch.empty(16, 8, 3, 3), wide_x, torch.empty(4, 16, 16, 16), 2)
    assert not conv_curvature.takes_fused(weight.half(), x.half(), delta.half(), 1)
