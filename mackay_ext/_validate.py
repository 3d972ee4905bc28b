"""Argument checks shared by the op wrappers and the pure-PyTorch fallback."""
from __future__ import annotations

import math

import torch

RULES = ("mackay", "em", "paper")
PRUNE_CRITERIA = ("alpha", "snr")
DEFAULT_THRESHOLDS = {"alpha": 1e13, "snr": 0.05}
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
BACKENDS = ("ext", "torch")


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
    if not alpha_fits(alpha.shape, weight.shape):
        raise RuntimeError(f"{where}: alpha must be broadcastable to the weight's shape "
                           f"{tuple(weight.shape)} (one alpha per weight or per group), got {tuple(alpha.shape)}")
    if not (math.isfinite(num_data) and num_data > 0):
        raise ValueError(f"{where}: num_data must be a positive number of training examples, got {num_data}")
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
