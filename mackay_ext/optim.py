"""MacKayAdam: Adam with per-weight ARD priors, fused into one pass over memory.

Per element (docs/mathematics.md section 2), for a parameter with ARD state:
    alpha == inf  ->  w = m = v = 0 (pruned)
    h <- rho h + (1 - rho) B g^2               (when batch_size is set: the ef-batch curvature)
    d = g + (alpha / N) w  (+ weight decay)
    m <- b1 m + (1 - b1) d ;  v <- b2 v + (1 - b2) d^2
    w <- w - lr (m / bc1) / (sqrt(v / bc2) + eps)
With alpha = 0 and no curvature this is exactly torch.optim.Adam (AdamW with
decoupled_weight_decay=True).
"""
from __future__ import annotations

import math
import numbers
import operator
from typing import Any

import torch

from . import _extension, ops
from ._adam_options import check_adam_options
from ._follow import MOMENT_KEYS, follow_param, state_dtype
from ._validate import BACKENDS, alpha_fits, check_choice, check_count, check_initialised, check_module
from .batch_curvature import ema_debiased
from .sharded import refuse_sharded

_STATE_KEYS = ("step", "exp_avg", "exp_avg_sq", "alpha", "curvature")
# C-level accessors for the per-step passes over the parameters (MacKayAdam._plan)
_GRAD, _DTYPE, _DEVICE = (operator.attrgetter(name) for name in ("grad", "dtype", "device"))
_same = operator.is_


def _has_no_grad(param: torch.Tensor) -> bool:
    return param.grad is None


def _schedule_pattern(groups) -> tuple[int, ...]:
    """Which param groups share lr and betas (for each group, the first group with the same): a
    plan's launch joins groups with the same values, so a change of this pattern remakes the plan,
    a change of the values (a scheduler's, every step) does not."""
    values = [(float(group["lr"]), *map(float, group["betas"])) for group in groups]
    return tuple(map(values.index, values))


def _in_param_layouts(params, grads, wheres) -> list[torch.Tensor]:
    """The gradients in their parameters' memory layouts (the kernels walk both in one order)."""
    out = []
    for param, grad, where in zip(params, grads, wheres):
        if grad.layout != torch.strided:
            raise RuntimeError(f"MacKayAdam: sparse gradients are not supported ({where})")
        out.append(_grad_like(grad, param))
    return out


def ard_param_groups(model: torch.nn.Module, is_ard=None) -> list[dict[str, Any]]:
    """Split a model's parameters into an ARD group (by default every parameter with dim >= 2:
    Linear and Conv weights) and a plain-Adam group (biases, norms) with ard=False."""
    check_module(model, "model", "ard_param_groups")
    check_initialised(model, "ard_param_groups")
    if is_ard is not None and not callable(is_ard):
        raise TypeError("ard_param_groups: is_ard must be a function (name, param) -> bool or None, "
                        f"got {type(is_ard).__name__}")
    is_ard = is_ard or (lambda name, param: param.dim() >= 2)
    ard, plain = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (ard if is_ard(name, param) else plain).append(param)
    groups = [{"params": ard}]
    if plain:
        groups.append({"params": plain, "ard": False})
    return groups


def _check_params(group: dict[str, Any]) -> None:
    """What the fused step cannot take, refused when a group is added rather than at the first step."""
    refuse_sharded(((f"a parameter of shape {tuple(p.shape)}", p) for p in group["params"]), "MacKayAdam")
    for param in group["params"]:
        if param.is_complex():
            raise TypeError(f"MacKayAdam: complex parameters are not supported (one of shape {tuple(param.shape)}): "
                            "the prior and the curvature are real; make torch.view_as_real(...) of it the parameter")
        # empty_like keeps the strides of a dense, non-overlapping tensor and only of one
        if param.numel() > 1 and torch.empty_like(param, device="meta").stride() != param.stride():
            raise ValueError(f"MacKayAdam: a parameter of shape {tuple(param.shape)} with strides {param.stride()} "
                             "(a strided view, e.g. x[:, ::2]): the fused step walks dense memory; make the "
                             "parameter a contiguous tensor (.contiguous()) and slice it in forward")


def _is_number(value) -> bool:
    """A real number (Python, NumPy or a 0-d tensor), not a bool or a string."""
    if isinstance(value, torch.Tensor):
        return value.dim() == 0 and not value.is_complex() and value.dtype != torch.bool
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_group_types(group: dict[str, Any]) -> None:
    """The types of a group's options, once, where the group enters (add_param_group,
    load_state_dict): Python's own errors ("must be real number, not str") named none, and
    "no" as ard was true. _check_group checks their values at every step."""
    where = "MacKayAdam"
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2 or not all(map(_is_number, betas)):
        raise ValueError(f"{where}: betas must be two numbers in [0, 1), got {betas!r}")
    for name in ("eps", "weight_decay", "curvature_decay"):
        if not _is_number(group[name]):
            raise TypeError(f"{where}: {name} must be a number, got {type(group[name]).__name__} {group[name]!r}")
    for name in ("ard", "decoupled_weight_decay"):   # "no" would be true
        if not isinstance(group[name], bool):
            raise TypeError(f"{where}: {name} must be True or False, got {type(group[name]).__name__} "
                            f"{group[name]!r}")


def _check_group(group: dict[str, Any]) -> None:
    where = "MacKayAdam"
    if isinstance(group["lr"], (str, bool)) or not isinstance(group["lr"], (int, float, torch.Tensor)):
        raise TypeError(f"{where}: lr must be a number, got {type(group['lr']).__name__} {group['lr']!r}")
    lr = float(group["lr"])
    if not (math.isfinite(lr) and lr >= 0):
        raise ValueError(f"{where}: lr must be finite and >= 0, got {group['lr']}")
    betas = group["betas"]
    if len(betas) != 2 or not all(0.0 <= float(b) < 1.0 for b in betas):
        raise ValueError(f"{where}: betas must be two numbers in [0, 1), got {betas}")
    if not (math.isfinite(group["eps"]) and group["eps"] >= 0):
        raise ValueError(f"{where}: eps must be finite and >= 0, got {group['eps']}")
    if not (math.isfinite(group["weight_decay"]) and group["weight_decay"] >= 0):
        raise ValueError(f"{where}: weight_decay must be finite and >= 0, got {group['weight_decay']}")
    # numpy integers and 0-d tensors are counts too; stored as floats so the kernels get numbers
    group["num_data"] = check_count(group["num_data"], "num_data", where)
    if group["batch_size"] is not None:
        group["batch_size"] = check_count(group["batch_size"], "batch_size", where)
        if group["batch_size"] > group["num_data"]:   # B g^2 would claim more data than there is
            raise ValueError(f"{where}: batch_size ({group['batch_size']:g}) exceeds num_data "
                             f"({group['num_data']:g}), the training-set size; a batch is part "
                             "of the training set (under DDP, both count every process's examples)")
    if not 0.0 <= group["curvature_decay"] < 1.0:   # at 1 the average never leaves 0
        raise ValueError(f"{where}: curvature_decay must be in [0, 1), got {group['curvature_decay']}")


def _check_alpha(alpha, param: torch.Tensor, where: str) -> None:
    if not isinstance(alpha, torch.Tensor) or alpha.dtype != torch.float32:
        raise TypeError(f"MacKayAdam: state['alpha'] of {where} must be a float32 tensor, got "
                        f"{getattr(alpha, 'dtype', type(alpha).__name__)}")
    if alpha.device != param.device:
        raise RuntimeError(f"MacKayAdam: state['alpha'] of {where} is on {alpha.device} but the "
                           f"parameter is on {param.device}")
    if not alpha_fits(alpha.shape, param.shape):
        raise RuntimeError(f"MacKayAdam: state['alpha'] of {where} has shape {tuple(alpha.shape)}, "
                           f"not broadcastable to the parameter's shape {tuple(param.shape)}")


def _grad_like(grad: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The gradient in the parameter's memory layout (the kernels walk both in one order)."""
    if grad.stride() == param.stride():
        return grad
    return torch.empty_like(param).copy_(grad)


class MacKayAdam(torch.optim.Optimizer):
    """Adam whose weights carry ARD prior precisions (state[p]["alpha"]) and an ef-batch
    curvature estimate (state[p]["curvature"]), all updated in one fused pass (one parallel
    region on the CPU, a few multi-tensor launches on CUDA).

    Args:
        params: parameters or param groups; a group with ``ard=False`` (biases, norms) gets
            plain Adam in the same launch and no ARD state (see ard_param_groups).
        num_data: N, the training-set size: the ARD term adds (alpha / N) * w to the gradient.
            Under DistributedDataParallel the whole training set, not one rank's shard (which
            would make the prior world-size times too strong, and prune more, with no word).
        batch_size: B; when set, h <- rho h + (1 - rho) B g^2 is accumulated every step.
        curvature_decay: rho.
        decoupled_weight_decay: AdamW-style decay.
        backend: "ext" (compiled kernels) or "torch" (foreach fallback, same math; the kernels
            also write 0 where m, v or h fall below the dtype's smallest normal number, whose
            subnormal arithmetic made a CPU step with a third of a layer's units dead 3.1x
            slower: the two differ there by less than 1.2e-38).

    ARD state is created lazily (alpha = 0: no prior; curvature = 0); alpha may be replaced by
    any float32 tensor broadcastable to the parameter, e.g. (1, in_features) for one precision
    per input neuron; +inf marks pruned weights, which are held at exactly 0.
    state["curvature"] is the moving average itself, which starts at 0: after t steps it holds
    (1 - rho^t) of B g^2; curvature_estimate(param) divides that out (Adam's bias correction,
    with t = state["step"], which counts exactly the steps that fed it).
    Works with GradScaler (grad_scale / found_inf, no host sync) and LR schedulers.

    gradient_scale (attribute, default 1, back to 1 after each step): the gradient the next step
    reads over the gradient of the mean loss that num_data and batch_size refer to, e.g.
    c = min(1, max_norm / (norm + 1e-6)) when clip_grad_norm_ scaled this step's gradient by c.
    The prior's term is then added as c alpha / N w and h reads (g / c)^2: the data and the prior
    scaled alike, as one step on c times the whole objective (clipping the data alone made the
    prior 1/c times stronger and h c^2 times smaller, and the updates pruned weights the data
    determine). MacKayPruner's gradient_scale sets it; the training-loop callbacks set it at
    every step.
    """

    _step_supports_amp_scaling = True

    @property
    def gradient_scale(self) -> float:
        return getattr(self, "_gradient_scale", 1.0)   # (not pickled: a setting of the next step)

    @gradient_scale.setter
    def gradient_scale(self, value) -> None:
        self._gradient_scale = check_count(value, "gradient_scale", "MacKayAdam")

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, num_data: float, batch_size: float | None = None,
                 curvature_decay: float = 0.99, decoupled_weight_decay: bool = False,
                 backend: str = "ext", amsgrad: bool = False, maximize: bool = False, foreach: bool | None = None,
                 fused: bool | None = None, capturable: bool = False, differentiable: bool = False):
        if isinstance(params, torch.nn.Module):   # torch's own message names neither fix
            raise TypeError(f"MacKayAdam: params must be the parameters, not the module: pass "
                            f"ard_param_groups(model) (a prior on the weights, plain Adam on biases and "
                            f"norms) or model.parameters(), got {type(params).__name__}")
        # torch.optim.Adam's own options, so that code passing them runs: each at a value that
        # changes nothing (mackay_ext._adam_options), not stored in the groups
        check_adam_options(dict(amsgrad=amsgrad, maximize=maximize, foreach=foreach, fused=fused,
                                capturable=capturable, differentiable=differentiable), "MacKayAdam")
        check_choice("backend", backend, BACKENDS, "MacKayAdam")
        if backend == "ext":
            _extension.require()
        self.backend = backend
        betas = tuple(betas) if isinstance(betas, (tuple, list)) else betas   # else: named at the group check
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                        "num_data": num_data, "batch_size": batch_size, "curvature_decay": curvature_decay,
                        "decoupled_weight_decay": decoupled_weight_decay, "ard": True}
        super().__init__(params, defaults)

    def __getstate__(self) -> dict[str, Any]:
        # torch.optim.Optimizer pickles only defaults, state and param_groups
        return dict(super().__getstate__(), backend=self.backend)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # load_state_dict calls this too, without a backend: keep the one this optimizer has
        self.backend = state.pop("backend", getattr(self, "backend", "ext"))
        super().__setstate__(state)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self._plan_cache = None
        super().add_param_group(param_group)
        try:   # Adam's options and the params once, here: not in _check_group, which runs every step
            check_adam_options(self.param_groups[-1], "MacKayAdam (param group)")
            _check_params(self.param_groups[-1])
            _check_group_types(self.param_groups[-1])
            _check_group(self.param_groups[-1])
        except (TypeError, ValueError):
            self.param_groups.pop()   # a refused group is not kept (every later step would fail)
            raise

    # ------------------------------------------------------------------ state
    def _group_of(self, param: torch.Tensor) -> dict[str, Any]:
        for group in self.param_groups:
            if any(p is param for p in group["params"]):
                return group
        raise KeyError("MacKayAdam: this tensor is not one of the optimizer's parameters")

    def _init_state(self, param: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        state = self.state[param]
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
            moments = state_dtype("exp_avg", param.dtype)   # float32 for a float16 weight (see _follow)
            state["exp_avg"] = torch.zeros_like(param, dtype=moments, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, dtype=moments, memory_format=torch.preserve_format)
        if group["ard"]:
            if "alpha" not in state:
                state["alpha"] = torch.zeros(param.shape, dtype=torch.float32, device=param.device)
            if "curvature" not in state:   # float32 for a half-precision weight (see _follow)
                state["curvature"] = torch.zeros_like(param, dtype=state_dtype("curvature", param.dtype),
                                                      memory_format=torch.preserve_format)
        # the model may have moved since the state was made (model.to() after the pruner made it)
        return follow_param(state, param)

    def ard_state(self, param: torch.Tensor) -> dict[str, Any]:
        """The state of an ARD parameter (created now if the optimizer has not stepped yet):
        a dict with "alpha", "curvature", "exp_avg", "exp_avg_sq", "step"."""
        group = self._group_of(param)
        if not group["ard"]:
            raise ValueError("MacKayAdam.ard_state: this parameter is in a group with ard=False")
        return self._init_state(param, group)

    def curvature_estimate(self, param: torch.Tensor) -> torch.Tensor:
        """The ef-batch curvature of an ARD parameter, h / (1 - rho^t) (t = state["step"]: the
        kernel feeds h at exactly the steps it counts, a GradScaler's skipped step at neither);
        state["curvature"] itself once the correction is below float64's resolution."""
        group = self._group_of(param)
        state = self.ard_state(param)
        if group["batch_size"] is None:   # h is not fed by the step: no moving average to correct
            return state["curvature"]
        return ema_debiased(state["curvature"], state["step"], group["curvature_decay"])

    def _checked_state(self, param, group, where):
        state = self._init_state(param, group)
        for key in _STATE_KEYS:   # what could not follow the parameter (see _follow)
            value = state.get(key)
            if isinstance(value, torch.Tensor) and value.device != param.device:
                raise RuntimeError(f"MacKayAdam: state['{key}'] of {where} is on {value.device} but "
                                   f"the parameter is on {param.device}")
        if group["ard"]:
            _check_alpha(state["alpha"], param, where)
        return state

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        """One step. GradScaler passes grad_scale / found_inf as attributes (like torch's fused
        Adam); a step with found_inf != 0 changes nothing, without a host synchronisation."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        for bucket in self._plan():
            self._run_bucket(bucket, grad_scale, found_inf)
        if self.gradient_scale != 1.0:   # (it held for this step)
            self._gradient_scale = 1.0
        return loss

    # Dynamo runs the plan's bookkeeping eagerly (a graph break): it caches on self, and torch
    # releases before 2.14 refuse to trace a setattr on a user object
    # ("does not have an AttributeMutation mutation_type").
    @torch.compiler.disable
    def _plan(self) -> list[dict[str, Any]]:
        """The launches of a step, rebuilt (with every check) only when the set of parameters
        with gradients, a parameter's dtype or device, a group's options (other than the values of
        lr and betas: OneCycleLR changes both every step) or a parameter's state dict change; a step
        with an unchanged plan costs a few C-level passes over the parameters (about 0.5 us a
        parameter, against 2.9 us when every step checked every state tensor in Python)."""
        groups = self.param_groups
        for group in groups:   # lr and betas are read at each launch, so checked at each step
            _check_group(group)
        params = [p for group in groups for p in group["params"]]
        signature = (
            # dtype and device too: model.to() keeps the Parameter objects, with new data
            tuple(map(_has_no_grad, params)), tuple(map(_DTYPE, params)), tuple(map(_DEVICE, params)),
            _schedule_pattern(groups),
            tuple((g["eps"], g["weight_decay"], g["decoupled_weight_decay"], g["num_data"],
                   g["batch_size"], g["curvature_decay"], g["ard"]) for g in groups))
        cached = getattr(self, "_plan_cache", None)
        if cached is None or cached[0] != signature or not all(
                all(map(_same, map(self.state.get, bucket["params"]), bucket["states"]))
                for bucket in cached[1]):
            cached = self._plan_cache = (signature, self._build_plan())
        return cached[1]

    def _build_plan(self) -> list[dict[str, Any]]:
        """Parameters grouped into launches: one per (device, dtype, hyperparameters); plain-Adam
        parameters join an ARD launch with the same Adam hyperparameters. Every parameter's
        state is checked here; the op checks its lists again at every launch."""
        ard_buckets: dict[tuple, dict] = {}
        plain_buckets: dict[tuple, dict] = {}
        for group_index, group in enumerate(self.param_groups):
            _check_group(group)
            adam_key = (float(group["lr"]), *map(float, group["betas"]), float(group["eps"]),
                        float(group["weight_decay"]), bool(group["decoupled_weight_decay"]))
            tracks = group["ard"] and group["batch_size"] is not None
            for param_index, param in enumerate(group["params"]):
                if param.grad is None:
                    continue
                where = f"param {param_index} of param group {group_index}"
                state = self._checked_state(param, group, where)
                base = (param.device, param.dtype, adam_key)
                if group["ard"]:
                    key = base + (float(group["num_data"]), float(group["batch_size"] or 0),
                                  float(group["curvature_decay"]), tracks)
                    bucket = ard_buckets.get(key) or ard_buckets.setdefault(
                        key, _new_bucket(group, adam_key, tracks))
                    bucket["ard"].append((param, state, where))
                else:
                    bucket = plain_buckets.get(base) or plain_buckets.setdefault(
                        base, _new_bucket(group, adam_key, False))
                    bucket["plain"].append((param, state, where))
        buckets = list(ard_buckets.values())
        for base, plain in plain_buckets.items():
            partner = next((b for k, b in ard_buckets.items() if k[:3] == base), None)
            if partner is None:
                buckets.append(plain)
            else:
                partner["plain"].extend(plain["plain"])
        for bucket in buckets:
            bucket["num_ard"] = len(bucket["ard"])
            entries = bucket.pop("ard") + bucket.pop("plain")
            bucket["params"] = [p for p, _, _ in entries]
            bucket["states"] = [s for _, s, _ in entries]
            bucket["where"] = [w for _, _, w in entries]
            bucket["relayout"] = False   # set once a gradient came in another layout than its parameter
        return buckets

    def _run_bucket(self, bucket, grad_scale, found_inf) -> None:
        # The state tensors are read again every step (the pruner replaces alpha) and not checked
        # here: the op checks every list before it touches anything. When it refuses, the plan is
        # rebuilt with the optimizer's own checks (which name the parameter and the state entry,
        # re-create missing entries and move state after the parameter), and the launch is tried
        # once more with the gradients in their parameters' layouts.
        params = bucket["params"]
        grads = list(map(_GRAD, params))
        if bucket["relayout"]:
            grads = _in_param_layouts(params, grads, bucket["where"])
        device = params[0].device
        if grad_scale is not None:
            grad_scale = grad_scale.to(device=device, dtype=torch.float32, non_blocking=True)
        if found_inf is not None:
            found_inf = found_inf.to(device=device, dtype=torch.float32, non_blocking=True)
        try:
            self._launch(bucket, grads, grad_scale, found_inf)
            return
        except (RuntimeError, TypeError, ValueError, KeyError) as error:
            refused = error
        self._plan_cache = None
        self._build_plan()   # raises the optimizer's own message for a bad state entry
        laid_out = _in_param_layouts(params, grads, bucket["where"])   # and for a sparse gradient
        bucket["relayout"] = not all(map(_same, laid_out, grads))
        try:
            self._launch(bucket, laid_out, grad_scale, found_inf)
        except (RuntimeError, TypeError, ValueError, KeyError):
            raise refused from None

    def _launch(self, bucket, grads, grad_scale, found_inf):
        params, states, hyper = bucket["params"], bucket["states"], bucket["hyper"]
        ard_states = states[:bucket["num_ard"]]
        alphas = [s["alpha"] for s in ard_states]
        curvatures = [s["curvature"] for s in ard_states] if bucket["tracks"] else []
        # the plan joins groups of one lr and betas, whose values a scheduler may change every step
        group = bucket["group"]
        lr, (beta1, beta2) = float(group["lr"]), map(float, group["betas"])
        scale = self.gradient_scale   # the data's gradient is `scale` times the mean loss's
        widened = params[0].dtype == torch.float16
        if widened:   # the step on float32 copies, to match the float32 moments (see _follow)
            halves = params
            params, grads = [t.float() for t in params], [t.float() for t in grads]
        # (h of a half-precision weight is float32: the op takes it beside bfloat16 weights)
        ops.mackay_adam_step_(
            params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
            [s["step"] for s in states], curvatures, alphas, lr=lr,
            beta1=beta1, beta2=beta2, eps=hyper["eps"],
            weight_decay=hyper["weight_decay"],
            decoupled_weight_decay=hyper["decoupled_weight_decay"], num_data=hyper["num_data"] / scale,
            batch_size=hyper["batch_size"] / scale ** 2, curvature_decay=hyper["curvature_decay"],
            grad_scale=grad_scale, found_inf=found_inf, backend=self.backend)
        if widened:
            torch._foreach_copy_(halves, params)

    # ------------------------------------------------------------- state_dict
    def _check_same_order(self, saved_groups, exact, saved_ids) -> None:
        """The saved groups and parameters line up with these by position (torch's rule): a group
        whose ard flag or a parameter whose moments' shape differs means another order, which
        would move the prior to other weights (or off them) before failing on a shape."""
        for index, (ours, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if "ard" in saved and bool(saved["ard"]) != bool(ours.get("ard")):
                raise _order_error(f"param group {index} has ard={bool(ours.get('ard'))} here and "
                                   f"ard={bool(saved['ard'])} in the state")
        params = [p for group in self.param_groups for p in group["params"]]
        for index, (pid, param) in enumerate(zip(saved_ids, params)):
            for key, value in exact[pid].items():
                if (key in MOMENT_KEYS or key == "curvature") and value.shape != param.shape:
                    raise _order_error(f"parameter {index} has shape {tuple(param.shape)} here and its "
                                       f"saved {key} {tuple(value.shape)}")
                if key == "alpha" and not alpha_fits(value.shape, param.shape):   # (the step refused it)
                    raise ValueError(f"MacKayAdam.load_state_dict: parameter {index}'s saved alpha has shape "
                                     f"{tuple(value.shape)}, neither the parameter's {tuple(param.shape)} nor "
                                     "one alpha per group of it (a damaged or edited state); nothing was loaded")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch.optim.Optimizer.load_state_dict, but alpha stays float32 and the step on
        the parameter's device (the base class would cast alpha to a bf16 param's dtype), and a
        float16 weight's moments stay float32 (the base class would cast them to float16)."""
        # a state_dict of torch's Adam or AdamW lacks MacKayAdam's options: this optimizer's
        # groups give them (the next step failed with KeyError: 'num_data')
        state_dict = dict(state_dict, param_groups=[
            dict({k: v for k, v in ours.items() if k != "params"}, **saved)
            for ours, saved in zip(self.param_groups, state_dict["param_groups"])]
            + state_dict["param_groups"][len(self.param_groups):])
        for group in state_dict["param_groups"][:len(self.param_groups)]:   # before anything is replaced
            # (e.g. Adam's amsgrad=True); a count that differs is the base class's to refuse
            check_adam_options(group, "MacKayAdam (param group)")
            _check_group_types(group)
            _check_group(group)
        saved_ids = [pid for group in state_dict["param_groups"] for pid in group["params"]]
        exact = {pid: {k: v for k, v in state_dict["state"].get(pid, {}).items()
                       if k in ("alpha", "step", "curvature", *MOMENT_KEYS) and isinstance(v, torch.Tensor)}
                 for pid in saved_ids}
        self._check_same_order(state_dict["param_groups"], exact, saved_ids)
        _check_state_values(exact, saved_ids)
        super().load_state_dict(state_dict)
        self._plan_cache = None
        params = [p for group in self.param_groups for p in group["params"]]
        for pid, param in zip(saved_ids, params):
            for key, value in exact[pid].items():
                weight_shaped = key in MOMENT_KEYS or key == "curvature"
                dtype = state_dtype(key, param.dtype) if weight_shaped else torch.float32
                self.state[param][key] = value.to(device=param.device, dtype=dtype, copy=True)


def _check_state_values(exact: dict, saved_ids: list) -> None:
    """Values the step could not have written: a NaN or infinite moment or curvature, a negative
    second moment, curvature or alpha, a negative or fractional step count. Loaded, each turns
    every later step into NaN (or a negative square root) without a word."""
    for index, pid in enumerate(saved_ids):
        for key, value in exact[pid].items():
            if not value.is_floating_point():
                bad = key != "step" or bool((value < 0).any())
            elif key == "alpha":   # +inf is a pruned weight's alpha
                bad = bool(torch.isnan(value).any()) or bool((value < 0).any())
            else:
                bad = not bool(torch.isfinite(value).all()) or (
                    key != "exp_avg" and bool((value < 0).any())) or (
                    key == "step" and bool((value != value.round()).any()))
            if bad:
                raise ValueError(f"MacKayAdam.load_state_dict: parameter {index}'s saved {key} holds "
                                 f"{_what_is_wrong(key)}, which no step writes (a damaged or edited "
                                 "state); nothing was loaded")


def _what_is_wrong(key: str) -> str:
    return {"exp_avg": "NaN or inf", "alpha": "NaN or a negative number",
            "step": "a count that is not a whole number >= 0"}.get(key, "NaN, inf or a negative number")


def _order_error(where: str) -> ValueError:
    return ValueError(f"MacKayAdam.load_state_dict: {where}: a state from another model (another architecture "
                      "or width), or the param groups, or the parameters in them, in another order than when "
                      "the state was saved (groups are matched by position, as in torch). Load it into the "
                      "model it was saved from, with the groups built in the same order, e.g. with "
                      "ard_param_groups(model); nothing was loaded")


def _new_bucket(group, adam_key, tracks) -> dict[str, Any]:
    _, _, _, eps, weight_decay, decoupled = adam_key   # lr and betas: read from `group` at each launch
    return {"ard": [], "plain": [], "tracks": tracks, "num_ard": 0, "group": group, "hyper": {
        "eps": eps, "weight_decay": weight_decay,
        "decoupled_weight_decay": decoupled, "num_data": float(group["num_data"]),
        "batch_size": float(group["batch_size"] or 1.0), "curvature_decay": float(group["curvature_decay"])}}
