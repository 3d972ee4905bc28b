"""State that follows its parameter when the model moves.

`model.to(torch.float64)` or `model.cuda()` after the optimizer or pruner was built keeps the
same Parameter objects with new data: torch's Adam does not notice, since it creates its state
at the first step. MacKayAdam and MacKayPruner create theirs when they are built (alpha must
exist before the first update), so each state is moved where its parameter now is when it is
next read: tensors shaped like the weight take its dtype and device (and Adam's moments and the
curvature its memory format, after model.to(memory_format=torch.channels_last)); alpha and the step
counts keep their dtype (float32: their precision is not the weight's) and only change device;
Adam's moments of a float16 weight and the curvature of a float16 or bfloat16 one are float32
(state_dtype).
A tensor on the meta device holds no values to move: it is left for the callers' checks.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch

# state entries in float32 whatever the parameter's dtype: a move changes only their device
FLOAT32_KEYS = frozenset({"alpha", "step", "curvature_steps"})
# Adam's moments: float32 for a float16 weight. The prior's share of the gradient, alpha w / N,
# passes float16's largest value (65504) once alpha is large (1e11 and more as a weight is pruned),
# and its square much sooner: in float16 the moments would turn to inf and the step to NaN.
MOMENT_KEYS = frozenset({"exp_avg", "exp_avg_sq"})
# weight-shaped state that keeps the weight's memory layout (strides), as zeros_like made it
LAID_OUT_KEYS = MOMENT_KEYS | {"curvature"}
# The ef-batch curvature h <- rho h + (1 - rho) B g^2 of a half-precision weight: float32. In
# float16 a step's share (1 - rho) B g^2 rounds to 0 once g is below ~1e-4 (h stayed 0 and the
# update pruned weights the data determine); in bfloat16's 8-bit mantissa the 1% steps fall
# below half an ulp of h, which stalled 15-20% short of B g^2.
HALF_DTYPES = (torch.float16, torch.bfloat16)


def state_dtype(key: str, param_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the weight-shaped state entry `key` of a parameter of `param_dtype`."""
    if key in MOMENT_KEYS and param_dtype == torch.float16:
        return torch.float32
    if key == "curvature" and param_dtype in HALF_DTYPES:
        return torch.float32
    return param_dtype


def follow_param(state: dict[str, Any], param: torch.Tensor) -> dict[str, Any]:
    """Move the tensors of `state` where `param` now is (in place, see the module's docstring);
    returns `state`. A state already there costs two attribute reads per tensor."""
    for key, value in state.items():
        if not isinstance(value, torch.Tensor) or value.is_meta:
            continue
        keeps_dtype = key in FLOAT32_KEYS or not value.is_floating_point()
        dtype = value.dtype if keeps_dtype else state_dtype(key, param.dtype)
        if key in LAID_OUT_KEYS and value.shape == param.shape and value.stride() != param.stride():
            # the model moved to another memory format (channels_last) after the state was made:
            # the fused step walks the weight and these in one flat order
            state[key] = torch.empty_like(param, dtype=dtype).copy_(value)
        elif value.device != param.device or value.dtype != dtype:
            state[key] = value.to(device=param.device, dtype=dtype)
    return state


class ParamStates(dict):
    """name -> the state dict of one parameter; each state is moved where its parameter is when
    read through [], get, values or items (see follow_param). Add states with track().

    A read that finds the parameter where it was (device, dtype, strides) and the state holding the
    very tensors follow_param last left skips its per-tensor checks: a pruner under a foreign
    optimizer reads these states 18 times a step, at 2.8 us each (a tenth of the pruner's cost on
    LeNet-300-100's 1.4 ms step) against about 1 us."""

    def __init__(self) -> None:
        super().__init__()
        self._params: dict[str, torch.Tensor] = {}
        self._placed: dict[str, tuple[tuple, tuple]] = {}   # see __getitem__

    def __setstate__(self, state: dict) -> None:   # (a copy pickled before _placed existed has none)
        self.__dict__.update(state)
        self.__dict__.setdefault("_placed", {})

    def track(self, name: str, param: torch.Tensor, state: dict[str, Any]) -> None:
        self._params[name] = param
        self._placed.pop(name, None)
        super().__setitem__(name, state)

    def __getitem__(self, name: str) -> dict[str, Any]:
        state, param = super().__getitem__(name), self._params[name]
        # (device, dtype, strides) of the parameter and the state's values at the last move
        where = (param.device, param.dtype, param.stride())
        placed = self._placed.get(name)
        if placed is not None and placed[0] == where and len(placed[1]) == len(state) \
                and all(held is value for held, value in zip(placed[1], state.values())):
            return state
        follow_param(state, param)
        # the values are held, not their ids: an id is reused once its tensor is freed
        self._placed[name] = (where, tuple(state.values()))
        return state

    def get(self, name: str, default: Any = None) -> Any:
        return self[name] if name in self else default

    def values(self) -> Iterable[dict[str, Any]]:   # type: ignore[override]
        return [self[name] for name in self]

    def items(self) -> Iterable[tuple[str, dict[str, Any]]]:   # type: ignore[override]
        return [(name, self[name]) for name in self]
