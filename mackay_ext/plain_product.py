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

import copy
import warnings

import torch
from torch import nn
from torch.nn import functional as F

PLAIN_FORWARDS = (nn.Linear.forward, nn.Conv1d.forward, nn.Conv2d.forward)
# The derivative against the plain product, relative to the product's largest entry. The same
# kernels on the same numbers agree to rounding; a forward may compute in bfloat16 inside a
# float32 layer (~3e-3 off), which 1e-2 lets through while a transformed weight (a 0.5 scale:
# 0.5 off; standardization: several times the product) is far above it.
TOLERANCE = {torch.float16: 5e-2, torch.bfloat16: 5e-2}
DEFAULT_TOLERANCE = 1e-2
HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


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
    """The check could not run: the layer could not be copied, its forward not run under
    forward-mode differentiation, or the plain product not formed from its input."""


def _private_copy(module: nn.Module) -> nn.Module:
    """A copy of the layer for the check's forward to run on, so that nothing it does reaches the
    user's modules (an output appended to a list kept for an auxiliary loss, a call counter, a
    cache): its parameters shared (not copied), its and its children's hooks left behind."""
    memo: dict[int, object] = {}

    def share_tensors(value, depth: int = 0) -> None:
        """Tensors the copy shares rather than copies (an output kept with its graph cannot be
        deep-copied), found in attributes and the containers in them."""
        if isinstance(value, torch.Tensor):
            memo.setdefault(id(value), value)
        elif depth < 4 and isinstance(value, (list, tuple, set, frozenset)):
            for item in value:
                share_tensors(item, depth + 1)
        elif depth < 4 and isinstance(value, dict):
            for item in value.values():
                share_tensors(item, depth + 1)

    for m in module.modules():
        memo.update({id(b): b.clone() for b in m._buffers.values() if b is not None})   # updated in place
        memo.update({id(m.__dict__[name]): type(m.__dict__[name])() for name in HOOK_DICTS if name in m.__dict__})
        for name, value in m.__dict__.items():
            if name not in ("_buffers", "_modules"):
                share_tensors(value)
    return copy.deepcopy(module, memo)


def weight_use_problem(module: nn.Module, x: torch.Tensor, inputs: tuple, kwargs: dict) -> str | None:
    """None when `module`'s forward on `inputs` and `kwargs` depends on its weight as the
    layer's plain product of its input `x` (one of them); otherwise what differs, in a few
    words. Raises Unchecked when that cannot be told. The forward runs once more, on a private
    copy of the layer (_private_copy) with the random state put back afterwards; what it does
    outside the layer (a global counter, a print, a global module hook) happens once more."""
    try:
        probe = _private_copy(module)
        # the tensor the forward reads as self.weight: the parameter, or torch.nn.utils.prune's
        # product of weight_orig and the mask, an attribute its pre-hook sets
        holder = probe._parameters if "weight" in probe._parameters else probe.__dict__
        weight = holder["weight"].detach()
        autocast = (torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type)
                    else x.dtype)
    except Exception as err:
        raise Unchecked(f"{type(err).__name__}: {str(err)[:200]}") from err
    generator = torch.Generator().manual_seed(0)   # the user's random streams stay untouched
    direction = torch.randn(weight.shape, generator=generator, dtype=torch.float32).to(weight)

    def output(w):
        holder["weight"] = w
        return probe.forward(*inputs, **kwargs)

    devices = [x.device] if x.device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices), warnings.catch_warnings():
        # torch.func's first use scripts a helper, and torch's deprecation of that names no call of the user's
        warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)
        try:
            _, change = torch.func.jvp(output, (weight,), (direction,))
            # the plain product in float64, autocast off: a forward may cast its input or weight
            with torch.autocast(x.device.type, enabled=False):
                expected = _plain(module, x.double(), direction.double())
        except Exception as err:
            raise Unchecked(f"{type(err).__name__}: {str(err)[:200]}") from err
    if not isinstance(change, torch.Tensor) or change.shape != expected.shape:
        got = tuple(change.shape) if isinstance(change, torch.Tensor) else type(change).__name__
        return (f"its output has shape {got} where the plain product of its input gives "
                f"{tuple(expected.shape)} (a forward that pads or reshapes its input)")
    scale = float(expected.abs().max())
    difference = float((change.double() - expected).abs().max()) / max(scale, torch.finfo(torch.float64).tiny)
    if difference > max(TOLERANCE.get(dtype, DEFAULT_TOLERANCE) for dtype in (x.dtype, weight.dtype, change.dtype,
                                                                           autocast)):
        return (f"its output changes with its weight unlike the plain product (off by {difference:.3g} of its "
                "largest entry: a forward that scales, standardizes or otherwise transforms the weight)")
    return None
