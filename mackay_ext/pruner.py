"""MacKayPruner: re-estimates every ARD weight's prior precisions and prunes (docs/mathematics.md section 1).

Two ways to train under the ARD prior:
- with MacKayAdam, alpha and the ef-batch curvature live in the optimizer's state and its fused
  step applies the prior; the pruner reads and writes that state;
- with any other torch optimizer, the pruner keeps alpha and curvature itself, estimates the
  curvature from each optimizer step's gradient (step hooks), and applies the prior after every
  optimizer step as an exact implicit (proximal) step, w <- w / (1 + s alpha / N)
  (mackay_ext.standalone_prior): stable for any alpha and step size, where the prior's gradient
  in plain SGD diverges once lr alpha / N > 2 (prior="penalty" keeps that older way: add
  `pruner.penalty()` to the loss).
  Pruned weights are re-zeroed after every step.

What an update does, predictably:
- a weight whose prior is still off (alpha = 0 everywhere, e.g. the first update) gets alpha
  estimated and nothing pruned: pruning needs the weights to have trained under the prior;
- an update with no optimizer step since the previous one re-estimates alpha, prunes nothing
  and says so (alpha moved, the weights have not answered yet);
- a layer never loses every group: the group with the largest weights is kept (and reported)
  unless allow_empty_layers=True; the groups kept in two neighbouring layers may still not
  connect, and when dropping the units nobody reads then empties a layer, a warning says so;
- with max_prune_fraction=f, an update prunes at most floor(f x live groups) of a layer (the
  others of those the criterion picks stay, the least clear-cut first; mackay_ext.prune_cap);
- NaN/inf in a weight or curvature raises NonFiniteError before anything changes
  (on_nonfinite="skip": the update is skipped and recorded in the report).
"""
from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from . import curvature_shares, ops
from ._alpha import group_dims, update_rule
from ._follow import ParamStates, state_dtype
from ._validate import (NonFiniteError, all_finite, any_nan, check_count, check_initialised, check_module,
                        check_optimizer, user_stacklevel)
from .alpha_stats import quantiles
from .alpha_views import AlphaViews
from .copy_inert import CopyInert
from .micro_batches import MicroBatchScale
from .model_loads import watch_model_loads, zero_pruned_weights_of
from .ard_targets import (
    FROZEN,
    GRANULARITIES,
    PARAMETRIZED,
    UNFROZEN,
    UNFROZEN_COVERED,
    ARDTarget,
    alpha_shape,
    alpha_shape_for,
    exact_curvature_problem,
    find_targets,
    is_parametrization_input,
)
from .batch_curvature import batch_share_note, ema_debiased
from .row_examples import RowExamples
from .sharded import refuse_sharded
from .ddp_lockstep import Lockstep, world_size
from .step_batch import StepBatchWatch
from .dead_units import prune_unused_units
from .foreign_steps import unwatch, watch_foreign_steps
from .mac_compensate import REFIT_MAX_INPUTS, InputCovariance, compensated_price_out
from .mac_price import FreedMacs, price_out, target_uses, weight_uses
from .optim import MacKayAdam
from .pruner_claims import claim, claimed, holder_of, release
from .pruner_options import CURVATURES, check_pruner_options
from .prune_cap import allowed_prunes, groups_to_restore, target_scores
from .standalone_prior import StandalonePrior
from .unfinished_update import UnfinishedUpdate, marks

__all__ = ["CURVATURES", "GRANULARITIES", "MacKayPruner", "alpha_shape"]


# the prefixes torch.compile's OptimizedModule and DistributedDataParallel / DataParallel add
# to the names of the modules they wrap
WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def _unwrapped(name: str) -> str:
    while name.startswith(WRAPPER_PREFIXES):
        name = name.split(".", 1)[1]
    return name


def _wrapper_hint(ours: set[str], saved: set[str]) -> str:
    """Said when the two sets of layer names differ only by a wrapper's prefix: the two pruners
    were built on a wrapped and an unwrapped model (or on different wrappers)."""
    if {_unwrapped(n) for n in ours} != {_unwrapped(n) for n in saved}:
        return ""
    shown = ", ".join(sorted(saved)[:3]) + (", ..." if len(saved) > 3 else "")
    return (f" (the state holds {shown}: the same layers under a wrapper's prefix, "
            "torch.compile's '_orig_mod.' or DistributedDataParallel's 'module.'). Build both pruners "
            "on the same object; on the unwrapped model (model, not torch.compile(model) or DDP(model)) "
            "the names stay the same whatever wraps it")


@contextlib.contextmanager
def _detached_if_refused(pruner):
    """A build that raises takes back what it had attached by then: the optimizer's step hooks
    were registered before the later checks, and a refused MacKayPruner(model, adam, num_data=N)
    (no batch_size) left a hook that failed every later adam.step() with a bare KeyError, while
    attached_pruners(model) found nothing to detach."""
    try:
        yield
    except BaseException:
        pruner.detach()
        raise


def _note_gradient(seen: set[str], name: str, grad):
    """A weight's gradient hook: note that a backward reached it (the gradient is left as it is)."""
    seen.add(name)


def _dynamo_compiled_something() -> bool:
    """Whether torch.compile has compiled any frame in this process (its hint is noise otherwise)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return True
    return bool(counters["stats"].get("unique_graphs", 0))


AT_LR_ZERO = ("its param group's lr is 0 (others' are not), so the optimizer does not move it and its "
              "weights are not where the prior and the data balance: alpha is re-estimated, nothing of it "
              "pruned while its lr is 0 (to leave a layer out, freeze it with requires_grad_(False) before "
              "building the pruner)")
FROZEN_NOW = ("its requires_grad is False now (frozen after the pruner was built), so no optimizer moves it: "
              "alpha is re-estimated where curvature reached it (else kept), nothing of it pruned, and the prior "
              "leaves its weights alone while it stays frozen")
ADDED_LATER = ("trained by the optimizer, but added after the pruner was built (add_param_group): no prior; "
               "build a new MacKayPruner to cover it")
WITHOUT_DATA = ("no data has reached it since the last update (its curvature is 0 everywhere, or under "
                "ef-batch no step had its gradient, while other layers' did: no forward used it, or its "
                "gradient was always 0), so its alpha and weights are left as they are and nothing of it is "
                "pruned until its gradient does")

# One update that prunes more than this share of the weights still live (or empties a layer) is
# said so, with the ways out: the largest single update in the committed runs pruned 89%
# (mnist32 VGG-D6 per weight; the CLI's LeNet-300-100 recipe 84%), the collapses a new user met
# 94-99% (a BatchNorm CNN, resnet18, a tiny BERT).
COLLAPSE_SHARE = 0.95


def _mackay_update(weight: torch.Tensor, curvature: torch.Tensor, alpha: torch.Tensor, **options):
    """ops.mackay_update_, also for a half-precision weight whose ef-batch curvature is float32
    (see _follow): on a float32 copy of the weight, whose pruned zeros are written back (the
    other entries are copied back unchanged: half -> float32 -> half is exact)."""
    if curvature.dtype == weight.dtype:
        return ops.mackay_update_(weight, curvature, alpha, **options)
    wide = weight.detach().to(curvature.dtype)
    stats = ops.mackay_update_(wide, curvature, alpha, **options)
    with torch.no_grad():
        weight.copy_(wide)
    return stats


class MacKayPruner(StandalonePrior):
    """Runs MacKay's precision update on a model's weights and prunes.

    Args:
        model: the network. By default every trainable parameter with dim >= 2 gets a prior
            (Linear/Conv/ConvTranspose weights, embeddings, LSTM/GRU matrices, attention
            projections, ...); `layers` (module or parameter names) restricts them. Tied
            weights are one target. `report()["excluded"]` lists what is left out and why.
        optimizer: a MacKayAdam (uses its ARD state and fused step) or any torch optimizer.
        num_data: N, the number of training examples (what the loss averages over: label tokens
            for a language model's token-mean loss); under DistributedDataParallel the whole
            training set, not one rank's shard.
        granularity: "weight" | "input" | "output" | "filter", or {name: granularity} (names as
            in `pruner.layers`; unknown names are an error; unnamed ones get "weight"); or
            "channel": one alpha per coupled channel group of the whole model (filters with their
            bias, norm entries and consumers' input slices, residual-coupled channels, attention
            heads; mackay_ext.channel_ard), which needs example_inputs. `mackay_ext.shrink` then
            removes the pruned groups physically.
        example_inputs: with granularity="channel" or mac_price > 0, a batch (tensor, tuple or
            dict of keyword inputs) that runs the model: the coupling, or every weight's MACs per
            example, is found from one forward (in eval mode, without gradients).
        mac_price: nats of evidence per multiply-accumulate (default 0: off). An update also
            prunes every group whose evidence gain (what it adds to the log evidence) is below
            mac_price x its MACs per example (mackay_ext.mac_price): the knob that trades accuracy
            for compute where MacKay's rule keeps groups that are well determined but dear, such
            as a first conv layer's filters. A group's MACs are those of its weights in the full
            network and of the channel that dies with it (a hidden unit's outgoing column pays for
            its incoming row; with granularity="channel", a filter for its consumers' input
            slices). The inputs of a Linear layer (granularity "filter") are judged and removed
            with the other inputs re-fitted (mackay_ext.mac_compensate; the input moments it
            samples during training are saved in state_dict). The report says how many groups it
            priced out ("priced_out", per layer or in the channel section).
        mac_price_ramp: the price rises linearly to mac_price over this many pruning updates
            (default 1: the full price at once). The first pruning update sees groups trained
            without any price; at the full price it removes most of them at once, and the
            network may not recover (LeNet-300-100: 8.6% error at once against 1.64% over 10).
        rule: "mackay" | "em" | "paper"; prune: "snr" (the default, threshold 0.05) | "alpha"
            (threshold 1e13, the paper's; the default under rule="paper", whose gamma = 1 leaves
            every group's snr near 1: said where snr is asked for there).
        curvature: "ef-batch" (from the optimizer step or gradient hooks), "ef-exact" or
            "fisher-mc" (mackay_ext.curvature.FisherAccumulator; `accumulate_mc(x)` feeds the
            latter), averaged over everything seen since the previous update(). ef-batch is a
            moving average h that starts at 0; the update reads h / (1 - rho^t), t the updates
            it has taken (Adam's bias correction; curvature_estimate(name)), so an update a few
            steps into training sees B g^2, not (1 - rho^t) of it.
        curvature_every: ef-exact and fisher-mc only: estimate the curvature from one training
            step's batch in this many (the first step after an update and every k-th after it;
            default 1, every step). The exact estimators cost an extra squared GEMM or backward
            per step, and an update every few hundred steps needs far fewer batches than that to
            average over; the estimate stays the mean over the batches taken.
        prior: with a non-MacKayAdam optimizer, "proximal" (default) or "penalty" (the module's
            docstring: a proximal step after each optimizer step, or pruner.penalty() added to
            the loss by you).
        batch_size, curvature_decay: B and rho of the ef-batch estimate when the optimizer is
            not a MacKayAdam (MacKayAdam uses its own). g is each optimizer step's gradient
            (accumulated, averaged over ranks, unscaled), so B is the effective batch of one
            step: per-device batch x accumulation steps x world size; without an optimizer
            (prior="penalty"), each backward's gradient and its batch (mackay_ext.standalone_prior).
        alpha_max: cap on alpha.
        allow_empty_layers: let an update prune every group of a layer.
        max_prune_fraction: at most this share of a layer's live groups (of each parameter
            dimension's, with granularity="channel") is pruned by one update's criterion; of the
            groups it picks, those with the largest snr (prune="alpha": smallest alpha) stay, with
            their weights and new alpha, and are judged again at the next update. Default None (no
            limit). Where a layer's groups are redundant given each other, the diagonal evidence
            can find every one of them prunable at once (VGG's deep convs on an easy dataset,
            down to one filter); e.g. 0.5 thins such a layer over several updates, with the
            others re-fitting in between. Groups priced out by mac_price are governed by
            mac_price_ramp instead.
        channel_prior: with granularity="channel", where a group's prior sits. "members"
            (default): on every member entry (filter, bias, norm entries, consumer slices);
            left at its default on a network whose groups pass through a BatchNorm, with no
            max_prune_fraction, a warning says why "norm-scale" is the well-posed choice there.
            "norm-scale": on a group whose channel passes through a BatchNorm, InstanceNorm or
            GroupNorm with a scale, on those scale entries alone; its filter and consumer slices get no
            prior from it, and pruning it still zeroes every member. A filter before such a norm
            is scale-free (the norm divides its scale out): the prior shrinks it at no cost to
            the fit, its curvature grows as 1/|w|^2, and the diagonal evidence cannot tell a
            needed filter from a redundant one; the norm's scale is what sets the channel's
            size. Groups without such a norm keep the prior on every member.
        on_nonfinite: "raise" (default) or "skip".

    DistributedDataParallel: every rank builds the pruner and calls update() at the same step
    (an update raises, naming each rank's step count, when the previous one was not; like the
    exact curvatures' all-reduce, this takes an initialised process group to mean that its ranks
    train one model together).
    The exact curvatures are summed over ranks (with their example counts) before the update;
    ef-batch is computed from DDP's already averaged gradients, read at the optimizer step (pass
    the global batch size as batch_size, or MacKayAdam's), so every rank computes identical alpha
    and identical pruning (not so without an optimizer: each rank then reads its own backward).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                 num_data: float, granularity: str | dict[str, str] = "weight", rule: str = "mackay",
                 prune: str | None = None, threshold: float | None = None, curvature: str = "ef-batch",
                 layers: Iterable[str] | None = None, batch_size: float | None = None,
                 curvature_decay: float = 0.99, eps: float = 1e-16, alpha_max: float | None = None,
                 prior: str = "proximal", allow_empty_layers: bool = False,
                 on_nonfinite: str = "raise", backend: str = "ext", example_inputs=None,
                 mac_price: float = 0.0, mac_price_ramp: int = 1, curvature_every: int = 1,
                 max_prune_fraction: float | None = None, channel_prior: str | None = None):
        where = "MacKayPruner"
        check_module(model, "model", where)
        check_initialised(model, where)
        check_optimizer(optimizer, "optimizer", where)
        refuse_sharded(model.named_parameters(), where, model)
        if isinstance(optimizer, torch.optim.LBFGS):   # (a new user's run diverged to NaN after the first prune)
            raise ValueError(f"{where}: torch.optim.LBFGS is not supported: its step runs a line search over "
                             "the loss alone through a closure, while the prior acts after the step and the "
                             "curvature is read once per step; use a first-order optimizer or MacKayAdam")
        num_data = check_count(num_data, "num_data", where)
        checked = check_pruner_options(
            where, granularity=granularity, rule=rule, prune=prune, threshold=threshold, curvature=curvature,
            layers=layers, curvature_decay=curvature_decay, eps=eps, alpha_max=alpha_max, prior=prior,
            allow_empty_layers=allow_empty_layers, on_nonfinite=on_nonfinite, backend=backend,
            mac_price=mac_price, mac_price_ramp=mac_price_ramp, curvature_every=curvature_every,
            max_prune_fraction=max_prune_fraction, channel_prior=channel_prior)
        prune, threshold, channel_prior = checked["prune"], checked["threshold"], checked["channel_prior"]
        self._channel_prior_chosen = checked["channel_prior_chosen"]
        if isinstance(optimizer, MacKayAdam):
            groups = [g for g in optimizer.param_groups if g.get("ard")]
            differ = [f"{key}={given!r} (MacKayAdam's: {', '.join(sorted({repr(g[key]) for g in groups}))})"
                      for key, given, default in (("batch_size", batch_size, None),
                                                  ("curvature_decay", curvature_decay, 0.99))
                      if given != default and any(g[key] != given for g in groups)]
            if differ:   # the same values repeated here change nothing
                warnings.warn(f"{where}: batch_size and curvature_decay are MacKayAdam's (its param groups'); "
                              f"the values given here are not used: {'; '.join(differ)}", UserWarning, stacklevel=user_stacklevel())
        self.channel_prior = channel_prior
        self.model, self.optimizer = model, optimizer
        self.num_data, self.rule, self.prune, self.threshold = num_data, rule, prune, threshold
        self.curvature_kind, self.eps, self.alpha_max, self.backend = curvature, eps, alpha_max, backend
        self.allow_empty_layers, self.on_nonfinite = allow_empty_layers, on_nonfinite
        self.max_prune_fraction = checked["max_prune_fraction"]
        self.fused = isinstance(optimizer, MacKayAdam)
        self.prior = "optimizer" if self.fused else prior
        if not self.fused and prior == "proximal" and optimizer is None:
            raise ValueError("MacKayPruner: prior='proximal' applies the prior after each step of "
                             "the optimizer: pass it, or use prior='penalty' and add penalty() to the loss")
        self.channel = None   # the group update of granularity="channel" (mackay_ext.channel_ard)
        coupling = None
        if isinstance(granularity, str) and granularity == "channel":
            from .channel_ard import trace_for_pruner
            coupling = trace_for_pruner(model, example_inputs)   # before any hook is attached
        elif example_inputs is not None and not mac_price:
            raise ValueError("MacKayPruner: example_inputs is used by granularity='channel' and "
                             f"mac_price > 0 only, got granularity={granularity!r}, mac_price=0")
        self.mac_price = checked["mac_price"]
        if self.mac_price and example_inputs is None:
            raise ValueError("MacKayPruner: mac_price > 0 needs example_inputs= (a batch that runs "
                             "the model): the MACs of every group are counted from one forward")
        self.mac_price_ramp = mac_price_ramp
        if curvature_every > 1 and optimizer is None:
            raise ValueError(f"{where}: curvature_every counts optimizer steps: pass the optimizer")
        self.curvature_every = curvature_every
        self._mc_calls_since_update = 0
        self._mc_captured: bool | None = None   # capture_mc's verdict, until accumulate_mc_from
        self._priced_updates = 0   # updates so far that could prune with a price (the ramp's clock)
        self.targets, self.excluded = find_targets(model, optimizer, layers, ard_groups_only=self.fused)
        self._unfrozen_warned: set[str] = set()
        parametrized = [entry["name"] for entry in self.excluded if entry["reason"] == PARAMETRIZED]
        if parametrized:   # weight-like parameters the user will expect covered: say so
            warnings.warn(f"{where}: {', '.join(parametrized)} left without a prior: each is {PARAMETRIZED}",
                          stacklevel=user_stacklevel())
        if not self.targets:
            reasons = {e["reason"] for e in self.excluded if not e["reason"].startswith("1-D")}
            untrained = reasons == {"not trained by the optimizer"}
            if untrained:
                raise ValueError("MacKayPruner: the optimizer trains none of this model's weights: was it built "
                                 "for another model, or for a copy of this one (copy.deepcopy makes new "
                                 "parameters)? Pass the optimizer of model.parameters()")
            raise ValueError("MacKayPruner: the model has no trainable parameter with dim >= 2 to "
                             f"put a prior on (left out: {self.excluded})")
        sparse_grads = sorted({t.module_name for t in self.targets.values() if getattr(t.module, "sparse", False) is True})
        if sparse_grads:   # the prior's gradient hook and the curvature read dense gradients
            raise ValueError(f"{where}: {', '.join(map(repr, sparse_grads))} "
                             f"{'makes' if len(sparse_grads) == 1 else 'make'} sparse gradients (e.g. nn.Embedding("
                             "sparse=True)), which the prior and the curvature cannot read; build them with "
                             "sparse=False, or leave them out with layers=")
        taken = claimed((name, target.param) for name, target in self.targets.items())
        if taken:
            raise ValueError(f"{where}: layers {', '.join(map(repr, taken))} already have a prior from another "
                             "MacKayPruner, whose hooks stay live until its detach(): both would apply the prior and the "
                             "masks. Call that pruner's detach() first (mackay_ext.attached_pruners(model) "
                             "lists them), or give this one other layers with layers=[...]")
        # MACs per example of one entry of each weight (mac_price.py), before any hook is attached
        self._weight_uses = weight_uses(model, example_inputs) if self.mac_price else {}
        self._freed = None   # MACs_g of each group (granularity weight / filter)
        if self.mac_price and granularity != "channel":
            target_uses(self._weight_uses, self.targets)   # every target counted, or a clear error
            self._freed = FreedMacs(model, example_inputs, self._weight_uses)
        self.layers = {name: target.module for name, target in self.targets.items()}
        self.granularity, self.notes = self._granularities(granularity)
        fallen = [name for name, note in self.notes.items() if note.startswith("per-weight ARD")]
        if fallen:   # said when built: a note in the update reports alone went unread
            warnings.warn(f"{where}: granularity={granularity!r} does not apply to {', '.join(fallen[:6])}"
                          f"{', ...' if len(fallen) > 6 else ''}, which get one alpha per weight "
                          f"({self.notes[fallen[0]][len('per-weight ARD: '):]})", UserWarning, stacklevel=user_stacklevel())
        # from here on hooks are attached: a refusal takes them back (the with adds no frame, so
        # the warnings said inside point at the caller as before)
        with _detached_if_refused(self):
            # what detach() takes back, before anything is attached
            self._hooks, self._step_reader, self._covariance, self.accumulator = [], None, None, None
            # layers split from a group granularity into one alpha per weight (_drop), with the group's
            # name: a checkpoint of the split layer resumes in a new pruner built with the group one
            self.split_from: dict[str, str] = {}
            if self._freed is not None and self._freed.note:
                self.notes["mac_price"] = self._freed.note
            # priced Linear inputs are re-fitted from the others when they go (mac_compensate.py)
            if self._freed is not None:
                refit = {name: t.module for name, t in self.targets.items()
                         if isinstance(t.module, nn.Linear) and t.attr == "weight" and len(t.owners) <= 1
                         and self._alpha_shape(t, self.granularity[name]) == (1, t.param.shape[1])}
                wide = sorted(name for name, module in refit.items() if module.in_features > REFIT_MAX_INPUTS)
                if wide:
                    self.notes["mac_price refit"] = (f"inputs of {', '.join(wide)} priced without the re-fit (more "
                                                     f"than {REFIT_MAX_INPUTS} inputs)")
                refit = {name: module for name, module in refit.items() if name not in wide}
                self._covariance = InputCovariance(refit) if refit else None
            if curvature != "ef-batch":
                self._attach_accumulator()
            self.history: list[dict[str, Any]] = []
            self._said_without_data: set[str] = set()   # layers no data has reached, warned about once
            self._said_lr_zero: set[str] = set()         # layers whose lr was 0 at an update, warned about once
            self._masks_warned = False   # torch.nn.utils.prune masks not imported (_warn_unimported_masks)
            self._uncovered_warned = False   # trainable weights outside the optimizer (_warn_uncovered_weights)
            self._replaced_untrained: dict[str, str] = {}   # layer -> "sparsify": note_replaced_untrained
            # the optimizer's parameters when the pruner was built: one added later has no prior
            self._params_at_build = {id(p) for group in optimizer.param_groups for p in group["params"]} \
                if optimizer is not None else set()
            self._said_emptied: set[str] = set()   # layers kept at their strongest group, warned about once
            self.alpha_before_switch_off: dict[str, torch.Tensor] | None = None   # see switch_off_prior
            self.detached = False   # see detach()
            self.copied = False     # see __setstate__
            # layers that had a gradient at a step whose batch the exact estimator captured, yet have
            # not been seen by its hooks since the last update (a parent reads their weight itself);
            # update() refuses to price them at 0. fisher-mc: whether this step's batch was captured.
            self._grad_not_captured: set[str] = set()
            self._mc_step_captured = False
            self._said_dropped = False   # see _say_dropped
            self._said_batch_against_rows = False   # see _say_batch_against_rows
            self._fed_since_update: set[str] = set()   # ef-batch: layers a step had a gradient for
            self._own = ParamStates()   # without a MacKayAdam: each layer's alpha and h
            # where the ef-batch curvature reads g (standalone_prior): each optimizer step's gradient
            # (MacKayAdam's fused step, or the step hooks), or each backward's without an optimizer;
            # the 1-D channel members that channel_ard tracks itself follow it
            self.ef_batch_source = "step" if optimizer is not None else "backward"
            self._steps_since_update: int | None = None
            self._gradient_since_update = False   # a backward reached a weight (the hooks say)
            self._steps_total = 0           # optimizer steps seen (DDP: compared across ranks)
            self._unfinished: UnfinishedUpdate | None = None   # an update() stopped part-way
            self._gradient_scale = 1.0   # see the property
            self._alpha_views = AlphaViews(on_new=self._hold_pruned_state_at_zero)   # read per alpha change
            self._lockstep = Lockstep({name: tuple(t.param.shape) for name, t in self.targets.items()})
            # B under DDP or gradient accumulation (step_batch.py): where ef-batch reads it
            self._step_batch = StepBatchWatch(model) if optimizer is not None and curvature == "ef-batch" else None
            if self._step_batch is not None:
                self._hooks.extend(self._step_batch.handles)
            # MacKayAdam: per layer (its state dict, its step, t) when load_state_dict wrote h there
            self._loaded_steps: dict[str, tuple[dict, float, float]] = {}
            self.foreign_steps: dict[str, int] = {}   # steps of other optimizers since the last update, by class
            if optimizer is not None:
                self._steps_since_update = 0
                self._hooks += [optimizer.register_step_pre_hook(self._before_step),
                                optimizer.register_step_post_hook(self._after_step)]
            if optimizer is not None:   # another optimizer's steps leave the pruned weights at 0 too
                watch_foreign_steps(self)
            if self.fused:
                self._attach_to_optimizer()
                self._hooks.append(optimizer.register_load_state_dict_post_hook(self._after_optimizer_load))
            else:
                if batch_size is None and curvature == "ef-batch":
                    raise ValueError("MacKayPruner: batch_size is needed for the ef-batch curvature "
                                     "when the optimizer is not a MacKayAdam")
                self.batch_size = check_count(batch_size, "batch_size", where) if batch_size is not None else 1.0
                self._batch_size_given = batch_size is not None
                if batch_size is not None and self.batch_size > self.num_data:
                    raise ValueError(f"{where}: batch_size ({self.batch_size:g}) exceeds num_data "
                                     f"({self.num_data:g}), the training-set size")
                self.curvature_decay = float(curvature_decay)
                self._attach_hooks()
                self._warn_unknown_optimizer()
            if coupling is not None:
                from .channel_ard import ChannelARD
                self.channel = ChannelARD(self, coupling, batch_size)
            claim(self, [target.param for target in self.targets.values()])
            if optimizer is not None:   # after every other hook of a step: gradient_scale holds for one
                self._hooks.append(optimizer.register_step_post_hook(self._end_of_step))
            self._hooks.append(watch_model_loads(self))   # weights loaded where alpha = +inf are said
            # weights outside the optimizer that a backward gives a gradient (_warn_uncovered_weights)
            self._trained_elsewhere: set[str] = set()
            self._watch_uncovered_weights()
            self._check_batch_share(self.num_data)

    def _check_batch_share(self, num_data: float) -> None:
        """ef-batch's curvature shrinks as the batch nears the training set: said
        (batch_curvature.batch_share_note), when built and when num_data changes."""
        self._batch_share_checked = True
        batch = self._step_batch_size() if self.curvature_kind == "ef-batch" else None
        note = batch_share_note(batch, num_data) if batch is not None else None
        if note is not None:
            warnings.warn(f"MacKayPruner: {note}", UserWarning, stacklevel=user_stacklevel())

    @property
    def gradient_scale(self) -> float:
        """The gradient the optimizer's next steps use over the gradient of the mean loss that
        num_data and batch_size refer to (default 1): c = min(1, max_norm / (norm + 1e-6)) after
        clip_grad_norm_ scaled a step's gradient by c; A where a loss summed over A accumulated
        micro-batches is A times the mean. The prior's step and the ef-batch curvature read at
        the step are put in the mean loss's units (the prior's pull times c, h from (g / c)^2),
        as one step on c times the whole objective: clipping the data's gradient alone made the
        prior 1 / c times stronger and h c^2 times smaller (a tiny BERT under the Hugging Face
        Trainer's default max_grad_norm=1 kept 17 of 21,760 weights, at chance). Set it before
        the step it applies to: it holds for that optimizer step only, and is 1 again after it
        (a factor that stayed in force was applied to every later, unclipped step when a loop set
        it only on the steps clipping acted on).
        With a MacKayAdam it sets the optimizer's too. The training-loop callbacks set it at every
        step from the norm before clipping."""
        return self._gradient_scale

    @gradient_scale.setter
    def gradient_scale(self, value) -> None:
        self._gradient_scale = check_count(value, "gradient_scale", "MacKayPruner")
        if self.fused:
            self.optimizer.gradient_scale = self._gradient_scale

    @property
    def num_data(self) -> float:
        """N, the number of training examples. Set on a built pruner (a notebook user correcting
        it mid-run), it sets MacKayAdam's too, in the param groups that hold this pruner's
        weights: the prior's step and the update then use the same N."""
        return self._num_data

    @num_data.setter
    def num_data(self, value) -> None:
        value = check_count(value, "num_data", "MacKayPruner")
        built = getattr(self, "_batch_share_checked", False)
        batch = self._step_batch_size() if built else getattr(self, "batch_size", None)
        if batch is not None and batch > value:   # (MacKayAdam's batch_size too, once built)
            raise ValueError(f"MacKayPruner: num_data ({value:g}) is below batch_size ({batch:g}): num_data is "
                             "the training set's size")
        if built and value != self._num_data:
            self._check_batch_share(value)
        if getattr(self, "fused", False):   # (built: the groups were checked against N there)
            held = {id(target.param) for target in self.targets.values()}
            for group in self.optimizer.param_groups:
                if any(id(p) in held for p in group["params"]):
                    group["num_data"] = value
        self._num_data = value

    # ------------------------------------------------------------------ set-up
    def current_mac_price(self) -> float:
        """The price the next pruning update charges: mac_price once mac_price_ramp pruning
        updates have passed, a linear share of it before."""
        return self.mac_price * min(1.0, (self._priced_updates + 1) / self.mac_price_ramp)

    def _granularities(self, granularity) -> tuple[dict[str, str], dict[str, str]]:
        if isinstance(granularity, str) and granularity == "channel":   # alpha_eff per entry
            return {name: "channel" for name in self.targets}, {}
        per_name = granularity if isinstance(granularity, dict) else {}
        if isinstance(granularity, dict):
            names = set(self.targets) | {t.module_name for t in self.targets.values()}
            unknown = sorted(set(granularity) - names)
            if unknown:
                # a weight left without a prior under the name asked for says why (a parametrized layer's)
                why = [f"{e['name']} is {e['reason'].split(':')[0]}" for e in self.excluded
                       if not e["reason"].startswith("1-D") and any(
                           e["name"].startswith(u.rpartition(".")[0] + "." if u.endswith(".weight") else u + ".")
                           for u in unknown)]
                raise ValueError(f"MacKayPruner: granularity names {unknown} are not ARD layers of the "
                                 f"model (they are: {sorted(self.targets)})" + (f"; {'; '.join(why)}" if why else ""))
        chosen, notes = {}, {}
        for name, target in self.targets.items():
            value = per_name.get(name, per_name.get(target.module_name, "weight")) if per_name else granularity
            if value not in GRANULARITIES:   # "channel" is for the whole model, so listed apart
                raise ValueError(f"MacKayPruner: granularity must be one of {GRANULARITIES} (per layer, or "
                                 f"for every layer) or 'channel' (for every layer), got {value!r}")
            try:
                self._alpha_shape(target, value)
            except ValueError as error:
                if per_name:  # asked for this layer by name: say why it cannot be
                    raise ValueError(f"MacKayPruner: {target.description}: {error}") from None
                notes[name] = f"per-weight ARD: {error}"
                value = "weight"
            chosen[name] = value
        return chosen, notes

    @staticmethod
    def _alpha_shape(target: ARDTarget, granularity: str) -> tuple[int, ...]:
        if granularity == "channel":   # the summed precisions of the entry's groups
            return tuple(target.param.shape)
        return alpha_shape_for(target.layout, tuple(target.param.shape), granularity,
                               getattr(target.module, "groups", 1))

    def _attach_accumulator(self) -> None:
        from .curvature import FisherAccumulator, supported
        problems = [p for p in (exact_curvature_problem(t, supported) for t in self.targets.values()) if p]
        if problems:
            raise ValueError(f"MacKayPruner: curvature={self.curvature_kind!r} covers the untied weights "
                             "of nn.Linear, nn.Conv1d and nn.Conv2d (zero padding, equal on both sides) only; "
                             f"it cannot serve {', '.join(problems)}. Use curvature='ef-batch', or "
                             "leave them out with layers=[...]")
        modules = sorted({t.module_name for t in self.targets.values()})
        self._target_of_param = {t.param: name for name, t in self.targets.items()}
        self.accumulator = FisherAccumulator(self.model, mode=self.curvature_kind, modules=modules,
                                             backend=self.backend, strict=True, alpha_of=self._alpha_of)
        # ef-exact: a captured backward whose gradient is dropped before the optimizer steps (_say_dropped)
        self.accumulator.watch_dropped = self.optimizer is not None and self.curvature_kind == "ef-exact"
        self._micro_batches = MicroBatchScale()   # ef-exact: gradient accumulation's A per step

    def _alpha_of(self, param: nn.Parameter) -> torch.Tensor | None:
        """The alphas of an ARD weight, for the accumulator to skip what is pruned (None under
        channel ARD, whose pruned channels are its own)."""
        if self.channel is not None:
            return None
        name = self._target_of_param.get(param)
        if name is None:
            return None
        if self.fused:   # asked for every layer on every batch: the state's dict, not ard_state's search
            alpha = self.optimizer.state.get(param, {}).get("alpha")
            if alpha is not None and alpha.device == param.device:   # else alpha() moves it first
                return alpha
        return self.alpha(name)

    def _attach_to_optimizer(self) -> None:
        for name, target in self.targets.items():
            group = self.optimizer._group_of(target.param)
            if group["num_data"] != self.num_data:
                raise ValueError(f"MacKayPruner: num_data={self.num_data:g}, but MacKayAdam applies the "
                                 f"prior of {name!r} with num_data={group['num_data']:g}: give both the "
                                 "number of training examples")
            if group["batch_size"] is None and self.curvature_kind == "ef-batch":
                raise ValueError("MacKayPruner: the ef-batch curvature needs MacKayAdam(batch_size=...)")
            state = self.optimizer.ard_state(target.param)
            shape = self._alpha_shape(target, self.granularity[name])
            if tuple(state["alpha"].shape) != shape:
                state["alpha"] = torch.zeros(shape, dtype=torch.float32, device=target.param.device)

    def note_replaced_untrained(self, layer: str, by: str) -> None:
        """`by` (sparsify, densify) replaced `layer` without this pruner's optimizer, which still
        holds its old weight: said at the optimizer's next step (_say_replaced_untrained)."""
        self._replaced_untrained[layer] = by

    def _say_replaced_untrained(self) -> None:
        by = sorted(set(self._replaced_untrained.values()))
        layers = ", ".join(self._replaced_untrained)
        self._replaced_untrained.clear()
        warnings.warn(f"MacKayPruner: the optimizer stepped after {' and '.join(by)} replaced {layers} without "
                      "it: it still steps their old weights, which the model no longer computes with, and "
                      "does not train the new layers (their values stay as converted). To train on, pass the "
                      f"optimizer: {by[0]}(model, optimizer) rebinds it; this pruner's updates end there "
                      "(detach() it)", RuntimeWarning, stacklevel=user_stacklevel())

    def _before_step(self, optimizer, args, kwargs) -> None:
        """The step's examples and backward passes are closed before it runs: a step that raised
        (a notebook user's Ctrl-C in optimizer.step, the batch then run again) merged its passes
        with the next step's, read as gradient accumulation (ef-exact: that step's squares
        multiplied by A^2 = 4; ef-batch: "batch_size is one micro-batch"). A GradScaler step's
        squares are held until the scaler's verdict, and a step given a closure (Lightning's
        automatic optimization) runs the last backward inside it: counted after it (_after_step,
        where a step closed here has nothing left to count)."""
        self._stepping = True   # (another optimizer's step inside this one is part of it: foreign_steps)
        closure = args[1] if len(args) > 1 else kwargs.get("closure")   # (args[0]: the optimizer)
        if closure is not None:
            return
        if self._step_batch is not None:
            self._step_batch.close_step()
        if self.curvature_kind == "ef-exact" and self.accumulator is not None \
                and not self.accumulator.holds_a_scaled_step():
            self._count_micro_batches()

    def _after_step(self, optimizer, args, kwargs) -> None:
        if self._replaced_untrained:
            self._say_replaced_untrained()
        if self.accumulator is not None and self.accumulator.holds_a_scaled_step():
            # a GradScaler-scaled step's squares (mackay_ext.loss_scale): this step ran, unless an
            # optimizer that takes the scaler's found_inf skipped it on the device
            found_inf = getattr(optimizer, "found_inf", None)
            self.accumulator.settle_step(ran=not isinstance(found_inf, torch.Tensor) or float(found_inf) == 0)
        self._steps_since_update += 1
        self._steps_total += 1
        if self._step_batch is not None:   # (a step with a closure: its passes; else none since _before_step)
            self._step_batch.close_step()
        captured = (self.accumulator is not None and not self.accumulator.paused
                    if self.curvature_kind == "ef-exact" else self._mc_step_captured)
        if captured:
            self._grad_not_captured.update(name for name, target in self.targets.items()
                                           if target.param.grad is not None and not self.accumulator.saw(target.param))
        if self.curvature_kind == "ef-exact" and self.accumulator is not None:
            self._count_micro_batches()   # (a GradScaler step's, settled above, or a closure's)
            self._say_dropped()
        self._mc_step_captured = False
        if self.curvature_kind == "ef-batch":   # (where ef-batch's h took a gradient: _idle_layers)
            self._fed_since_update.update(name for name, target in self.targets.items()
                                          if target.param.grad is not None)
        self._sample_next_batch()
        if self.fused:
            return
        zeroed = set()
        if self.prior == "proximal":
            # GradScaler's found_inf (set while an AMP-aware step runs, e.g. Adam(fused=True)):
            # a step it skipped changed no weight, and the prior's step must not either
            zeroed = self._proximal_step(getattr(optimizer, "found_inf", None))
        self._zero_pruned(zeroed)

    def _end_of_step(self, optimizer, args, kwargs) -> None:
        self._stepping = False
        if self._gradient_scale != 1.0:   # (its curvature read and prior step have run)
            self.gradient_scale = 1.0

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A copy (copy.deepcopy, pickle) holds none of the hooks: they sit on the original's model
        # and optimizer, and the model's copy gets inert ones (copy_inert.py). So the copy is a
        # detached pruner: its state readable, its update() refused with what to do instead.
        self.__dict__.update(state)
        self.__dict__.setdefault("_fed_since_update", set())
        self.__dict__.setdefault("_gradient_since_update", True)
        self.__dict__.setdefault("_said_batch_against_rows", False)
        self.__dict__.setdefault("_batch_size_given", True)
        self.detached, self.copied = True, True
        self._hooks, self._step_reader = [], None

    def detach(self) -> None:
        """Remove the gradient, optimizer and curvature hooks; the weights are then free for
        another pruner. update() and apply_masks() are refused from then on (report(),
        state_dict() and the alphas stay readable). Also what a refused build runs.
        A MacKayAdam's state holds the alphas its steps apply: they go on after detach (the
        pruned weights held at 0, the kept ones under their prior, as fit() leaves them; a state
        saved afterwards resumes them, and a pruner built on it goes on from them), until
        switch_off_prior(), which works on a detached pruner too."""
        self.detached = True
        release(self)
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        unwatch(self)
        if self._step_reader is not None:
            self._step_reader.remove()
        if self.accumulator is not None:
            self.accumulator.detach()
        if self.channel is not None:
            self.channel.detach()
        if self._covariance is not None:
            self._covariance.remove()

    def examples_of_rows(self, *indices: torch.Tensor | None, num_examples: int | None = None) -> None:
        """Where an example spans several rows of a layer's input (a graph batch's nodes: PyG's
        `batch` vector, node -> graph), the example of each row, given before each batch's
        forward: ef-exact and fisher-mc then square each example's gradient (summed over its
        rows), and the batch-size check counts examples, not rows (FisherAccumulator's
        examples_of_rows says the rest). None: rows are examples again."""
        rows = None if indices == (None,) else RowExamples(indices, num_examples, "MacKayPruner.examples_of_rows")
        if self.accumulator is not None:
            self.accumulator.use_rows(rows)
        if self._step_batch is not None:
            self._step_batch.rows = rows

    def accumulate_mc(self, x: torch.Tensor, num_samples: int = 1) -> None:
        """fisher-mc: add the sampled-label Fisher of a batch of inputs (a forward and backward
        of its own; capture_mc() and accumulate_mc_from() reuse the training forward instead).
        With curvature_every=k, only the first call after an update and every k-th after it do."""
        if self._sample_mc("accumulate_mc"):
            before = self.accumulator.num_examples
            self.accumulator.accumulate_mc(x, num_samples)
            self._note_mc_rows(before, num_samples)
            self._mc_step_captured = True

    @contextlib.contextmanager
    def capture_mc(self):
        """fisher-mc from the training forward, which runs inside (no forward of its own):

            with pruner.capture_mc():
                logits = model(x)
            loss = loss_fn(logits, y)
            pruner.accumulate_mc_from(logits)   # before loss.backward(): the graph is reused
            loss.backward(); optimizer.step()

        With curvature_every=k, the first step after an update and every k-th after it are
        recorded, and accumulate_mc_from does nothing on the others."""
        sampled = self._sample_mc("capture_mc")
        self._mc_captured = sampled
        try:
            if not sampled:
                yield self
                return
            with self.accumulator.capture_mc():
                yield self
        except BaseException:   # the forward failed: no step to count, nothing to add
            self._mc_captured = None
            self._mc_calls_since_update -= 1
            raise

    def accumulate_mc_from(self, logits: torch.Tensor, num_samples: int = 1) -> None:
        """fisher-mc: add the sampled-label Fisher of the forward run inside capture_mc(), whose
        `logits` (N, classes) are given; see capture_mc."""
        if self.curvature_kind != "fisher-mc":
            raise RuntimeError("MacKayPruner.accumulate_mc_from needs curvature='fisher-mc'")
        captured, self._mc_captured = self._mc_captured, None
        if captured is None:
            raise RuntimeError("MacKayPruner.accumulate_mc_from: no forward was captured since the last "
                               "accumulate_mc_from: run the forward inside `with pruner.capture_mc():` first, once "
                               "for each call (the labels of one categorical a row; a second head's logits are "
                               "another likelihood: cover that head with a pruner of its own, layers=)")
        if captured:
            try:
                before = self.accumulator.num_examples
                self.accumulator.accumulate_mc_from(logits, num_samples)
                self._note_mc_rows(before, num_samples)
                self._mc_step_captured = True
                return
            except RuntimeError as error:
                failure = error
            # nothing captured because the layers were swapped (sparsify, shrink): say that (here,
            # outside the except, so the message does not come chained to the one it replaces)
            self._check_targets_in_model("accumulate_mc_from")
            raise failure

    def _note_mc_rows(self, before: int, num_samples: int) -> None:
        """The examples (rows of the layers' inputs) of one sampled batch, for the values a row
        (_values_per_example): the largest batch since the update."""
        rows = (self.accumulator.num_examples - before) // max(int(num_samples), 1)
        self._micro_batches.largest = max(self._micro_batches.largest, rows)

    def _sample_mc(self, where: str) -> bool:
        """Whether this fisher-mc call is one of the sampled ones (curvature_every)."""
        if self.curvature_kind != "fisher-mc":
            raise RuntimeError(f"MacKayPruner.{where} needs curvature='fisher-mc'")
        self._check_attached(where)
        sampled = self._mc_calls_since_update % self.curvature_every == 0
        self._mc_calls_since_update += 1
        return sampled

    def _say_dropped(self) -> None:
        """Once: a captured backward left a gradient that was dropped before this optimizer used
        it (FisherAccumulator._check_kept); what it left since the step is no longer watched."""
        self.accumulator._left.clear()
        dropped, self.accumulator.dropped = sorted(self.accumulator.dropped), set()
        if not dropped or self._said_dropped:
            return
        self._said_dropped = True
        warnings.warn(
            f"MacKayPruner: curvature='ef-exact' squared a backward pass through {', '.join(dropped)} whose "
            "gradient was then dropped (zero_grad) before this optimizer stepped: its squares belong to a loss "
            "these layers do not train on, and it counted as a micro-batch of the step. A GAN's generator loss "
            "through a discriminator left trainable: freeze the discriminator for the generator's step "
            "(D.requires_grad_(False), then True), which the curvature leaves out. A pass whose gradient "
            "you drop on purpose (SAM's first pass): pruner.accumulator.paused = True around its forward and "
            "backward",
            RuntimeWarning, stacklevel=user_stacklevel())

    def _count_micro_batches(self) -> None:
        """The backward passes this optimizer step captured and their examples (micro_batches.py)."""
        self._micro_batches.after_step(self.accumulator.backward_passes, self.accumulator.num_examples,
                                       self.gradient_scale)
        self.accumulator.backward_passes = 0

    def _sample_next_batch(self) -> None:
        """ef-exact with curvature_every=k: the hooks capture the first training step after an
        update and every k-th after it, and sleep in between (no inputs kept, no squared GEMM)."""
        if self.accumulator is not None and self.curvature_kind == "ef-exact":
            steps = self._steps_since_update or 0   # None without an optimizer (then k is 1)
            self.accumulator.paused = steps % self.curvature_every != 0

    @torch.no_grad()
    def _refresh_curvature(self) -> None:
        """Move the exact estimate into the curvature the update reads, and start afresh."""
        if self.accumulator is None:
            return
        self.accumulator.all_reduce()  # under torch.distributed: the global batch's estimate
        if self.accumulator.num_examples == 0 and not self._trained_since_update():
            # no optimizer step since the pruner was built or since the last update: the estimate
            # stays as it is, as ef-batch's does (the first update sets alpha from the weights and
            # says so; a second in a row re-estimates alpha and prunes nothing, said too)
            return
        if self.accumulator.num_examples == 0:
            from .curvature import COMPILED_HINT
            compiled = self._steps_since_update and _dynamo_compiled_something()
            raise RuntimeError(f"MacKayPruner.update: no {self.curvature_kind} curvature accumulated yet "
                               + ("(on training batches: `with pruner.capture_mc(): logits = model(x)`, then "
                                  "pruner.accumulate_mc_from(logits); or pruner.accumulate_mc(x))"
                                  if self.curvature_kind == "fisher-mc" else
                               "(run a training backward first; the hooks read backward() alone, not gradients "
                               "taken with torch.autograd.grad, torch.func.grad or vmap: use curvature='ef-batch' "
                               "there)")
                               + (f". {COMPILED_HINT}" if compiled else ""))
        missed = sorted(name for name in self._grad_not_captured if not self.accumulator.saw(self.targets[name].param))
        beside = [name for name in missed if self.targets[name].module in self.accumulator.sampled_calls]
        if beside:   # called in the sampled forward, yet no gradient of the sampled labels' loss reached them
            raise RuntimeError(f"MacKayPruner.update: {', '.join(beside)} had gradients, but their outputs do not reach "
                               "the logits fisher-mc samples labels from (a value head beside a policy head, an "
                               "auxiliary output): that likelihood's Fisher says nothing about them, and MacKay's rule "
                               "would prune them all for it. Leave them out with layers=[...] (a second pruner with "
                               "curvature='ef-batch' or 'ef-exact' can cover them), or use one of those for all")
        if missed:   # their curvature would read 0 and the rule would prune them for it
            raise RuntimeError(f"MacKayPruner.update: {', '.join(missed)} had gradients, but the {self.curvature_kind} "
                               "hooks never saw their forward: a parent module reads their weight itself (as "
                               "nn.MultiheadAttention does with out_proj), or they ran where hooks cannot capture "
                               "(torch.func; under fisher-mc, torch.utils.checkpoint with use_reentrant=True, whose "
                               "recomputed forward it does not see: pass use_reentrant=False). Use "
                               "curvature='ef-batch', or leave them out with layers=[...]")
        # ef-exact under gradient accumulation: each backward held 1/A of its examples' gradients;
        # and N, B counting K values per example: ef-exact squared 1/K of each example's gradient
        # of the sum over its values, fisher-mc sampled that sum's Fisher, K times one value's
        micro_batches = (self._micro_batches.factor() * self._values_per_example()
                         if self.curvature_kind == "ef-exact" else 1.0 / self._values_per_example())
        for name, target in self.targets.items():
            if self.accumulator.saw(target.param):
                self.curvature(name).copy_(self.accumulator.curvature(target.param))
                if micro_batches != 1.0:
                    self.curvature(name).mul_(micro_batches)
            else:   # a layer no forward used (an idle head or branch): no data, as under ef-batch;
                # the update leaves it as it is and says so (_without_data)
                self.curvature(name).zero_()
        self.accumulator.reset()
        self._micro_batches.reset()
        self._grad_not_captured.clear()

    def _trained_since_update(self) -> bool:
        """An optimizer step since the pruner was built or since the last update; without an
        optimizer, a backward that reached one of its weights (gradients taken with
        torch.autograd.grad count: the exact hooks then say what they cannot read)."""
        if self._steps_since_update is not None:
            return self._steps_since_update > 0
        return self._gradient_since_update

    def _values_per_example(self) -> float:
        """K where batch_size counts K values the loss averages over per example (a row of the
        batch), as the README says for a regression's outputs (num_data=N*K, batch_size=B*K) and
        a token-level loss (label tokens), else 1. ef-exact squares each row's gradient of the
        mean loss, which holds 1/K of the row's gradient of the objective the evidence weighs
        (summed over its values): a new user's 6-output regression read a curvature 6 times too
        small (151 weights kept where ef-batch, right, kept 299). fisher-mc samples each row's
        Fisher of the sum over its values (a segmentation's pixels given as rows of the logits,
        the layers' rows its images), K times a value's: read 25x too large on 5x5 images. Taken
        where B is at least 1.5
        examples' worth, so a batch_size a little off changes nothing; the examples of a step are
        those of the largest step (an epoch's short last batch read K = 1.8 off the mean)."""
        rows = float(self._micro_batches.largest_step())
        batch = self._step_batch_size()
        if world_size() > 1:   # a step's rows over every rank: the same K on each (B is the whole step's)
            total = torch.tensor([rows], dtype=torch.float64, device=next(iter(self.targets.values())).param.device)
            torch.distributed.all_reduce(total)
            rows = float(total)
        if not rows or batch is None:
            return 1.0
        values = float(batch) / rows
        if values >= 1.5:
            self._say_batch_against_rows(float(batch), rows)
            return values
        if rows >= 1.5 * float(batch):
            self._say_batch_against_rows(float(batch), rows)
        return 1.0

    def _say_batch_against_rows(self, batch: float, rows: float) -> None:
        """Once: batch_size is not the rows a step's layers saw, which ef-exact and fisher-mc read
        as its examples. Above them, K = B / rows values a row are read (a regression's outputs, a
        language model's tokens) and the squares multiplied by K (fisher-mc: divided): right where meant, and a
        batch_size off by 2x read the curvature 2x, no word. Below them, rows are parts of
        examples (a Linear on a PackedSequence's data or on a seq-first RNN output, alone in the
        pruner: 3.0x and 0.92x the per-utterance curvature, no word) or batch_size is too small."""
        if self._said_batch_against_rows:
            return
        self._said_batch_against_rows = True
        kind, values = self.curvature_kind, f"{batch / rows:.3g}"
        if batch > rows:
            message = (f"batch_size={batch:g} is {values}x the examples {kind} read in a step ({rows:g}: the rows of "
                       "a layer's input; a layer called twice on one batch, such as two views run apart, reads row "
                       "i of both calls as one example, their gradients summed before squaring). It reads "
                       f"{values} values the loss averages over a row (a regression's outputs, a language model's "
                       "tokens, a segmentation's pixels; README 'Regression') and "
                       + ("multiplies each row's squares by that" if kind == "ef-exact" else
                          "divides each row's Fisher, the sum of its values', by that")
                       + f". If each row is one example, pass batch_size={rows:g}")
        else:
            message = (f"{kind} read {rows:g} examples (rows of the layers' inputs) in a step where "
                       f"batch_size={batch:g}. Rows that are parts of examples (time steps of a PackedSequence's "
                       "data or of a seq-first [T, N, d] output, a graph's nodes) read no example's gradient: give "
                       "each row's example (pruner.examples_of_rows), run the layer batch-first, or use "
                       "curvature='ef-batch'. "
                       + ("Where a step runs several backward passes (gradient accumulation, two views or losses "
                          "backpropagated apart), batch_size is the whole step's, and each pass's loss is divided "
                          "by their number (torch's recipe) or pruner.gradient_scale set to it (the squares of "
                          "undivided passes read that number squared too large); " if kind == "ef-exact" else "")
                       + f"If the rows are the step's examples, pass batch_size={rows:g}")
        warnings.warn(f"MacKayPruner.update: {message}", RuntimeWarning, stacklevel=user_stacklevel())

    # ------------------------------------------------------------------ state
    def _layer(self, name: str | torch.Tensor) -> str:
        """The key of a layer in self.targets (its module's name for a weight), from that key,
        from the parameter's full name ('0.weight' for layer '0') or from the weight itself."""
        if isinstance(name, torch.Tensor):
            found = next((key for key, target in self.targets.items() if target.param is name), None)
            if found is None:
                raise KeyError(f"MacKayPruner: the {type(name).__name__} of shape {tuple(name.shape)} given is no "
                               f"weight of this pruner's layers {list(self.targets)} (a bias, a weight of another "
                               "model or of a copy, or one replaced since the pruner was built)")
            return found
        if not isinstance(name, str):
            raise TypeError(f"MacKayPruner: a layer is named by a string (or given as its weight), got "
                            f"{type(name).__name__}")
        if name in self.targets:
            return name
        for key, target in self.targets.items():
            if name == (f"{target.module_name}.{target.attr}" if target.module_name else target.attr):
                return key
        raise KeyError(f"MacKayPruner: no layer {name!r}; its layers are {list(self.targets)} (a weight's layer "
                       "is named by its module; the parameter's full name, such as '0.weight', works too)")

    def weight(self, name: str | torch.Tensor) -> nn.Parameter:
        return self.targets[self._layer(name)].param

    def alpha(self, name: str | torch.Tensor) -> torch.Tensor:
        """A layer's alpha (+inf where pruned), by its name or its weight."""
        name = self._layer(name)
        return (self.optimizer.ard_state(self.targets[name].param)["alpha"] if self.fused
                else self._own[name]["alpha"])

    def curvature(self, name: str | torch.Tensor) -> torch.Tensor:
        """The curvature state of a layer (by its name or its weight) (in place: ef-batch's moving average h itself)."""
        name = self._layer(name)
        return (self.optimizer.ard_state(self.targets[name].param)["curvature"] if self.fused
                else self._own[name]["curvature"])

    def curvature_estimate(self, name: str) -> torch.Tensor:
        """The curvature update() reads: ef-batch's h / (1 - rho^t), t the updates h has taken
        (the optimizer's step count with MacKayAdam, the hooks' count otherwise), which is B g^2
        for a constant gradient whatever t; the exact estimates as the last update() wrote them
        (0 before the first): the batches since are summed in `pruner.accumulator` and written
        at the next update."""
        name = self._layer(name)
        if self.curvature_kind != "ef-batch":
            return self.curvature(name)
        rho = (self.optimizer._group_of(self.targets[name].param)["curvature_decay"] if self.fused
               else self.curvature_decay)
        return ema_debiased(self.curvature(name), self._curvature_steps(name), rho)

    def _curvature_steps(self, name: str) -> float:
        """t of a layer's ef-batch moving average (see curvature_estimate): the hooks' count, or
        MacKayAdam's step count, which its kernel advances exactly when it feeds h; after
        load_state_dict the saved t plus the steps since, as long as the optimizer's state is
        the one the saved h was written into (a fresh optimizer restarts its count at 0; one
        loaded afterwards brings its own h and step)."""
        if not self.fused:
            return float(self._own[name]["curvature_steps"])
        state = self.optimizer.ard_state(self.targets[name].param)
        step = float(state["step"])
        origin = self._loaded_steps.get(name)
        if origin is None or origin[0] is not state:
            return step
        return origin[2] + (step - origin[1])

    def _set_alpha(self, name: str, alpha: torch.Tensor) -> None:
        if self.fused:
            self.optimizer.ard_state(self.targets[name].param)["alpha"] = alpha
        else:
            self._own[name]["alpha"] = alpha

    @torch.no_grad()
    def prune_unused_units(self) -> int:
        """Prune the weights feeding units whose every outgoing weight is pruned (in an
        nn.Sequential chain, see mackay_ext.dead_units): they cannot change the output. A layer
        that loses part of an alpha group gets one alpha per weight from then on (the group's
        value repeated, +inf on the removed weights). Returns the number of weights removed.
        With granularity="channel" it removes nothing: a channel's group already holds its readers."""
        if self.channel is not None:
            return 0
        chainable = {n: t for n, t in self.targets.items()
                     if t.attr == "weight" and len(t.owners) == 1 and isinstance(t.module, (nn.Linear, nn.Conv2d))}
        kept = {n: (self.alpha(n) != math.inf).expand_as(t.param) for n, t in chainable.items()}
        still_kept = prune_unused_units(self.model, kept)
        return sum(self._drop(name, kept[name] & ~still_kept[name]) for name in chainable)

    @torch.no_grad()
    def prune_entries(self, param: torch.Tensor, drop: torch.Tensor) -> int:
        """Prune the entries of `param` where `drop` (a bool tensor of its shape) is True, as an
        update would: alpha +inf and the weight 0, so the counts and masks know them (e.g. the
        readers' slices of a channel mackay_ext.dead_channels cut). Returns the number of kept
        weights pruned; 0 for a tensor without a prior of this pruner (or with granularity
        "channel", whose groups already hold every slice of a channel). `param` may also be a
        layer's name, as in alpha() (a new user's name was a tensor without a prior: 0, silently)."""
        if isinstance(param, str):
            param = self.weight(param)
        if not isinstance(param, torch.Tensor):
            raise TypeError(f"MacKayPruner.prune_entries: param must be a weight (tensor) or a layer's name, got "
                            f"{type(param).__name__}")
        name = next((n for n, t in self.targets.items() if t.param is param), None)
        if self.channel is not None or name is None:
            return 0
        if not isinstance(drop, torch.Tensor) or drop.dtype != torch.bool or drop.shape != param.shape:
            raise ValueError(f"MacKayPruner.prune_entries: drop must be a bool tensor of {name}'s shape "
                             f"{tuple(param.shape)}, got {getattr(drop, 'dtype', type(drop).__name__)} "
                             f"{tuple(getattr(drop, 'shape', ()))}")
        return self._drop(name, drop.to(param.device) & (self.alpha(name) != math.inf).expand_as(param))

    def _drop(self, name: str, drop: torch.Tensor) -> int:
        """alpha +inf and weight 0 where `drop` (kept entries only); a layer that loses part of
        an alpha group gets one alpha per weight from then on (the group's value repeated)."""
        count = int(drop.sum())
        if count:
            target = self.targets[name]
            alpha = self.alpha(name).expand_as(target.param).clone().masked_fill_(drop, math.inf)
            self._set_alpha(name, alpha)
            if self.granularity[name] != "weight":
                self.split_from.setdefault(name, self.granularity[name])
            self.granularity[name] = "weight"
            target.param.masked_fill_(drop, 0)
            if not self.allow_empty_layers and bool((alpha == math.inf).all()):
                # each update kept a group of every layer, but those groups need not connect
                warnings.warn(f"MacKayPruner: every kept weight of {target.description} fed units nobody "
                              "reads any more, so the layer is now empty and the network's output no longer "
                              "depends on its input: the groups kept in neighbouring layers do not connect. "
                              "Prune less (a smaller threshold, max_prune_fraction, more data) or pass "
                              "allow_empty_layers=True to accept it.", RuntimeWarning, stacklevel=user_stacklevel())
        return count

    @torch.no_grad()
    def apply_masks(self, model: nn.Module | None = None) -> None:
        """Hold pruned weights at exactly 0 (after a step of a non-fused optimizer).

        model: another model of the same structure to zero at the pruned weights instead, such
            as an EMA or SWA average of this one (torch.optim.swa_utils.AveragedModel or its
            .module): an average is never exactly 0 where the model was pruned, so sparsify,
            save_compressed and shrink found nothing to remove in it (a fine-tuned MLP's EMA:
            3,576 pruned weights nonzero, up to 0.037). Works on a detached pruner too."""
        if model is not None:
            zero_pruned_weights_of(self, model)
            return
        self._check_attached("apply_masks")
        self._zero_pruned()

    @torch.no_grad()
    def _zero_pruned(self, done: set[str] = frozenset()) -> None:
        """apply_masks on this pruner's model, but for the layers in `done` (zeroed already)."""
        for name, target in self.targets.items():
            view = self._alpha_view(name)
            if view.any_pruned and name not in done:   # (after every foreign step: see AlphaView.keep)
                target.param.mul_(view.keep)
        if self.channel is not None:
            self.channel.apply_masks()

    @torch.no_grad()
    def _hold_pruned_state_at_zero(self, name: str, view) -> None:
        """The curvature and a foreign optimizer's per-weight state (Adam's moments, SGD's velocity)
        at newly pruned weights set to 0, where their zero gradients keep them. Left alone they
        decay geometrically (h by rho = 0.99 a step) into denormal floats, which the CPU handles
        ~100x slower: 234,874 of LeNet-300-100's first-layer Adam moments were denormal some 700
        steps after a prune under torch Adam, and its step went from 2.6 to 5-17 ms. (MacKayAdam
        holds its own moments at 0 there.)"""
        if not view.any_pruned:
            return
        param = self.targets[name].param
        held = [self.curvature(name)]
        if not self.fused and self.optimizer is not None:
            held += [value for value in self.optimizer.state.get(param, {}).values()
                     if isinstance(value, torch.Tensor) and value.shape == param.shape]
        for value in held:
            value.masked_fill_(view.pruned.expand_as(value), 0)

    def _alpha_view(self, name: str):
        """alpha of a layer as every step reads it (mackay_ext.alpha_views), kept until it changes."""
        return self._alpha_views(name, self.alpha(name), self.targets[name].param)

    # ------------------------------------------------------------------ update
    def _check_attached(self, where: str) -> None:
        if self.copied:
            raise RuntimeError(f"MacKayPruner.{where}: this pruner is a copy (copy.deepcopy or pickle), and its "
                               "hooks stayed with the original's model and optimizer; build a new MacKayPruner "
                               "on the copied model and optimizer, and load this one's state_dict() into it")
        if self.detached:
            raise RuntimeError(f"MacKayPruner.{where}: this pruner was detached (its hooks are gone, and its "
                               "weights may be another pruner's now); build a new MacKayPruner, and load "
                               "this one's state_dict() into it to carry on")

    def nonfinite(self) -> list[str]:
        """Names of the weights, curvatures or alphas holding NaN (or inf, alpha excepted)."""
        bad = []
        for name, target in self.targets.items():
            if not all_finite(target.param):
                bad.append(f"{name} (weight)")
            if not all_finite(self.curvature(name)):
                bad.append(f"{name} (curvature)")
            if any_nan(self.alpha(name)):
                bad.append(f"{name} (alpha)")
        if self.channel is not None:
            bad += self.channel.nonfinite()
        return bad

    @torch.no_grad()
    def switch_off_prior(self) -> None:
        """alpha = 0 on every kept weight (no prior), +inf stays: the kept weights can then be
        fine-tuned on the data alone while the pruned ones are held at 0. The alphas it switched
        off stay readable as `alpha_before_switch_off` (per layer, on the CPU), for reports."""
        current = {name: self.alpha(name).detach().cpu().clone() for name in self.targets}
        if self.alpha_before_switch_off is None or any(   # a second call in a row: only zeros
                bool((a[torch.isfinite(a)] > 0).any()) for a in current.values()):
            self.alpha_before_switch_off = current
        for name in self.targets:
            alpha = self.alpha(name)
            alpha.masked_fill_(torch.isfinite(alpha), 0.0)
        if self.channel is not None:
            self.channel.switch_off_prior()

    @torch.no_grad()
    def update(self, prune: bool = True) -> dict[str, Any]:
        """One MacKay re-estimation of every ARD weight's alpha, then pruning (prune=False:
        alpha only, e.g. while it settles in the first updates). Returns a report:
        per layer the total and kept weights, total and kept groups, sum of gamma, alpha
        quantiles (mackay_ext.alpha_stats: min and max exact, p5/p50/p95 from a sample of a very
        large layer) and what happened ("warmup", "kept_strongest"); overall totals, the sparsity,
        "excluded" (parameters without a prior, and why) and "notes"."""
        if not isinstance(prune, bool):
            raise TypeError(f"MacKayPruner.update: prune must be True or False, got {prune!r}")
        self._check_attached("update")
        if self.optimizer is not None:   # every DDP rank at the same step (ddp_lockstep)
            self._lockstep.check(self._steps_total, before_collective=self.accumulator is not None)
        if self._step_batch is not None and self._step_batch.check(self._step_batch_size()):
            self._step_batch.remove()   # (its verdict is in)
            self._step_batch = None
        self._check_targets_in_model("update")
        problem = self._num_data_disagreement() if self.fused else None
        if problem:
            raise ValueError(f"MacKayPruner.update: {problem}")
        self._warn_unimported_masks()
        self._warn_uncovered_weights()
        resumed = self._resumable()
        if not resumed:   # (a stopped update moved the estimate in already, and reset the accumulator)
            self._refresh_curvature()
        bad = self.nonfinite()
        if bad:
            message = (f"MacKayPruner.update: non-finite values in {', '.join(bad)}: training has "
                       "diverged (lower the learning rate, or check the loss); alpha is unchanged")
            if self.on_nonfinite == "raise":
                raise NonFiniteError(message)
            warnings.warn(message, RuntimeWarning, stacklevel=user_stacklevel())
            # the keys of every report: notes say why, gamma_sum was not computed
            report = dict(self.report(), skipped=True, nonfinite=bad, notes=[message], gamma_sum=math.nan)
            self.history.append(report)
            return report
        if not self.history and self._no_curvature_yet():
            self._warn_no_curvature()
        untrained = not self._trained_since_update() and bool(self.history)
        hold = untrained or not prune   # alpha re-estimated, nothing pruned
        price = self.current_mac_price()
        notes = []
        if untrained:
            notes.append(f"no {'optimizer step' if self.optimizer is not None else 'backward'} since the "
                         "previous update: alpha re-estimated, "
                         "nothing pruned (the weights have not answered the new prior yet)" + self._foreign_note())
            warnings.warn("MacKayPruner.update: " + notes[-1], RuntimeWarning, stacklevel=user_stacklevel())
        live_before = self.kept_weights()
        if self.channel is not None:
            layers, channel = self.channel.update(hold=hold)
        else:
            layers, finished, still = self._update_layers(hold, resumed)
            notes += [f"{name}: {why}" for name, why in sorted(still.items())] + finished
        report = self._summarise(layers)
        self._warn_collapse(live_before, report, layers, channel if self.channel is not None else None)
        notes += [f"{layer['name']}: {WITHOUT_DATA}" for layer in layers if layer.get("without_data")]
        report["notes"] = notes + [f"{n}: {note}" for n, note in self.notes.items()]
        if self.channel is not None:
            report["channel"] = channel
            report["notes"] += channel["notes"]
        if self.mac_price:
            report["mac_price"] = price
            could_prune = (not (channel["warmup"] or hold) if self.channel is not None
                           else any("priced_out" in layer for layer in layers))
            self._priced_updates += bool(could_prune)
        self.history.append(report)
        self._unfinished = None
        if self._steps_since_update is not None:
            self._steps_since_update = 0
        self._gradient_since_update = False
        self._fed_since_update.clear()
        self.foreign_steps = {}
        self._mc_calls_since_update = 0
        self._sample_next_batch()
        for name in self.targets:   # the newly pruned weights' state to 0 (_hold_pruned_state_at_zero)
            self._alpha_view(name)
        return report

    def _warn_unimported_masks(self) -> None:
        """Said once: a torch.nn.utils.prune mask whose zeros this pruner has not made pruned (a
        new user's masked layer: its 512 masked weights took alphas of their own and counted as
        kept, with no word; from_torch_prune imports them)."""
        if self._masks_warned:
            return
        unimported = {}
        for name, target in self.targets.items():
            mask = getattr(target.module, target.attr[:-5] + "_mask", None) if target.attr.endswith("_orig") else None
            if not isinstance(mask, torch.Tensor) or mask.shape != target.param.shape:
                continue
            alpha = self.alpha(name)
            masked_live = (mask == 0) & torch.isfinite(alpha).expand_as(mask)
            if bool(masked_live.any()):
                unimported[name] = int(masked_live.sum())
        if unimported:
            self._masks_warned = True
            shown = ", ".join(f"{name} ({count:,})" for name, count in unimported.items())
            warnings.warn(f"MacKayPruner.update: torch.nn.utils.prune masks zero weights this pruner counts as "
                          f"kept, each with an alpha of its own: {shown}. Import them as pruned with "
                          "mackay_ext.integrations.torch_prune.from_torch_prune(model, pruner), once, after "
                          "building the pruner", RuntimeWarning, stacklevel=user_stacklevel())

    def _untrained_by_optimizer(self) -> dict[str, nn.Parameter]:
        """The weights (2-D and more) that require a gradient but are not in the optimizer."""
        found = {}
        for entry in self.excluded:
            if entry["reason"] != "not trained by the optimizer":
                continue
            try:
                param = self.model.get_parameter(entry["name"])
            except AttributeError:   # gone from the model since (said by _check_targets_in_model)
                continue
            if param.requires_grad and param.dim() >= 2:
                found[entry["name"]] = param
        return found

    def _watch_uncovered_weights(self) -> None:
        """A gradient hook on each weight the optimizer does not hold, noting the ones a backward
        reaches: requires_grad alone also holds for a teacher run under no_grad and for an EMA copy
        (torch's AveragedModel), which no backward reaches and nobody means to train."""
        if self.optimizer is None:
            return
        for name, param in self._untrained_by_optimizer().items():
            self._hooks.append(param.register_hook(CopyInert(functools.partial(_note_gradient, self._trained_elsewhere,
                                                                               name))))

    def _warn_uncovered_weights(self) -> None:
        """Said once: weights that took gradients but are in neither this pruner's optimizer nor
        another pruner's (a new user's SparseAdam embedding beside Adam for the rest: listed in
        report()["excluded"] only, never pruned, with no word). Said at the first update, not when
        built: a second pruner for the second optimizer may be built after this one."""
        if self._uncovered_warned or self.optimizer is None:
            return
        self._uncovered_warned = True
        uncovered = [name for name, param in self._untrained_by_optimizer().items()
                     if name in self._trained_elsewhere and holder_of(param) is None]
        if uncovered:
            sparse = [name for name in uncovered
                      if getattr(self.model.get_submodule(name.rpartition(".")[0]), "sparse", False) is True]
            why = (f" ({', '.join(sparse)}: sparse gradients, e.g. under SparseAdam, which no pruner "
                   "reads; nn.Embedding(sparse=False) with the rest's optimizer would be)") if sparse else ""
            one = len(uncovered) == 1
            warnings.warn(f"MacKayPruner.update: {', '.join(uncovered)} {'takes' if one else 'take'} gradients "
                          f"but {'is' if one else 'are'} in neither the optimizer this pruner was given nor "
                          f"another pruner: no prior, never "
                          f"pruned{why}. A pruner covers one optimizer's weights: "
                          + ("" if len(sparse) == len(uncovered) else "build one for each other optimizer; ")
                          + "for weights trained on purpose without a prior, build the pruner on "
                          "the submodule its optimizer trains, or pass layers= naming the layers it covers",
                          RuntimeWarning, stacklevel=user_stacklevel())

    def _no_curvature_yet(self) -> bool:
        """Every curvature the update would read is 0: no training step has reached the pruner."""
        if self.channel is not None:
            return not any(bool(self.channel.curvature(name).any()) for name in self.channel.members)
        return not any(bool(self.curvature(name).any()) for name in self.targets)

    def _warn_no_curvature(self) -> None:
        """The first update with no training step behind it sets alpha from the weights alone
        (gamma = 1 everywhere: alpha = 1/w^2), as the paper's schedule does from a pretrained
        network. From untrained weights that is a prior from no data, and the next update prunes
        against it: a new user's loop, update() at the top of every second epoch, kept 424 of
        4,224 weights where 1,682 with the updates after training."""
        warnings.warn("MacKayPruner.update: no curvature yet (no training step since the pruner was built"
                      f"{self._foreign_note()}): alpha is set from the weights alone (alpha = 1/w^2), which is "
                      "right for a trained network; if it is not trained yet, call update() after training "
                      "steps", RuntimeWarning, stacklevel=user_stacklevel())

    def _foreign_note(self) -> str:
        if not self.foreign_steps:
            return ""
        steps = ", ".join(f"{name} {count} step(s)" for name, count in self.foreign_steps.items())
        return (f"; another optimizer stepped its weights ({steps}), but the pruner reads the curvature and "
                f"applies its prior through the optimizer it was built with ({type(self.optimizer).__name__}): "
                "to train with another one, detach() this pruner and build a new one on it, loading this one's "
                "state_dict()")

    def _warn_collapse(self, before: int, report: dict[str, Any], layers: list[dict[str, Any]],
                       channel: dict[str, Any] | None) -> None:
        """One warning, with what to do, when this update pruned nearly every weight still live
        (`before` of them) or would have emptied a layer: the per-layer "strongest group is kept"
        reads like a safety net, while the network has lost most of what it had learned."""
        share = (before - report["kept"]) / before if before else 0.0
        emptied = [layer["name"] for layer in layers if layer.get("kept_strongest")]
        emptied += [entry.split(": kept")[0] for entry in (channel or {}).get("kept_strongest", [])]
        # a layer already down to its strongest group is found "emptied" at every later update:
        # said once, so that a later collapse is not buried under copies
        emptied = [name for name in emptied if name not in self._said_emptied]
        self._said_emptied.update(emptied)
        if share <= COLLAPSE_SHARE and not emptied:
            return
        where = (f" and would have emptied {len(emptied)} layer(s) ({', '.join(emptied[:4])}"
                 f"{', ...' if len(emptied) > 4 else ''}; the strongest group of each kept)" if emptied else "")
        from .channel_ard import SCALED_NORMS
        norms = self.channel is None and any(isinstance(m, SCALED_NORMS) and m.affine for m in self.model.modules())
        # per weight or per filter, a layer before a BatchNorm is scale-free: its prior costs the fit nothing
        scale_free = (" This network has normalisation layers (BatchNorm, InstanceNorm or GroupNorm): the "
                      "weights of a layer before one are scale-free (the norm divides their scale out), so "
                      "their prior shrinks them at no cost to the fit and can empty the layer; "
                      "granularity='channel' with channel_prior='norm-scale' puts the prior on the norm's "
                      "scale instead." if norms else "")
        priced = (channel or {}).get("priced_out", 0) + sum(layer.get("priced_out", 0) for layer in layers)
        # the cap does not hold back what the price removes (mac_price_ramp paces that): a new
        # user under max_prune_fraction=0.5 went from 64 units a layer to 1 by the price and was told to set it
        thin = ("max_prune_fraction=0.5 to thin each layer over several updates" if self.max_prune_fraction is None
                else f"a smaller max_prune_fraction (now {self.max_prune_fraction:g})")
        if priced:
            thin = (f"a lower mac_price, or a longer mac_price_ramp (now {self.mac_price_ramp}), which raises the "
                    f"price over more updates ({priced:,} groups went for their multiply-adds, which "
                    f"max_prune_fraction does not limit), or {thin}")
        warnings.warn(
            f"MacKayPruner.update: this update pruned {100 * share:.1f}% of the weights still live "
            f"({before:,} -> {report['kept']:,}){where}. The diagonal evidence finds groups prunable "
            "all at once when the network is not yet fit to its data or its groups stand in for each "
            "other; if accuracy falls, train to a fit before the first pruning update, pass "
            f"{thin}, or, for a BatchNorm "
            "network under granularity='channel', channel_prior='norm-scale' (README: 'When one "
            f"update prunes too much').{scale_free}{self._scale_hint()}", RuntimeWarning, stacklevel=user_stacklevel())

    def _step_batch_size(self) -> float | None:
        """B of the ef-batch curvature: the pruner's, or its MacKayAdam's."""
        if not self.fused:   # (1.0 where none was given, for the prior's step: not a count of the batch)
            return self.batch_size if self._batch_size_given else None
        return self.optimizer._group_of(next(iter(self.targets.values())).param).get("batch_size")

    def _scale_hint(self) -> str:
        """The evidence's scale is the user's to give: a batch_size below the step's batch (the
        micro-batch under accumulation) made h too small and pruned 95%, and a regression's MSE on
        targets in small units read as a very noisy likelihood (new-user passes)."""
        loss = (" Check also that the loss is the mean negative log-likelihood per example (a regression's "
                "MSE fixes the noise precision in the target's units: targets in small units read as very "
                "noisy, README 'Regression').")
        batch = self._step_batch_size()
        if self.curvature_kind != "ef-batch" or batch is None:
            return loss
        return loss + (f" And that batch_size ({batch:g}) is the batch of one optimizer step (micro-batch x "
                       "accumulation steps x processes) and num_data the training set's size: h scales with B, "
                       "so a smaller B reads less evidence than there is.")

    def _resumable(self) -> bool:
        """Whether an update stopped part-way and nothing changed the weights or alphas since
        (unfinished_update.py): this update goes on from where it stopped."""
        record = self._unfinished
        return record is not None and record.marks is not None and record.marks == self._marks()

    def _marks(self) -> dict[str, tuple[int, int, int]]:
        return marks({name: target.param for name, target in self.targets.items()},
                     {name: self.alpha(name) for name in self.targets})

    def _update_layers(self, hold: bool, resumed: bool) -> tuple[list[dict[str, Any]], list[str], dict[str, str]]:
        """Every layer's update (report entries), going on from an update that stopped part-way
        when `resumed` (unfinished_update.py); the note saying so, if it did; the layers held for
        an lr of 0 or a freeze."""
        record, notes = self._unfinished, []
        if resumed:
            notes.append("finished the update that stopped part-way before (nothing changed since); the layers "
                         f"it had done kept the result it gave them: {', '.join(record.done) or 'none'}")
            warnings.warn("MacKayPruner.update: " + notes[-1], RuntimeWarning, stacklevel=user_stacklevel())
        else:
            # alpha = 0 everywhere: the prior was off until now; and a layer whose warm-up ran in
            # an update that never finished is warming up still (no update has happened)
            stopped = record.warmup if record is not None else set()
            record = self._unfinished = UnfinishedUpdate(
                {name for name in self.targets if not bool(self.alpha(name).any())} | stopped)
        still, idle = self._layers_at_lr_zero(), self._idle_layers()
        try:
            for name, target in self.targets.items():
                if name in record.done:
                    continue
                if name in idle and name in still:
                    # a layer frozen at its calls gathers no exact curvature: held as it is (its alpha
                    # re-estimated from a curvature of 0 would turn its prior off), and said as frozen
                    record.done[name] = dict(self._layer_entry(name, target), gamma=0.0,
                                             warmup=name in record.warmup, held=True)
                else:
                    record.done[name] = (self._without_data(name, target) if name in idle else
                                         self._update_one(name, target, hold or name in still, name in record.warmup))
        except BaseException:
            record.marks = self._marks()
            raise
        return [record.done[name] for name in self.targets], notes, still

    def _update_one(self, name: str, target: ARDTarget, hold: bool, warmup: bool) -> dict[str, Any]:
        """One layer's update; stopped part-way (Ctrl-C, an error), it puts the layer's weight and
        alpha back as they were, so that the update can be run again from its start."""
        weight, alpha = target.param, self.alpha(name)
        saved = (weight.detach().clone(), alpha.clone())
        try:
            return self._update_layer(name, target, hold, warmup, saved)
        except BaseException:
            with torch.no_grad():
                weight.copy_(saved[0])
                alpha.copy_(saved[1])
            raise

    def _update_layer(self, name: str, target: ARDTarget, hold: bool, warmup: bool,
                      saved: tuple[torch.Tensor, torch.Tensor]) -> dict[str, Any]:
        weight, alpha = target.param, self.alpha(name)
        can_prune = not (warmup or hold)
        limit = can_prune and self.max_prune_fraction is not None
        before = saved if not self.allow_empty_layers or limit else None
        price = self.current_mac_price()
        priced = price > 0 and can_prune
        old_alpha = alpha.clone() if priced else None
        curvature = self.curvature_estimate(name)
        unpruned_alpha = self._unpruned_alpha(weight, curvature, alpha) if limit else None
        stats = _mackay_update(
            weight, curvature, alpha, num_data=self.num_data, rule=update_rule(self.rule, warmup),
            # snr < 0 never holds: the same alpha estimate, nothing pruned
            prune=self.prune if can_prune else "snr", threshold=self.threshold if can_prune else 0.0,
            eps=self.eps, alpha_max=self.alpha_max, backend=self.backend)
        gamma = float(stats.gamma_sum)
        limited = 0
        if limit:
            limited, restored_gamma = self._limit_pruning(target, alpha, curvature, *before, unpruned_alpha)
            gamma += restored_gamma
        priced_out = 0
        if priced:
            macs = self._freed.group_macs(weight, alpha)
            moment = self._covariance.second_moment.get(name) if self._covariance is not None else None
            refitted = None
            if moment is not None:
                try:
                    refitted = compensated_price_out(target.module, curvature, alpha, old_alpha, moment,
                                                     num_data=self.num_data, macs=macs, price=price, rule=self.rule)
                except torch.linalg.LinAlgError:   # A singular even with damping: the diagonal rule
                    refitted = None
            if refitted is not None:
                priced_out, priced_gamma = refitted
            else:
                priced_out, priced_gamma = price_out(weight, curvature, alpha, old_alpha, num_data=self.num_data,
                                                     macs=macs, price=price, rule=self.rule)
            gamma -= priced_gamma
        extra = {"priced_out": priced_out} if priced else {}
        if limit:
            extra["limited"] = limited
        entry = dict(self._layer_entry(name, target), gamma=gamma, warmup=warmup, **extra)
        if (not self.allow_empty_layers and entry["groups_kept"] == 0
                and bool((before[1] != math.inf).any())):
            self._keep_strongest(name, target, *before)
            entry = dict(self._layer_entry(name, target), gamma=gamma, warmup=warmup,
                         kept_strongest=True, **extra)
            # a layer's weight carries its input on; a bare parameter (a positional table) does not
            layer = isinstance(target.module, (nn.Linear, nn.modules.conv._ConvNd)) and target.attr == "weight"
            loss = ("the network would no longer depend on its input there" if layer
                    else "none of it would be left")
            if name not in self._said_emptied:   # else _warn_collapse said it at an earlier update
                warnings.warn(f"MacKayPruner.update: every group of {target.description} would be "
                              f"pruned ({loss}); the strongest group is kept. Pass allow_empty_layers=True "
                              "to allow it.", RuntimeWarning, stacklevel=user_stacklevel())
        return entry

    def _idle_layers(self) -> set[str]:
        """The layers whose curvature is 0 everywhere while another layer's is not: no data has
        reached them (no forward used them, or their gradient was always 0). The rule would read
        that as "the data need none of it" and prune them whole (the strongest group kept, with
        a warning about the network's input): an idle head, or a branch used later, is left as
        it is instead. (Before any training step every curvature is 0: the usual warm-up.) A layer
        pruned whole (prune_entries, or allow_empty_layers) reads 0 because its gradients are held
        at 0: it is no idle layer. Under ef-batch, whose h is a moving average that a step without
        the layer's gradient leaves as it was, a layer no step since the last update had a gradient
        for is idle too (a continual learner's first task's head, untouched in the second, was
        pruned further from its stale h)."""
        # (the stored curvature, not its estimate: ef-batch's h / (1 - rho^t) is 0 where h is, and
        # forming it for every layer twice an update cost a full-size division each time)
        reached = {name: bool(self.curvature(name).any()) for name in self.targets}
        idle = {name for name, yes in reached.items() if not yes} if any(reached.values()) else set()
        if self.curvature_kind == "ef-batch" and self._steps_since_update and self._fed_since_update:
            idle |= {name for name in self.targets if name not in self._fed_since_update}
        return {name for name in idle if not bool((self.alpha(name) == math.inf).all())}

    def _layers_at_lr_zero(self) -> dict[str, str]:
        """The layers the optimizer does not move now, with why (see _not_moving)."""
        return self._not_moving({name: (target.param, target.description) for name, target in self.targets.items()})

    def _not_moving(self, params: dict[str, tuple[torch.Tensor, str]]) -> dict[str, str]:
        """Of `params` ({name: (parameter, description)}), those whose param group has lr 0 now
        while another group's is not, or frozen (requires_grad False) since the pruner was built,
        with why (AT_LR_ZERO, FROZEN_NOW): the optimizer does not move them, so their weights are
        not where the prior and the data balance, and pruning them on that (90% of such a layer)
        would be pruning on their initial weights. (Every group at 0 is a schedule's end or start:
        the weights were trained up to it.) Warned about once per name."""
        if self.optimizer is None:
            return {}
        rates = {id(p): float(group.get("lr", 0.0)) for group in self.optimizer.param_groups for p in group["params"]}
        some_move = any(rate > 0.0 for rate in rates.values())
        why = {name: FROZEN_NOW for name, (param, _) in params.items() if not param.requires_grad}
        why.update({name: AT_LR_ZERO for name, (param, _) in params.items()
                    if name not in why and some_move and rates.get(id(param)) == 0.0})
        for name in sorted(set(why) - self._said_lr_zero):
            self._said_lr_zero.add(name)
            warnings.warn(f"MacKayPruner.update: {params[name][1]}: {why[name]}", RuntimeWarning,
                          stacklevel=user_stacklevel())
        return why

    def _without_data(self, name: str, target: ARDTarget) -> dict[str, Any]:
        """An idle layer's report entry (alpha and weights unchanged); said once per layer."""
        if name not in self._said_without_data:
            self._said_without_data.add(name)
            hooks = ("; under exact curvature a layer that ran where the hooks cannot capture (e.g. under "
                     "torch.func) looks the same" if self.accumulator is not None else "")
            warnings.warn(f"MacKayPruner.update: {target.description}: {WITHOUT_DATA}{hooks}", RuntimeWarning,
                          stacklevel=user_stacklevel())
        return dict(self._layer_entry(name, target), gamma=0.0, warmup=not bool(self.alpha(name).any()),
                    without_data=True)

    def _unpruned_alpha(self, weight, curvature, alpha) -> torch.Tensor:
        """The alpha this update estimates for every group, pruned or not (on copies: snr < 0
        never holds)."""
        unpruned = alpha.clone()
        _mackay_update(weight.detach().clone(), curvature, unpruned, num_data=self.num_data, rule=self.rule,
                           prune="snr", threshold=0.0, eps=self.eps, alpha_max=self.alpha_max,
                           backend=self.backend)
        return unpruned

    def _limit_pruning(self, target: ARDTarget, alpha, curvature, old_weight, old_alpha,
                       unpruned_alpha) -> tuple[int, float]:
        """max_prune_fraction: restore, with their weights and unpruned new alpha, the groups this
        update pruned beyond the share it may prune (the highest scores, mackay_ext.prune_cap).
        Returns (groups restored, their gamma)."""
        live = old_alpha != math.inf
        newly = (alpha == math.inf) & live
        restorable = newly & (unpruned_alpha != math.inf)   # alpha itself ran to inf: gone anyway
        allowed = max(0, allowed_prunes(int(live.sum()), self.max_prune_fraction)
                      - int((newly & ~restorable).sum()))
        if int(restorable.sum()) <= allowed:
            return 0, 0.0
        score, gamma = target_scores(old_weight, curvature, old_alpha, unpruned_alpha,
                                     num_data=self.num_data, rule=self.rule, prune=self.prune)
        restore = groups_to_restore(restorable, score, allowed)
        alpha.copy_(torch.where(restore, unpruned_alpha, alpha))
        _, padded = group_dims(old_weight, old_alpha)
        keep = restore.reshape(padded).expand_as(target.param)
        target.param.copy_(torch.where(keep, old_weight, target.param))
        return int(restore.sum()), float(gamma[restore].sum())

    def _keep_strongest(self, name: str, target: ARDTarget, old_weight, old_alpha) -> None:
        """Restore the group of largest sum w^2 (with its weights and its alpha before the update)."""
        alpha = self.alpha(name)
        dims, _ = group_dims(old_weight, old_alpha)
        norms = old_weight.double().square()
        norms = norms.sum(dim=dims, keepdim=True) if dims else norms
        norms = norms.reshape(old_alpha.shape).masked_fill(old_alpha == math.inf, -1.0)
        best = int(norms.flatten().argmax())
        alpha.view(-1)[best] = old_alpha.reshape(-1)[best]
        restore = torch.zeros(alpha.numel(), dtype=torch.bool, device=alpha.device)
        restore[best] = True
        restore = restore.reshape(alpha.shape).expand_as(target.param)
        target.param.copy_(torch.where(restore, old_weight, target.param))

    def _kept(self, name: str, target: ARDTarget) -> tuple[int, int]:
        """(weights kept, groups kept) of one target."""
        alpha = self.alpha(name)
        groups = int(torch.count_nonzero(alpha != math.inf))
        # (every entry of alpha spans the same number of weights: it broadcasts to the weight)
        return groups * (target.param.numel() // max(alpha.numel(), 1)), groups

    def _layer_entry(self, name: str, target: ARDTarget) -> dict[str, Any]:
        alpha = self.alpha(name)
        kept, groups_kept = self._kept(name, target)
        entry = {"name": name, "total": target.param.numel(), "kept": kept, "groups": alpha.numel(),
                 "groups_kept": groups_kept, "granularity": self.granularity[name],
                 "alpha": quantiles(alpha)}
        before = (self.alpha_before_switch_off or {}).get(name)
        if before is not None and not bool((alpha[torch.isfinite(alpha)] != 0).any()):   # prior off
            entry["alpha_before_switch_off"] = quantiles(before)
        if len(target.owners) > 1:
            entry["tied"] = list(target.owners)
        if self.channel is not None:   # channel groups slicing this parameter, not its entries
            entry.update(self.channel.layer_groups(target.param))
        return entry

    def _num_data_disagreement(self) -> str | None:
        """Where MacKayAdam's groups changed N after the pruner was built: optimizer.load_state_dict
        takes the saved groups' settings (a new user's checkpoint from a run on 5,000 examples,
        loaded after the pruner: the prior applied with N = 5,000, alpha re-estimated with 100)."""
        held = {id(target.param) for target in self.targets.values()}
        for index, group in enumerate(self.optimizer.param_groups):
            if group["num_data"] != self.num_data and any(id(p) in held for p in group["params"]):
                return (f"num_data={self.num_data:g}, but MacKayAdam's param group {index} now applies the prior "
                        f"with num_data={group['num_data']:g} (optimizer.load_state_dict takes the saved param "
                        "groups' settings). Give both the same number of training examples: "
                        f"optimizer.param_groups[{index}]['num_data'] = {self.num_data:g} after loading, or a "
                        f"pruner built with num_data={group['num_data']:g}")
        return None

    def _after_optimizer_load(self, optimizer) -> None:
        problem = self._num_data_disagreement()
        if problem:   # loaded already (torch's hook runs after): said now, refused at the next update
            warnings.warn(f"MacKayPruner: {problem}", RuntimeWarning, stacklevel=user_stacklevel())

    def _check_targets_in_model(self, where: str, model: bool = True) -> None:
        """Refuse to go on when a layer's weight is no longer the model's (sparsify, densify or
        shrink swapped the module, or the user reassigned the weight): alpha would be estimated
        for a tensor the network no longer computes with. model=False: only where MacKayAdam,
        which holds the alphas, no longer has the weight (sparsify(model, optimizer) moved them)."""
        modules = dict(self.model.named_modules()) if model else {}
        in_optimizer = ({id(p) for group in self.optimizer.param_groups for p in group["params"]}
                        if self.fused else None)
        gone = [name for name, target in self.targets.items()
                if (model and (modules.get(target.module_name) is not target.module
                               or not any(target.param is held for held in (
                                   getattr(target.module, target.attr, None),   # torch prune:
                                   getattr(target.module, target.attr + "_orig", None)))
                               # spectral_norm's hook form keeps the Parameter, as weight_orig
                               or is_parametrization_input(target.module, target.attr)))
                or (in_optimizer is not None and id(target.param) not in in_optimizer)]
        if gone and all(is_parametrization_input(self.targets[name].module, self.targets[name].attr)
                        for name in gone):
            raise RuntimeError(f"MacKayPruner.{where}: a parametrization was put on the weight of {', '.join(gone)} "
                               "after the pruner was built: the layer's weight is computed in its forward now, and the "
                               "prior is on a tensor it is computed from or no longer reads; register "
                               "it before building the pruner (that weight then has no prior), or remove it "
                               "(torch.nn.utils.parametrize.remove_parametrizations; the hook forms: "
                               "torch.nn.utils.remove_weight_norm, remove_spectral_norm)")
        if gone:
            raise RuntimeError(f"MacKayPruner.{where}: the weights of {', '.join(gone)} are no longer the "
                               "model's (a module or weight was replaced after the pruner was built, e.g. by "
                               "sparsify, densify or shrink, or a new head); prune before converting, or build a "
                               "new MacKayPruner (and optimizer) for the changed model: detach() this one and "
                               "load its state_dict() into the new one with fresh=[the replaced layers] to carry "
                               "the others' alphas on")

    def report(self) -> dict[str, Any]:
        """The current per-layer counts, without updating (after sparsify or shrink: those of
        the weights the pruner held, as they were converted, unless MacKayAdam gave their
        alphas to the converted layers)."""
        self._check_targets_in_model("report", model=False)
        report = self._summarise([self._layer_entry(n, t) for n, t in self.targets.items()])
        if self.channel is not None:
            report["channel"] = self.channel.summary()
        return report

    def kept_weights(self) -> int:
        """Weights of the ARD layers not pruned (cheap: no alpha statistics)."""
        uncovered = self._without_prior()
        return sum(self._kept(n, t)[0] for n, t in self.targets.items() if n not in uncovered)

    def _without_prior(self) -> dict[str, str]:
        """Layers the pruner holds that get no prior, and why: with granularity='channel', those
        in no channel group. They are reported as excluded and left out of the totals."""
        return self.channel.without_group if self.channel is not None else {}

    def _summarise(self, layers) -> dict[str, Any]:
        uncovered = self._without_prior()
        layers = [layer for layer in layers if layer["name"] not in uncovered]
        total = sum(layer["total"] for layer in layers)
        kept = sum(layer["kept"] for layer in layers)
        excluded = self._excluded_now() + [{"name": name, "reason": why} for name, why in uncovered.items()]
        report = {"layers": layers, "total": total, "kept": kept, "sparsity": 1 - kept / max(total, 1),
                  "excluded": excluded}
        if all("gamma" in layer for layer in layers):
            report["gamma_sum"] = sum(layer["gamma"] for layer in layers)
        return report

    def _excluded_now(self) -> list[dict[str, str]]:
        """self.excluded, with a weight frozen when the pruner was built and trainable now named
        as such (once, in a warning too): it trains without a prior; and the weights the optimizer
        was given after the pruner was built (add_param_group), which no list held (once, too)."""
        entries = self._added_later()
        for entry in self.excluded:
            unfrozen = entry["reason"] == FROZEN and self._requires_grad_now(entry["name"])
            if unfrozen and self._claimed_elsewhere(entry["name"]):
                entry = dict(entry, reason=UNFROZEN_COVERED)
            elif unfrozen:
                entry = dict(entry, reason=UNFROZEN)
                if entry["name"] not in self._unfrozen_warned:
                    self._unfrozen_warned.add(entry["name"])
                    warnings.warn(f"MacKayPruner: {entry['name']} is {UNFROZEN}", UserWarning, stacklevel=user_stacklevel())
            entries.append(entry)
        return entries

    def _added_later(self) -> list[dict[str, str]]:
        if self.optimizer is None:
            return []
        known = getattr(self, "_params_at_build", None)
        if known is None:   # (a copy of a pruner from before this record)
            return []
        names = {id(p): name for name, p in self.model.named_parameters()}
        listed = {entry["name"] for entry in self.excluded}   # (a weight frozen at build: said as unfrozen)
        added = [names[id(p)] for group in self.optimizer.param_groups for p in group["params"]
                 if id(p) in names and id(p) not in known and p.dim() >= 2 and names[id(p)] not in listed]
        for name in added:
            if name not in self._unfrozen_warned:
                self._unfrozen_warned.add(name)
                warnings.warn(f"MacKayPruner: {name} is {ADDED_LATER}", UserWarning, stacklevel=user_stacklevel())
        return [{"name": name, "reason": ADDED_LATER} for name in added]

    def _claimed_elsewhere(self, name: str) -> bool:
        holder = holder_of(self.model.get_parameter(name))
        return holder is not None and holder is not self and not holder.detached

    def _requires_grad_now(self, name: str) -> bool:
        try:
            return self.model.get_parameter(name).requires_grad
        except AttributeError:   # gone since (sparsify, shrink)
            return False

    def sparsity(self) -> float:
        """Fraction of the ARD layers' weights that are pruned."""
        uncovered = self._without_prior()
        total = sum(t.param.numel() for n, t in self.targets.items() if n not in uncovered)
        return 1 - self.kept_weights() / max(total, 1)

    def reset_curvature(self) -> None:
        """Start every layer's curvature estimate afresh, the alphas kept: at a change of data (a
        continual learner's next task). ef-batch's moving average h holds the old data's for
        about 1/(1 - rho) steps (60 steps into a second task at rho = 0.99, 55% of it: a new
        user's features of the second task read at 0.48x their curvature), and h.zero_() alone
        reads the new data at (1 - rho^t) of its size, t not restarted. ef-batch: h and its t;
        ef-exact and fisher-mc: the squares summed since the last update. Not under
        granularity="channel" (its members keep their own estimates)."""
        self._check_attached("reset_curvature")
        if self.channel is not None:
            raise ValueError("MacKayPruner.reset_curvature: not under granularity='channel', whose channel "
                             "groups' members keep estimates of their own; build a new pruner and "
                             "load_state_dict the alphas instead")
        for name, target in self.targets.items():
            self.curvature(name).zero_()
            if self.curvature_kind != "ef-batch":
                continue
            if self.fused:
                state = self.optimizer.ard_state(target.param)
                self._loaded_steps[name] = (state, float(state["step"]), 0.0)   # t counts from here
            else:
                self._own[name]["curvature_steps"].zero_()
        if self.accumulator is not None:
            self.accumulator.reset()
            self._micro_batches.reset()
            self._grad_not_captured.clear()
        self._fed_since_update.clear()

    # ------------------------------------------------------------- persistence
    def consolidate_curvature(self) -> None:
        """Under torch.distributed with curvature "ef-exact" or "fisher-mc": sum every rank's exact
        curvature since the last update into rank 0's state (a collective: call it on every rank,
        then save rank 0's state_dict()). Between two updates each rank holds its own examples'
        share, which the update sums; rank 0's state alone would resume without the others'
        (mackay_ext.curvature_shares). Nothing to do otherwise (ef-batch: every rank holds the
        same state)."""
        if self.accumulator is not None and self.accumulator.reduce_to_first_rank():
            # the next step's examples are counted from here (the counts just moved between ranks)
            self._micro_batches.seen = self.accumulator.num_examples

    def state_dict(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, "alpha": {n: self.alpha(n).detach().clone() for n in self.targets},
                "curvature": {n: self.curvature(n).detach().clone() for n in self.targets},
                # (t unknown, inf, is left out, as the states saved before t was kept left it)
                "curvature_steps": {n: t for n in self.targets if (t := self._curvature_steps(n)) != math.inf},
                "granularity": dict(self.granularity), "split_from": dict(self.split_from),
                "history": list(self.history),
                "steps_since_update": self._steps_since_update,
                "mc_calls_since_update": self._mc_calls_since_update,
                "steps_total": self._steps_total,
                "gradient_since_update": self._gradient_since_update,   # (without an optimizer)
                **({"exact_curvature": self.accumulator.state_dict(),
                    "exact_curvature_ranks": curvature_shares.source(self.accumulator)}
                   if self.accumulator is not None else {}),
                **({"micro_batches": self._micro_batches.state_dict()} if self.accumulator is not None else {}),
                **({"channel": self.channel.state_dict()} if self.channel is not None else {}),
                "settings": {"num_data": self.num_data, "rule": self.rule, "prune": self.prune,
                             "threshold": self.threshold, "curvature": self.curvature_kind,
                             "mac_price": self.mac_price, "mac_price_ramp": self.mac_price_ramp,
                             "curvature_every": self.curvature_every,
                             "max_prune_fraction": self.max_prune_fraction,
                             "channel_prior": self.channel_prior},
                "priced_updates": self._priced_updates,
                **({"alpha_before_switch_off": {n: a.clone() for n, a in self.alpha_before_switch_off.items()}}
                   if self.alpha_before_switch_off is not None else {}),
                **({"input_covariance": self._covariance.state_dict()} if self._covariance is not None else {})}

    def _check_loaded(self, state: Mapping[str, Any], where: str) -> None:
        """Refuse a state whose alphas or curvatures do not fit this pruner's layers, hold NaN
        or negative values, or were saved with other granularities (naming the layer); warn
        where its settings differ from this pruner's."""
        saved_granularity = state.get("granularity", {})
        for name, target in self.targets.items():
            saved_alpha = state["alpha"][name]
            # a group layer that lost part of a group (prune_unused_units, prune_entries) went on
            # with one alpha per weight; a new pruner built with the group granularity resumes it
            split = (saved_granularity.get(name) == "weight"
                     and state.get("split_from", {}).get(name) == self.granularity[name]
                     and isinstance(saved_alpha, torch.Tensor) and saved_alpha.shape == target.param.shape)
            if name in saved_granularity and saved_granularity[name] != self.granularity[name] and not split:
                raise ValueError(f"{where}: layer {name!r} was saved with granularity "
                                 f"{saved_granularity[name]!r}; this pruner has {self.granularity[name]!r}")
            if name not in state["curvature"]:
                raise KeyError(f"{where}: no curvature for layer {name!r}")
            for key, current in (("alpha", self.alpha(name)), ("curvature", self.curvature(name))):
                value = state[key][name]
                if not isinstance(value, torch.Tensor):
                    raise TypeError(f"{where}: {key} of layer {name!r} must be a tensor, got {type(value).__name__}")
                if key == "alpha" and split:
                    current = target.param
                if value.shape != current.shape:
                    raise ValueError(f"{where}: {key} of layer {name!r} has shape {tuple(value.shape)}; this "
                                     f"pruner's is {tuple(current.shape)} (a state from another model?)")
                if not value.is_floating_point() or bool(torch.isnan(value).any()) or bool((value < 0).any()):
                    raise ValueError(f"{where}: {key} of layer {name!r} must hold non-negative numbers "
                                     "(inf allowed for pruned alpha), got NaN, negative or non-float values")
                if key == "curvature" and bool(torch.isinf(value).any()):
                    raise ValueError(f"{where}: curvature of layer {name!r} holds inf, which no training step "
                                     "writes (a damaged or edited state)")
        _check_saved_fields(state, where, set(self.targets))
        settings = state.get("settings", {})
        differ = [f"{key} {settings[key]!r} (here {value!r})" for key, value in (
            ("num_data", self.num_data), ("rule", self.rule), ("prune", self.prune), ("threshold", self.threshold),
            ("curvature", self.curvature_kind)) if key in settings and settings[key] != value]
        if differ:
            warnings.warn(f"{where}: the state was saved with other settings: {', '.join(differ)}; this "
                          "pruner's own apply from now on", RuntimeWarning, stacklevel=user_stacklevel())

    def load_state_dict(self, state: dict[str, Any], fresh: Sequence[str] = ()) -> None:
        """Restore what state_dict() saved. Everything is checked before anything changes, and a
        load that fails part-way puts this pruner's own state back: a refused state never leaves
        half of it loaded. `fresh`: layers that keep this pruner's state (their prior, curvature and
        weights) rather than the saved one's, such as a head replaced since the state was saved."""
        where = "MacKayPruner.load_state_dict"
        if not isinstance(state, Mapping):
            raise TypeError(f"{where}: state must be a dict from MacKayPruner.state_dict(), got "
                            f"{type(state).__name__}")
        if not isinstance(fresh, (list, tuple, set, frozenset)) or not all(isinstance(name, str) for name in fresh):
            raise TypeError(f"{where}: fresh must be a list of layer names, got {fresh!r}")
        check_state_format(state, where)
        if fresh:
            state = self._with_own_layers(state, fresh, where)
        absent = [key for key in ("alpha", "curvature") if key not in state]
        if absent:
            raise KeyError(f"{where}: state has no {' or '.join(map(repr, absent))} entry; pass a dict "
                           "from MacKayPruner.state_dict()")
        missing = set(self.targets) - set(state["alpha"])
        if missing:
            hint = _wrapper_hint(set(self.targets), set(state["alpha"]))
            if not hint and not set(self.targets) & set(state["alpha"]):   # not one layer in common
                shown = ", ".join(sorted(map(str, state["alpha"]))[:4]) + (", ..." if len(state["alpha"]) > 4 else "")
                hint = f" (the state's layers are {shown or 'none'}: a state from another model?)"
            if not hint:   # some layers in common: this pruner was built over other layers
                hint = (" (this pruner covers layers the saved one did not, such as a layer frozen when the saved "
                        "pruner was built and trainable now: build this one as that one was, freezing them before "
                        "and unfreezing after as the run did, pass layers= without them, or load with "
                        f"fresh={sorted(missing)} to start them afresh)")
            raise KeyError(f"MacKayPruner.load_state_dict: no alpha for layers {sorted(missing)}" + hint)
        self._check_loaded(state, where)   # everything checked before anything changes
        not_as_saved = self._layers_not_as_saved(state) if self.channel is None else {}
        if self.channel is not None:
            if "channel" not in state:
                raise KeyError("MacKayPruner.load_state_dict: the state has no channel group alphas "
                               "(it was saved by a pruner without granularity='channel')")
            self.channel.check_state(state["channel"])
        own = self.state_dict()
        try:
            self._apply_state(state)
        except BaseException:
            self._apply_state(own)
            raise
        if not_as_saved:
            # said, not refused: an older model under a newer state loads as before (its later-pruned
            # weights zeroed), and the Lightning and Hugging Face callbacks load states themselves
            counts = ", ".join(f"{name} ({count:,})" for name, count in not_as_saved.items())
            warnings.warn(
                f"{where}: the state pruned weights of {counts} that were not 0 in the model (nearly all its "
                "pruned entries), while the other layers were 0 wherever the state prunes them: those weights "
                "look replaced or re-initialised since the state was saved (a new head of the old one's shape), "
                "and the load has zeroed them at the old mask, with the old alpha as their prior. If so, "
                "re-initialise them, build the pruner again and load with "
                f"load_state_dict(state, fresh={list(not_as_saved)}): they keep their weights and start "
                "their prior afresh", RuntimeWarning, stacklevel=user_stacklevel())

    def _with_own_layers(self, state: Mapping[str, Any], fresh: Sequence[str], where: str) -> dict[str, Any]:
        """`state` with this pruner's own entries for the `fresh` layers (load_state_dict)."""
        unknown = sorted(set(fresh) - set(self.targets))
        if unknown:
            raise ValueError(f"{where}: fresh names layers this pruner has not: {unknown} (its layers: "
                             f"{', '.join(list(self.targets)[:6])}{', ...' if len(self.targets) > 6 else ''})")
        if self.channel is not None:
            raise ValueError(f"{where}: fresh= is for per-layer granularities; under granularity='channel' a "
                             "layer's groups reach into its neighbours, so build the pruner afresh")
        own, state = self.state_dict(), dict(state)
        for key in ("alpha", "curvature", "curvature_steps", "granularity", "split_from"):
            if isinstance(state.get(key), Mapping):
                state[key] = {**{n: v for n, v in state[key].items() if n not in fresh},
                              **{n: own[key][n] for n in fresh if n in own[key]}}
        if isinstance(state.get("alpha_before_switch_off"), Mapping):
            state["alpha_before_switch_off"] = {n: a for n, a in state["alpha_before_switch_off"].items()
                                                if n not in fresh}
        if isinstance(state.get("exact_curvature"), Mapping):   # by parameter name
            # every parameter of the layer's module: the accumulator keeps its bias's sums beside its weight's
            names = {id(p): n for n, p in self.model.named_parameters()}
            weights = {names.get(id(self.targets[n].param)) for n in fresh}

            def of_fresh(param_name: str) -> bool:
                return param_name in weights or any(param_name.startswith(f"{n}.") for n in fresh)
            state["exact_curvature"] = {**{n: v for n, v in state["exact_curvature"].items() if not of_fresh(n)},
                                        **{n: v for n, v in own["exact_curvature"].items() if of_fresh(n)}}
        return state

    def _layers_not_as_saved(self, state: Mapping[str, Any]) -> dict[str, int]:
        """{layer: count} of the layers whose weight is not 0 at 90% or more of the entries the
        state prunes, when another layer, not 0 everywhere, is 0 wherever the state prunes it: a
        new head of the old one's shape took the old mask and alpha with no word. (A model loaded
        after the pruner's state is not 0 at any layer's pruned entries, a zero-initialised layer
        aside; an older model under a newer state is 0 at what the older one had pruned.)"""
        live, as_saved = {}, False
        for name, target in self.targets.items():
            alpha = state["alpha"].get(name)
            if not isinstance(alpha, torch.Tensor) or not bool(torch.isinf(alpha).any()):
                continue
            weight = target.param.detach()
            try:
                gone = torch.isinf(alpha).to(weight.device).expand_as(weight)
            except RuntimeError:   # (a split group layer's alpha: per weight, checked above)
                continue
            count, pruned = int((weight[gone] != 0).sum()), int(gone.sum())
            if count >= 0.9 * pruned:
                live[name] = count
            elif count == 0 and bool(weight.any()):
                as_saved = True
        return live if as_saved else {}

    def _apply_state(self, state: Mapping[str, Any]) -> None:
        """load_state_dict's writes; the pruned weights are zeroed last, so a failure before
        leaves the weights as they were."""
        self._priced_updates = int(state.get("priced_updates", 0))   # absent before mac_price_ramp
        if self.accumulator is not None:   # absent before it was saved: the estimate starts afresh
            shares = curvature_shares.check_source(state.get("exact_curvature_ranks"), "MacKayPruner.load_state_dict")
            self.accumulator.load_state_dict(state.get("exact_curvature", {}))
            curvature_shares.place_loaded(self.accumulator, shares)   # (under torch.distributed: on one rank)
            # (absent before it was saved: no accumulation seen)
            self._micro_batches.load_state_dict(state.get("micro_batches", {}), self.accumulator.num_examples)
        if self._covariance is not None:
            self._covariance.load_state_dict(state.get("input_covariance", {}))
        # t of each ef-batch moving average; absent from older checkpoints: read h as it is
        saved_steps = state.get("curvature_steps", {})
        self._loaded_steps = {}
        pruned = {}
        for name, target in self.targets.items():
            device = target.param.device
            alpha = state["alpha"][name].to(device=device, dtype=torch.float32)
            curvature = state["curvature"][name].to(device=device, dtype=state_dtype("curvature", target.param.dtype))
            steps = float(saved_steps.get(name, math.inf))
            if self.fused:
                ard = self.optimizer.ard_state(target.param)
                ard["alpha"] = alpha.clone()
                ard["curvature"].copy_(curvature)
                # (inf: h read as it is from here on, as on the hooks' path; t = the optimizer's
                # step count read a state saved 40 steps in at 3x the h its writer used)
                self._loaded_steps[name] = (ard, float(ard["step"]), steps)
            else:
                self._own[name]["alpha"] = alpha.clone()
                self._own[name]["curvature"] = curvature.clone()
                self._own[name]["curvature_steps"] = torch.tensor(steps, dtype=torch.float32, device=device)
            pruned[name] = alpha == math.inf
        self.granularity = dict(state.get("granularity", self.granularity))
        self.split_from = dict(state.get("split_from", {}))   # absent before it existed
        if self.channel is not None:
            self.channel.load_state_dict(state["channel"])
        self.history = list(state.get("history", []))
        switched_off = state.get("alpha_before_switch_off")   # absent before it existed
        self.alpha_before_switch_off = (None if switched_off is None else
                                        {n: a.detach().cpu().clone() for n, a in switched_off.items()
                                         if n in self.targets and isinstance(a, torch.Tensor)})
        if self._steps_since_update is not None:  # a resumed run prunes as the uninterrupted one
            saved = state.get("steps_since_update", 1)   # absent from older checkpoints
            self._steps_since_update = 1 if saved is None else int(saved)
        # (without an optimizer: a backward since the last update; absent before it was saved: as if one ran)
        self._gradient_since_update = bool(state.get("gradient_since_update", True))
        self._mc_calls_since_update = int(state.get("mc_calls_since_update", 0))
        self._steps_total = int(state.get("steps_total", self._steps_total))   # absent before it was saved
        self._sample_next_batch()
        with torch.no_grad():   # a pruned weight is exactly 0 from here, not from the next step
            for name, target in self.targets.items():
                target.param.masked_fill_(pruned[name].expand_as(target.param), 0)
                self._alpha_view(name)   # and its state (_hold_pruned_state_at_zero)


# The format of state_dict(): raised when a change makes an earlier version misread a state (a
# key it would ignore, or read otherwise); a version refuses a state of a later format. States
# written before it was kept hold none: format 0.
STATE_FORMAT = 1


def check_state_format(state: Mapping[str, Any], where: str) -> None:
    """Refuse a state written by a later mackay_ext than this one reads (it would be misread)."""
    written = state.get("format", 0)
    if not isinstance(written, int) or isinstance(written, bool) or written < 0:
        raise ValueError(f"{where}: the state's format must be a whole number >= 0, got {written!r} "
                         "(a damaged or edited state)")
    if written > STATE_FORMAT:
        raise ValueError(f"{where}: the state was written by a later mackay_ext (pruner state format "
                         f"{written}; this version reads up to {STATE_FORMAT}), which this one would misread: "
                         "load it with that version or a later one")


def _check_saved_fields(state: Mapping[str, Any], where: str, layers: set[str]) -> None:
    """The fields of a saved pruner state besides alpha and curvature are what state_dict()
    writes: its layers only, counts >= 0, lists and dicts (a damaged one was loaded as it was,
    or refused with a bare Python error naming no field)."""
    for key in ("alpha", "curvature"):
        unknown = sorted(set(state[key]) - layers) if isinstance(state[key], Mapping) else None
        if unknown is None:
            raise TypeError(f"{where}: state[{key!r}] must be a dict by layer name, got {type(state[key]).__name__}")
        if unknown:
            raise ValueError(f"{where}: state[{key!r}] holds layers this pruner has not: {unknown} (a state of "
                             "another model, or a pruner built with other layers?)")
    steps = state.get("curvature_steps", {})
    if not isinstance(steps, Mapping) or not all(
            isinstance(t, (int, float)) and not isinstance(t, bool) and 0 <= t < math.inf for t in steps.values()):
        raise ValueError(f"{where}: state['curvature_steps'] must map layers to step counts >= 0, got {steps!r}")
    for key in ("steps_since_update", "steps_total", "mc_calls_since_update", "priced_updates"):
        value = state.get(key, 0)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise ValueError(f"{where}: state[{key!r}] must be an integer >= 0, got {value!r}")
    curvature_shares.check_source(state.get("exact_curvature_ranks"), where)
    for key, kind in (("history", list), ("granularity", Mapping), ("split_from", Mapping),
                      ("alpha_before_switch_off", Mapping), ("settings", Mapping)):
        value = state.get(key)
        if value is not None and not isinstance(value, kind):
            raise TypeError(f"{where}: state[{key!r}] must be a {'list' if kind is list else 'dict'}, got "
                            f"{type(value).__name__}")
