"""torch.optim.Adam's own options, as MacKayAdam meets them: code written for Adam passes them
(to the constructor, in a param group, or in a state_dict saved by Adam or AdamW), so each is
accepted at every value that changes nothing about the step, and refused, by name and with the
reason, at one that would (where a param group carried it, it used to be ignored in silence:
maximize=True minimised)."""
from __future__ import annotations

from typing import Any

# option -> (the values MacKayAdam runs exactly as Adam runs them, why the others are refused)
ADAM_OPTIONS: dict[str, tuple[tuple[Any, ...], str]] = {
    "foreach": ((None, False, True), ""),   # how torch launches Adam; MacKayAdam's launch is fused anyway
    "fused": ((None, False, True), ""),
    "amsgrad": ((False,), "MacKayAdam has no AMSGrad variant"),
    "maximize": ((False,), "negate the objective instead"),
    "capturable": ((False,), "the step reads its counts on the host; use GradScaler's grad_scale/found_inf"),
    "differentiable": ((False,), "the fused step is not differentiable"),
}


def check_adam_options(options: dict[str, Any], where: str) -> None:
    """Refuse an Adam option at a value MacKayAdam cannot honour (options it does not know are
    not looked at: torch's Optimizer keeps a group's extra keys too)."""
    for name, value in options.items():
        if name not in ADAM_OPTIONS:
            continue
        allowed, why = ADAM_OPTIONS[name]
        if not any(value is a or (type(value) is type(a) and value == a) for a in allowed):
            raise ValueError(f"{where}: {name}={value!r} is not supported ({why}); MacKayAdam takes "
                             f"{name}={allowed[0]!r}, as torch.optim.Adam's default")
