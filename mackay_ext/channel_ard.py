"""Channel ARD: one prior precision per coupled channel group (docs/mathematics.md sections 1 and 3b).

The groups are mackay_ext.coupling's: everything that exists only for one channel or attention
head (a filter and its bias, its norm entries, the input slice of every consumer, the same channel
of every tensor summed at a residual addition). Group g has one alpha_g.

A weight entry can lie in two groups: conv2.weight[o, i] is in conv2's output group o and in the
group of channel i made upstream. Its prior is the product of its groups' Gaussian priors, so its
prior precision is the sum of their alphas:

    alpha_eff_i = sum_{g ∋ i} alpha_g        (an entry in no group, e.g. the output layer's rows:
                                              no prior from channel ARD, alpha_eff_i = 0)

With Sigma_ii = 1 / (N h_i + alpha_eff_i) and gamma_i = 1 - alpha_eff_i Sigma_ii, setting the
derivative of the log evidence in alpha_g to zero, sum_{i in g} (1/alpha_eff_i - Sigma_ii - w_i^2)
= 0, and multiplying by alpha_g gives the fixed point

    mackay: alpha_g <- sum_{i in g} r_gi gamma_i / (sum_{i in g} w_i^2 + eps),   r_gi = alpha_g / alpha_eff_i
    em:     alpha_g <- sum_{i in g} r_gi / (sum_{i in g} w_i^2 + sum_{i in g} Sigma_ii)
    paper:  alpha_g <- n_g / (sum_{i in g} w_i^2 + eps)     (gamma_i = 1, the source paper's code)

For a group alone on its entries r_gi = 1, and these are the group ARD rules of ops.mackay_update_.
Where alpha_eff_i = 0 (the first update: the prior was off) gamma_i = 1 and r_gi = 1 / (number of
groups of entry i), the limit of equal alphas. Every sum runs over every member, 1-D members
(biases, norm scales and shifts) included; entries already held at 0 by another pruned group
(alpha_eff_i = +inf) drop out of every sum, and n_g counts the others. New alphas are clamped to
[0, alpha_max]; a NaN estimate keeps the old alpha.

Pruning: "snr": sum_{i in g} w_i^2 / sum_{i in g} Sigma_ii < threshold, Sigma with the new alphas;
"alpha": alpha_g >= threshold. A pruned group gets alpha_g = +inf: every member entry is set to
exactly 0 and gets alpha_eff = +inf.

channel_prior="norm-scale": a group whose members include the weight (scale) of a BatchNorm,
InstanceNorm or GroupNorm carries its prior on those scale entries alone: the sums above run over
them, and its other members get nothing from alpha_g (r_gi = 0) until it is pruned, when they too
get +inf and are zeroed. A norm that normalises each channel divides out the scale of the filter before
it, so a prior on that filter only sets its norm (and its curvature, ~1/|w|^2), not the fit. A
GroupNorm divides out the joint scale of the filters of one of its groups, whose channels the
trace couples into one channel group: the same holds for that group's filters together.

Where each member's alpha_eff and curvature live:
- ARD targets of the pruner (matrices): the pruner's alpha of the parameter's full shape (MacKayAdam
  state["alpha"], whose fused step applies the prior and holds +inf entries at 0; or the pruner's
  own alpha, applied by its proximal step), and the pruner's curvature;
- other members (1-D) in a MacKayAdam param group with ard=True: that state's alpha and curvature;
- other members (1-D in an ard=False group, or any 1-D member with another optimizer): tracked
  here. Curvature: the ef-batch estimate h <- rho h + (1 - rho) B g^2 (B and rho as the pruner's
  ef-batch curvature; h = 0 when no batch size is known), from the gradient the pruner's own
  ef-batch estimate reads (MacKayPruner.ef_batch_source): each optimizer step's
  (batch_curvature.StepCurvature: accumulated, DDP-averaged, unscaled) whenever the pruner has the
  optimizer, as MacKayAdam's fused step does; each backward's (a gradient hook, averaged over
  ranks at the update) without one. The update reads h / (1 - rho^t), t the updates h has
  taken, as for every ef-batch curvature. After every optimizer step pruned entries are
  re-zeroed; with a non-MacKayAdam optimizer the prior is applied there by the same proximal step
  as the pruner's (prior="penalty": penalty() includes them). With MacKayAdam an ard=False group
  gets no prior term in its step (Adam's step size is not a step on the prior): the evidence
  update and pruning still count these members.

Groups that shrink cannot remove (ChannelGroup.fixed) get no alpha and are never pruned; so do
groups with a frozen member, a member the optimizer does not train, or a matrix member that is
not an ARD target (layers=, ard=False); `notes` lists them.
"""
from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import nn

from ._alpha import finite_alpha, update_rule
from .ard_targets import NO_CHANNEL_GROUP
from ._follow import ParamStates, state_dtype
from ._validate import all_finite, any_nan
from .copy_inert import CopyInert
from .coupling import ChannelGroup, Coupling, CouplingError, group_index, trace_coupling
from .coupling.groups import InputsDoNotRun
from .batch_curvature import StepCurvature, ema_debiased
from .mac_price import channel_group_macs, channel_priced_out
from .prune_cap import allowed_prunes, groups_to_restore
from .standalone_prior import proximal_shrink_

__all__ = ["ChannelARD", "NORM_NAMES", "SCALED_NORMS", "is_channel_scale", "trace_for_pruner"]

_FLOAT32_MAX = torch.finfo(torch.float32).max


def trace_for_pruner(model: nn.Module, example_inputs) -> Coupling:
    """The coupled groups of `model` (before any hook is attached to it)."""
    if example_inputs is None:
        raise ValueError("MacKayPruner: granularity='channel' needs example_inputs= (a batch, tuple of "
                         "inputs or dict of keyword inputs that runs the model): the coupled channel "
                         "groups are found from one traced forward")
    try:
        return trace_coupling(model, example_inputs)
    except InputsDoNotRun as error:
        raise InputsDoNotRun(f"MacKayPruner: {error}; pass example_inputs= that the model's forward accepts "
                             "(a batch of its inputs, a tuple of positional inputs or a dict of keyword "
                             "inputs)") from None
    except CouplingError as error:   # say what a user of such a model can do instead
        raise CouplingError(
            f"{error}. MacKayPruner(granularity='channel') traces the whole model, so one such op "
            "rules it out wherever it sits (layers= does not narrow the trace): use granularity="
            "'filter' (one prior per conv filter and per input of a Linear, RNN or embedding; no "
            "coupling), 'output', 'input' or 'weight', and "
            "mackay_ext.sparsify(model) to store and run what is pruned") from None


def _why_blocked(unsliced: list[str], pruner, coupling: Coupling) -> str:
    """The trace's reason for the first of `unsliced` (target names) it kept whole, if it gave one
    (e.g. a LayerNorm over channels couples them all), or ""."""
    names = {id(p): n for n, p in pruner.model.named_parameters()}
    for target in unsliced:
        param_name = names.get(id(pruner.targets[target].param))
        for group, reason in coupling.blocked:
            if any(member.name == param_name for member in group.members):
                first = reason.split("; ")[0]
                return f" (the trace keeps their channels whole; {target}: {first}{'; ...' if first != reason else ''})"
    return ""


# Norms with a per-channel scale that divide out the scale of what they read: per channel
# (BatchNorm, InstanceNorm: _NormBase) or per group of channels (GroupNorm).
SCALED_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm)
NORM_NAMES = "a BatchNorm, InstanceNorm or GroupNorm"


def is_channel_scale(model: nn.Module, name: str) -> bool:
    """Is parameter `name` the per-channel scale of a normalisation (BatchNorm, InstanceNorm,
    GroupNorm)? What such a layer reads is invariant to the scale of the filters that make its
    channel (a GroupNorm: its group of channels, which the trace keeps in one channel group), so
    the channel's size in the function is this weight's entry alone."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    return leaf == "weight" and isinstance(module, SCALED_NORMS) and module.affine


class _Member:
    """One parameter some groups slice: where its alpha_eff and curvature live, and its slices."""

    def __init__(self, name: str, param: nn.Parameter, dims: list[tuple[int, torch.Tensor]], where: str,
                 target: str | None, scale: bool = False):
        self.name, self.param, self.where, self.target = name, param, where, target
        self.scale = scale        # a per-channel norm's weight (channel_prior="norm-scale")
        self.dims = dims          # (dim, group number of every index along dim, -1 for none)
        ids = [set(ids[ids >= 0].tolist()) for _, ids in dims]
        # a group slicing two dimensions of one parameter holds the crossing entries once
        self.overlap = any(ids[a] & ids[b] for a in range(len(ids)) for b in range(a + 1, len(ids)))

    def views(self) -> list[tuple[int, torch.Tensor]]:
        """(dim, group numbers broadcastable to the parameter), -1 where an entry is not in the
        group of that dimension (or already counted through an earlier dimension); with an
        overlap the group numbers are materialised at the parameter's full shape."""
        ndim = self.param.dim()
        out = []
        for dim, ids in self.dims:
            shape = [1] * ndim
            shape[dim] = -1
            out.append((dim, ids.view(shape)))
        if self.overlap:
            full = [v.expand(self.param.shape) for _, v in out]
            for b in range(1, len(full)):
                seen = torch.zeros(self.param.shape, dtype=torch.bool, device=self.param.device)
                for a in range(b):
                    seen |= full[a] == full[b]
                full[b] = full[b].masked_fill(seen, -1)
            out = [(dim, f) for (dim, _), f in zip(out, full)]
        return out


class ChannelARD:
    """The group update of granularity='channel' for a MacKayPruner (see the module docstring).

    alpha: float64 (G,) one precision per group of `groups` (+inf: pruned).
    """

    def __init__(self, pruner, coupling: Coupling, batch_size: float | None):
        self.pruner = pruner
        model = pruner.model
        self.notes: list[str] = []
        target_of = {id(t.param): name for name, t in pruner.targets.items()}
        trained = None
        if pruner.optimizer is not None:
            trained = {id(p) for g in pruner.optimizer.param_groups for p in g["params"]}
        groups = []
        for group in coupling.groups:
            reason = self._no_alpha(group, model, target_of, trained)
            if reason is None:
                groups.append(group)
            else:
                self.notes.append(f"no alpha for {group!r}: {reason}")
        if not groups:
            # say why: the groups without a prior, and the first channels the trace could not free
            blocked = [f"{group!r}: {reason}" for group, reason in coupling.blocked[:3]]
            more = f" (and {len(coupling.blocked) - 3} more)" if len(coupling.blocked) > 3 else ""
            raise ValueError("MacKayPruner: granularity='channel' found no coupled channel group to put a "
                             f"prior on ({len(coupling.groups)} removable groups; {_tally(self.notes)}; "
                             f"blocked: {'; '.join(blocked) or 'none'}{more})")
        self.groups: list[ChannelGroup] = groups
        device = model.get_parameter(groups[0].members[0].name).device
        self.alpha = torch.zeros(len(groups), dtype=torch.float64, device=device)
        self.members: dict[str, _Member] = {}
        by_name: dict[str, list[tuple[int, torch.Tensor]]] = {}
        for (name, dim), ids in group_index(groups, model).items():
            by_name.setdefault(name, []).append((dim, ids))
        for name, dims in by_name.items():
            param = model.get_parameter(name)
            target = target_of.get(id(param))
            if target is not None:
                where = "target"
            elif pruner.fused and pruner.optimizer._group_of(param)["ard"]:
                where = "optimizer"
            else:
                where = "own"
            self.members[name] = _Member(name, param, sorted(dims, key=lambda d: d[0]), where, target,
                                         scale=is_channel_scale(model, name))
        # the groups whose channel passes through a norm with a scale: under channel_prior=
        # "norm-scale" their prior sits on those scales alone
        through_norm = [any(self.members[m.name].scale for m in g.members) for g in groups]
        if any(through_norm) and not pruner._channel_prior_chosen and pruner.max_prune_fraction is None:
            warnings.warn(
                f"MacKayPruner: {sum(through_norm)} of {len(groups)} channel groups pass through {NORM_NAMES}, "
                "which divides their filters' scale out: the default prior on those "
                "filters (channel_prior='members') is a prior on nothing the network computes, and the "
                "first pruning update can remove most of the network. channel_prior='norm-scale' puts "
                "it on the norm's scale, where the evidence is well posed; or keep 'members' (pass it "
                "to silence this) with max_prune_fraction=0.5", UserWarning, stacklevel=3)
        self.on_scale = None
        if pruner.channel_prior == "norm-scale":
            self.on_scale = torch.tensor(through_norm, dtype=torch.bool, device=device)
            if not bool(self.on_scale.any()):
                self.notes.append(f"channel_prior='norm-scale': no group passes through {NORM_NAMES} "
                                  "with a scale; every group's prior is on all its members")
        self._own = ParamStates()   # the 1-D members' alpha and h
        self._hooks = []
        self._batch_size, self._decay = self._ef_batch_settings(batch_size)
        # read h from each optimizer step's gradient where the pruner's own ef-batch does (see above)
        self._per_step = pruner.ef_batch_source == "step"
        for member in self.members.values():
            if member.where == "own":
                self._own.track(member.name, member.param, {
                    "alpha": torch.zeros(member.param.shape, dtype=torch.float32, device=member.param.device),
                    "curvature": torch.zeros_like(member.param, dtype=state_dtype("curvature", member.param.dtype),
                                                  memory_format=torch.preserve_format),
                    "curvature_steps": torch.zeros((), dtype=torch.float32, device=member.param.device)})
                self._hooks.append(member.param.register_hook(CopyInert(self._curvature_hook(member))))
        self._step_reader = None
        if self._per_step and self._own and self._batch_size is not None:
            self._step_reader = StepCurvature(
                pruner.optimizer, self._step_entries,
                prior_gradients=self._penalty_gradients if pruner.prior == "penalty" else None)
        sliced = {id(m.param) for m in self.members.values()}
        unsliced = [name for name, t in pruner.targets.items() if id(t.param) not in sliced]
        # report()["excluded"] names them, and its totals leave them out (they are never pruned)
        self.without_group = {name: NO_CHANNEL_GROUP + _why_blocked([name], pruner, coupling)
                              for name in unsliced}
        if unsliced:
            warnings.warn(f"MacKayPruner: {len(unsliced)} of {len(pruner.targets)} layers are in no channel "
                          f"group, so they train without a prior: {', '.join(unsliced[:6])}"
                          f"{', ...' if len(unsliced) > 6 else ''}{_why_blocked(unsliced, pruner, coupling)}. "
                          "granularity='filter' or 'weight' puts a prior on every layer", UserWarning, stacklevel=3)
        if self._own and self._batch_size is None:
            self.notes.append("no batch size known: the 1-D members tracked by the pruner ("
                              + ", ".join(self._own) + ") have curvature h = 0")
        if pruner.optimizer is not None and self._own:
            self._hooks.append(pruner.optimizer.register_step_post_hook(self._after_step))
        self.last: dict[str, Any] = {}
        # MACs per example of every group, for MacKayPruner(mac_price=...) (mac_price.py)
        self.macs = channel_group_macs(self, pruner._weight_uses) if pruner.mac_price else None

    # ------------------------------------------------------------------ set-up
    @staticmethod
    def _no_alpha(group: ChannelGroup, model: nn.Module, target_of, trained) -> str | None:
        if group.fixed:   # (the group's repr says why already: "(kept by shrink: ...)")
            return "shrink keeps it"
        for m in group.members:
            param = model.get_parameter(m.name)
            if not param.requires_grad:
                return f"{m.name} is frozen"
            if trained is not None and id(param) not in trained:
                return f"{m.name} is not trained by the optimizer"
            if param.dim() >= 2 and id(param) not in target_of:
                return f"{m.name} is not an ARD layer of the pruner"
        return None

    def _ef_batch_settings(self, batch_size):
        pruner = self.pruner
        if pruner.fused:
            group = pruner.optimizer._group_of(next(iter(pruner.targets.values())).param)
            size = batch_size if batch_size is not None else group["batch_size"]
            return (None if size is None else float(size)), float(group["curvature_decay"])
        return (None if batch_size is None else float(batch_size)), float(pruner.curvature_decay)

    def _curvature_hook(self, member: _Member):
        """Backward hook: holds pruned entries' gradient at 0 and, unless h is read at the step,
        updates h from this backward's gradient."""
        def hook(grad):
            state = self._own[member.name]
            if self._batch_size is not None and not self._per_step:
                data_grad = grad
                if self.pruner.prior == "penalty":   # the hook sees penalty()'s gradient alpha/N w too
                    data_grad = grad - finite_alpha(state["alpha"], grad) / self.pruner.num_data * member.param.detach()
                rho = self._decay
                state["curvature"].mul_(rho).addcmul_(data_grad, data_grad, value=(1 - rho) * self._batch_size)
                state["curvature_steps"].add_(1)
            return grad.masked_fill(state["alpha"] == math.inf, 0)
        return hook

    def _step_entries(self):
        batch_size = self._batch_size / self.pruner.gradient_scale ** 2   # as the pruner's own
        return [(self.members[name].param, state["curvature"], state["curvature_steps"],
                 batch_size, self._decay) for name, state in self._own.items()]

    @torch.no_grad()
    def _penalty_gradients(self) -> dict[int, torch.Tensor]:
        """penalty()'s gradient alpha/N w of each member tracked here, at the weights before the step."""
        members = {name: self.members[name].param for name in self._own}
        return {id(param): finite_alpha(self._own[name]["alpha"], param) / self.pruner.num_data * param
                for name, param in members.items()}

    @torch.no_grad()
    def _after_step(self, optimizer, args, kwargs) -> None:
        if not self.pruner.fused and self.pruner.prior == "proximal":
            groups = self.pruner._param_groups()
            for name, state in self._own.items():
                param = self.members[name].param
                if not param.requires_grad or param.grad is None:   # the optimizer did not step it (frozen)
                    continue
                step = self.pruner._prior_step(param, groups)
                if step is not None:   # not where GradScaler skipped the step (see MacKayPruner._after_step)
                    proximal_shrink_(param, finite_alpha(state["alpha"], param), step, self.pruner.num_data,
                                     getattr(optimizer, "found_inf", None))
        self.apply_masks()

    def detach(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        if self._step_reader is not None:
            self._step_reader.remove()

    # ------------------------------------------------------------------ state
    def curvature(self, name: str) -> torch.Tensor:
        """h of a member parameter (full shape), wherever it lives (in place: the state itself)."""
        member = self.members[name]
        if member.where == "target":
            return self.pruner.curvature(member.target)
        if member.where == "optimizer":
            return self.pruner.optimizer.ard_state(member.param)["curvature"]
        return self._own[name]["curvature"]

    def curvature_estimate(self, name: str) -> torch.Tensor:
        """The curvature the update reads for a member: ef-batch's h / (1 - rho^t) (see
        MacKayPruner.curvature_estimate)."""
        member = self.members[name]
        if member.where == "target":
            return self.pruner.curvature_estimate(member.target)
        if member.where == "optimizer":
            return self.pruner.optimizer.curvature_estimate(member.param)
        state = self._own[name]
        return ema_debiased(state["curvature"], state["curvature_steps"], self._decay)

    def alpha_eff(self, name: str) -> torch.Tensor:
        """The alpha_eff the optimizer or proximal step reads for a member (float32, full shape)."""
        member = self.members[name]
        if member.where == "target":
            return self.pruner.alpha(member.target)
        if member.where == "optimizer":
            return self.pruner.optimizer.ard_state(member.param)["alpha"]
        return self._own[name]["alpha"]

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Hold the pruned entries of the members tracked here at exactly 0."""
        for name, state in self._own.items():
            self.members[name].param.masked_fill_(state["alpha"] == math.inf, 0)

    def penalty(self) -> torch.Tensor | None:
        """(1 / 2N) sum alpha_eff w^2 over the members tracked here (prior='penalty')."""
        terms = [(finite_alpha(s["alpha"], self.members[n].param) * self.members[n].param.square()).sum()
                 for n, s in self._own.items()]
        return sum(terms) * (0.5 / self.pruner.num_data) if terms else None

    def nonfinite(self) -> list[str]:
        bad = []
        for name, state in self._own.items():
            if not all_finite(self.members[name].param):
                bad.append(f"{name} (weight)")
            if not all_finite(state["curvature"]):
                bad.append(f"{name} (curvature)")
        if any_nan(self.alpha):
            bad.append("channel group alpha")
        return bad

    @torch.no_grad()
    def switch_off_prior(self) -> None:
        self.alpha.masked_fill_(torch.isfinite(self.alpha), 0.0)
        self._write_alpha_eff()

    def layer_groups(self, param: torch.Tensor) -> dict[str, int]:
        """Channel groups slicing a parameter, and how many are kept."""
        for member in self.members.values():
            if member.param is param:
                ids = torch.cat([ids[ids >= 0] for _, ids in member.dims]).unique()
                return {"groups": int(ids.numel()), "groups_kept": int(torch.isfinite(self.alpha[ids]).sum())}
        return {"groups": 0, "groups_kept": 0}

    def summary(self) -> dict[str, Any]:
        pruned = ~torch.isfinite(self.alpha)
        entries = sum(m.param.numel() for m in self.members.values())
        kept = sum(int((self.alpha_eff(n) != math.inf).sum()) for n in self.members)
        return {"groups": len(self.groups), "groups_kept": int((~pruned).sum()),
                "member_entries": entries, "member_entries_kept": kept, "notes": list(self.notes)}

    def state_dict(self) -> dict[str, Any]:
        return {"alpha": self.alpha.detach().cpu().clone(),
                "groups": [repr(g) for g in self.groups],
                "own_curvature": {n: s["curvature"].detach().clone() for n, s in self._own.items()},
                "own_curvature_steps": {n: float(s["curvature_steps"]) for n, s in self._own.items()}}

    def check_state(self, state: Any) -> None:
        """Refuse a saved state that is not this model's channel groups' (MacKayPruner.load_state_dict
        asks before anything is loaded)."""
        where = "MacKayPruner.load_state_dict"
        if not isinstance(state, dict) or not isinstance(state.get("groups"), (list, tuple)):
            raise TypeError(f"{where}: the state's 'channel' entry must be a dict with the channel groups, "
                            f"got {type(state).__name__}")
        if list(state["groups"]) != [repr(g) for g in self.groups]:
            raise ValueError(f"{where}: the saved channel groups differ from this "
                             "model's (was the model or example_inputs changed?)")
        alpha, curvatures = state.get("alpha"), state.get("own_curvature", {})
        unknown = sorted(set(curvatures) - set(self._own)) if isinstance(curvatures, dict) else None
        if unknown is None or unknown:
            raise ValueError(f"{where}: the channel state's own curvatures must be a dict by layer name "
                             f"of this pruner's ({sorted(self._own)}), got {unknown or type(curvatures).__name__}")
        values = [("channel group alpha", alpha, self.alpha)] + [
            (f"curvature of {name}", value, self._own[name]["curvature"]) for name, value in curvatures.items()]
        for what, value, own in values:
            if not isinstance(value, torch.Tensor) or value.shape != own.shape:
                raise ValueError(f"{where}: the {what} must be a tensor of shape {tuple(own.shape)}, got "
                                 f"{_described(value)}")
            if not value.is_floating_point() or bool(torch.isnan(value).any()) or bool((value < 0).any()):
                raise ValueError(f"{where}: the {what} must hold non-negative numbers (inf allowed for a "
                                 "pruned alpha), got NaN, negative or non-float values")

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state(state)
        self.alpha.copy_(state["alpha"].to(self.alpha))
        steps = state.get("own_curvature_steps", {})   # absent from older checkpoints: h read as it is
        for name, curvature in state.get("own_curvature", {}).items():
            self._own[name]["curvature"].copy_(curvature)
            self._own[name]["curvature_steps"].fill_(float(steps.get(name, math.inf)))
        self._write_alpha_eff()

    @property
    def keys(self) -> list[tuple[str, int, torch.Tensor]]:
        """(member name, dim, group number of every index along dim) of every sliced dimension."""
        return [(m.name, dim, ids) for m in self.members.values() for dim, ids in m.dims]

    # ------------------------------------------------------------------ update
    def _follow_device(self) -> None:
        """The group tensors move to the members' device if the model moved after the pruner
        was built (the members' own state follows by itself, see _follow)."""
        device = next(iter(self.members.values())).param.device
        if self.alpha.device == device:
            return
        self.alpha = self.alpha.to(device)
        if self.on_scale is not None:
            self.on_scale = self.on_scale.to(device)
        if self.macs is not None:
            self.macs = self.macs.to(device)
        for member in self.members.values():
            member.dims = [(dim, ids.to(device)) for dim, ids in member.dims]

    def _alpha_terms(self, member: _Member, alpha: torch.Tensor):
        """Per dimension (dim, group numbers, alpha_g of the entry's group there or 0), and alpha_eff."""
        terms, alpha_eff, count = [], None, None
        zero = torch.zeros((), dtype=alpha.dtype, device=alpha.device)
        for dim, ids in member.views():
            inside = ids >= 0
            group_alpha = alpha[ids.clamp(min=0)]
            if self.on_scale is not None and not member.scale:
                # no prior from a group whose prior is on its norm scales; its pruning (+inf)
                # still holds the entry at 0
                off_scale = inside & self.on_scale[ids.clamp(min=0)]
                held = torch.where(off_scale & (group_alpha == math.inf), group_alpha, zero)
                inside = inside & ~off_scale
                a = torch.where(inside, group_alpha, held)
            else:
                a = torch.where(inside, group_alpha, zero)
            terms.append((dim, ids, inside, a))
            alpha_eff = a if alpha_eff is None else alpha_eff + a
            count = inside.double() if count is None else count + inside.double()
        shape = member.param.shape
        return terms, alpha_eff.expand(shape), count.expand(shape)

    def _group_sum(self, member: _Member, dim: int, ids: torch.Tensor, values: torch.Tensor,
                   out: torch.Tensor) -> None:
        """out[g] += sum of `values` over the entries whose group along `dim` is g."""
        values = values.expand(member.param.shape)
        if member.overlap:   # group numbers materialised at the full shape
            flat = ids.reshape(-1)
            keep = flat >= 0
            out.index_add_(0, flat[keep], values.reshape(-1)[keep])
            return
        other = [d for d in range(values.dim()) if d != dim]
        per_index = values.sum(dim=other) if other else values
        ids = ids.reshape(-1)
        keep = ids >= 0
        out.index_add_(0, ids[keep], per_index[keep])

    @torch.no_grad()
    def update(self, hold: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """One re-estimation of every group alpha, then pruning unless `hold` or warm-up.
        Returns (entries for the pruner's report per ARD target, the channel section)."""
        pruner = self.pruner
        self._follow_device()
        self._sync_own_curvature()
        num_data, rule = float(pruner.num_data), pruner.rule
        old = self.alpha.clone()
        warmup = not bool(old.any())       # alpha = 0 everywhere: the prior was off until now
        rule = update_rule(rule, warmup)
        can_prune = not (warmup or hold)
        already = old == math.inf
        held, held_notes = self._held_groups()
        weight_sq, numerator, sigma_sum, n_live = (torch.zeros_like(old) for _ in range(4))
        cache = {}
        for member in self.members.values():
            w = member.param.detach().double()
            h = self.curvature_estimate(member.name).double()
            n_h = torch.where(h > 0, h * num_data, torch.zeros_like(h))
            terms, alpha_eff, count = self._alpha_terms(member, old)
            live = torch.isfinite(alpha_eff)
            off = alpha_eff == 0
            gamma = torch.where(off, torch.ones_like(n_h), n_h / (n_h + alpha_eff)).masked_fill(~live, 0)
            gamma = gamma * (count > 0)      # entries in no group have no prior here
            sigma = (1.0 / (n_h + alpha_eff)).masked_fill(~live, 0)
            cache[member.name] = (w, n_h, gamma, live)
            for dim, ids, inside, a in terms:
                ratio = torch.where(off, inside.double() / count.clamp(min=1), a / alpha_eff)
                ratio = ratio.masked_fill(~live, 0)
                mask = (inside & live).double()
                self._group_sum(member, dim, ids, w * w * mask, weight_sq)
                self._group_sum(member, dim, ids, ratio * (gamma if rule == "mackay" else 1.0), numerator)
                # where(), not a product: an entry with neither data nor prior has Sigma = inf
                self._group_sum(member, dim, ids, torch.where(inside & live, sigma, 0.0), sigma_sum)
                self._group_sum(member, dim, ids, mask, n_live)
        if rule == "mackay":
            new = numerator / (weight_sq + pruner.eps)
        elif rule == "em":
            new = numerator / (weight_sq + sigma_sum)
        else:
            new = n_live / (weight_sq + pruner.eps)
        alpha_max = pruner.alpha_max if pruner.alpha_max is not None else math.inf
        new = torch.where(torch.isnan(new), old, new.clamp(min=0.0, max=alpha_max))
        new = torch.where(already | held, old, new)   # (a member frozen at its calls gathers no exact curvature)

        pruned = already | (new == math.inf)
        priced = torch.zeros_like(pruned)
        limited = 0
        if can_prune:
            fails, score = self._criterion(new, weight_sq, cache)
            fresh = fails & ~pruned & ~held
            if pruner.max_prune_fraction is not None:
                limited = self._limit_pruning(fresh, pruned & ~already, already, score)
            pruned |= fresh
            if pruner.mac_price:
                priced = channel_priced_out(self, new, num_data, pruner.current_mac_price()) & ~pruned & ~held
                pruned |= priced
        kept_strongest = [] if pruner.allow_empty_layers else self._keep_strongest(pruned, already, weight_sq)
        newly = pruned & ~already
        self.alpha.copy_(torch.where(pruned, torch.full_like(new, math.inf), new))
        for number in newly.nonzero().flatten().tolist():
            self.groups[number].zero_(pruner.model)
        self._write_alpha_eff()

        gamma_by_target: dict[str, float] = {}
        gamma_sum = 0.0
        for name, (w, n_h, gamma, _) in cache.items():
            member = self.members[name]
            value = float((gamma * torch.isfinite(self.alpha_eff(name))).sum())
            gamma_sum += value
            if member.target is not None:
                gamma_by_target[member.target] = value
        entries = [dict(pruner._layer_entry(name, target), gamma=gamma_by_target.get(name, 0.0), warmup=warmup)
                   for name, target in pruner.targets.items()]
        section = dict(self.summary(), pruned=[repr(self.groups[i]) for i in newly.nonzero().flatten().tolist()],
                       held=int((held & ~pruned).sum()),
                       kept_strongest=kept_strongest, warmup=warmup, gamma_sum=gamma_sum,
                       **({"limited": limited} if pruner.max_prune_fraction is not None else {}),
                       **({"priced_out": int(priced.sum())} if pruner.mac_price else {}))
        section["notes"] += held_notes
        self.last = section
        return entries, section

    def _held_groups(self) -> tuple[torch.Tensor, list[str]]:
        """(True for every group with a member the optimizer does not move now, notes): frozen
        since the pruner was built, or in a param group at lr 0 while others are not. Such a
        group's alpha is kept and the group not pruned, as the pruner does for a layer
        (MacKayPruner._not_moving, which warns once per member): a backbone stage frozen after a
        warm-up lost 15 of its 16 channels, BatchNorm scale and shift included, with no word."""
        held = torch.zeros_like(self.alpha, dtype=torch.bool)
        still = self.pruner._not_moving({name: (member.param, f"{name} (a member of channel groups)")
                                         for name, member in self.members.items()})
        for name in still:
            for _, ids in self.members[name].dims:
                held[ids[ids >= 0]] = True
        notes = [f"{name}: {why}; its channel groups are not pruned while it is" for name, why in sorted(still.items())]
        return held, notes

    def _sync_own_curvature(self) -> None:
        """Under torch.distributed the gradient hooks see each rank's local gradient: average the
        curvature tracked here over ranks so that every rank computes the same alphas (read at the
        step, h comes from the all-reduced gradient: the same on every rank already)."""
        dist = torch.distributed
        if (self._own and not self._per_step and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1):
            for state in self._own.values():
                dist.all_reduce(state["curvature"])
                state["curvature"].div_(dist.get_world_size())

    def _criterion(self, new: torch.Tensor, weight_sq: torch.Tensor, cache) -> tuple[torch.Tensor, torch.Tensor]:
        """(groups the criterion prunes, a score of how far each group is from it: higher, further)."""
        pruner = self.pruner
        if pruner.prune == "alpha":
            threshold = 1e13 if pruner.threshold is None else float(pruner.threshold)
            return new >= threshold, -new
        threshold = 0.05 if pruner.threshold is None else float(pruner.threshold)
        sigma_sum = torch.zeros_like(new)
        for name, (w, n_h, gamma, live) in cache.items():
            member = self.members[name]
            terms, alpha_eff, _ = self._alpha_terms(member, new)
            sigma = (1.0 / (n_h + alpha_eff)).masked_fill(~live, 0)
            for dim, ids, inside, _ in terms:
                self._group_sum(member, dim, ids, torch.where(inside, sigma, 0.0), sigma_sum)
        return weight_sq < threshold * sigma_sum, weight_sq / sigma_sum

    def _limit_pruning(self, fresh: torch.Tensor, gone: torch.Tensor, already: torch.Tensor,
                       score: torch.Tensor) -> int:
        """max_prune_fraction: un-mark in `fresh` (groups the criterion prunes now), parameter
        dimension by dimension, those beyond the share of its live groups one update may prune,
        keeping the highest scores; `gone` are groups this update loses anyway (alpha ran to
        inf), counted against the share. Returns how many groups stayed."""
        fraction = self.pruner.max_prune_fraction
        stayed = 0
        for _, _, ids in self.keys:
            here = ids.unique()
            here = here[(here >= 0) & ~already[here.clamp(min=0)]]
            if here.numel() == 0:
                continue
            allowed = max(0, allowed_prunes(here.numel(), fraction) - int(gone[here].sum()))
            restore = groups_to_restore(fresh[here], score[here], allowed)
            fresh[here[restore]] = False
            stayed += int(restore.sum())
        return stayed

    def _keep_strongest(self, pruned: torch.Tensor, already: torch.Tensor, weight_sq: torch.Tensor) -> list[str]:
        """Un-prune, for every parameter dimension whose every index would be pruned, the group of
        largest sum w^2 among those pruned by this update (the network would no longer depend on
        its input there)."""
        kept = []
        for name, dim, ids in self.keys:
            if bool((ids < 0).any()):
                continue        # some channel there has no alpha: the layer can never be emptied
            here = ids.unique()
            fresh = here[~already[here]]
            if fresh.numel() == 0 or not bool(pruned[here].all()):
                continue
            best = fresh[weight_sq[fresh].argmax()]
            pruned[best] = False
            kept.append(f"{name} (dim {dim}): kept {self.groups[int(best)]!r}")
            if f"{name} (dim {dim})" in self.pruner._said_emptied:
                continue   # warned at an earlier update (MacKayPruner._warn_collapse)
            warnings.warn(f"MacKayPruner.update: every channel group of {name} (dim {dim}) would be pruned "
                          "(the network would no longer depend on its input there); the strongest group is "
                          "kept. Pass allow_empty_layers=True to allow it.", RuntimeWarning, stacklevel=6)
        return kept

    @torch.no_grad()
    def _write_alpha_eff(self) -> None:
        """alpha_eff of every member entry into the tensor its optimizer step or proximal step reads."""
        self._follow_device()
        for name, member in self.members.items():
            _, alpha_eff, _ = self._alpha_terms(member, self.alpha)
            value = torch.where(torch.isinf(alpha_eff), alpha_eff, alpha_eff.clamp(max=_FLOAT32_MAX)).float()
            current = self.alpha_eff(name)
            if tuple(current.shape) == tuple(value.shape):
                current.copy_(value)
            elif member.where == "target":
                self.pruner._set_alpha(member.target, value.contiguous())
            else:
                self.pruner.optimizer.ard_state(member.param)["alpha"] = value.contiguous()
            if bool(torch.isinf(value).any()):
                member.param.masked_fill_(torch.isinf(value), 0)


def _tally(notes: list[str]) -> str:
    """The groups left without a prior, for an error: how many for each kind of reason, and the
    first (a ResNet-18 with frozen BatchNorm listed its 2,880 groups: 0.7 MB of message)."""
    if not notes:
        return "none"
    kinds: dict[str, int] = {}
    for note in notes:
        reason = note.rpartition(": ")[2]
        kind = reason.partition(" is ")[2] if " is " in reason else reason
        kinds[kind] = kinds.get(kind, 0) + 1
    counts = ", ".join(f"{count:,} {KIND_OF_MEMBER.get(kind, kind)}" for kind, count in kinds.items())
    hint = (" (a frozen member, such as a frozen norm, takes the prior off every group it is in: unfreeze it "
            "before building the pruner, or use a per-weight granularity)" if "frozen" in kinds else "")
    more = f"; and {len(notes) - 1:,} more" if len(notes) > 1 else ""
    return f"{len(notes):,} without a prior: {counts}{hint}; {notes[0]}{more}"


KIND_OF_MEMBER = {"frozen": "with a frozen member", "not trained by the optimizer": "with a member the optimizer "
                  "does not train", "not an ARD layer of the pruner": "with a matrix member not among the pruner's "
                  "layers", "shrink keeps it": "that shrink keeps"}


def _described(value: Any) -> str:
    return (f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else
            f"a {type(value).__name__}")
