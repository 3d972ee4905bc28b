"""The pruner the training-loop callbacks build: MacKayPruner without prior="penalty".

MacKayPruner reads the ef-batch curvature of a non-MacKayAdam optimizer from the gradient of each
optimizer step (mackay_ext.batch_curvature.StepCurvature, see mackay_ext.standalone_prior): the
accumulated, averaged, unscaled (and clipped) one the optimizer used, so with B the effective
batch (per-device batch x accumulation x world size) h is the estimate of a run without
accumulation on that batch, the same on every rank, as in MacKayAdam's fused step. The callbacks
own the loss, so they cannot add penalty() to it: they apply the prior in the step (proximal, or
MacKayAdam's).

The callbacks' pruner prunes at most 90% of a layer's live weights (groups) per update unless told
otherwise (max_prune_fraction=None lifts it): their updates come on a schedule inside one run, often
under a learning rate decaying to 0, with no retraining phase after them. There the diagonal evidence
of a network fitted to near-zero training loss found nearly every weight of a tiny BERT's encoder
prunable at once (each stands in for the others): one update took every attention and MLP layer
down to one weight, train accuracy fell from 0.998 to 0.637, and the rest of the run, its learning
rate decayed to a third, did not recover (MacKayAdam: 51 of 21,760 weights kept, 0.650 test
accuracy, chance). Capped at 0.9, the same run thinned over its next updates: 456 kept at 0.773
(AdamW: 226 at 0.780 -> 448 at 0.847; a constant rate: 293 at 0.786 -> 703 at 0.845), and a ViT
that did not collapse ended where it did without the cap (2,109 against 2,112 kept, 1.000).
"""
from __future__ import annotations

import math
import warnings
from typing import Any

from .._validate import check_count, user_stacklevel
from ..pruner import MacKayPruner
from ..pruner_options import check_option_names, check_pruner_options

CALLBACK_MAX_PRUNE_FRACTION = 0.9   # the callbacks' default (module docstring)


class StepCurvaturePruner(MacKayPruner):
    """MacKayPruner for the callbacks: prior="penalty" is refused; `batch_size` is the effective
    batch of one optimizer step; max_prune_fraction is CALLBACK_MAX_PRUNE_FRACTION unless given."""

    def __init__(self, model, optimizer, **options):
        if options.get("prior") == "penalty":
            # the penalty's gradient would reach the step's gradient in a framework-dependent
            # scale; the callbacks own the loss, not the user
            raise ValueError("the training-loop callbacks apply the prior themselves (proximal step, "
                             "or MacKayAdam): prior='penalty' is not available there")
        super().__init__(model, optimizer, **options)
        if self._step_batch is not None:   # the HF callback says what N and B count itself, knowing the rows
            self._step_batch.token_loss = False
        if "max_prune_fraction" not in options:
            # set after the build, so that what the pruner says there of an unlimited one
            # (channel_prior="norm-scale" on a BatchNorm network) is still said
            self.max_prune_fraction = CALLBACK_MAX_PRUNE_FRACTION


def mackay_adam_batch_mismatch(optimizer, expected: float) -> str | None:
    """The batch_size of a MacKayAdam's ARD groups (which the pruner then uses) when it differs
    from `expected`, the batch one optimizer step of the trainer reads; None when they agree."""
    given = {group["batch_size"] for group in optimizer.param_groups
             if group.get("ard") and group["batch_size"] is not None}
    if given and given != {expected}:
        return ", ".join(map(str, sorted(given, key=str)))
    return None


def training_set_size(num_data: float | None, loader, who: str, source: str) -> float:
    """`num_data` if the user gave it, else the length of the loader's dataset; a clear error
    naming the callback where the data has no length (an IterableDataset)."""
    if num_data is not None:
        return num_data
    try:
        return len(loader.dataset)
    except (AttributeError, TypeError):
        raise ValueError(f"{who}: {source} has no length (an IterableDataset?): pass num_data=N") from None


def check_callback_options(who: str, pruner_options: dict[str, Any], own: set[str], *,
                           num_data: Any = None, batch_size: Any = None) -> None:
    """What a callback can check when it is built, though its pruner is built when training
    starts: the names of the MacKayPruner options and the values that need no model (a typo or a
    bad value would surface inside the trainer, naming neither the callback nor the option),
    and num_data and batch_size."""
    check_option_names(who, pruner_options, own)
    with warnings.catch_warnings():   # its notes (a threshold's scale, ...) are the pruner's to say, once,
        warnings.simplefilter("ignore")   # when the callback builds it: said here too, each came twice
        check_pruner_options(who, **pruner_options)   # (the names were checked: num_data is never among them)
    if num_data is not None:
        check_count(num_data, "num_data", who)
    if batch_size is not None:
        check_count(batch_size, "batch_size", who)


def check_warmup_updates(value: Any, who: str) -> None:
    """Updates that only move alpha before the first that prunes: an int >= 0."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{who}: warmup_updates must be an int >= 0, got {value!r}")


def check_dense_phase(ratio: Any, count: Any, count_name: str, who: str) -> None:
    """dense_ratio: a fraction of the run in [0, 1); the count (dense_steps, dense): an int >= 0 or None."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise ValueError(f"{who}: dense_ratio must be a number in [0, 1), the fraction of the run trained "
                         f"without the prior before the first precision update, got {ratio!r}")
    if count is not None and (not isinstance(count, int) or isinstance(count, bool) or count < 0):
        raise ValueError(f"{who}: {count_name} must be an int >= 0 or None, got {count!r}")


def dense_length(ratio: float, count: int | None, total: float | None, count_name: str, who: str) -> int:
    """Where the first precision update may come: `count` if given, else ratio x the run's length."""
    if count is not None:
        return count
    if ratio == 0:
        return 0
    if total is None or not math.isfinite(total) or total <= 0:
        raise ValueError(f"{who}: dense_ratio={ratio:g} needs the length of the run, which this trainer does not "
                         f"know (no max_epochs or max_steps): pass {count_name}=<the dense part's length>, or "
                         "dense_ratio=0 to update from the start")
    return int(ratio * total)


def warn_if_no_update_prunes(who: str, first: int, last: int, every: int, warmup_left: int, unit: str) -> None:
    """Updates come at the multiples of `every` in [first, last]; the first `warmup_left` of them
    prune nothing. Said when none would prune (a run shorter than its dense part, say)."""
    start = max(first, 1)
    updates = max(0, last // every - (start - 1) // every)
    if updates <= warmup_left:
        warnings.warn(f"{who}: this run has {updates} precision update(s) left ({unit}s {start} to {last}, every "
                      f"{every}) and warmup_updates leaves {warmup_left} that only set alpha: nothing will be "
                      "pruned. Lower dense_ratio (or the dense length), update_every or warmup_updates, or train "
                      "longer", UserWarning, stacklevel=user_stacklevel())


def check_flag(value: Any, name: str, who: str, allowed=(False, True)) -> None:
    """A switch given as a bool (or one of the ints `allowed`): "yes", 1.0 or True for 1 is refused."""
    if type(value) not in {type(a) for a in allowed}:
        raise TypeError(f"{who}: {name} must be one of {allowed}, got {value!r}")
    if value not in allowed:
        raise ValueError(f"{who}: {name} must be one of {allowed}, got {value!r}")
