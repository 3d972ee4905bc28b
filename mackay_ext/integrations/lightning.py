"""MacKay ARD inside lightning.pytorch.Trainer.fit(): a Callback in the manner of ModelPruning.

    from mackay_ext.integrations.lightning import MacKayPruning
    trainer = lightning.pytorch.Trainer(callbacks=[MacKayPruning(update_every=1, verbose=1)])
    trainer.fit(module, datamodule)

The LightningModule's optimizer (whatever configure_optimizers returns) gets the prior as the
pruner's exact proximal step after every optimizer step; a MacKayAdam returned there applies it
in its fused step. Pruned weights are held at exactly 0. The ARD state (alpha, curvature,
history) is saved in Lightning's checkpoints and restored from them, and a later fit of the same
LightningModule (a fine-tune stage) goes on with it.
"""
from __future__ import annotations

import math
import warnings
from typing import Any

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from .._validate import check_choice, user_stacklevel
from ..optim import MacKayAdam
from ._clipping import ClippingWatch, clip_coefficient, gradients, largest_entry, total_norm
from ._step_curvature import (StepCurvaturePruner, check_callback_options, check_dense_phase, check_flag,
                              check_warmup_updates, dense_length, mackay_adam_batch_mismatch, training_set_size,
                              warn_if_no_update_prunes)

__all__ = ["MacKayPruning"]


def _pairs(parameters_to_prune) -> list:
    """ModelPruning's form, [(module, "weight"), ...], as a list: checked when the callback is
    built (that the modules are the LightningModule's, when training starts)."""
    if isinstance(parameters_to_prune, (str, bytes, nn.Module)) or not hasattr(parameters_to_prune, "__iter__"):
        raise TypeError("MacKayPruning: parameters_to_prune must be a list of (module, parameter name) "
                        f"pairs, got {type(parameters_to_prune).__name__}")
    pairs = list(parameters_to_prune)
    for entry in pairs:
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], nn.Module)
                and isinstance(entry[1], str)):
            raise TypeError("MacKayPruning: parameters_to_prune must hold (module, parameter name) "
                            f"pairs, got {entry!r}")
    return pairs


def _layer_names(module: nn.Module, parameters_to_prune) -> list[str]:
    """ModelPruning's [(module, "weight"), ...] as the pruner's layer names."""
    names = {id(m): n for n, m in module.named_modules()}
    chosen = []
    for sub, attr in _pairs(parameters_to_prune):
        if id(sub) not in names:
            raise ValueError(f"MacKayPruning: parameters_to_prune names a {type(sub).__name__} that is "
                             "not part of the LightningModule")
        if attr not in dict(sub.named_parameters(recurse=False)):
            raise ValueError(f"MacKayPruning: {type(sub).__name__} has no parameter {attr!r}")
        prefix = names[id(sub)]
        chosen.append((prefix or attr) if attr == "weight" else (f"{prefix}.{attr}" if prefix else attr))
    return chosen


def _clip_algorithm(trainer) -> str:
    """"norm" (Lightning's default) or "value" (the Trainer holds an enum, or None when unset)."""
    algorithm = trainer.gradient_clip_algorithm
    return "value" if getattr(algorithm, "value", algorithm) == "value" else "norm"


class MacKayPruning(Callback):
    """Runs MacKayPruner inside Trainer.fit().

    Args:
        parameters_to_prune: as ModelPruning's: [(module, "weight"), ...]; None = every trainable
            parameter with dim >= 2 (mutually exclusive with `layers`, the pruner's names).
        update_every: epochs (update_on="epoch", default) or optimizer steps (update_on="step")
            between precision updates.
        warmup_updates: updates that only move alpha, before the first that may prune (the very
            first never prunes, whatever this says: with alpha = 0 everywhere it sets alpha from the
            weights alone, 1 / w^2); as FitConfig's.
        dense_ratio, dense: the run trains without the prior for `dense` epochs or optimizer
            steps (update_on's unit; default dense_ratio x max_epochs or the run's optimizer
            steps, half the run), after which the first update may come: MacKay's update reads
            the evidence of a network fitted to its data, and one that is not loses at once the
            weights it has not yet learnt to use. dense_ratio=0 updates from the start.
        num_data: N; default the length of the training dataloader's dataset.
        batch_size: B of the ef-batch curvature with a non-MacKayAdam optimizer; default the
            effective batch of one optimizer step: the dataloader's batch size x
            accumulate_grad_batches x world size. The curvature is read once per optimizer step
            from the gradient the optimizer used (Lightning divides each micro-batch's loss by
            accumulate_grad_batches, and DDP averages over ranks: the mean over that batch;
            integrations._step_curvature), so every rank computes the same alpha. A MacKayAdam
            reads the same gradient in its step: give it batch_size=B.
        at_end: None or "sparsify" (mackay_ext.sparsify(module) in place at on_fit_end, the
            analogue of ModelPruning's make_pruning_permanent). The sparse layers' state_dict
            holds values and indices where the module's has a weight, so a checkpoint that
            trainer.save_checkpoint writes afterwards does not load into a new module (load_from_
            checkpoint: missing and unexpected keys; with strict=False those layers keep their
            initial weights): store the module with mackay_ext.save_compressed (load_compressed(
            path, model=YourModule()) reads it), or mackay_ext.densify(module) before saving (a
            warning says so when the fit ends; ModelCheckpoint's files, written during the fit,
            are dense).
        verbose: 0 quiet, 1 one line per update, 2 and every layer's kept weights.
        **pruner_options: for MacKayPruner (granularity, rule, prune, threshold, curvature, ...);
            max_prune_fraction defaults to 0.9 here (None: no limit), since an update inside the
            run has only the rest of the run's learning rate to recover from a cut
            (integrations._step_curvature).

    At each update "mackay/kept_fraction", "mackay/gamma_sum" and "mackay/updates" are written to
    the trainer's loggers (step = the global step). Their current values are also given to
    LightningModule.log(logger=False) at the end of every training batch and epoch, where
    ModelCheckpoint or EarlyStopping can monitor them from the first epoch on: before the first
    update (the dense phase) kept_fraction is 1.0 and updates 0; gamma_sum comes with the first
    update. The LightningModule must configure exactly one optimizer, and a Trainer may hold one
    MacKayPruning (for a subset of the layers, give that one parameters_to_prune or layers).

    Several fits: a later trainer.fit of the same LightningModule (a fine-tune stage: a new Trainer,
    hence a new optimizer) goes on with the ARD state the previous fit left. The pruner built for
    the new optimizer loads the previous one's state (alpha, curvature, history, counters): pruned
    weights stay 0 (alpha = +inf), the kept ones keep their priors, warmup_updates counts the
    updates already made. That fit has no dense phase from dense_ratio: the phase waits for a
    network fitted to its data before the first update reads its evidence, and this one was fitted
    under its alphas and is trained under them from its first step (a dense phase would not take
    them off, only delay the updates); its updates come every update_every epochs or steps from its
    start. `dense`, given, still delays its first update (the carried alphas apply meanwhile). A
    model whose previous fit made no update starts as a first fit does, and a fit of another
    LightningModule starts afresh. trainer.fit(ckpt_path=...) loads the checkpoint's state
    instead, and the run goes on as the one that saved it (a checkpoint without one, saved by a run
    without this callback, starts the state afresh, and says so). At the end of fit the pruner is
    detached from the module (its hooks removed); self.pruner's report(), alphas and state_dict()
    stay readable, and trainer.save_checkpoint still stores them.
    """

    def __init__(self, parameters_to_prune=None, *, layers=None, update_every: int = 1, warmup_updates: int = 1,
                 dense_ratio: float = 0.5, dense: int | None = None, update_on: str = "epoch",
                 num_data: float | None = None, batch_size: float | None = None, at_end: str | None = None,
                 verbose: int = 0, **pruner_options):
        if not isinstance(update_every, int) or isinstance(update_every, bool) or update_every < 1:
            raise ValueError(f"MacKayPruning: update_every must be an int >= 1, got {update_every!r}")
        check_warmup_updates(warmup_updates, "MacKayPruning")
        check_dense_phase(dense_ratio, dense, "dense", "MacKayPruning")
        self.warmup_updates, self.dense_ratio, self.dense = warmup_updates, dense_ratio, dense
        self._dense_until = 0   # the first epoch (completed) or step an update may come at (on_fit_start)
        self._run_length = None   # max_epochs or the optimizer steps of the fit (_plan_dense_phase)
        check_choice("update_on", update_on, ("epoch", "step"), "MacKayPruning")
        check_choice("at_end", at_end, (None, "sparsify"), "MacKayPruning")
        check_flag(verbose, "verbose", "MacKayPruning", allowed=(0, 1, 2))
        if parameters_to_prune is not None and layers is not None:
            raise ValueError("MacKayPruning: pass parameters_to_prune or layers, not both")
        if "optimizer" in pruner_options or "model" in pruner_options:
            raise TypeError("MacKayPruning: the LightningModule and its optimizer are used; do not pass them")
        check_callback_options("MacKayPruning", pruner_options, {"num_data", "batch_size", "layers"},
                               num_data=num_data, batch_size=batch_size)
        if pruner_options.get("prior") == "penalty":
            raise ValueError("MacKayPruning: prior='penalty' is not available: the callback applies the "
                             "prior itself (proximal step after each optimizer step, or MacKayAdam)")
        if parameters_to_prune is not None:
            parameters_to_prune = _pairs(parameters_to_prune)
        self.parameters_to_prune, self.layers = parameters_to_prune, layers
        self.update_every, self.update_on = update_every, update_on
        self.num_data, self.batch_size, self.at_end, self.verbose = num_data, batch_size, at_end, verbose
        self.pruner_options = pruner_options
        self.pruner: StepCurvaturePruner | None = None
        self.last_update: dict[str, Any] | None = None
        self._last_step = 0          # trainer.global_step at the latest step-based update
        self._pending: dict[str, Any] | None = None   # a checkpoint's state, loaded before its fit starts
        self._fitting = False        # from on_fit_start to the next setup: the pruner is this fit's
        self._carried = False        # this fit's pruner holds the previous fit's state (_build)
        self.clipping = ClippingWatch("MacKayPruning", "Trainer(gradient_clip_val=None)")

    # ------------------------------------------------------------------ set-up
    def setup(self, trainer, pl_module, stage: str) -> None:
        self._fitting = False   # (Lightning restores a checkpoint's callbacks after this, before on_fit_start)
        if stage == "fit" and self.pruner is not None and not self.pruner.detached:
            # a new fit builds a pruner for its own optimizer; the previous one's hooks would act
            # until then on what comes before it (a checkpoint's weights restored into the module,
            # which its load hook would call stale); its state stays readable, to be carried on
            self.pruner.detach()
        # Trainer(callbacks=[...]) refuses two of them itself, as stateful callbacks sharing a
        # state_key; these come in after it (configure_callbacks, trainer.callbacks.append), where
        # each would build a pruner on the same weights and the checkpoint would keep one's state
        count = sum(isinstance(callback, MacKayPruning) for callback in trainer.callbacks)
        if count > 1:
            twice = " (the same callback twice)" if count == 2 and sum(
                callback is self for callback in trainer.callbacks) == 2 else ""
            raise ValueError(f"MacKayPruning: one MacKayPruning per Trainer (got {count}{twice}): a pruner covers "
                             "one optimizer's weights; for a subset of layers pass parameters_to_prune= or "
                             "layers= to the one callback")

    def on_fit_start(self, trainer, pl_module) -> None:
        if len(trainer.optimizers) != 1:
            raise ValueError("MacKayPruning: the LightningModule must configure exactly one optimizer, "
                             f"got {len(trainer.optimizers)}")
        optimizer = trainer.optimizers[0]
        # fit(ckpt_path=...): the checkpoint's state, or none, replaces the previous fit's (a
        # strategy that restores after the set-up has not read the path yet: on_train_start)
        restoring = trainer.ckpt_path is not None and not trainer.strategy.restore_checkpoint_after_setup
        previous = self.pruner
        if previous is None or previous.detached or previous.model is not pl_module \
                or previous.optimizer is not optimizer:
            self._build(trainer, pl_module, optimizer, carry=not restoring)
        self._last_step = min(self._last_step, trainer.global_step)   # a new Trainer counts from step 0
        resumed = self._pending is not None
        if resumed:
            self._load(self._pending)
            self._pending = None
        elif restoring:
            self._say_no_state(trainer)
        self._fitting = True
        self._plan_dense_phase(trainer, carried=bool(self.pruner.history) and not resumed)

    def _build(self, trainer, pl_module, optimizer, carry: bool = True) -> None:
        """The pruner for this fit's optimizer; on the module of the previous fit, with that fit's
        ARD state unless `carry` is False (a fit resumed from a checkpoint: its state, or none,
        replaces it; see the class docstring, Several fits)."""
        previous = self.pruner
        carried = None
        self._carried = False
        if previous is not None:
            if carry and previous.model is pl_module and self._pending is None:
                carried = previous.state_dict()
                # the settings it was built with: a new dataloader's N is this fit's to set, not
                # a difference to warn about
                carried.pop("settings", None)
            if not previous.detached:
                previous.detach()
        loader = trainer.train_dataloader
        if loader is None:   # Lightning attaches it on the first epoch; ask the data source now
            trainer.fit_loop.setup_data()
            loader = trainer.train_dataloader
        layers = self.layers
        if self.parameters_to_prune is not None:
            layers = _layer_names(pl_module, self.parameters_to_prune)
        num_data = training_set_size(self.num_data, loader, "MacKayPruning", "the training dataloader's dataset")
        options = dict(self.pruner_options, layers=layers)
        if isinstance(optimizer, MacKayAdam):
            # its param groups' batch_size is the one used: check it, pass none (the pruner
            # warns about a value given to it that it does not use)
            self._check_mackay_adam(optimizer, self._batch_size(loader, trainer, num_data))
        else:
            options["batch_size"] = self._batch_size(loader, trainer, num_data)
        self.pruner = StepCurvaturePruner(pl_module, optimizer, num_data=num_data, **options)
        if carried is None:
            self.last_update, self._last_step = None, 0
            return
        try:
            self.pruner.load_state_dict(carried)
        except (KeyError, ValueError, TypeError) as error:
            # the weights free for another pruner, and this callback's state the one that did not
            # fit (a second try says the same, rather than carry the fresh state on)
            self.pruner.detach()
            self.pruner = previous
            raise ValueError("MacKayPruning: this LightningModule's previous fit left an ARD state that does not "
                             f"fit the pruner built for this one ({error}): its layers changed (other "
                             "parameters_to_prune or layers, a layer replaced, a new head?). Pass a new "
                             "MacKayPruning to start the ARD state afresh") from error
        self.pruner.apply_masks()
        self._carried = True

    def on_train_start(self, trainer, pl_module) -> None:
        # a strategy that restores the checkpoint after the set-up (FSDP, DeepSpeed) did so after
        # on_fit_start carried the previous fit's state: a checkpoint without state of ours
        # leaves that state on weights it did not come from
        if self._carried and trainer.ckpt_path is not None:
            self.pruner.detach()
            self._build(trainer, pl_module, trainer.optimizers[0], carry=False)
            self._plan_dense_phase(trainer)
            self._say_no_state(trainer)

    @staticmethod
    def _say_no_state(trainer) -> None:
        warnings.warn(f"MacKayPruning: the checkpoint this fit resumes from ({trainer.ckpt_path}) holds no "
                      "MacKayPruning state (saved by a run without this callback?): the ARD state starts "
                      "afresh, with this fit's dense phase, not with the previous fit's alphas and pruned weights",
                      UserWarning, stacklevel=user_stacklevel())

    def _plan_dense_phase(self, trainer, carried: bool = False) -> None:
        """Where the first update may come. A fit that goes on with the alphas of the module's
        previous fit (`carried`) has none from dense_ratio (the class docstring, Several fits)."""
        if self.update_on == "epoch":
            total, done = trainer.max_epochs, trainer.current_epoch
            total = None if total is None or total < 0 else total
        else:
            total, done = trainer.estimated_stepping_batches, trainer.global_step
        self._run_length = total   # (for a checkpoint loaded into this fit after it started: load_state_dict)
        self._dense_until = (self.dense or 0) if carried else \
            dense_length(self.dense_ratio, self.dense, total, "dense", "MacKayPruning")
        if total is not None and math.isfinite(total):
            warn_if_no_update_prunes("MacKayPruning", max(self._dense_until, done + 1), int(total), self.update_every,
                                     max(0, self.warmup_updates - len(self.pruner.history)), self.update_on)

    @staticmethod
    def _check_mackay_adam(optimizer, expected: float) -> None:
        given = mackay_adam_batch_mismatch(optimizer, expected)
        if given:
            warnings.warn(f"MacKayPruning: the MacKayAdam's batch_size is {given}, but one optimizer step "
                          f"of this Trainer reads a gradient whose curvature needs batch_size={expected:g} "
                          "(dataloader batch x accumulate_grad_batches x processes, see MacKayPruning's "
                          "batch_size)", UserWarning, stacklevel=user_stacklevel())

    def _batch_size(self, loader, trainer, num_data: float) -> float:
        """B of the ef-batch curvature (a training set smaller than the batch makes a smaller one)."""
        if self.batch_size is not None:
            return self.batch_size
        size = getattr(loader, "batch_size", None)
        if size is None:
            raise ValueError("MacKayPruning: the training dataloader has no batch_size (a batch "
                             "sampler?): pass batch_size=B")
        return min(size * trainer.accumulate_grad_batches * max(trainer.world_size, 1), num_data)

    # ------------------------------------------------------------------ training
    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        # called before Lightning clips the gradient (see mackay_ext.integrations._clipping):
        # norm clipping's factor c is taken out of the prior and the curvature (gradient_scale);
        # clipping by value changes each entry by its own factor, which is only counted and said
        limit = trainer.gradient_clip_val
        if self.pruner is None:
            return
        scale = 1.0
        if limit and limit > 0:
            grads = gradients(pl_module)
            if _clip_algorithm(trainer) == "value":
                self.clipping.before_clipping(largest_entry(grads), limit)
            else:
                norm = total_norm(grads)
                self.clipping.before_clipping(norm, limit, corrected=True)
                scale = clip_coefficient(norm, limit)
        self.pruner.gradient_scale = scale

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step   # optimizer steps: unchanged on accumulation micro-batches
        if self.update_on == "step" and step != self._last_step and step % self.update_every == 0 \
                and step >= self._dense_until:
            self._last_step = step
            self._update(trainer, pl_module, f"step {step}")
        self._log_for_monitors(pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        completed = trainer.current_epoch + 1
        if self.update_on == "epoch" and completed % self.update_every == 0 and completed >= self._dense_until:
            self._update(trainer, pl_module, f"epoch {trainer.current_epoch}")
        self._log_for_monitors(pl_module)

    def _metrics(self) -> dict[str, float]:
        """The latest update's values; before the first, every weight kept, no update, and the sum
        of gamma at alpha = 0, where each weight's gamma is 1 (docs/mathematics.md section 1)."""
        if self.pruner is None:
            return {"mackay/kept_fraction": 1.0, "mackay/updates": 0.0}
        if not self.pruner.history:
            return {"mackay/kept_fraction": 1.0, "mackay/updates": 0.0,
                    "mackay/gamma_sum": float(self.pruner.report()["total"])}
        report = self.pruner.history[-1]
        metrics = {"mackay/kept_fraction": report["kept"] / max(report["total"], 1),
                   "mackay/updates": float(len(self.pruner.history))}
        if "gamma_sum" in report:
            metrics["mackay/gamma_sum"] = float(report["gamma_sum"])
        return metrics

    def _log_for_monitors(self, pl_module) -> None:
        # at every batch and epoch end, not only at updates: ModelCheckpoint and EarlyStopping
        # raise where the metric they monitor was never logged (the dense phase has no update),
        # and a monitor with every_n_train_steps looks at batch ends
        for name, value in self._metrics().items():
            pl_module.log(name, value, logger=False)

    def _update(self, trainer, pl_module, when: str) -> None:
        self.clipping.warn_if_clipped(lambda: f"gradient_clip_val={trainer.gradient_clip_val:g}, "
                                              f"gradient_clip_algorithm={_clip_algorithm(trainer)!r}")
        self.last_update = report = self.pruner.update(prune=len(self.pruner.history) >= self.warmup_updates)
        kept = report["kept"] / max(report["total"], 1)
        # straight to the loggers: self.log from a batch hook reaches them only on steps that
        # meet log_every_n_steps, and an update every k steps may never meet one
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(self._metrics(), step=trainer.global_step)
        if self.verbose:
            rank_zero_info(f"MacKayPruning ({when}): kept {kept:.2%} ({report['kept']}/{report['total']}), "
                           f"sum of gamma {report.get('gamma_sum', float('nan')):.4g}")
        if self.verbose > 1:
            for layer in report["layers"]:
                rank_zero_info(f"  {layer['name']}: kept {layer['kept']}/{layer['total']}, "
                               f"gamma {layer.get('gamma', float('nan')):.4g}")

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.pruner is None:
            return
        if self.at_end == "sparsify":
            self.pruner.apply_masks()
        # The fit is over: the pruner's hooks come off the module, so that nothing acts on it
        # unasked (trainer.test(ckpt_path=<an earlier checkpoint>), whose weights the load hook
        # would call stale; a later fine-tune by other means). Its state stays readable, and a
        # later fit goes on with it (the class docstring, Several fits).
        if not self.pruner.detached:
            self.pruner.detach()
        if self.at_end == "sparsify":
            from ..convert import sparsify
            from ..sparse import SparseConv2d, SparseLinear
            sparsify(pl_module)
            converted = [name for name, module in pl_module.named_modules()
                         if isinstance(module, (SparseLinear, SparseConv2d))]
            if converted:
                shown = ", ".join(converted[:4]) + (", ..." if len(converted) > 4 else "")
                warnings.warn(f"MacKayPruning(at_end='sparsify'): the LightningModule now has sparse layers ({shown}), "
                              "whose state_dict holds values and indices where a new module has a weight: a "
                              "checkpoint trainer.save_checkpoint writes now does not load into one "
                              "(load_from_checkpoint: missing and unexpected keys; with strict=False those layers "
                              "keep their initial weights, with no error). Store it with mackay_ext.save_compressed"
                              "(module, path) and load it with load_compressed(path, model=YourModule()), or "
                              "mackay_ext.densify(module) before trainer.save_checkpoint", UserWarning,
                              stacklevel=user_stacklevel())

    # ------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        if self._pending is not None or self.pruner is None:
            return dict(self._pending or {})
        return {"pruner": self.pruner.state_dict(), "last_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Lightning restores callbacks before the fit starts, and so before the pruner for its
        optimizer exists: the state waits for on_fit_start (a strategy that restores after the
        set-up loads it into this fit's pruner at once)."""
        if not state_dict:
            return
        if self.pruner is None or not self._fitting:
            self._pending = dict(state_dict)
            return
        self._load(state_dict)
        self._dense_until = dense_length(self.dense_ratio, self.dense, self._run_length, "dense", "MacKayPruning")

    def _load(self, state: dict[str, Any]) -> None:
        self.pruner.load_state_dict(state["pruner"])
        self._carried = False   # (the checkpoint's state replaced what the previous fit left)
        self._last_step = int(state.get("last_step", 0))
        self.last_update = self.pruner.history[-1] if self.pruner.history else None
        self.pruner.apply_masks()   # the weights of a restored model agree with alpha = +inf
