"""Is a layer subclass's weight used as nn.Linear / nn.Conv1d / nn.Conv2d use theirs?

The exact estimators square each example's gradient of the layer's weight, formed from its input
x and the gradient delta at its output: delta x^T for a Linear, the same over the positions of a
convolution. That is the gradient only where the output depends on the weight through the layer's
own product. A subclass whose forward transforms the weight first (timm's StdConv2d, a
weight-standardized or scaled layer) or its input (timm's Conv2dSame pads it) breaks that: a new
user's StdConv2d read a curvature 5-200x too small, a 0.5 * weight Linear one 4x too large, and
Conv2dSame failed inside loss.backward(). A warning at construction said the numbers might be
wrong and also fired for harmless subclasses (timm's Linear), so it was learned to be ignored.

The check: the derivative of the layer's output along a random change V of its weight (one
forward-mode pass through the subclass's own forward, torch.func.jvp) must be the plain product of
its input with V. An addition that does not involve the weight (a LoRA branch) leaves it so, and
keeps the curvature right; a transform of the weight or of the input does not.
"""
from __future__ import annotations

import contextlib
import warnings

import torch
from torch import nn
from torch.nn import functional as F

PLAIN_FORWARDS = (nn.Linear.forward, nn.Conv1d.forward, nn.Conv2d.forward)
# the derivative against the plain product, relative to the product's largest entry: the same
# kernels on the same numbers agree to rounding; half precision carries ~3 digits
TOLERANCE = {torch.float16: 3e-2, torch.bfloat16: 3e-2}
DEFAULT_TOLERANCE = 1e-3


def has_own_forward(module: nn.Module) -> bool:
    return type(module).forward not in PLAIN_FORWARDS


def base_layer(module: nn.Module) -> type[nn.Module]:
    """nn.Linear, nn.Conv1d or nn.Conv2d: the torch layer `module` is one of."""
    return next(base for base in (nn.Linear, nn.Conv1d, nn.Conv2d) if isinstance(module, base))


def _plain(module: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The layer's own product of x with `weight`, without the bias."""
    base = base_layer(module)
    return F.linear(x, weight) if base is nn.Linear else base._conv_forward(module, x, weight, None)


class Unchecked(Exception):
    """The forward could not run under forward-mode differentiation, or the plain product could
    not be formed from its input."""


HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


@contextlib.contextmanager
def _unseen(module: nn.Module):
    """Run the check's forward as if it never ran, as far as the modules can tell: their hooks
    (the user's, and the library's on the layers inside) off, and every attribute the forward
    sets (an output kept for an auxiliary loss, a call counter, a cache) put back after it."""
    # each module's attributes, and the contents of the dicts among them that a forward may
    # change in place (a parameter swapped in, a buffer or submodule set)
    saved = [(m, dict(m.__dict__), [(d, dict(d)) for d in (m._parameters, m._buffers, m._modules)])
             for m in module.modules()]
    for m in module.modules():
        for name in HOOK_DICTS:
            m.__dict__[name] = type(m.__dict__[name])()
    try:
        yield
    finally:
        for m, attributes, contents in saved:
            m.__dict__.clear()
            m.__dict__.update(attributes)
            for held, items in contents:
                held.clear()
                held.update(items)


def _precision(*dtypes: torch.dtype) -> float:
    """The check's tolerance: that of the least precise dtype the numbers went through."""
    return max(TOLERANCE.get(dtype, DEFAULT_TOLERANCE) for dtype in dtypes)


def weight_use_problem(module: nn.Module, x: torch.Tensor, inputs: tuple, kwargs: dict) -> str | None:
    """None when `module`'s forward on `inputs` and `kwargs` depends on its weight as the
    layer's plain product of its input `x` (one of them); otherwise what differs, in a few
    words. Raises Unchecked when that cannot be told. The forward runs once more, unseen by the
    modules (_unseen) and with the random state put back afterwards; what it does outside the
    modules (a global counter, a print) happens once more."""
    # the tensor the forward reads as self.weight: the parameter, or torch.nn.utils.prune's
    # product of weight_orig and the mask, an attribute its pre-hook sets
    holder = module._parameters if "weight" in module._parameters else module.__dict__
    weight = holder["weight"].detach()
    generator = torch.Generator().manual_seed(0)   # the user's random streams stay untouched
    direction = torch.randn(weight.shape, generator=generator, dtype=torch.float32).to(weight)

    def output(w):
        holder["weight"] = w   # (put back by _unseen)
        return module.forward(*inputs, **kwargs)

    devices = [x.device] if x.device.type == "cuda" else []
    autocast = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    with torch.no_grad(), torch.random.fork_rng(devices=devices), warnings.catch_warnings():
        # torch.func's first use scripts a helper, and torch's deprecation of that names no call of the user's
        warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)
        try:
            with _unseen(module):
                _, change = torch.func.jvp(output, (weight,), (direction,))
            # the plain product in float64, autocast off: a forward may cast its input or weight
            with torch.autocast(x.device.type, enabled=False):
                expected = _plain(module, x.double(), direction.double())
        except Exception as err:
            raise Unchecked(f"{type(err).__name__}: {str(err)[:200]}") from err
    if change.shape != expected.shape:
        return (f"its output has shape {tuple(change.shape)} where the plain product of its input gives "
                f"{tuple(expected.shape)} (a forward that pads or reshapes its input)")
    scale = float(expected.abs().max())
    difference = float((change.double() - expected).abs().max()) / max(scale, torch.finfo(torch.float64).tiny)
    if difference > _precision(x.dtype, weight.dtype, change.dtype, autocast):
        return (f"its output changes with its weight unlike the plain product (off by {difference:.3g} of its "
                "largest entry: a forward that scales, standardizes or otherwise transforms the weight)")
    return None
