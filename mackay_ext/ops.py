"""Python entry points of the compiled ops, with their fake (meta) kernels for torch.compile."""
from __future__ import annotations

from typing import NamedTuple

import torch

from . import _extension, reference
from .csr import TransposeIndex, check_csr, csr_linear, transpose_index  # noqa: F401  (public API)
from ._validate import BACKENDS, check_choice, check_dense_tensors, check_one_device, check_update_values


class UpdateStats(NamedTuple):
    """Result of a precision update; 0-dim tensors on the op's device (no host sync)."""

    gamma_sum: torch.Tensor   # float64: sum of gamma, the effective number of parameters
    num_pruned: torch.Tensor  # int64: alpha entries that are +inf after the update


def mackay_update_(
    weight: torch.Tensor,
    curvature: torch.Tensor,
    alpha: torch.Tensor,
    *,
    num_data: float,
    rule: str = "mackay",
    prune: str = "alpha",
    threshold: float | None = None,
    eps: float = 1e-16,
    alpha_min: float = 0.0,
    alpha_max: float | None = None,
    backend: str = "ext",
) -> UpdateStats:
    """One MacKay re-estimation of the prior precisions `alpha`, in place; prunes groups.

    weight:    parameter tensor, any shape S (float32/64, float16, bfloat16).
    curvature: shape S, same dtype: per-example diagonal curvature h >= 0 (total is N*h).
    alpha:     float32/64, broadcastable to S; elements of `weight` sharing one alpha form a
               group, e.g. (1, in) = one per input neuron of a Linear, (out, 1, 1, 1) per filter.
    rule:      "mackay": alpha <- gamma / (sum w^2 + eps), gamma = sum N h / (N h + alpha);
               "em": alpha <- n / (sum w^2 + sum Sigma_ii); "paper": alpha <- n / (sum w^2 + eps).
    prune:     "alpha": alpha >= threshold (default 1e13); "snr": sum w^2 / sum Sigma_ii <
               threshold (default 0.05), Sigma_ii = 1 / (N h + alpha_new).
    A pruned group gets alpha = +inf and its weights set to exactly 0; it stays pruned.
    New alphas are clamped to [alpha_min, alpha_max] (alpha_max at most the largest finite value
    of alpha's dtype: +inf means pruned); a NaN estimate keeps the old alpha.
    "em" from alpha = 0 is degenerate where an entry has h = 0 (its Sigma_ii is infinite, so the
    group's alpha stays 0, or snr prunes it): MacKayPruner starts em from MacKay's estimate.
    backend:   "ext" (compiled kernels) or "torch" (mackay_ext.reference, no extension needed).
    """
    check_choice("backend", backend, BACKENDS, "mackay_update_")
    if alpha.dtype in (torch.float32, torch.float16, torch.bfloat16) and (
            alpha_max is None or (isinstance(alpha_max, (int, float)) and not isinstance(alpha_max, bool))):
        # an estimate beyond alpha's range (tiny float64 weights, eps = 0) would be stored as
        # +inf, the mark of a pruned group, with its weights left non-zero: cap it there
        top = torch.finfo(alpha.dtype).max
        alpha_max = top if alpha_max is None else min(float(alpha_max), top)
    kwargs = dict(num_data=float(num_data), rule=rule, prune=prune, threshold=threshold, eps=eps,
                  alpha_min=alpha_min, alpha_max=alpha_max)
    if backend == "torch":
        return reference.mackay_update_(weight, curvature, alpha, **kwargs)
    _extension.require()
    check_dense_tensors("mackay_update_", weight=weight, curvature=curvature, alpha=alpha)
    check_update_values(alpha)
    with torch.no_grad():
        gamma_sum, num_pruned = torch.ops.mackay_ext.mackay_update_.default(
            weight, curvature, alpha, **kwargs)
        # the kernel writes in place below autograd, which would not see it: advance the versions as
        # torch's own in-place ops do (autograd's saved-tensor check; kept_pattern's cache of alpha)
        torch.autograd.graph.increment_version([weight, alpha])
    return UpdateStats(gamma_sum, num_pruned)


def mackay_adam_step_(params, grads, exp_avgs, exp_avg_sqs, steps, curvatures, alphas, *, lr,
                      beta1, beta2, eps, weight_decay, decoupled_weight_decay, num_data,
                      batch_size, curvature_decay, grad_scale=None, found_inf=None,
                      backend="ext") -> None:
    """One fused MacKay-Adam step over lists of one device and dtype (docs/mathematics.md section 2).

    The first len(alphas) params carry ARD state: alphas (float32, broadcastable to the param)
    and, when `curvatures` is non-empty, the ef-batch curvature h (param's shape and dtype).
    The rest get plain Adam. `steps` (float32 scalars on the params' device) count the steps
    taken and are incremented here. With found_inf != 0 nothing changes, steps included;
    grads are divided by grad_scale. Most users want
    mackay_ext.optim.MacKayAdam instead.
    """
    check_choice("backend", backend, BACKENDS, "mackay_adam_step_")
    kwargs = dict(lr=float(lr), beta1=float(beta1), beta2=float(beta2), eps=float(eps),
                  weight_decay=float(weight_decay), decoupled_weight_decay=bool(decoupled_weight_decay),
                  num_data=float(num_data), batch_size=float(batch_size),
                  curvature_decay=float(curvature_decay), grad_scale=grad_scale, found_inf=found_inf)
    if backend == "torch":
        reference.mackay_adam_step_(params, grads, exp_avgs, exp_avg_sqs, steps, curvatures, alphas,
                                    **kwargs)
        return
    _extension.require()
    with torch.no_grad():
        torch.ops.mackay_ext.mackay_adam_step_.default(
            params, grads, exp_avgs, exp_avg_sqs, steps, curvatures, alphas, **kwargs)
        # written below autograd: advance the weights' versions as torch's optimizers' in-place
        # steps do (a graph that saved a weight then refuses a backward through the stepped one,
        # and a stopped pruner update sees that the weights moved since)
        torch.autograd.graph.increment_version(params)


def adam_proximal_prior_(weight, exp_avg_sq, alpha, step, *, beta2, eps, scale, found_inf=None,
                         backend="ext") -> None:
    """The ARD prior's proximal step after a step of a torch Adam, AdamW or NAdam, in place, in
    one pass (mackay_ext.standalone_prior): w <- w d / (d + scale alpha), d = sqrt(v / (1 -
    beta2^max(step, 1)) + tiny) + eps with v the optimizer's exp_avg_sq and scale = lr / N (times
    the pruner's gradient_scale); w <- 0 where alpha = +inf; nothing where found_inf != 0.

    weight, exp_avg_sq: float32, one shape; alpha: float32, broadcastable to it; step: one value
    (Adam's state["step"]), on the CPU or the weight's device; found_inf: GradScaler's, or None.
    backend: "ext" (one kernel) or "torch" (mackay_ext.reference).
    """
    check_choice("backend", backend, BACKENDS, "adam_proximal_prior_")
    kwargs = dict(beta2=float(beta2), eps=float(eps), scale=float(scale), found_inf=found_inf)
    if backend == "torch":
        reference.adam_proximal_prior_(weight, exp_avg_sq, alpha, step, **kwargs)
        return
    _extension.require()
    check_dense_tensors("adam_proximal_prior_", weight=weight, exp_avg_sq=exp_avg_sq, alpha=alpha)
    with torch.no_grad():
        torch.ops.mackay_ext.adam_proximal_prior_.default(weight, exp_avg_sq, alpha, step, **kwargs)
        torch.autograd.graph.increment_version([weight])   # (an in-place write autograd did not see)


if _extension.is_loaded():

    @torch.library.register_fake("mackay_ext::adam_proximal_prior_")
    def _adam_proximal_prior_fake(weight, exp_avg_sq, alpha, step, *, beta2, eps, scale, found_inf=None):
        check_one_device("adam_proximal_prior_", weight=weight, exp_avg_sq=exp_avg_sq, alpha=alpha)
        return None

    @torch.library.register_fake("mackay_ext::mackay_update_")
    def _mackay_update_fake(weight, curvature, alpha, *, num_data, rule="mackay", prune="alpha",
                            threshold=None, eps=1e-16, alpha_min=0.0, alpha_max=None):
        check_one_device("mackay_update_", weight=weight, curvature=curvature, alpha=alpha)
        return (weight.new_empty((), dtype=torch.float64),
                weight.new_empty((), dtype=torch.int64))

    @torch.library.register_fake("mackay_ext::mackay_adam_step_")
    def _mackay_adam_step_fake(params, grads, exp_avgs, exp_avg_sqs, steps, curvatures, alphas,
                               *, lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay,
                               num_data, batch_size, curvature_decay, grad_scale=None,
                               found_inf=None):
        lists = {"params": params, "grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs,
                 "steps": steps, "curvatures": curvatures, "alphas": alphas}
        check_one_device("mackay_adam_step_", **{f"{name}[{i}]": tensor for name, tensors in lists.items()
                                                 for i, tensor in enumerate(tensors)})
        return None
