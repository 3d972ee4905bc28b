"""The step a torch optimizer gives a weight per unit of steady gradient: the step size of the
proximal prior (mackay_ext.standalone_prior) under an optimizer other than MacKayAdam.

The prior w <- w / (1 + s alpha / N) balances the data's step where the two pull equally. If s
is the optimizer's own step per unit of gradient, that balance is the posterior mode
g = -alpha w / N that MacKay's update assumes. With s = lr under Adam, which moves a weight by
lr / sqrt(v) per unit of gradient, the prior pulled 1/sqrt(v) times weaker than the data (1e4
times near a fit, where gradients are 1e-4): the weights stayed at the unregularised fit, whose
curvature is near 0, and the first pruning update left 19 of a tiny BERT's 21,760 weights under
the Hugging Face Trainer's AdamW (the majority class; MacKayAdam, whose step holds the prior's
gradient inside Adam's normalisation, kept 805, and now AdamW keeps 977).

Each rule reads the optimizer's own per-weight state after its step; every value stays on the
weight's device (no host sync).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch

# the torch optimizers whose step per unit of gradient is known here (and their subclasses)
KNOWN = ("SGD", "Adam", "AdamW", "NAdam", "RAdam", "Adamax", "RMSprop", "Adagrad", "Adadelta", "ASGD")
_KNOWN_CLASSES = tuple(getattr(torch.optim, name) for name in KNOWN)


def knows(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the step of `optimizer` per unit of gradient is known here. Another class's is
    read as Adam's where it keeps Adam's state, else taken to be lr (a stateless sign-SGD would
    be read as SGD: its class, not its state, says it is not)."""
    return isinstance(optimizer, _KNOWN_CLASSES)


class PriorStep(NamedTuple):
    """s = scale / denominator: `scale` a number (or a 0-d tensor: a tensor lr, Adagrad's decayed
    lr), `denominator` the optimizer's per-weight preconditioner (the weight's shape; None for a
    plain step). Kept apart so that the prior's factor 1 / (1 + s alpha / N) can be formed as
    d / (d + scale alpha / N) in two passes over the weight."""
    scale: float | torch.Tensor
    denominator: torch.Tensor | None = None

    def per_unit_gradient(self) -> float | torch.Tensor:
        return self.scale if self.denominator is None else self.scale / self.denominator


def step_per_unit_gradient(optimizer: torch.optim.Optimizer, group: dict[str, Any],
                           param: torch.Tensor) -> float | torch.Tensor | None:
    """lr, or lr over the optimizer's per-weight preconditioner (a tensor of the weight's shape),
    as `optimizer` stepped `param` last; None when the rule for this optimizer is not known."""
    step = prior_step(optimizer, group, param)
    return None if step is None else step.per_unit_gradient()


def prior_step(optimizer: torch.optim.Optimizer, group: dict[str, Any], param: torch.Tensor) -> PriorStep | None:
    """step_per_unit_gradient as a PriorStep; None when the rule for this optimizer is not known
    (the caller uses lr; MacKayPruner says so when it is built)."""
    lr = group.get("lr", 0.0)
    lr = float(lr) if not isinstance(lr, torch.Tensor) else lr.to(param.device)
    state = optimizer.state.get(param, {})
    if not knows(optimizer) and not ("exp_avg_sq" in state and "betas" in group):
        return None
    momentum = float(group.get("momentum", 0.0) or 0.0)
    steady = 1.0 / (1.0 - momentum) if 0.0 < momentum < 1.0 else 1.0   # a velocity builds up to this
    if "exp_avg_sq" in state and "betas" in group:   # Adam, AdamW, NAdam, RAdam: lr / (sqrt(v_hat) + eps)
        second = state.get("max_exp_avg_sq") if group.get("amsgrad") else None
        second = state["exp_avg_sq"] if second is None else second
        step = torch.as_tensor(state.get("step", 1.0), dtype=torch.float32, device=param.device).clamp(min=1.0)
        beta2 = float(group["betas"][1])
        denominator = _sqrt(_wide(second) / (1.0 - beta2 ** step)).add_(float(group.get("eps", 1e-8)))
        if isinstance(optimizer, torch.optim.RAdam):
            return _rectified(denominator, lr, step, beta2)
        return PriorStep(lr, denominator)
    if "exp_inf" in state:   # Adamax: lr / u (u holds eps already; 0 where a weight was pruned)
        exp_inf = _wide(state["exp_inf"])
        return PriorStep(lr, exp_inf.clamp(min=torch.finfo(exp_inf.dtype).tiny))
    if "square_avg" in state and "acc_delta" in state:   # Adadelta
        eps = float(group.get("eps", 1e-6))
        return PriorStep(lr, (_wide(state["square_avg"]) + eps).sqrt_().div_((_wide(state["acc_delta"]) + eps).sqrt_()))
    if "square_avg" in state:   # RMSprop (centered: the variance about the running mean)
        average = _wide(state["square_avg"]).clone()
        if "grad_avg" in state:
            average.sub_(_wide(state["grad_avg"]).square()).clamp_(min=0)
        return PriorStep(lr * steady, _sqrt(average).add_(float(group.get("eps", 1e-8))))
    if "sum" in state:   # Adagrad: its lr decays with the step count
        step = torch.as_tensor(state.get("step", 1.0), dtype=torch.float32, device=param.device)
        decayed = lr / (1.0 + (step - 1.0).clamp(min=0.0) * float(group.get("lr_decay", 0.0)))
        return PriorStep(decayed, _sqrt(_wide(state["sum"]).clone()).add_(float(group.get("eps", 1e-10))))
    if "eta" in state:   # ASGD: plain steps of a decaying size
        return PriorStep(torch.as_tensor(state["eta"], dtype=torch.float32, device=param.device))
    # SGD (heavy-ball or Nesterov: a constant force's steady step lr (1 - dampening) / (1 - momentum)),
    # or a known optimizer before its first step
    return PriorStep(lr * steady * (1.0 - float(group.get("dampening", 0.0) or 0.0)) if steady != 1.0 else lr)


def _sqrt(tensor: torch.Tensor) -> torch.Tensor:
    """sqrt in place of a state whose pruned entries are 0: plus the dtype's smallest normal
    number, which changes no result (eps follows) but keeps the CPU off its slow path for sqrt(0)
    (13x slower than for other numbers here: 0.5 against 0.04 ms over LeNet-300-100's first
    layer, the greatest cost of a step once 98% of it was pruned)."""
    return tensor.add_(torch.finfo(tensor.dtype).tiny).sqrt_()


def _wide(tensor: torch.Tensor) -> torch.Tensor:
    """A half-precision optimizer state in float32 (float32 and float64 as they are)."""
    return tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.float()


def _rectified(denominator: torch.Tensor, lr, step: torch.Tensor, beta2: float) -> PriorStep:
    """RAdam's step per unit gradient: the adaptive one times its rectification r_t once the
    variance of the adaptive rate is tractable (rho_t > 5), plain lr before."""
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    rho = rho_inf - 2.0 * step * beta2 ** step / (1.0 - beta2 ** step)
    rectification = ((rho - 4.0) * (rho - 2.0) * rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho)).clamp(min=0).sqrt()
    tractable = rho > 5.0
    return PriorStep(lr * torch.where(tractable, rectification, torch.ones_like(rectification)),
                     torch.where(tractable, denominator, torch.ones_like(denominator)))
