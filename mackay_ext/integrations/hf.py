"""MacKay ARD inside transformers.Trainer.train(): a TrainerCallback.

    from mackay_ext.integrations.hf import MacKayCallback
    callback = MacKayCallback(update_every=50)
    trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=[callback])
    trainer.train()
    print(callback.pruner.report())

The Trainer's own optimizer (AdamW, or anything from `optimizers=`) gets the prior as the
pruner's exact proximal step after every optimizer step; a MacKayAdam passed through
`optimizers=(MacKayAdam(ard_param_groups(model), ...), None)` applies it in its fused step.
Pruned weights are held at exactly 0 either way.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from transformers import TrainerCallback

from .._validate import check_choice
from ..pruner import MacKayPruner

__all__ = ["MacKayCallback"]

logger = logging.getLogger(__name__)

AT_END = (None, "sparsify", "shrink")


def _inner_optimizer(optimizer):
    """accelerate wraps the optimizer (AcceleratedOptimizer.optimizer); the pruner needs the
    torch optimizer itself, whose step hooks fire once per optimizer step."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


class MacKayCallback(TrainerCallback):
    """Runs MacKayPruner inside Trainer.train().

    Args:
        num_data: N; default len(train_dataset) as the Trainer's dataloader sees it.
        update_every: optimizer steps between precision updates (on_step_end fires once per
            optimizer step, so with gradient accumulation this counts accumulated steps).
        batch_size: B of the ef-batch curvature when the optimizer is not a MacKayAdam. The
            curvature is then read from each backward's gradient. For a mean loss the Trainer
            divides each micro-batch's loss by gradient_accumulation_steps A, and the default
            per_device_train_batch_size * A^2 makes B g^2 the per-example estimate again
            (DESIGN.md section 1). A model whose forward takes **kwargs gets num_items_in_batch
            instead and must normalise itself; one that ignores it (BertForSequenceClassification
            in transformers 5: its logged loss is A times the mean) has A^2 too large a curvature
            under this default: pass batch_size=per_device_train_batch_size there.
            Under DDP these gradients are the rank's own: use MacKayAdam there (its step reads the
            averaged gradient), so that every rank computes the same alpha.
        at_end: None (default), "sparsify" (mackay_ext.sparsify(model) in place at on_train_end)
            or "shrink" (`callback.shrunk_model` = mackay_ext.shrink(model, example_inputs); the
            Trainer keeps its model).
        example_inputs: batch for at_end="shrink" (and granularity="channel").
        verbose: log every update's kept fraction and sum of gamma (logger mackay_ext.integrations.hf).
        **pruner_options: passed to MacKayPruner (layers, granularity, rule, prune, threshold,
            curvature, alpha_max, ...).

    Logs: "mackay_kept_fraction", "mackay_gamma_sum" (of the latest update) and "mackay_updates"
    are added to every Trainer log entry (state.log_history and the callbacks after this one;
    report_to integrations run before user callbacks in transformers' order: to reach them, put
    this callback first: trainer.callback_handler.callbacks.insert(0, trainer.pop_callback(callback))).
    The ARD state is not in the Trainer's checkpoints: `callback.pruner.state_dict()` has it.
    """

    def __init__(self, num_data: float | None = None, *, update_every: int = 50,
                 batch_size: float | None = None, at_end: str | None = None, example_inputs=None,
                 verbose: bool = False, **pruner_options):
        if not isinstance(update_every, int) or isinstance(update_every, bool) or update_every < 1:
            raise ValueError(f"MacKayCallback: update_every must be an int >= 1, got {update_every!r}")
        check_choice("at_end", at_end, AT_END, "MacKayCallback")
        if at_end == "shrink" and example_inputs is None:
            raise ValueError("MacKayCallback: at_end='shrink' needs example_inputs (a batch the model runs)")
        if "optimizer" in pruner_options or "model" in pruner_options:
            raise TypeError("MacKayCallback: the Trainer's model and optimizer are used; do not pass them")
        self.num_data, self.update_every, self.batch_size = num_data, update_every, batch_size
        self.at_end, self.example_inputs, self.verbose = at_end, example_inputs, bool(verbose)
        self.pruner_options = pruner_options
        self.pruner: MacKayPruner | None = None
        self.last_update: dict[str, Any] | None = None
        self.shrunk_model = None
        self._steps = 0

    # ------------------------------------------------------------------ set-up
    def _num_data(self, train_dataloader) -> float:
        if self.num_data is not None:
            return self.num_data
        try:
            return len(train_dataloader.dataset)
        except (AttributeError, TypeError):
            raise ValueError("MacKayCallback: the training set has no length (an IterableDataset?): "
                             "pass num_data=N") from None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None,
                       **kwargs):
        optimizer = _inner_optimizer(optimizer)
        if self.pruner is not None and self.pruner.model is model and self.pruner.optimizer is optimizer:
            return   # train() called again on the same Trainer: keep the ARD state
        if self.pruner is not None:
            self.pruner.detach()
        accumulation = max(int(args.gradient_accumulation_steps), 1)
        batch_size = self.batch_size
        if batch_size is None:
            batch_size = args.per_device_train_batch_size * accumulation ** 2
        options = dict(self.pruner_options)
        if self.pruner_options.get("granularity") == "channel":
            options["example_inputs"] = self.example_inputs
        self.pruner = MacKayPruner(model, optimizer, num_data=self._num_data(train_dataloader),
                                   batch_size=batch_size, **options)
        self._steps = 0
        if self.verbose:
            logger.info("MacKayCallback: prior on %d weights of %d layers (%s); left out: %s",
                        self.pruner.report()["total"], len(self.pruner.targets), self.pruner.prior,
                        [e.get("name") for e in self.pruner.excluded])

    # ------------------------------------------------------------------ training
    def on_step_end(self, args, state, control, **kwargs):
        self._steps += 1
        if self._steps % self.update_every:
            return
        self.last_update = self.pruner.update()
        if self.verbose:
            logger.info("MacKayCallback: step %d: %s", state.global_step, self._summary())

    def _summary(self) -> dict[str, float]:
        report = self.last_update if self.last_update is not None else self.pruner.report()
        summary = {"mackay_kept_fraction": report["kept"] / max(report["total"], 1),
                   "mackay_updates": float(len(self.pruner.history))}
        if "gamma_sum" in report:
            summary["mackay_gamma_sum"] = report["gamma_sum"]
        return summary

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.pruner is None or logs is None:
            return
        summary = self._summary()
        logs.update(summary)
        # Trainer.log appended a copy of `logs` to log_history before calling the callbacks
        if state.log_history and all(state.log_history[-1].get(k) == v for k, v in logs.items()
                                     if k not in summary):
            state.log_history[-1].update(summary)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.pruner is None or self.at_end is None:
            return
        self.pruner.apply_masks()
        if self.at_end == "sparsify":
            from ..convert import sparsify
            sparsify(model)
        else:
            from ..shrink import shrink
            self.shrunk_model = shrink(model, self.example_inputs)
