"""The ef-batch curvature's helpers (docs/mathematics.md section 1, "Curvature"): the bias correction of its
moving average (ema_bias, ema_debiased) and its reading from the gradient of each optimizer step
(StepCurvature), for optimizers without MacKayAdam's fused step and for the channel groups.
"""
from __future__ import annotations

import math

import torch


def ema_bias(steps, decay: float) -> float:
    """1 - rho^t: the share of its target that a moving average h <- rho h + (1 - rho) x, started
    at 0, holds after t updates of a constant x (Adam's bias correction). 1.0 where nothing needs
    correcting: rho = 1 (h never leaves its start), t unknown (inf: saved before the count was
    kept); 0.0 for t = 0 (nothing fed yet). `steps`: a number or a 0-d tensor (read on the host)."""
    decay, steps = float(decay), float(steps)
    if decay >= 1.0 or steps == math.inf:
        return 1.0
    if steps <= 0.0:
        return 0.0
    return -math.expm1(steps * math.log(decay)) if decay > 0.0 else 1.0


def batch_share_note(batch: float, num_data: float) -> str | None:
    """What ef-batch misses where the batch is a large share of the training set, or None below a
    tenth. Its B g^2 reads the spread of batch gradients around their mean: for B of N examples
    drawn without replacement (a shuffled epoch), E[B g^2] = B gbar^2 + (N - B) / (N - 1) s^2, s^2
    the per-example gradients' spread about their mean gbar, so near convergence (gbar ~ 0) h
    reads (N - B) / (N - 1) of the per-example squares (measured 0.506 at B = N / 2), and at a
    full batch none of them (a regression fitted on its 500 examples in one batch read 1e-4 of its
    curvature and pruned true weights exact ARD keeps, no word). The factor (N - 1) / (N - B) is
    no cure: at the optimum the data's mean gradient balances the prior's (gbar = -alpha w / N),
    a term it would inflate for weakly determined weights; ef-exact reads the squares exactly."""
    share = batch / num_data
    if share >= 1:
        why = ("full-batch training, where every step's gradient is the whole training set's, and one full "
               "batch has no spread: the curvature reads the squared gradient of the whole loss, nothing of "
               "the per-example squares")
    elif share > 0.1:
        why = (f"the spread shrinks as the batch nears the training set: near convergence it reads (N - B) / "
               f"(N - 1) = {(num_data - batch) / (num_data - 1):.2f} of the per-example squared gradients")
    else:
        return None
    return (f"batch_size ({batch:g}) is {share:.0%} of num_data ({num_data:g}). The ef-batch curvature reads the "
            f"spread of batch gradients around their mean; {why}, so the weights read less evidence than they "
            "have and more are pruned. curvature='ef-exact' reads the per-example squares exactly at any batch size")


def ema_debiased(curvature: torch.Tensor, steps, decay: float) -> torch.Tensor:
    """The ef-batch curvature h / (1 - rho^t) of a moving average that took t updates (see
    ema_bias): the estimate of B g^2 whatever t, where h alone holds (1 - rho^t) of it (3% after 3
    steps at rho = 0.99). Returns `curvature` itself (no copy) when there is nothing to correct:
    t = 0 (h is still its start), or 1 - rho^t == 1.0 in float64 (t above ~3,700 at rho = 0.99)."""
    bias = ema_bias(steps, decay)
    if bias == 0.0 or bias == 1.0:
        return curvature
    return curvature / bias


class StepCurvature:
    """h <- rho h + (1 - rho) B g^2 from the gradient of each optimizer step, not of each backward.

    A backward hook sees one micro-batch's part of the step's gradient under gradient accumulation
    (A updates per step, each from a partial gradient) and, under DistributedDataParallel, the
    rank's own gradient before the all-reduce (every rank its own h, world-size times too large
    with the global B). After the step, param.grad is the accumulated, averaged, unscaled (and
    clipped) gradient the optimizer used: with B the effective batch of one step the estimate is
    the one of a run without accumulation on that batch, the same on every rank, as MacKayAdam's
    fused step computes it. It is read after the step: a post-step hook fires only for steps that
    ran (GradScaler skips an overflowing step before the optimizer), and Lightning runs the last
    micro-batch's closure inside optimizer.step(); except for an optimizer that takes GradScaler's
    scale into its own step (_step_supports_amp_scaling: torch's fused Adam/AdamW, MacKayAdam): it
    gets optimizer.grad_scale / found_inf, may unscale the gradients in place and runs also when
    they overflowed (skipping itself on the device). GradScaler refuses closures, so there the
    gradients are complete before the step: read then, unscaled, and skip an overflowing step on
    the device (no host sync).

    entries: called at each step, returns (param, curvature, steps, batch_size, rho) tuples;
    `curvature` (param's shape) and `steps` (0-d float32, the updates taken: see ema_debiased)
    are updated in place. A parameter without a gradient in a step is left as it is.
    prior_gradients: with a prior added to the loss (MacKayPruner's prior="penalty"), called
    before each step, returns {id(param): the prior's gradient at the weights the step's gradient
    was taken at}; it is subtracted from the gradient read, so h holds the data's g^2 only (taken
    before the step: read after it, the weights have moved).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, entries, prior_gradients=None):
        self.entries = entries
        self.prior_gradients = prior_gradients
        self._prior: dict[int, torch.Tensor] = {}
        self._read_before_step = False
        self.handles = [optimizer.register_step_pre_hook(self._before_step),
                        optimizer.register_step_post_hook(self._after_step)]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    @torch.no_grad()
    def _before_step(self, optimizer, args, kwargs) -> None:
        if self.prior_gradients is not None:
            self._prior = self.prior_gradients()
        found_inf = getattr(optimizer, "found_inf", None)
        if found_inf is None:
            return
        self._read(getattr(optimizer, "grad_scale", None), found_inf)
        self._read_before_step = True

    @torch.no_grad()
    def _after_step(self, optimizer, args, kwargs) -> None:
        if self._read_before_step:   # done by the pre-step hook for this step
            self._read_before_step = False
            return
        self._read(None, None)

    def _read(self, grad_scale, found_inf) -> None:
        prior, self._prior = self._prior, {}
        for param, curvature, steps, batch_size, rho in self.entries():
            grad = param.grad
            if grad is None:   # not used by this step's forward: no evidence either way
                continue
            if grad_scale is not None:
                grad = grad / grad_scale.to(grad.device)
            if id(param) in prior:
                grad = grad - prior[id(param)]
            if found_inf is None:
                curvature.mul_(rho).addcmul_(grad, grad, value=(1 - rho) * batch_size)
                steps.add_(1)
            else:
                ran = found_inf.to(grad.device) == 0
                updated = torch.addcmul(curvature * rho, grad, grad, value=(1 - rho) * batch_size)
                curvature.copy_(torch.where(ran, updated, curvature))
                steps.add_(ran.to(steps.dtype))
