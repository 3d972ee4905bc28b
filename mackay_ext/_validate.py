"""Argument checks shared by the op wrappers and the pure-PyTorch fallback."""
from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Iterable

import torch

RULES = ("mackay", "em", "paper")
PRUNE_CRITERIA = ("alpha", "snr")
DEFAULT_THRESHOLDS = {"alpha": 1e13, "snr": 0.05}
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
BACKENDS = ("ext", "torch")


# Training frameworks whose callbacks call mackay_ext: a warning from inside names the user's
# trainer.fit() / trainer.train() line, not the framework's dispatch of its hooks
_FRAMEWORKS = ("lightning", "pytorch_lightning", "transformers", "accelerate")


def user_stacklevel() -> int:
    """warnings.warn's stacklevel that names the first frame outside torch, mackay_ext and the
    training frameworks, from a hook that torch calls through wrappers of its own
    (optimizer.load_state_dict's post-hooks run under torch._dynamo's disable wrapper: a fixed
    stacklevel named that)."""
    import os
    import sys
    modules = [torch, sys.modules[__package__]] + [sys.modules[name] for name in _FRAMEWORKS if name in sys.modules]
    inside = tuple(os.path.dirname(module.__file__) + os.sep for module in modules
                   if getattr(module, "__file__", None))
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(inside):
        frame, level = frame.f_back, level + 1
    return level


def check_choice(name: str, value: str, allowed: tuple[str, ...], where: str) -> None:
    if value not in allowed:
        raise ValueError(f"{where}: {name} must be one of {allowed}, got {value!r}")


def alpha_fits(alpha_shape, shape) -> bool:
    """Whether alpha broadcasts to a weight of `shape` (one alpha per weight or per group)."""
    offset = len(shape) - len(alpha_shape)
    return offset >= 0 and all(a in (1, w) for a, w in zip(alpha_shape, tuple(shape)[offset:]))


def check_dense_tensors(where: str, **tensors) -> None:
    """Reject non-tensors and sparse layouts before they reach the dispatcher, whose own error
    ("could not run ... with arguments from the 'SparseCPU' backend") names no argument."""
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.layout != torch.strided:
            raise RuntimeError(f"{where}: {name} must be a dense (strided) tensor, got {tensor.layout}")


def check_one_device(where: str, **tensors) -> None:
    """Every tensor given (None skipped) on the first one's device. The fake kernels call it:
    a 'meta' tensor among CPU or CUDA ones sends the call to the fake kernel (Meta outranks
    them), which would otherwise return without a word and leave the real tensors unchanged."""
    named = [(name, t) for name, t in tensors.items() if t is not None]
    if not named:
        return
    first_name, first = named[0]
    for name, tensor in named[1:]:
        if tensor.device != first.device:
            raise RuntimeError(f"{where}: {name} is on {tensor.device} but {first_name} is on {first.device}; "
                               "every tensor of one call must be on one device")


def check_update_values(alpha: torch.Tensor) -> None:
    """alpha >= 0 (+inf: pruned), read once an update (rare next to the steps): a negative alpha
    made N h + alpha zero, gamma infinite, and pruned every weight of a healthy layer. (A
    negative curvature entry is an edge case the update defines, a Hessian estimate's.) Not
    under tracing: fake tensors hold no values."""
    if torch.compiler.is_compiling() or alpha.is_meta:
        return
    if alpha.numel() and not float(alpha.min()) >= 0:   # (NaN compares False; one reduction, no mask)
        raise ValueError(f"mackay_update_: alpha must hold precisions >= 0 (+inf for pruned weights), got "
                         f"negative or NaN values (min {float(alpha.min())})")


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or inf in `tensor`. Its sum first (one pass, no mask: a NaN or an inf anywhere
    makes it non-finite), the entry-wise test only where that sum is not finite, which an
    overflow alone can make so. (torch.isfinite(x).all() over the weights and curvatures of a
    29M-weight model took 0.3 s of its pruner's update.)"""
    if bool(torch.isfinite(_sum(tensor))):
        return True
    return bool(torch.isfinite(tensor).all())


def any_nan(tensor: torch.Tensor) -> bool:
    """A NaN in `tensor` (alpha's +inf, pruned, is none): its sum is NaN only then, or where
    +inf meets -inf (then the entry-wise test)."""
    if not bool(torch.isnan(_sum(tensor))):
        return False
    return bool(torch.isnan(tensor).any())


def _sum(tensor: torch.Tensor) -> torch.Tensor:
    # (half precision summed in float32: its own sum overflows at 65,504)
    return tensor.sum(dtype=torch.float32) if tensor.dtype in (torch.float16, torch.bfloat16) else tensor.sum()


def check_update_args(weight, curvature, alpha, *, num_data, rule, prune, threshold, eps,
                      alpha_min, alpha_max) -> float:
    """Validate mackay_update_ arguments; return the effective threshold."""
    where = "mackay_update_"
    check_choice("rule", rule, RULES, where)
    check_choice("prune", prune, PRUNE_CRITERIA, where)
    check_dense_tensors(where, weight=weight, curvature=curvature, alpha=alpha)
    if weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{where}: weight must be float32, float64, float16 or bfloat16, got {weight.dtype}")
    if curvature.dtype != weight.dtype:
        raise TypeError(f"{where}: curvature must have the weight's dtype {weight.dtype}, got {curvature.dtype}")
    if alpha.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{where}: alpha must be float32 or float64, got {alpha.dtype}")
    if not (curvature.device == weight.device == alpha.device):
        raise RuntimeError(f"{where}: weight, curvature and alpha must be on one device, got weight on "
                           f"{weight.device}, curvature on {curvature.device}, alpha on {alpha.device}")
    if curvature.shape != weight.shape:
        raise RuntimeError(f"{where}: curvature must have the weight's shape {tuple(weight.shape)}, "
                           f"got {tuple(curvature.shape)}")
    for name, tensor in (("weight", weight), ("alpha", alpha)):   # as the compiled op refuses them
        # An empty tensor holds no memory to overlap, whatever its strides (torch * gives stride 0 there).
        if tensor.numel() and any(stride == 0 and size > 1
                                  for stride, size in zip(tensor.stride(), tensor.shape)):
            raise RuntimeError(f"{where}: {name} has overlapping memory (e.g. an expanded tensor); "
                               + ("it is written in place" if name == "weight" else "pass one entry per group"))
    if not alpha_fits(alpha.shape, weight.shape):
        raise RuntimeError(f"{where}: alpha must be broadcastable to the weight's shape "
                           f"{tuple(weight.shape)} (one alpha per weight or per group), got {tuple(alpha.shape)}")
    if not (math.isfinite(num_data) and num_data > 0):
        raise ValueError(f"{where}: num_data must be a positive number of training examples, got {num_data}")
    check_update_values(alpha)
    threshold = DEFAULT_THRESHOLDS[prune] if threshold is None else float(threshold)
    if not (math.isfinite(threshold) and threshold >= 0):
        raise ValueError(f"{where}: threshold must be finite and >= 0, got {threshold}")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"{where}: eps must be finite and >= 0, got {eps}")
    if not (math.isfinite(alpha_min) and alpha_min >= 0):
        raise ValueError(f"{where}: alpha_min must be finite and >= 0, got {alpha_min}")
    if alpha_max is not None and not alpha_max >= alpha_min:
        raise ValueError(f"{where}: alpha_max must be >= alpha_min ({alpha_min}), got {alpha_max}")
    return threshold


class NonFiniteError(FloatingPointError):
    """A loss, gradient, weight or curvature that is NaN or infinite: training has diverged."""


def check_count(value, name: str, where: str) -> float:
    """A positive count (num_data, batch_size): Python or NumPy numbers and 0-d tensors; not bool
    (True == 1 would pass silently for a flag passed by mistake)."""
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{where}: {name} must be a positive number, got the string {value!r}")
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        raise TypeError(f"{where}: {name} must be a positive number, got the bool {value!r}")
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dim() != 0:
            raise TypeError(f"{where}: {name} must be a number or a 0-d tensor, got a tensor of "
                            f"shape {tuple(value.shape)}")
        value = value.item()
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{where}: {name} must be a positive number, got {type(value).__name__} "
                        f"{value!r}") from None
    if hasattr(value, "dtype") and getattr(value.dtype, "kind", "") == "b":  # numpy bool
        raise TypeError(f"{where}: {name} must be a positive number, got the bool {value!r}")
    if not (math.isfinite(number) and number > 0):
        raise ValueError(f"{where}: {name} must be a positive, finite number, got {value!r}")
    return number


def check_initialised(model: torch.nn.Module, where: str) -> None:
    """Every parameter exists: a lazy module (nn.LazyLinear, ...) gets its weights at its first
    forward, and torch's own error ("Can't access the shape of an uninitialized parameter")
    names no layer."""
    lazy = [name for name, param in model.named_parameters()
            if isinstance(param, torch.nn.parameter.UninitializedParameter)]
    if lazy:
        raise ValueError(f"{where}: {', '.join(lazy[:4])}{', ...' if len(lazy) > 4 else ''} not initialised yet "
                         "(a lazy module, e.g. nn.LazyLinear, makes its weights at its first forward): run one "
                         "batch through the model first")


def check_module(value, name: str, where: str) -> None:
    """A torch.nn.Module, or a TypeError that names the argument (instead of an AttributeError
    from deep inside, e.g. 'str' object has no attribute 'named_parameters')."""
    if not isinstance(value, torch.nn.Module):
        shown = " ".join(repr(value).split())   # (an optimizer's repr runs over many lines)
        raise TypeError(f"{where}: {name} must be a torch.nn.Module, got {type(value).__name__} {shown:.60}")


# torch.ao's quantized modules (eager dynamic and static, FX-converted): packed int8 weights
_QUANTIZED_MODULES = ("torch.ao.nn.quantized", "torch.nn.quantized", "torch.ao.nn.intrinsic.quantized")


def quantized_modules(model: torch.nn.Module) -> list[str]:
    """The names of `model`'s torch.ao quantized modules (their packed parameters' holders left out)."""
    return [name for name, module in model.named_modules()
            if type(module).__module__.startswith(_QUANTIZED_MODULES) and not name.endswith("_packed_params")]


def check_not_quantized(model: torch.nn.Module, where: str, instead: str) -> None:
    """A clear refusal of a model quantized by torch.ao, whose packed int8 layers none of the
    library's conversions reads (an AttributeError or a tracer's error deep inside, otherwise)."""
    names = quantized_modules(model)
    if names:
        shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        raise TypeError(f"{where}: the model has layers quantized by torch.ao ({shown}), whose packed int8 "
                        f"weights {where} does not read; {instead}")


def check_optimizer(value, name: str, where: str) -> None:
    """A torch.optim.Optimizer or None."""
    if value is not None and not isinstance(value, torch.optim.Optimizer):
        raise TypeError(f"{where}: {name} must be a torch.optim.Optimizer or None, got "
                        f"{type(value).__name__} {value!r:.60}")


def _optional_number(value, name: str, where: str, expected: str) -> float | None:
    """None, or a real number (not a bool) as a float; `expected` says what is accepted."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where}: {name} must be {expected}, got {type(value).__name__} {value!r}")
    return float(value)


def check_threshold(value, where: str) -> float | None:
    """None (the prune criterion's default) or a finite number >= 0, as a float. Checked when the
    pruner is built: a string would otherwise fail only at the first update that prunes."""
    number = _optional_number(value, "threshold", where, "a number >= 0 or None (the criterion's default)")
    if number is not None and not (math.isfinite(number) and number >= 0):
        raise ValueError(f"{where}: threshold must be finite and >= 0, got {value!r}")
    return number


def warn_threshold_scale(prune: str, threshold: float | None, where: str) -> None:
    """The two criteria's thresholds differ by some 14 orders of magnitude (alpha: 1e13, snr:
    0.05), and either one given to the other prunes every weight: say so when one looks swapped."""
    if threshold is None:
        return
    if prune == "alpha" and threshold <= 1.0:
        warnings.warn(f"{where}: threshold={threshold:g} with prune='alpha' prunes every weight whose "
                      f"prior precision alpha is at least {threshold:g}, nearly all of them; that is "
                      "the scale of prune='snr' (default 0.05). prune='alpha' thresholds are large "
                      "(default 1e13, the paper's)", UserWarning, stacklevel=user_stacklevel())
    if prune == "snr" and threshold >= 1e6:
        warnings.warn(f"{where}: threshold={threshold:g} with prune='snr' prunes every weight whose "
                      f"signal-to-noise ratio w^2 / Sigma is below {threshold:g}, nearly all of them; "
                      "that is the scale of prune='alpha' (default 1e13). prune='snr' thresholds "
                      "are small (default 0.05)", UserWarning, stacklevel=user_stacklevel())


def check_max_prune_fraction(value, where: str) -> float | None:
    """None (no limit) or a number in (0, 1], as a float."""
    number = _optional_number(value, "max_prune_fraction", where, "a number in (0, 1] or None (no limit)")
    if number is not None and not 0.0 < number <= 1.0:
        raise ValueError(f"{where}: max_prune_fraction must be in (0, 1] (the share of a layer's live "
                         f"groups one update may prune), got {value!r}")
    return number


def check_names(value, name: str, where: str) -> None:
    """None or an iterable of names; a bare string would be read one character at a time."""
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{where}: {name} must be a list of module or parameter names, got the "
                        f"string {value!r} (pass [{value!r}] for one name)")
    if value is not None and not isinstance(value, Iterable):
        raise TypeError(f"{where}: {name} must be a list of module or parameter names or None, "
                        f"got {type(value).__name__} {value!r:.60}")
