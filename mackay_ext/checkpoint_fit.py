"""Does a file fit this Trainer as a checkpoint of its own run? Trainer.load_checkpoint asks
before it reads anything into the model: a compressed model, a checkpoint of another network and
one of a run on another training set are each named as such (they used to surface as a KeyError,
a complaint about phase lengths or torch's raw state_dict message, or, for another training set,
not at all: the pruner took the new N while the optimizer kept the saved one)."""
from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import nn

from ._validate import user_stacklevel
from .data import Splits
from .pruner import check_state_format

# what Trainer.state() writes; "data" (the training set's summary) is newer and optional
CHECKPOINT_KEYS = ("model", "optimizer", "pruner", "position", "history", "best", "dense_test_accuracy",
                   "lr_scheduler", "rng")


@torch.no_grad()
def training_set_summary(data: Splits) -> dict[str, Any]:
    """What identifies the training set in a checkpoint: its size (N, in every precision update
    and in MacKayAdam's prior), one example's shape, and sums of its inputs and labels (another
    set of the same size differs there)."""
    x, y = data.x_train, data.y_train
    total = square = 0.0
    for chunk in x.split(4096):   # in float64 a chunk at a time (all of MNIST's would take 345 MB)
        chunk = chunk.double()
        total, square = total + float(chunk.sum()), square + float(chunk.square().sum())
    return {"examples": len(x), "example_shape": list(x.shape[1:]), "x_sum": total, "x_square_sum": square,
            "y_sum": int(y.long().sum())}


def check_checkpoint_fits(state: Any, path: str, model: nn.Module, data_summary: dict[str, Any]) -> None:
    """Refuse `state` (a loaded file) unless it is a Trainer checkpoint of this model's
    architecture on this training set; each refusal says what the file is instead."""
    where = f"load_checkpoint: {path}"
    if isinstance(state, dict) and str(state.get("format", "")).startswith("mackay_ext.compressed"):
        raise ValueError(f"{where} is a compressed model written by save_compressed, not a training "
                         "checkpoint: load it with mackay_ext.load_compressed")
    missing = [key for key in CHECKPOINT_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise ValueError(f"{where} is not a checkpoint written by Trainer.save_checkpoint (it lacks "
                         f"{', '.join(missing)})")
    if isinstance(state["pruner"], dict):   # before anything else: a later version's checkpoint is misread
        check_state_format(state["pruner"], where)
    _check_same_network(state, where, model)
    _check_same_training_set(state.get("data") if "data" in state else _older_summary(state, where),
                             where, data_summary)
    _check_position(state["position"], where)


PHASES = ("pretrain", "round", "finetune", "done")   # Trainer.position["phase"], in run order


def _check_position(position: Any, where: str) -> None:
    """Where the run stands is one the Trainer writes: a phase it knows and counts >= 0 (an
    unknown phase ran nothing and returned the model as it was)."""
    def count(key: str) -> bool:
        value = position.get(key, 0)
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    if (not isinstance(position, dict) or position.get("phase") not in PHASES
            or not all(count(key) for key in ("round", "epoch", "steps"))
            or not isinstance(position.get("updated", False), bool)):
        raise ValueError(f"{where}: its position {position!r} is not one Trainer writes (a dict with a phase "
                         f"of {', '.join(PHASES)} and round, epoch and steps counts >= 0): damaged or edited")


def _check_same_network(state: dict, where: str, model: nn.Module) -> None:
    saved, ours = state["model"], model.state_dict()
    if not isinstance(saved, dict):
        raise ValueError(f"{where}: its 'model' entry is a {type(saved).__name__}, not a state_dict")
    named = (state.get("cli_settings") or {}).get("model") if isinstance(state.get("cli_settings"), dict) else None
    whose = f" (the run's model: {named})" if named else ""
    def shape(value):
        return tuple(value.shape) if isinstance(value, torch.Tensor) else "no such tensor"

    for key in sorted(set(saved) | set(ours)):
        if shape(saved.get(key)) != shape(ours.get(key)):
            raise ValueError(f"{where} was saved by a run of another network{whose}: {key} is "
                             f"{shape(saved.get(key))} there, {shape(ours.get(key))} in this Trainer's model")


def _older_summary(state: dict, where: str) -> dict[str, Any] | None:
    """A checkpoint written before it held the training set's summary still holds N, the pruner's
    num_data: its size is checked from that (such a checkpoint resumed on a set of another size
    with the optimizer's N the saved one and the pruner's the new one), and the check of its
    contents, which cannot be made, is said."""
    settings = state["pruner"].get("settings") if isinstance(state["pruner"], dict) else None
    num_data = settings.get("num_data") if isinstance(settings, dict) else None
    warnings.warn(f"{where} was written before checkpoints recorded the training set: whether this is the "
                  "run's own training set cannot be checked beyond its size"
                  + ("" if isinstance(num_data, (int, float)) else " (which it does not hold either)"),
                  UserWarning, stacklevel=user_stacklevel())
    if not isinstance(num_data, (int, float)):
        return None
    return {"examples": int(num_data) if float(num_data).is_integer() else num_data}


def _check_same_training_set(saved: Any, where: str, ours: dict[str, Any]) -> None:
    if not isinstance(saved, dict):
        return   # written before checkpoints held the summary, nor N (said by _older_summary)
    shape = saved.get("example_shape", ours["example_shape"])   # (an older checkpoint's: N alone)
    if saved.get("examples") != ours["examples"] or shape != ours["example_shape"]:
        theirs = f" of shape {tuple(shape or ())}" if "example_shape" in saved else ""
        raise ValueError(
            f"{where} was saved by a run on {saved.get('examples')} training examples{theirs}; this "
            f"Trainer's training split has {ours['examples']} "
            f"of shape {tuple(ours['example_shape'])}. N enters every precision update and MacKayAdam's "
            "prior: resume with the run's own training set, or start a new run")
    for key in ("x_sum", "x_square_sum", "y_sum"):
        theirs = saved.get(key)
        if isinstance(theirs, (int, float)) and not math.isclose(theirs, ours[key], rel_tol=1e-6, abs_tol=1e-6):
            raise ValueError(
                f"{where} was saved by a run on another training set of the same size ({ours['examples']} "
                "examples: their inputs or labels differ); resume with the run's own training set, or "
                "start a new run")
