"""Pure-PyTorch fallback: the same mathematics as the compiled kernels, no extension needed.

Written from docs/mathematics.md section 1 with whole-tensor PyTorch ops; it is the `backend="torch"`
path and the baseline the benchmarks compare against.
"""
from __future__ import annotations

import math

import torch

from ._alpha import group_dims
from ._follow import HALF_DTYPES
from ._validate import check_update_args


def mackay_update_(weight, curvature, alpha, *, num_data, rule="mackay", prune="alpha",
                   threshold=None, eps=1e-16, alpha_min=0.0, alpha_max=None):
    """Reference of mackay_ext.ops.mackay_update_ (same signature and semantics)."""
    from .ops import UpdateStats  # the result type lives with the ops

    threshold = check_update_args(weight, curvature, alpha, num_data=num_data, rule=rule,
                                  prune=prune, threshold=threshold, eps=eps, alpha_min=alpha_min,
                                  alpha_max=alpha_max)
    gamma_sum = torch.zeros((), dtype=torch.float64, device=weight.device)
    num_pruned = torch.zeros((), dtype=torch.int64, device=weight.device)
    if weight.numel() == 0:
        return UpdateStats(gamma_sum, num_pruned)
    with torch.no_grad():
        wide = torch.float64 in (weight.dtype, alpha.dtype)
        math_dtype = torch.float64 if wide else torch.float32
        dims, padded = group_dims(weight, alpha)
        count = math.prod(weight.shape[d] for d in dims)

        def group_sum(x):
            return x.sum(dim=dims, keepdim=True) if dims else x

        w = weight.to(math_dtype)
        h = curvature.to(math_dtype)
        old = alpha.to(math_dtype).reshape(padded)
        n_h = torch.where(h <= 0, torch.zeros_like(h), h * num_data)  # -0 too: Sigma stays > 0
        already_pruned = old == math.inf

        weight_sq = group_sum(w * w)
        if rule == "paper":
            gamma = torch.full_like(old, float(count))
        else:
            gamma = group_sum(torch.where(old == 0, torch.ones_like(n_h), n_h / (n_h + old)))
        if rule == "mackay":
            new = gamma / (weight_sq + eps)
        elif rule == "em":
            new = count / (weight_sq + group_sum(1.0 / (n_h + old)))
        else:
            new = count / (weight_sq + eps)
        new = torch.where(torch.isnan(new), old,
                          new.clamp(min=alpha_min, max=alpha_max if alpha_max is not None else math.inf))

        if prune == "alpha":
            criterion = new >= threshold
        else:
            criterion = weight_sq < threshold * group_sum(1.0 / (n_h + new))
        pruned = already_pruned | (new == math.inf) | criterion
        new = torch.where(pruned, torch.full_like(new, math.inf), new)

        alpha.copy_(new.reshape(alpha.shape))
        weight.masked_fill_(pruned.expand(weight.shape), 0)
        gamma_sum.copy_(torch.where(pruned, torch.zeros_like(gamma), gamma).sum(dtype=torch.float64))
        num_pruned.copy_(pruned.sum())
    return UpdateStats(gamma_sum, num_pruned)


def _check_adam_inputs(params, grads, exp_avgs, exp_avg_sqs, steps, curvatures, alphas, *, lr, beta1,
                       beta2, eps, weight_decay, num_data, batch_size, curvature_decay, grad_scale,
                       found_inf) -> None:
    """The compiled op's checks (csrc/adam_step.cpp), all made before anything is written: a
    refused call changes nothing, steps included, on either backend (strides aside: the foreach
    ops here take any)."""
    op = "mackay_adam_step_"
    n = len(params)
    if not (len(grads) == len(exp_avgs) == len(exp_avg_sqs) == len(steps) == n):
        raise RuntimeError(f"{op}: params, grads, exp_avgs, exp_avg_sqs and steps must have one entry per "
                           f"parameter; got lengths {n}, {len(grads)}, {len(exp_avgs)}, {len(exp_avg_sqs)}, "
                           f"{len(steps)}")
    if len(alphas) > n or (curvatures and len(curvatures) != len(alphas)):
        raise RuntimeError(f"{op}: {len(alphas)} alphas and {len(curvatures)} curvatures for {n} params "
                           "(one alpha per ARD parameter, the first ones; curvatures empty or one per alpha)")
    for name, value, ok in (("lr", lr, math.isfinite(lr) and lr >= 0), ("beta1", beta1, 0 <= beta1 < 1),
                            ("beta2", beta2, 0 <= beta2 < 1), ("eps", eps, math.isfinite(eps) and eps >= 0),
                            ("weight_decay", weight_decay, math.isfinite(weight_decay) and weight_decay >= 0),
                            ("num_data", num_data, math.isfinite(num_data) and num_data > 0)):
        if not ok:
            raise ValueError(f"{op}: {name} out of range, got {value}")
    if curvatures and not (math.isfinite(batch_size) and batch_size > 0 and 0 <= curvature_decay <= 1):
        raise ValueError(f"{op}: batch_size must be positive and curvature_decay in [0, 1] to track "
                         f"curvature, got {batch_size}, {curvature_decay}")
    if not n:
        return
    first = params[0]
    for name, t in (("grad_scale", grad_scale), ("found_inf", found_inf)):
        if t is not None and (t.dtype != torch.float32 or t.numel() != 1 or t.device != first.device):
            raise RuntimeError(f"{op}: {name} must be one float32 value on {first.device}")
    for i, param in enumerate(params):
        if param.layout != torch.strided or param.device != first.device or param.dtype != first.dtype:
            raise RuntimeError(f"{op}: params[{i}] must be dense and share params[0]'s device and dtype")
        lists = [("grads", grads), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs)]
        lists += [("curvatures", curvatures)] if i < len(curvatures) else []
        for name, tensors in lists:
            t = tensors[i]
            if t.layout != torch.strided:
                raise RuntimeError(f"{op}: {name}[{i}] must be dense (sparse gradients are not supported)")
            # h of a bfloat16 / float16 weight may be float32, the same for every entry of a call
            if name == "curvatures" and t.dtype != tensors[0].dtype:
                raise TypeError(f"{op}: all curvatures of one call must share a dtype; curvatures[{i}] is "
                                f"{t.dtype}, curvatures[0] is {tensors[0].dtype}")
            wide_h = name == "curvatures" and param.dtype in HALF_DTYPES and t.dtype == torch.float32
            if t.device != param.device or (t.dtype != param.dtype and not wide_h) or t.shape != param.shape:
                raise RuntimeError(f"{op}: {name}[{i}] must have the shape, dtype and device of params[{i}] "
                                   f"({tuple(param.shape)}, {param.dtype}, {param.device}), got "
                                   f"{tuple(t.shape)}, {t.dtype}, {t.device}")
        if steps[i].dtype != torch.float32 or steps[i].numel() != 1 or steps[i].device != param.device:
            raise RuntimeError(f"{op}: steps[{i}] must be one float32 value on {param.device}")
        if i < len(alphas):
            alpha = alphas[i]
            if alpha.dtype != torch.float32 or alpha.device != param.device:
                raise TypeError(f"{op}: alphas[{i}] must be float32 on {param.device}, got {alpha.dtype} "
                                f"on {alpha.device}")
            offset = param.dim() - alpha.dim()
            if offset < 0 or any(a not in (1, p) for a, p in zip(alpha.shape, param.shape[offset:])):
                raise RuntimeError(f"{op}: alphas[{i}] of shape {tuple(alpha.shape)} must be broadcastable "
                                   f"to params[{i}] {tuple(param.shape)}")


def mackay_adam_step_(params, grads, exp_avgs, exp_avg_sqs, steps, curvatures, alphas, *, lr,
                      beta1, beta2, eps, weight_decay, decoupled_weight_decay, num_data,
                      batch_size, curvature_decay, grad_scale=None, found_inf=None):
    """Reference of torch.ops.mackay_ext.mackay_adam_step_ with foreach ops (same signature).

    The first len(alphas) params carry ARD state; `steps` are incremented here (not when
    found_inf is set). Math runs in float32 for half-precision params (copies written back),
    with no host synchronisation.
    """
    _check_adam_inputs(params, grads, exp_avgs, exp_avg_sqs, steps, curvatures, alphas, lr=lr,
                       beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, num_data=num_data,
                       batch_size=batch_size, curvature_decay=curvature_decay, grad_scale=grad_scale,
                       found_inf=found_inf)
    if not params:
        return
    with torch.no_grad():
        wide = params[0].dtype == torch.float64
        math_dtype = torch.float64 if wide else torch.float32

        def up(tensors):
            return [t if t.dtype == math_dtype else t.to(math_dtype) for t in tensors]

        w, m, v = up(params), up(exp_avgs), up(exp_avg_sqs)
        g = up(grads)
        if grad_scale is not None:
            g = torch._foreach_div(g, grad_scale.to(math_dtype))
        num_ard = len(alphas)
        alpha_full = [a.to(math_dtype).expand_as(p) for a, p in zip(alphas, params)]
        pruned = [a == math.inf for a in alpha_full]
        before = [t.clone() for t in params + exp_avgs + exp_avg_sqs + list(curvatures)] \
            if found_inf is not None else None
        if found_inf is None:
            torch._foreach_add_(steps, 1)
        else:
            torch._foreach_add_(steps, [1 - found_inf.to(s.dtype) for s in steps])

        h = up(curvatures)
        if h:
            # h <- rho h + (1 - rho) B g^2, left unchanged where the weight is pruned
            h_new = torch._foreach_mul(h, curvature_decay)
            torch._foreach_addcmul_(h_new, g[:num_ard], g[:num_ard], value=(1 - curvature_decay) * batch_size)
            h = [torch.where(p, old, new) for p, old, new in zip(pruned, h, h_new)]

        # direction = g + (alpha / N + coupled weight decay) * w; pruned alphas read as 0
        coupled = 0.0 if decoupled_weight_decay else weight_decay
        coefficients = [torch.where(p, torch.zeros_like(a), a) / num_data + coupled
                        for p, a in zip(pruned, alpha_full)]
        direction = torch._foreach_addcmul(g[:num_ard], coefficients, w[:num_ard]) if num_ard else []
        if num_ard < len(w):
            plain = torch._foreach_add(g[num_ard:], w[num_ard:], alpha=coupled) if coupled else list(g[num_ard:])
            direction = list(direction) + list(plain)
        if decoupled_weight_decay and weight_decay:
            torch._foreach_mul_(w, 1 - lr * weight_decay)

        torch._foreach_mul_(m, beta1)
        torch._foreach_add_(m, direction, alpha=1 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, direction, direction, value=1 - beta2)

        step_values = [s.to(math_dtype) for s in steps]
        bias_correction1 = [1 - torch.pow(beta1, s) for s in step_values]
        bias_correction2_sqrt = [torch.sqrt(1 - torch.pow(beta2, s)) for s in step_values]
        denom = torch._foreach_div(torch._foreach_sqrt(v), bias_correction2_sqrt)
        torch._foreach_add_(denom, eps)
        update = torch._foreach_div(m, denom)
        torch._foreach_mul_(update, [lr / bc for bc in bias_correction1])
        torch._foreach_sub_(w, update)

        for p, *tensors in zip(pruned, w, m, v):
            for t in tensors:
                t.masked_fill_(p, 0)

        results = list(w) + list(m) + list(v) + list(h)
        targets = list(params) + list(exp_avgs) + list(exp_avg_sqs) + list(curvatures)
        if found_inf is not None:
            skip = found_inf.to(torch.bool)
            results = [torch.where(skip, old.to(new.dtype), new) for old, new in zip(before, results)]
        for target, result in zip(targets, results):
            if result is not target:
                target.copy_(result)


@torch.no_grad()
def adam_proximal_prior_(weight, exp_avg_sq, alpha, step, *, beta2, eps, scale, found_inf=None):
    """mackay_ext::adam_proximal_prior_ in torch ops: w <- w d / (d + scale alpha) with
    d = sqrt(v / (1 - beta2^max(t, 1)) + tiny) + eps; 0 where alpha = +inf; nothing where found_inf."""
    if found_inf is not None and float(found_inf) != 0.0:
        return
    bias = 1.0 - beta2 ** max(float(step), 1.0)
    d = (exp_avg_sq / bias).add_(torch.finfo(exp_avg_sq.dtype).tiny).sqrt_().add_(eps)
    pruned = alpha == math.inf
    factor = d / (d + scale * torch.where(pruned, torch.zeros_like(alpha), alpha))
    weight.mul_(factor).masked_fill_(pruned.expand_as(weight), 0)


def csr_linear(x, crow_indices, col_indices, values, bias=None, *, in_features=None):
    """Reference of mackay_ext.ops.csr_linear: scatter W densely, then F.linear (differentiable
    in x, values and bias through autograd)."""
    from .csr import to_dense

    in_features = x.shape[-1] if in_features is None else in_features
    weight = to_dense(crow_indices, col_indices, values, (crow_indices.numel() - 1, in_features))
    return torch.nn.functional.linear(x, weight, bias)
