"""A small training driver for MacKay pruning: the source paper's outer loop and an in-run
schedule, with validation-based early stopping and crash-safe checkpoints.

paper:  pretrain without prior -> a warm-up round (the first update sets alpha; nothing is
        pruned before the weights have trained under the prior) -> repeat `rounds` times:
        update alpha and prune, then retrain
        with Adam (lr restarted every round, x0.9 when the validation loss stops improving)
        until the validation accuracy stops improving (patience) or `epochs` run out; the best
        validation weights of the round are kept.
in-run: one run of `epochs` epochs after `pretrain_epochs`; alpha is updated every
        `update_every` epochs.
Both end by dropping the weights that feed units whose outputs are all pruned (the network's
output is unchanged; see mackay_ext.dead_units).
"""
from __future__ import annotations

import contextlib
import copy
import math
import random
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from torch import nn

from ._checksum import load_sealed, save_sealed
from ._validate import NonFiniteError, check_choice
from .checkpoint_fit import check_checkpoint_fits, training_set_summary
from .coupling import CouplingError
from .dead_channels import cut_dead_channels, may_hold_dead_channels
from .data import Splits, check_shift, random_shift
from .model_loads import expected_model_load
from .optim import MacKayAdam, ard_param_groups
from .pruner import MacKayPruner
from .pruner_options import check_option_names

SCHEDULES = ("paper", "in-run")
LR_SCHEDULES = ("plateau", "cosine")
# FitConfig fields a resumed run may change (Trainer.load_checkpoint): how long its phases run and
# how fast it learns, not what it trains on or in which order
RESUMABLE_CHANGES = ("pretrain_epochs", "rounds", "epochs", "finetune_epochs", "patience", "lr",
                     "retrain_lr", "finetune_lr", "lr_decay")
FINETUNE_TAG = 1_000_000  # batch-order tag of the fine-tuning epochs (apart from every round's)


@dataclass
class FitConfig:
    schedule: str = "paper"
    pretrain_epochs: int = 20
    rounds: int = 3             # pruning rounds (paper), after one warm-up round that sets alpha
    epochs: int = 20            # per round (paper) or in total after pretraining (in-run)
    update_every: int = 2       # in-run: epochs between precision updates
    batch_size: int = 128
    lr: float = 1e-3            # pretraining lr; rounds restart at retrain_lr
    retrain_lr: float = 1e-3
    lr_decay: float = 0.9       # on a validation-loss plateau
    patience: int = 5           # epochs without validation improvement before a phase stops
    seed: int = 0
    backend: str = "ext"
    augment_shift: int = 0      # training images moved by up to this many pixels (image data only)
    update_every_steps: int = 0  # in-run: optimizer steps between updates (0: `update_every` epochs)
    warmup_updates: int = 1     # updates that only move alpha (the first one always does)
    finetune_epochs: int = 0    # then: prior off, kept weights fine-tuned, pruned ones held at 0
    finetune_lr: float | None = None  # default: retrain_lr
    finetune_augment_shift: int | None = None  # the fine-tune's shifts (default: augment_shift); a
                                  # network pruned to a few thousand weights fits less than the
                                  # dense one, and smaller shifts let it fit more of the data
    lr_schedule: str = "plateau"  # or "cosine" over each dense / fine-tune phase (the in-run
                                  # pruning phase then keeps its lr constant)
    channels_last: bool = False  # convolutions in NHWC (about 1.5x faster on CPU)


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000,
             device: str | torch.device = "cpu") -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of `model` on (x, y)."""
    was_training = model.training
    model.eval()
    correct, loss = 0, 0.0
    for start in range(0, len(x), batch_size):
        xb, yb = x[start:start + batch_size].to(device), y[start:start + batch_size].to(device)
        logits = model(xb)
        loss += float(nn.functional.cross_entropy(logits, yb, reduction="sum"))
        correct += int((logits.argmax(1) == yb).sum())
    model.train(was_training)
    return correct / max(len(x), 1), loss / max(len(x), 1)


class Trainer:
    """Runs a FitConfig on one model and dataset; `run()` returns the history."""

    def __init__(self, model: nn.Module, data: Splits, config: FitConfig, *, pruner_options=None,
                 device="cpu", checkpoint: str | None = None, progress: Callable[[str], None] | None = None,
                 batch_progress: Callable[[int, int], None] | None = None):
        if not isinstance(config, FitConfig):
            raise TypeError(f"fit: config must be a mackay_ext.train.FitConfig, got {type(config).__name__} "
                            "(FitConfig(**settings) builds one; the pruner's options go in pruner_options=)")
        if config.schedule not in SCHEDULES:
            raise ValueError(f"fit: schedule must be one of {SCHEDULES}, got {config.schedule!r}")
        check_choice("lr_schedule", config.lr_schedule, LR_SCHEDULES, "fit")
        if isinstance(config.seed, bool) or not isinstance(config.seed, int):
            raise ValueError(f"fit: seed must be an integer, got {config.seed!r}")
        for name, least in (("pretrain_epochs", 0), ("rounds", 0), ("epochs", 0), ("update_every_steps", 0),
                            ("warmup_updates", 0), ("finetune_epochs", 0), ("patience", 0),
                            ("batch_size", 1), ("update_every", 1)):
            value = getattr(config, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"fit: {name} must be an integer >= {least}, got {value!r}")
        for name in ("lr", "retrain_lr", "finetune_lr"):   # checked now, not when their phase starts
            value = getattr(config, name)
            if value is None and name == "finetune_lr":
                continue
            if (isinstance(value, bool) or not isinstance(value, (int, float))
                    or not math.isfinite(value) or value < 0):
                raise ValueError(f"fit: {name} must be a finite number >= 0, got {value!r}")
        decay = config.lr_decay
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 < decay < 1:
            raise ValueError(f"fit: lr_decay (the plateau schedule's factor) must be in (0, 1), got {decay!r}")
        if config.schedule == "paper" and config.rounds == 0:
            warnings.warn("fit: rounds=0 with the paper schedule runs the dense pretraining and the warm-up "
                          "round that sets alpha, and prunes nothing", UserWarning, stacklevel=3)
        _check_splits(data)
        for name in ("augment_shift", "finetune_augment_shift"):
            value = getattr(config, name)
            if value is None and name == "finetune_augment_shift":
                continue
            check_shift(value, "fit", name)
            if value and data.x_train.dim() != 4:
                raise ValueError(f"fit: {name} needs images (N, C, H, W); {data.name} training "
                                 f"inputs have shape {tuple(data.x_train.shape)}")
            if value and value >= min(data.x_train.shape[-2:]):   # every image moved off itself
                raise ValueError(f"fit: {name} must be smaller than the images, "
                                 f"{tuple(data.x_train.shape[-2:])} pixels, got {value}")
        self.model, self.data, self.config, self.device = model.to(device), data, config, device
        self.memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
        if config.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.checkpoint, self.progress = checkpoint, progress or (lambda message: None)
        self.batch_progress = batch_progress
        self.num_data = len(data.x_train)
        _warn_if_nothing_prunes(config, self.num_data)
        check_option_names("fit", pruner_options or {}, {"num_data", "backend"})
        self.num_labels = data.num_classes   # the model must give at least this many outputs
        self.data_summary = training_set_summary(data)   # saved with checkpoints, checked on resume
        # torch.distributed (e.g. under torchrun): each rank trains on its slice of every global
        # batch through DistributedDataParallel; all control decisions use the (identical)
        # validation results, and only rank 0 writes checkpoints.
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.rank = torch.distributed.get_rank() if distributed else 0
        self.world_size = torch.distributed.get_world_size() if distributed else 1
        self.net = (nn.parallel.DistributedDataParallel(self.model) if self.world_size > 1
                    else self.model)
        # a training set smaller than config.batch_size makes every batch the whole set
        if config.batch_size > self.num_data:
            warnings.warn(f"batch_size {config.batch_size:,} exceeds the training set ({self.num_data:,} "
                          "examples): every batch is the whole set", stacklevel=2)
        self.optimizer = MacKayAdam(ard_param_groups(model), lr=config.lr, num_data=self.num_data,
                                    batch_size=min(config.batch_size, self.num_data), backend=config.backend)
        self.pruner = MacKayPruner(model, self.optimizer, num_data=self.num_data,
                                   backend=config.backend, **(pruner_options or {}))
        self.position = {"phase": "pretrain", "round": 0, "epoch": 0}
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self.dense_test_accuracy: float | None = None
        self.lr_scheduler = self._new_scheduler(config.pretrain_epochs)
        self.extra_state: dict[str, Any] = {}   # saved with every checkpoint (e.g. CLI settings)
        self.wall_clock_start: float | None = None
        self.unused_unit_weights = 0  # weights dropped because the units they feed are silent
        self.cut_channels = 0  # pruned channels zeroed whole before the fine-tune (dead_channels)

    def _new_scheduler(self, epochs: int | None):
        """The lr schedule of a phase of `epochs` epochs (None: the in-run pruning phase)."""
        for group in self.optimizer.param_groups:
            group.pop("initial_lr", None)  # a new phase starts from the lr it is given
        if self.config.lr_schedule == "plateau":
            return torch.optim.lr_scheduler.ReduceLROnPlateau(self.optimizer, factor=self.config.lr_decay,
                                                              patience=1)
        if epochs is None:
            return torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda epoch: 1.0)
        return torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, max(epochs, 1))

    def _phase_epochs(self) -> int | None:
        """The epochs of the phase at self.position, as _new_scheduler takes them."""
        cfg, phase = self.config, self.position["phase"]
        if phase == "pretrain":
            return cfg.pretrain_epochs
        if phase in ("finetune", "done"):
            return cfg.finetune_epochs
        if cfg.schedule == "in-run" and cfg.update_every_steps:
            return None  # the in-run pruning phase keeps its lr
        return cfg.epochs

    def _step_scheduler(self, val_loss: float) -> None:
        if isinstance(self.lr_scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.lr_scheduler.step(val_loss)
        else:
            self.lr_scheduler.step()

    # ------------------------------------------------------------------ epochs
    def _train_epoch(self, tag: int) -> float:
        """One pass over the training set in an order fixed by (seed, tag): a resumed run sees
        the batches an uninterrupted one would."""
        generator = torch.Generator().manual_seed(self.config.seed * 100003 + tag)
        order = torch.randperm(self.num_data, generator=generator)
        self.model.train()
        total = 0.0
        num_batches = (self.num_data + self.config.batch_size - 1) // self.config.batch_size
        shift = self.config.augment_shift
        if self.position["phase"] == "finetune" and self.config.finetune_augment_shift is not None:
            shift = self.config.finetune_augment_shift
        for batch, start in enumerate(range(0, self.num_data, self.config.batch_size)):
            if self.batch_progress:
                self.batch_progress(batch, num_batches)
            index = order[start:start + self.config.batch_size]
            xb, yb = self.data.x_train[index], self.data.y_train[index]
            if shift:
                # offsets for the whole global batch from the epoch's generator: resumable, and
                # every rank moves an image as a single process would
                xb = random_shift(xb, shift, generator=generator)
            if self.world_size > 1:  # this rank's contiguous share of the global batch
                xb = xb.tensor_split(self.world_size)[self.rank]
                yb = yb.tensor_split(self.world_size)[self.rank]
            xb, yb = xb.to(self.device, memory_format=self._memory_format(xb)), yb.to(self.device)
            self.optimizer.zero_grad(set_to_none=True)
            sampled_fisher = self.pruner.curvature_kind == "fisher-mc"
            # fisher-mc reuses this forward: its sampled-label backward runs before the training one
            with self.pruner.capture_mc() if sampled_fisher else contextlib.nullcontext():
                try:
                    logits = self.net(xb)
                except RuntimeError as error:
                    _note_dtype_mismatch(error, xb, self.model)
                    raise
            self._check_outputs(logits)
            loss = nn.functional.cross_entropy(logits, yb)
            value = float(loss.detach())  # the one host sync of a step, before it can do harm
            if not math.isfinite(value):
                pos = self.position
                phase = "pretraining" if pos["phase"] == "pretrain" else f"round {pos['round']}"
                raise NonFiniteError(
                    f"training loss is {value} ({phase}, epoch {pos['epoch'] + 1}, batch "
                    f"{batch + 1}); the weights were not updated with it")
            if sampled_fisher:
                self.pruner.accumulate_mc_from(logits)
            loss.backward()
            self.optimizer.step()
            if "steps" in self.position:  # in-run with updates every `update_every_steps` steps
                self.position["steps"] += 1
                if self.position["steps"] % self.config.update_every_steps == 0:
                    self._update_precisions()
            total += value * len(yb)
        return total * self.world_size / self.num_data  # this rank's mean, scaled to its share

    def _check_outputs(self, logits) -> None:
        """One logit per class for each example (checked on shapes: no host sync); cross_entropy
        would otherwise stop at the first label past the outputs with a bare IndexError."""
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[1] < self.num_labels:
            got = (f"shape {tuple(logits.shape)}" if isinstance(logits, torch.Tensor)
                   else type(logits).__name__)
            raise ValueError(f"fit: the model must return logits of shape (batch, classes) with at least "
                             f"{self.num_labels} classes (data {self.data.name}'s labels go up to "
                             f"{self.num_labels - 1}), got {got}")

    def _memory_format(self, x: torch.Tensor):
        return self.memory_format if x.dim() == 4 else torch.contiguous_format

    def _epoch(self) -> dict[str, Any]:
        pos = self.position
        tag = {"pretrain": 0, "round": 1000 * (pos["round"] + 1),
               "finetune": FINETUNE_TAG}.get(pos["phase"], 0) + pos["epoch"]
        start = time.perf_counter()
        train_loss = self._train_epoch(tag)
        val_acc, val_loss = evaluate(self.model, self.data.x_val, self.data.y_val, device=self.device)
        self._step_scheduler(val_loss)
        record = dict(pos, train_loss=train_loss, val_accuracy=val_acc, val_loss=val_loss,
                      lr=self.optimizer.param_groups[0]["lr"], seconds=time.perf_counter() - start,
                      kept=self.pruner.kept_weights())
        self.history.append(record)
        self.progress(f"{pos['phase']} r{pos['round']} e{pos['epoch'] + 1}: loss {train_loss:.4f} "
                      f"val acc {val_acc:.4f} kept {record['kept']}")
        return record

    def _remember_best(self, record) -> bool:
        """Keep the weights of the best validation accuracy of the current phase."""
        if self.best is None or record["val_accuracy"] > self.best["val_accuracy"]:
            self.best = {"val_accuracy": record["val_accuracy"], "epoch": record["epoch"],
                         "model": {k: v.detach().clone() for k, v in self.model.state_dict().items()}}
            return True
        return False

    def _restore_best(self) -> None:
        if self.best is not None:
            with expected_model_load(self.pruner):   # (pruned at once)
                self.model.load_state_dict(self.best["model"])
            self.pruner.apply_masks()
        self.best = None

    def _run_phase(self, epochs: int, update_every: int | None = None, early_stop: bool = True) -> None:
        """Train up to `epochs` epochs from self.position, stopping early on the patience rule."""
        while self.position["epoch"] < epochs:
            if update_every and self.position["epoch"] % update_every == 0 and self.position["epoch"]:
                self._update_precisions()
            record = self._epoch()
            improved = self._remember_best(record)
            self.position["epoch"] += 1
            stale = self.position["epoch"] - 1 - self.best["epoch"]
            self.save_checkpoint()
            if not improved and stale >= self.config.patience and early_stop and not update_every:
                break

    def _update_precisions(self) -> None:
        # the first `warmup_updates` updates only move alpha (the pruner's own warm-up is the first)
        prune = len(self.pruner.history) >= self.config.warmup_updates
        with warnings.catch_warnings():
            # the paper schedule's warm-up from a model given as pretrained (pretrain_epochs=0)
            # comes before any step: alpha from its weights alone is what that warm-up means
            warnings.filterwarnings("ignore", message="MacKayPruner.update: no curvature yet")
            report = self.pruner.update(prune=prune)
        self.progress(f"update: kept {report['kept']}/{report['total']} weights "
                      f"({100 * (1 - report['sparsity']):.2f}%), sum gamma {report.get('gamma_sum', 0):.1f}")
        self.best = None  # the pruned network is a new model: earlier best weights are void

    # -------------------------------------------------------------------- run
    def pretrain(self) -> None:
        """The dense phase (no prior): `pretrain_epochs` epochs, best validation weights kept;
        measures the dense test accuracy. Does nothing once done (e.g. after a resume)."""
        if self.position["phase"] != "pretrain":
            return
        self._run_phase(self.config.pretrain_epochs)
        self._restore_best()
        self.dense_test_accuracy = evaluate(self.model, self.data.x_test, self.data.y_test,
                                            device=self.device)[0]
        self.position = {"phase": "round", "round": 0, "epoch": 0, "updated": False}
        self.save_checkpoint()

    def run(self) -> list[dict[str, Any]]:
        cfg = self.config
        self.pretrain()
        if cfg.schedule == "paper":
            # round 0 is the warm-up: its update sets alpha (the prior was off) and prunes nothing
            # (see MacKayPruner); rounds 1..rounds prune
            while self.position["phase"] == "round" and self.position["round"] < cfg.rounds + 1:
                if not self.position.get("updated"):
                    self._update_precisions()
                    for group in self.optimizer.param_groups:  # lr restarted every round
                        group["lr"] = cfg.retrain_lr
                    self.lr_scheduler = self._new_scheduler(cfg.epochs)
                    self.position["updated"] = True
                    self.save_checkpoint()
                self._run_phase(cfg.epochs)
                self._restore_best()
                self.position = {"phase": "round", "round": self.position["round"] + 1, "epoch": 0,
                                 "updated": False}
                self.save_checkpoint()
        elif self.position["phase"] == "round" and self.position["round"] == 0:
            if cfg.update_every_steps:
                self.position.setdefault("steps", 0)
                if self.position["epoch"] == 0:
                    for group in self.optimizer.param_groups:
                        group["lr"] = cfg.retrain_lr
                    self.lr_scheduler = self._new_scheduler(None)
                self._run_phase(cfg.epochs, early_stop=False)
            else:
                self._run_phase(cfg.epochs, update_every=cfg.update_every)
                self._update_precisions()
            self.position = {"phase": "round", "round": 1, "epoch": 0, "updated": True}
            self.save_checkpoint()
        if cfg.finetune_epochs and self.position["phase"] != "done":
            self.finetune(cfg.finetune_epochs, cfg.finetune_lr or cfg.retrain_lr)
        self._drop_unused_units()  # changes no output; only the counts
        return self.history

    def _drop_unused_units(self) -> None:
        removed = self.pruner.prune_unused_units()
        self.unused_unit_weights += removed
        if removed:
            self.progress(f"dropped {removed} weights feeding units whose outputs are all pruned")

    def _cut_dead_channels(self) -> None:
        """Zero the pruned channels that still carry a constant shrink cannot fold (a BatchNorm
        shift read by a zero-padded conv; mackay_ext.dead_channels), so the fine-tune makes up for
        them and shrink removes them. Traces the model only when it may hold one."""
        if not may_hold_dead_channels(self.model):
            return
        example = self.data.x_train[:2].to(self.device)
        try:
            cut = cut_dead_channels(self.model, example, optimizer=self.optimizer, pruner=self.pruner)
        except CouplingError as error:
            warnings.warn(f"Trainer: pruned channels that still carry a constant (a BatchNorm shift, a "
                          f"bias) were not looked for, so shrink may keep them: {error}", stacklevel=3)
            return
        self.cut_channels += len(cut)
        if cut:
            self.progress(f"zeroed {len(cut)} pruned channels whose BatchNorm shift or bias still reached "
                          "a zero-padded conv (shrink can now remove them)")

    def finetune(self, epochs: int, lr: float, drop_unused: bool = True) -> None:
        """Prior off, kept weights trained on the data alone for `epochs` epochs (best validation
        weights kept), pruned ones held at 0 (first, with `drop_unused`, the weights feeding
        silenced units are pruned too, and pruned channels that still carry a constant shrink
        could not fold are zeroed whole). Resumable like every phase."""
        if self.position["phase"] != "finetune":
            if drop_unused:  # their rows cannot matter any more
                self._drop_unused_units()
                self._cut_dead_channels()
            self.pruner.switch_off_prior()
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.lr_scheduler = self._new_scheduler(epochs)
            self.best = None
            self.position = {"phase": "finetune", "round": self.position.get("round", 0), "epoch": 0}
            self.save_checkpoint()
        self._run_phase(epochs)
        self._restore_best()
        self.position = {"phase": "done", "round": self.position["round"], "epoch": 0}
        self.save_checkpoint()

    # ------------------------------------------------------------- checkpoints
    def state(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "pruner": self.pruner.state_dict(), "position": dict(self.position),
                "history": list(self.history), "best": self.best,
                "dense_test_accuracy": self.dense_test_accuracy,
                "lr_scheduler": self.lr_scheduler.state_dict(), "config": asdict(self.config),
                "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
                "data": dict(self.data_summary),
                "wall_seconds": (time.perf_counter() - self.wall_clock_start
                                 if self.wall_clock_start is not None else 0.0),
                **self.extra_state}

    def save_checkpoint(self) -> None:
        """Write the run's state to the checkpoint path (rank 0 writes). Under DDP a collective:
        every rank calls it, as the Trainer's own loop does; called on one rank alone it waits
        for the others."""
        # every rank's share of the exact curvature since the last update, and every rank's random
        # streams (fisher-mc's sampled labels, dropout), into what rank 0 saves: collectives, so on
        # every rank, whether or not it was given the checkpoint's path
        self.pruner.consolidate_curvature()
        streams = self._random_streams()
        if not self.checkpoint:
            return
        # the loss can stay finite while B g^2 overflows: such a state would replace the last good
        # checkpoint, and every resume from it would diverge again, at any lr (checked on every
        # rank: they hold the same state, and stop together)
        bad = self.pruner.nonfinite()
        if bad:
            raise NonFiniteError(f"non-finite values in {', '.join(bad)}: training has diverged; the "
                                 f"checkpoint {self.checkpoint} was not overwritten with this state")
        if self.rank == 0:
            save_sealed(dict(self.state(), rng_of_ranks=streams), self.checkpoint)

    def _random_streams(self) -> list[dict[str, Any]] | None:
        """Each rank's random states (by rank), where there are several ranks."""
        if self.world_size == 1:
            return None
        streams: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(streams, {"torch": torch.get_rng_state(), "python": random.getstate()})
        return streams

    def load_checkpoint(self, path: str) -> None:
        """Continue the run a checkpoint saved. This Trainer's FitConfig may differ from the saved
        run's only in phase lengths, patience and learning rates (RESUMABLE_CHANGES); any other
        difference (seed, schedule, batch size, shifts, ...) would silently turn the rest of the
        run into another run, and is refused, as are a checkpoint of another network or of a run
        on another training set (mackay_ext.checkpoint_fit)."""
        state = load_sealed(path, "checkpoint", map_location=self.device)
        check_checkpoint_fits(state, path, self.model, self.data_summary)
        saved = state.get("config")
        self._check_saved_config(saved, path)
        if isinstance(saved, dict):
            late, why = late_length_changes(saved, asdict(self.config), state.get("position"))
            if late:
                raise ValueError(f"load_checkpoint: {', '.join(late)} cannot change this run any more: "
                                 f"{why}; start a new run with them")
        own = self._own_state()
        try:
            self._load_state(state, saved)
        except BaseException:   # a refusal part-way (e.g. the optimizer's) leaves nothing half loaded
            self._load_state(own, None)
            raise

    def _own_state(self) -> dict[str, Any]:
        """A copy of everything load_checkpoint replaces, to put back if it fails."""
        state = copy.deepcopy({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                               "pruner": self.pruner.state_dict(), "position": self.position,
                               "history": self.history, "best": self.best})
        return dict(state, dense_test_accuracy=self.dense_test_accuracy, lr_scheduler=self.lr_scheduler,
                    rng={"torch": torch.get_rng_state(), "python": random.getstate()})

    def _load_state(self, state: dict[str, Any], saved_config: Any) -> None:
        with expected_model_load(self.pruner):   # (the pruner's state saved with them follows)
            self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.pruner.load_state_dict(state["pruner"])
        self.position, self.history, self.best = state["position"], state["history"], state["best"]
        self.dense_test_accuracy = state["dense_test_accuracy"]
        if isinstance(state["lr_scheduler"], dict):
            self.lr_scheduler = self._new_scheduler(self._phase_epochs())  # the saved phase's kind
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        else:   # this Trainer's own, put back
            self.lr_scheduler = state["lr_scheduler"]
        rng = state["rng"]
        streams = state.get("rng_of_ranks")
        if isinstance(streams, list) and len(streams) == self.world_size:   # (a run on as many ranks)
            rng = streams[self.rank]
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if isinstance(saved_config, dict):
            self._apply_changed_rates(saved_config)

    def _apply_changed_rates(self, saved: dict[str, Any]) -> None:
        """A resume with another learning rate for the phase the checkpoint is in scales the
        saved lr by new / old (the plateau decays so far kept); another lr_decay is the plateau
        schedule's factor from here on. (Later phases start from their own config lr anyway.)"""
        phase = self.position["phase"]
        key = {"pretrain": "lr", "round": "retrain_lr", "finetune": "finetune_lr"}.get(phase)
        if key is not None:
            ours, theirs = getattr(self.config, key), saved.get(key)
            if key == "finetune_lr":   # None: the fine-tune runs at retrain_lr
                ours = self.config.retrain_lr if ours is None else ours
                theirs = saved.get("retrain_lr") if theirs is None else theirs
            if theirs and ours != theirs:
                for group in self.optimizer.param_groups:
                    group["lr"] *= ours / theirs
                if hasattr(self.lr_scheduler, "base_lrs"):
                    self.lr_scheduler.base_lrs = [lr * ours / theirs for lr in self.lr_scheduler.base_lrs]
        if isinstance(self.lr_scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.lr_scheduler.factor = self.config.lr_decay

    def _check_saved_config(self, saved: Any, path: str) -> None:
        if not isinstance(saved, dict):
            return   # written before checkpoints held their config
        ours = asdict(self.config)
        differ = [f"{key}={saved[key]!r} in the checkpoint, {ours[key]!r} here" for key in ours
                  if key in saved and key not in RESUMABLE_CHANGES and saved[key] != ours[key]]
        if differ:
            raise ValueError(f"load_checkpoint: {path} was saved by a run with another FitConfig: "
                             f"{'; '.join(differ)}. Build the Trainer with the checkpoint's config "
                             f"(only {', '.join(RESUMABLE_CHANGES)} may change on resume), or start a new run")


def _note_dtype_mismatch(error: RuntimeError, inputs: torch.Tensor, model: nn.Module) -> None:
    """A forward that failed on inputs of another dtype than the model's weights ("mat1 and mat2
    must have the same dtype"): the note names the data and the model."""
    dtypes = sorted({str(p.dtype) for p in model.parameters() if p.is_floating_point()})
    if dtypes and str(inputs.dtype) not in dtypes:
        error.add_note(f"fit: the training inputs are {inputs.dtype} and the model's weights {', '.join(dtypes)}: "
                       "convert one (data.x_train.float() for a float32 model, or model.to(the inputs' dtype))")


def _warn_if_nothing_prunes(config: FitConfig, num_data: int) -> None:
    """The in-run schedule prunes at its updates after the warm-up ones (the pruner's first update
    only sets alpha): a phase too short for one more returned a dense "pruned" model, unsaid."""
    if config.schedule != "in-run":
        return
    if config.update_every_steps:
        steps = config.epochs * -(-num_data // min(config.batch_size, num_data))
        updates, how = steps // config.update_every_steps, (
            f"{steps} optimizer steps with update_every_steps={config.update_every_steps}")
    else:   # every update_every epochs within the phase, and one at its end
        updates, how = (max(config.epochs, 1) - 1) // config.update_every + 1, (
            f"epochs={config.epochs} with update_every={config.update_every}")
    warmup = max(config.warmup_updates, 1)
    if updates <= warmup:
        warnings.warn(f"fit: the in-run schedule makes {updates} precision update(s) ({how}), and the first "
                      f"{warmup} only set alpha (warmup_updates={config.warmup_updates}; the pruner's first "
                      "update always does): nothing will be pruned. Give more epochs, or update more often",
                      UserWarning, stacklevel=4)


def _check_splits(data: Splits) -> None:
    """Each split as fit reads it: as many labels (integer class indices) as inputs (floating
    point), and examples to train and validate on."""
    for split in ("train", "val", "test"):
        x, y = getattr(data, f"x_{split}", None), getattr(data, f"y_{split}", None)
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise TypeError(f"fit: data.x_{split} and data.y_{split} must be tensors, got "
                            f"{type(x).__name__} and {type(y).__name__}")
        if len(x) != len(y):
            raise ValueError(f"fit: data {split} split has {len(x)} inputs but {len(y)} labels")
        if not x.is_floating_point():
            raise ValueError(f"fit: data.x_{split} must be floating point, got {x.dtype}")
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool or y.dim() != 1:
            raise ValueError(f"fit: data.y_{split} must be a 1-D tensor of integer class indices, got "
                             f"{y.dtype} of shape {tuple(y.shape)}")
        if y.dtype not in (torch.int64, torch.uint8):   # what cross_entropy takes as class indices
            raise ValueError(f"fit: data.y_{split} must hold int64 class indices, got {y.dtype}: "
                             f"pass data.y_{split}.long()")
        if len(y) and int(y.min()) < 0:
            raise ValueError(f"fit: data.y_{split} holds the label {int(y.min())}; class indices "
                             "start at 0")
    for split in ("train", "val"):
        if len(getattr(data, f"x_{split}")) == 0:
            raise ValueError(f"fit: the {split} split is empty (fit trains on one and picks the best "
                             "weights on the other)")


def late_length_changes(saved: dict[str, Any], config: dict[str, Any], position: Any,
                        name: Callable[[str], str] = str) -> tuple[list[str], str]:
    """The phase lengths (pretrain_epochs, rounds, epochs, finetune_epochs) that `config` changes
    from the `saved` run's but that the phases a checkpoint at `position` has left cannot reach,
    and why (as `name` calls the fields): a resume must refuse them, since they would be silently
    ignored. (A length either lacks is not compared.)"""
    changed = [key for key in ("pretrain_epochs", "rounds", "epochs", "finetune_epochs")
               if key in config and config[key] != saved.get(key, config[key])]
    if not changed or not isinstance(position, dict):
        return [], ""
    phase, round_index = position.get("phase"), position.get("round", 0)
    paper = config["schedule"] == "paper"
    if phase == "done" and changed == ["finetune_epochs"]:
        return changed, "the run is over"
    if phase in ("finetune", "done"):
        pruning = [key for key in changed if key != "finetune_epochs" or phase == "done"]
        return pruning, "the pruning is over: this checkpoint is in or past its fine-tuning (prior off)"
    late, why = [], []
    if "pretrain_epochs" in changed and phase != "pretrain":
        late.append("pretrain_epochs")
        why.append("the dense pretraining is over")
    if "rounds" in changed and not paper:
        late.append("rounds")
        why.append(f"the in-run schedule has no rounds (its length is {name('epochs')})")
    if "epochs" in changed and phase == "round" and not paper and round_index >= 1:
        late.append("epochs")
        why.append("the in-run pruning phase is over")
    if "rounds" in changed and paper and phase == "round":
        # round 0 is the warm-up; round r >= 1 has begun once its precision update ran
        begun = round_index if position.get("updated") else round_index - 1
        if begun > config["rounds"]:
            late.append("rounds")
            why.append(f"{begun} pruning rounds have run or begun, more than {config['rounds']}")
    if "epochs" in changed and paper and phase == "round" and round_index > config["rounds"]:
        late.append("epochs")
        why.append(f"every round has run (add rounds with {name('rounds')})")
    return late, "; ".join(why)


def fit(model: nn.Module, data: Splits, config: FitConfig | None = None, **kwargs) -> Trainer:
    """Train and prune `model` on `data` (see FitConfig); returns the finished Trainer, whose
    `history`, `pruner` and `optimizer` hold the results. The pruner is detached: the model
    leaves with no hook of ours (a later forward costs nothing extra, and another fit or
    MacKayPruner may take it); the optimizer still holds the pruned weights at 0 if stepped."""
    trainer = Trainer(model, data, config or FitConfig(), **kwargs)
    trainer.run()
    trainer.pruner.detach()
    return trainer
