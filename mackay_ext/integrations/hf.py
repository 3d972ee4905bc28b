"""MacKay ARD inside transformers.Trainer.train(): a TrainerCallback.

    from mackay_ext.integrations.hf import MacKayCallback
    callback = MacKayCallback(update_every=50)
    trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=[callback])
    trainer.train()
    print(callback.pruner.report())

The Trainer's own optimizer (AdamW, or anything from `optimizers=`) gets the prior as the
pruner's exact proximal step after every optimizer step; a MacKayAdam passed through
`optimizers=(MacKayAdam(ard_param_groups(model), ...), None)` applies it in its fused step.
Pruned weights are held at exactly 0 either way. The ARD state (alpha, curvature, history) is
saved in the Trainer's checkpoints and restored from them, and a later train() of the same model
(a fine-tune stage with a new Trainer) goes on with it.
"""
from __future__ import annotations

import logging
import os
import warnings
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .._checksum import load_sealed, save_sealed
from .._validate import check_choice, user_stacklevel
from ..loss_units import loss_normalisation
from ..optim import MacKayAdam
from ._clipping import ClippingWatch, NormBeforeClipping, clip_coefficient, gradients, total_norm
from ._step_curvature import (StepCurvaturePruner, check_callback_options, check_dense_phase, check_flag,
                              check_warmup_updates, dense_length, mackay_adam_batch_mismatch, training_set_size,
                              warn_if_no_update_prunes)

__all__ = ["MacKayCallback"]

logger = logging.getLogger(__name__)

AT_END = (None, "sparsify", "shrink")
STATE_FILE = "mackay_pruner.pt"   # beside the Trainer's files in each checkpoint-<step> folder


def _inner_optimizer(optimizer):
    """accelerate wraps the optimizer (AcceleratedOptimizer.optimizer); the pruner needs the
    torch optimizer itself, whose step hooks fire once per optimizer step."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def _warn_counts_of_examples(model, num_data: float) -> None:
    """A model that divides its loss by num_items_in_batch averages over what that counts (a
    causal LM: label tokens), not over examples: N and B default to examples, and the prior is
    then too strong by the tokens per example (a GPT-2 on a next-token task kept 402 of 26,112
    weights at 0.089 next-token accuracy with the defaults, 2,944 at 1.000 with token counts)."""
    name = type(getattr(model, "module", model)).__name__
    warnings.warn(f"MacKayCallback: {name} divides its loss by num_items_in_batch (a mean over label tokens, "
                  f"as a causal LM's), but num_data defaulted to the {num_data:g} examples of the training set: "
                  "N and batch_size count what the loss averages over. Pass num_data=<label tokens in the "
                  "training set> and batch_size=<label tokens of one optimizer step>", UserWarning,
                  stacklevel=user_stacklevel())


def _tokens_per_row(num_data: float, loader) -> float | None:
    """num_data over the training set's rows where it counts more than them (label tokens, as the
    class docstring asks of a model that averages its loss over them), else None."""
    try:
        rows = len(loader.dataset)
    except (AttributeError, TypeError):
        return None
    return num_data / rows if rows and num_data > 1.5 * rows else None


def _in_tokens(model, step_rows: float, per_row: float, num_data: float) -> float:
    """B of a step in num_data's unit when only num_data was given in label tokens: the step's
    rows times the tokens a row holds on average (B left as the step's rows made h per_row times
    too small: a GPT-2 on a next-token task kept 3.1% of its weights at 0.011 accuracy, 13.7% at
    0.994 with B in tokens, and nothing said so). Said, with how to give it exactly."""
    batch = min(step_rows * per_row, num_data)
    name = type(getattr(model, "module", model)).__name__
    warnings.warn(f"MacKayCallback: {name} averages its loss over label tokens (num_items_in_batch) and num_data "
                  f"counts {per_row:.3g} a row of the training set, but batch_size was not given: B is read in the "
                  f"same unit, the step's {step_rows:g} rows x {per_row:.3g} = {batch:g} label tokens. Pass "
                  "batch_size=<label tokens of one optimizer step> where rows hold different numbers of them",
                  UserWarning, stacklevel=user_stacklevel())
    return batch


def _loss_scale(optimizer) -> float:
    """GradScaler's scale, by which the gradients the hooks measured are multiplied (accelerate's
    optimizer wrapper holds the scaler); 1 without one."""
    scaler = getattr(optimizer, "scaler", None)
    if scaler is None or not getattr(scaler, "is_enabled", lambda: False)():
        return 1.0
    return float(scaler.get_scale())


class MacKayCallback(TrainerCallback):
    """Runs MacKayPruner inside Trainer.train().

    Args:
        num_data: N; default len(train_dataset) as the Trainer's dataloader sees it. N and
            batch_size count what the loss averages over: for a token-level loss (a causal LM's
            mean over tokens) pass the number of training tokens, and the tokens of one step.
        update_every: optimizer steps between precision updates: an update at every global step
            divisible by it (on_step_end fires once per optimizer step, so with gradient
            accumulation this counts accumulated steps; a resumed run keeps the schedule).
        warmup_updates: updates that only move alpha, before the first that may prune (the very
            first never prunes, whatever this says: with alpha = 0 everywhere it sets alpha from the
            weights alone, 1 / w^2); as FitConfig's, e.g. 5
            lets alpha settle when updates come every few hundred steps.
        dense_ratio, dense_steps: the run trains without the prior until step dense_steps (default
            dense_ratio x max_steps, half the run), where the first update may come: MacKay's
            update reads the evidence of a network fitted to its data, and a network that is not
            loses at once the weights it has not yet learnt to use (a tiny BERT and a small ViT
            fell to chance with updates from the first steps, as in the paper's recipe, which
            trains to a fit first). dense_ratio=0 updates from the start, as fine-tuning from a
            model already fitted to the task may.
        batch_size: B of the ef-batch curvature when the optimizer is not a MacKayAdam; default
            the effective batch per_device_train_batch_size x gradient_accumulation_steps x
            world_size (for a model that averages its loss over label tokens, with num_data above
            the training set's rows: that times num_data / rows, the tokens a row holds on
            average, and said). The curvature h <- rho h + (1 - rho) B g^2 is read once per optimizer step
            from the gradient the optimizer used (accumulated, averaged over DDP ranks, unscaled,
            clipped; integrations._step_curvature), so every rank computes the same alpha and
            accumulation A x batch b estimates what one batch of A b does. That gradient is the
            mean over the effective batch when the Trainer divides each micro-batch's loss by A,
            or the model normalises by num_items_in_batch. A model that takes **kwargs but computes
            its own mean loss without them (transformers 5's sequence- and token-classification
            heads: its forward builds CrossEntropyLoss itself) hands the optimizer A times that
            mean: the pruner's gradient_scale then takes that A out of the curvature and the prior
            (said in an info log). Where the forward's source shows neither (a wrapper passing
            **kwargs on) a warning says what to pass if the model ignores num_items_in_batch.
            A MacKayAdam reads the same gradient in its step: give it that B (a warning says
            when its batch_size differs).
            Clipping (max_grad_norm, 1 by default) scales a step's gradient by c: on one process
            the callback measures the norm before clipping (a hook on each parameter's gradient)
            and sets the pruner's gradient_scale to c for that step, so that the prior and the
            curvature are those of the mean loss (MacKayPruner.gradient_scale); on several
            processes it warns where clipping acted.
        at_end: None (default), "sparsify" (mackay_ext.sparsify(model) in place at on_train_end;
            store that model with mackay_ext.save_compressed, not Trainer.save_model: from_pretrained
            does not know the sparse layers' tensors and re-initialises those weights, with no error)
            or "shrink" (`callback.shrunk_model` = mackay_ext.shrink(model, example_inputs); the
            Trainer keeps its model).
        example_inputs: batch for at_end="shrink", granularity="channel" and mac_price.
        resume_from: the checkpoint folder whose ARD state a resumed run loads; default the
            folder of the resumed step in args.output_dir (see Checkpoints).
        verbose: log every update's kept fraction and sum of gamma (logger mackay_ext.integrations.hf).
        **pruner_options: passed to MacKayPruner (layers, granularity, rule, prune, threshold,
            curvature, alpha_max, ...); max_prune_fraction defaults to 0.9 here (None: no limit),
            since an update inside the run has only the rest of the run's learning rate to
            recover from a cut (integrations._step_curvature).

    Logs: "mackay_kept_fraction", "mackay_gamma_sum" (of the latest update) and "mackay_updates"
    are added to every Trainer log entry (state.log_history and the callbacks after this one;
    report_to integrations run before user callbacks in transformers' order: to reach them, put
    this callback first: trainer.callback_handler.callbacks.insert(0, trainer.pop_callback(callback))).

    Checkpoints: every checkpoint the Trainer saves gets the pruner's state (alpha, curvature,
    history) as mackay_pruner.pt beside its files (written by the process that saves). When
    train(resume_from_checkpoint=...) resumes at step s, the state is loaded from
    `resume_from`, or else from <output_dir>/checkpoint-s, so that the run goes on with the alpha,
    masks and update schedule it had; without such a file it warns and starts the ARD state afresh.

    Several runs: a later train() of the same model with this callback (a fine-tune stage: a new
    Trainer, new TrainingArguments, hence a new optimizer; or train() again on the same Trainer)
    goes on with the ARD state the previous run left. The pruner built for a new optimizer loads
    the previous one's state (alpha, curvature, history, counters): pruned weights stay 0 (alpha =
    +inf), the kept ones keep their priors, warmup_updates counts the updates already made. That
    run has no dense phase from dense_ratio: the phase waits for a network fitted to its data
    before the first update reads its evidence, and this one was fitted under its alphas and is
    trained under them from its first step (a dense phase would not take them off, only delay the
    updates); its updates come at the multiples of update_every from its start. dense_steps,
    given, still delays its first update (the carried alphas apply meanwhile). A model whose
    previous run made no update starts as a first run does, a model whose layers changed since is
    refused (pass a new MacKayCallback to start afresh), and another model starts afresh.
    train(resume_from_checkpoint=...) loads the checkpoint's state instead (as under
    Checkpoints), and the run goes on as the one that saved it. At the end of train() the pruner
    is detached from the model (its hooks removed: nothing holds pruned gradients at 0 in a later
    fine-tune by other means); self.pruner's report(), alphas and state_dict() stay readable.
    """

    def __init__(self, num_data: float | None = None, *, update_every: int = 50, warmup_updates: int = 1,
                 dense_ratio: float = 0.5, dense_steps: int | None = None, batch_size: float | None = None,
                 at_end: str | None = None, example_inputs=None, resume_from: str | os.PathLike | None = None,
                 verbose: bool = False, **pruner_options):
        if not isinstance(update_every, int) or isinstance(update_every, bool) or update_every < 1:
            raise ValueError(f"MacKayCallback: update_every must be an int >= 1, got {update_every!r}")
        check_warmup_updates(warmup_updates, "MacKayCallback")
        check_dense_phase(dense_ratio, dense_steps, "dense_steps", "MacKayCallback")
        self.warmup_updates, self.dense_ratio, self.dense_steps = warmup_updates, dense_ratio, dense_steps
        self._dense_until = 0   # the first step an update may come at (on_train_begin)
        check_choice("at_end", at_end, AT_END, "MacKayCallback")
        if at_end == "shrink" and example_inputs is None:
            raise ValueError("MacKayCallback: at_end='shrink' needs example_inputs (a batch the model runs)")
        if "optimizer" in pruner_options or "model" in pruner_options:
            raise TypeError("MacKayCallback: the Trainer's model and optimizer are used; do not pass them")
        check_callback_options("MacKayCallback", pruner_options, {"num_data", "batch_size", "example_inputs"},
                               num_data=num_data, batch_size=batch_size)
        check_flag(verbose, "verbose", "MacKayCallback")
        if pruner_options.get("prior") == "penalty":
            raise ValueError("MacKayCallback: prior='penalty' needs pruner.penalty() in the loss, which "
                             "the Trainer computes: use the default proximal prior, or MacKayAdam")
        if resume_from is not None and not isinstance(resume_from, (str, os.PathLike)):
            raise TypeError("MacKayCallback: resume_from must be a checkpoint folder path, got "
                            f"{type(resume_from).__name__}")
        self.num_data, self.update_every, self.batch_size = num_data, update_every, batch_size
        self.at_end, self.example_inputs, self.verbose = at_end, example_inputs, bool(verbose)
        self.resume_from = None if resume_from is None else os.fspath(resume_from)
        self.pruner_options = pruner_options
        self.pruner: StepCurvaturePruner | None = None
        self.last_update: dict[str, Any] | None = None
        self.shrunk_model = None
        self.clipping = ClippingWatch("MacKayCallback", "TrainingArguments(max_grad_norm=0)")
        self._gradient_scale = 1.0   # of the model's loss under accumulation (on_train_begin)
        self._norm_before_clipping: NormBeforeClipping | None = None

    # ------------------------------------------------------------------ set-up
    def _batch_size(self, args, model, num_data: float) -> float:
        """B of the ef-batch curvature h = B g^2, g the gradient the optimizer steps with (a
        training set smaller than the batch makes a smaller one)."""
        if self.batch_size is not None:
            return self.batch_size
        accumulation = max(int(args.gradient_accumulation_steps), 1)
        world = max(int(args.world_size), 1)
        effective = min(args.per_device_train_batch_size * accumulation * world, num_data)
        if accumulation == 1:
            return effective
        name = type(getattr(model, "module", model)).__name__
        normalisation = loss_normalisation(model)
        if normalisation == "ignored":   # (taken out by the pruner's gradient_scale: see on_train_begin)
            logger.info("MacKayCallback: %s takes **kwargs but computes its own mean loss, so the Trainer "
                        "does not divide it over the %d accumulated micro-batches and the gradient is %d "
                        "times the batch mean; the prior and the curvature take that factor out "
                        "(gradient_scale)", name, accumulation, accumulation)
            return effective
        if normalisation == "unknown":
            logger.warning(
                "MacKayCallback: the Trainer leaves the division of the loss over %d accumulated "
                "micro-batches to %s (its forward takes **kwargs: num_items_in_batch); if it ignores "
                "num_items_in_batch, the optimizer's gradient is %d times the batch mean and the "
                "curvature %d times too large: pass batch_size=%g, or set model.accepts_loss_kwargs = "
                "False", accumulation, name, accumulation, accumulation ** 2, effective / accumulation ** 2)
        return effective

    def on_init_end(self, args, state, control, **kwargs):
        # a new Trainer: its train() builds a pruner for its own optimizer; the previous one's
        # hooks would act until then on what comes before it (a checkpoint's weights loaded into
        # the model, which its load hook would call stale); its state stays readable, to be
        # carried on (on_train_begin)
        if self.pruner is not None and not self.pruner.detached:
            self.pruner.detach()

    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None,
                       **kwargs):
        optimizer = _inner_optimizer(optimizer)
        resumed = state.global_step > 0   # the Trainer resumed from a checkpoint, whose state replaces ours
        previous = self.pruner
        if resumed or previous is None or previous.detached or previous.model is not model \
                or previous.optimizer is not optimizer:
            self._build(args, model, optimizer, train_dataloader, carry=not resumed)
        # (else train() runs again on the same Trainer: the pruner goes on as it is)
        self._norm_before_clipping = self._watch_norm(args, model)
        if self.at_end == "shrink" and self.pruner_options.get("granularity") != "channel":
            self._check_shrinkable(model)   # (granularity="channel" traced it already)
        if resumed:
            self._resume(args, state)
        # a run that goes on with the alphas of the model's previous train() has no dense phase
        # from dense_ratio (the class docstring, Several runs)
        carried = not resumed and bool(self.pruner.history)
        self._dense_until = (self.dense_steps or 0) if carried else dense_length(
            self.dense_ratio, self.dense_steps, state.max_steps, "dense_steps", "MacKayCallback")
        warn_if_no_update_prunes("MacKayCallback", max(self._dense_until, state.global_step + 1), state.max_steps,
                                 self.update_every, max(0, self.warmup_updates - len(self.pruner.history)), "step")
        if self.verbose:
            logger.info("MacKayCallback: prior on %d weights of %d layers (%s); left out: %s",
                        self.pruner.report()["total"], len(self.pruner.targets), self.pruner.prior,
                        [e.get("name") for e in self.pruner.excluded])

    def _build(self, args, model, optimizer, train_dataloader, carry: bool) -> None:
        """The pruner for this run's optimizer; on the model of the previous train(), with that
        run's ARD state unless `carry` is False (a resumed run: the checkpoint's state replaces
        it). See the class docstring, Several runs."""
        previous = self.pruner
        carried = None
        if previous is not None:
            if carry and previous.model is model:
                carried = previous.state_dict()
                # the settings it was built with: this run's N and B are its own to set, not a
                # difference to warn about
                carried.pop("settings", None)
            if not previous.detached:
                previous.detach()
        options = dict(self.pruner_options)
        if self.pruner_options.get("granularity") == "channel" or self.pruner_options.get("mac_price"):
            options["example_inputs"] = self.example_inputs
        num_data = training_set_size(self.num_data, train_dataloader, "MacKayCallback", "the training set")
        per_row = None   # label tokens a row on average, where num_data counts tokens and B was not given
        if loss_normalisation(model) == "model":
            if self.num_data is None:
                _warn_counts_of_examples(model, num_data)
            elif self.batch_size is None:
                per_row = _tokens_per_row(num_data, train_dataloader)
        batch_size = self._batch_size(args, model, num_data)
        if per_row is not None:
            batch_size = _in_tokens(model, batch_size, per_row, num_data)
        if isinstance(optimizer, MacKayAdam):
            # its param groups' batch_size is the one used: check it, pass none (the pruner
            # warns about a value given to it that it does not use)
            self._check_mackay_adam(optimizer, batch_size)
        else:
            options["batch_size"] = batch_size
        pruner = StepCurvaturePruner(model, optimizer, num_data=num_data, **options)
        if carried is not None:
            try:
                pruner.load_state_dict(carried)
            except (KeyError, ValueError, TypeError) as error:
                # the weights free for another pruner, and this callback's state the one that did
                # not fit (a second try says the same, rather than carry the fresh state on)
                pruner.detach()
                raise ValueError("MacKayCallback: this model's previous train() left an ARD state that does not "
                                 f"fit the pruner built for this one ({error}): its layers changed (other layers "
                                 "or granularity, a layer replaced, a new head?). Pass a new MacKayCallback to "
                                 "start the ARD state afresh") from error
            pruner.apply_masks()
        self.pruner = pruner
        self.last_update = pruner.history[-1] if pruner.history else None
        accumulation = max(int(args.gradient_accumulation_steps), 1)
        # the optimizer's gradient over the batch mean's: A where the model's loss ignores the
        # accumulation (see _batch_size); times each step's clipping factor (on_pre_optimizer_step)
        self._gradient_scale = float(accumulation) if accumulation > 1 and \
            loss_normalisation(model) == "ignored" else 1.0
        pruner.gradient_scale = self._gradient_scale
        if pruner.curvature_kind == "ef-exact":   # its backward passes hold undivided micro-batch means
            pruner._micro_batches.divided = self._gradient_scale == 1.0

    def _check_shrinkable(self, model) -> None:
        """at_end="shrink" traces the model on example_inputs at the end of training: tried here
        first, so that inputs that do not run the model, or a model torch.export cannot trace,
        are said before the run rather than after it."""
        from ..coupling import CouplingError
        from ..coupling.trace import trace_coupling
        try:
            trace_coupling(model, self.example_inputs)
        except (CouplingError, TypeError) as error:
            raise ValueError(f"MacKayCallback(at_end='shrink'): shrink traces the model on example_inputs at the "
                             f"end of training, and that fails now: {error}") from error

    def _watch_norm(self, args, model) -> NormBeforeClipping | None:
        """Hooks that measure the gradient's norm before the Trainer clips it, where it clips and
        runs on one process (see integrations._clipping); else None."""
        if self._norm_before_clipping is not None:
            self._norm_before_clipping.remove()
        if not (args.max_grad_norm and args.max_grad_norm > 0) or max(int(args.world_size), 1) > 1:
            return None
        return NormBeforeClipping(model)

    @staticmethod
    def _check_mackay_adam(optimizer, expected: float) -> None:
        given = mackay_adam_batch_mismatch(optimizer, expected)
        if given:
            # (a warning, not a log line: -W error and catch_warnings see it)
            warnings.warn(f"MacKayCallback: the MacKayAdam's batch_size is {given}, but one optimizer step of this "
                          f"Trainer reads a gradient whose curvature needs batch_size={expected:g} (per-device batch "
                          "x accumulation x processes, see MacKayCallback's batch_size)", UserWarning,
                          stacklevel=user_stacklevel())

    # ------------------------------------------------------------- checkpoints
    def on_save(self, args, state, control, **kwargs):
        if self.pruner is None or not args.should_save:
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if not os.path.isdir(folder):   # a hyperparameter search saves under run-<id>/
            logger.warning("MacKayCallback: no checkpoint folder %s: the ARD state of step %d is not "
                           "saved", folder, state.global_step)
            return
        save_sealed({"pruner": self.pruner.state_dict(), "global_step": state.global_step},
                    os.path.join(folder, STATE_FILE))

    def _resume(self, args, state) -> None:
        folder = self.resume_from or os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        path = os.path.join(folder, STATE_FILE)
        if not os.path.exists(path):
            if self.resume_from is not None:
                raise FileNotFoundError(f"MacKayCallback: resume_from={self.resume_from!r} has no {STATE_FILE} "
                                        "(a checkpoint saved without this callback?)")
            logger.warning("MacKayCallback: the Trainer resumed at step %d but %s does not exist: the "
                           "ARD state starts afresh (a checkpoint from elsewhere: pass resume_from=<its "
                           "folder>)", state.global_step, path)
            return
        saved = load_sealed(path, "MacKayCallback state")
        if not isinstance(saved, dict) or not isinstance(saved.get("pruner"), dict):
            raise ValueError(f"MacKayCallback: {path} is not a state this callback wrote (a dict with the "
                             "pruner's state and the step)")
        if saved.get("global_step") != state.global_step:
            raise ValueError(f"MacKayCallback: {path} holds the ARD state of step {saved.get('global_step')}, "
                             f"but the Trainer resumed at step {state.global_step}")
        self.pruner.load_state_dict(saved["pruner"])
        self.pruner.apply_masks()   # the loaded weights agree with alpha = +inf
        self.last_update = self.pruner.history[-1] if self.pruner.history else None

    # ------------------------------------------------------------------ training
    def on_step_begin(self, args, state, control, **kwargs):
        if self._norm_before_clipping is not None:   # (at the first micro-batch of the step)
            self._norm_before_clipping.reset()

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        # called after the Trainer clipped the gradient (see mackay_ext.integrations._clipping)
        if self.pruner is None:
            return
        scale = self._gradient_scale
        limit = args.max_grad_norm
        if self._norm_before_clipping is not None:
            norm = self._norm_before_clipping.norm(_loss_scale(optimizer))
            self.clipping.before_clipping(norm, limit, corrected=True)
            scale *= clip_coefficient(norm, limit)
        elif limit and limit > 0 and model is not None:
            self.clipping.after_clipping(total_norm(gradients(model)), limit)
        self.pruner.gradient_scale = scale

    def on_step_end(self, args, state, control, **kwargs):
        if self.pruner is None or state.global_step % self.update_every or state.global_step < self._dense_until:
            return
        self.clipping.warn_if_clipped(lambda: f"max_grad_norm={args.max_grad_norm:g}")
        self.last_update = self.pruner.update(prune=len(self.pruner.history) >= self.warmup_updates)
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
        if self._norm_before_clipping is not None:
            self._norm_before_clipping.remove()
            self._norm_before_clipping = None
        if self.pruner is None:
            return
        if self.at_end is not None:
            self.pruner.apply_masks()
        self._release()
        if self.at_end is None:
            return
        if self.at_end == "sparsify":
            from ..convert import sparsify
            from ..sparse import SparseConv2d, SparseLinear
            sparsify(model)   # (it says what it left dense, and why)
            if not any(isinstance(module, (SparseLinear, SparseConv2d)) for module in model.modules()):
                return   # nothing converted (a GPT-2: Conv1D has no sparse form): save_model is as usual
            warnings.warn("MacKayCallback(at_end='sparsify'): the Trainer's model now has sparse layers, whose "
                          "tensors from_pretrained does not know: after Trainer.save_model it would re-initialise "
                          "those weights at random, with no error. Store it with mackay_ext.save_compressed("
                          "trainer.model, path) and load it with load_compressed(path, model=<a new model>), or "
                          "mackay_ext.densify(trainer.model) before save_model", UserWarning,
                          stacklevel=user_stacklevel())
        else:
            from ..shrink import shrink
            self.shrunk_model = shrink(model, self.example_inputs)

    def _release(self) -> None:
        # The run is over: the pruner's hooks come off the model, so that nothing acts on it
        # unasked (a later fine-tune by other means, a checkpoint a later train() on this Trainer
        # loads before any callback runs, which its load hook would call stale). Its state stays
        # readable, and a later train() goes on with it (the class docstring, Several runs).
        if not self.pruner.detached:
            self.pruner.detach()
