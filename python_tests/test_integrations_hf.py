"""mackay_ext.integrations.hf: MacKayCallback inside transformers.Trainer (tiny random BERT)."""
import logging
import math
import re
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")   # Trainer needs it

from mackay_ext import MacKayAdam
from mackay_ext.integrations.hf import MacKayCallback
from mackay_ext.optim import ard_param_groups

NUM_DATA = 48


def _model(**config):
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=37,
                                     max_position_embeddings=16, num_labels=3, **config)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config)


def _dataset():
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 50, (NUM_DATA, 9), generator=generator)
    labels = tokens[:, 0] % 3   # learnable from the first token
    return [{"input_ids": t, "attention_mask": torch.ones_like(t), "labels": y}
            for t, y in zip(tokens, labels)]


def _train(tmp_path, callback, optimizers=(None, None), model=None, resume=None, callbacks=(), **options):
    options = {"max_steps": 20, "per_device_train_batch_size": 8, "save_strategy": "no", "logging_steps": 5,
               **options}
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, learning_rate=3e-3,
        disable_tqdm=True, seed=0, **options)
    model = _model() if model is None else model
    if optimizers[0] == "mackay":   # B: the effective batch of one optimizer step
        batch = options["per_device_train_batch_size"] * options.get("gradient_accumulation_steps", 1)
        optimizers = (MacKayAdam(ard_param_groups(model), lr=3e-3, num_data=NUM_DATA, batch_size=batch), None)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_dataset(),
                                   callbacks=[callback, *callbacks], optimizers=optimizers)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def _check_pruned_and_logged(trainer, callback, updates):
    pruner = callback.pruner
    assert pruner.model is trainer.model and len(pruner.history) == updates
    report = pruner.report()
    assert 0 < report["kept"] < report["total"]   # pruning happened
    for name, target in pruner.targets.items():
        pruned = (pruner.alpha(name) == math.inf).expand_as(target.param)
        assert torch.equal(target.param[pruned], torch.zeros_like(target.param[pruned]))
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]   # every 5 steps
    assert len(logged) == 4 and {"mackay_kept_fraction", "mackay_gamma_sum", "mackay_updates"} <= set(logged[-1])
    assert "mackay_kept_fraction" in trainer.state.log_history[-1]   # the run's summary too
    assert logged[-1]["mackay_kept_fraction"] == pytest.approx(report["kept"] / report["total"])
    assert logged[0]["mackay_kept_fraction"] == 1.0 > logged[-1]["mackay_kept_fraction"]
    return logged


# updates from the start (dense_ratio=0): these runs are short; alpha >= 1e5: |w| below ~3e-3
PRUNING = {"update_every": 5, "prune": "alpha", "threshold": 1e5, "dense_ratio": 0}


def test_trainer_prunes_and_logs(tmp_path, caplog):
    callback = MacKayCallback(verbose=True, **PRUNING)
    with caplog.at_level(logging.INFO, logger="mackay_ext.integrations.hf"):
        trainer = _train(tmp_path, callback)
    assert callback.pruner.prior == "proximal" and callback.pruner.num_data == NUM_DATA
    assert callback.pruner.batch_size == 8
    logged = _check_pruned_and_logged(trainer, callback, updates=4)
    assert "MacKayCallback: step 20:" in caplog.text
    print("\n".join(str(entry) for entry in logged))


def test_warmup_updates_only_move_alpha(tmp_path):
    """As FitConfig's warmup_updates: the first updates set alpha and prune nothing."""
    callback = MacKayCallback(warmup_updates=3, **PRUNING)
    _train(tmp_path, callback)
    history = callback.pruner.history
    assert len(history) == 4 and all(h["kept"] == h["total"] for h in history[:3])
    assert history[3]["kept"] < history[3]["total"]
    with pytest.raises(ValueError, match=r"MacKayCallback: warmup_updates must be an int >= 0, got 1.5"):
        MacKayCallback(warmup_updates=1.5)


@pytest.mark.parametrize("given, fraction", [({}, 0.9), ({"max_prune_fraction": 0.5}, 0.5),
                                              ({"max_prune_fraction": None}, None)])
def test_one_update_prunes_at_most_the_callbacks_share_of_a_layer(tmp_path, recwarn, given, fraction):
    """The callbacks' updates come inside the run, with only its remaining learning rate to recover
    from a cut: by default one prunes at most 90% of a layer's live weights (None: no limit)."""
    # alpha >= 1e-30: every weight fails the criterion at the first update that prunes (the second)
    callback = MacKayCallback(update_every=5, prune="alpha", threshold=1e-30, dense_ratio=0, **given)
    _train(tmp_path, callback, max_steps=10)
    assert callback.pruner.max_prune_fraction == fraction and len(callback.pruner.history) == 2
    for layer in callback.pruner.history[-1]["layers"]:
        total = layer["total"]
        least = 1 if fraction is None else total - math.floor(fraction * total)   # (an emptied layer keeps one)
        # the encoder's layers read every input: their whole layer fails the criterion (the
        # embeddings' rows of tokens and positions the data never shows get alpha = 0 and stay)
        assert layer["kept"] == least if ".encoder." in layer["name"] else layer["kept"] >= least, layer["name"]


class _UpdateSteps(transformers.TrainerCallback):
    """The global steps at which the MacKayCallback (before it in the list) ran an update."""
    def __init__(self, callback):
        self.callback, self.steps, self._seen = callback, [], 0

    def on_step_end(self, args, state, control, **kwargs):
        if len(self.callback.pruner.history) > self._seen:
            self._seen = len(self.callback.pruner.history)
            self.steps.append(state.global_step)


@pytest.mark.parametrize("options, steps", [({}, [10, 15, 20]), ({"dense_ratio": 0.3}, [10, 15, 20]),
                                            ({"dense_steps": 12}, [15, 20]), ({"dense_ratio": 0}, [5, 10, 15, 20])])
def test_the_run_trains_densely_before_the_first_update(tmp_path, options, steps):
    """By default the first half of the run has no prior (MacKay's update reads the evidence of a
    fitted network; from the first steps a tiny BERT fell to chance): updates from step
    dense_steps, default dense_ratio x max_steps, at the multiples of update_every."""
    callback = MacKayCallback(update_every=5, prune="alpha", threshold=1e5, **options)
    probe = _UpdateSteps(callback)
    _train(tmp_path, callback, callbacks=[probe])
    assert probe.steps == steps
    assert callback.pruner.history[0]["kept"] == callback.pruner.history[0]["total"]   # (the warm-up update)


def test_a_run_whose_updates_would_prune_nothing_is_told(tmp_path, recwarn):
    callback = MacKayCallback(update_every=5, dense_steps=20, prune="alpha", threshold=1e5)
    _train(tmp_path, callback)
    said = [str(w.message) for w in recwarn if "nothing will be pruned" in str(w.message)]
    assert len(said) == 1 and "1 precision update(s) left (steps 20 to 20, every 5)" in said[0]
    assert len(callback.pruner.history) == 1


@pytest.mark.parametrize("options, message", [
    ({"dense_ratio": 1.0}, "dense_ratio must be a number in [0, 1)"),
    ({"dense_ratio": -0.1}, "dense_ratio must be a number in [0, 1)"),
    ({"dense_ratio": True}, "dense_ratio must be a number in [0, 1)"),
    ({"dense_ratio": "half"}, "dense_ratio must be a number in [0, 1)"),
    ({"dense_steps": -1}, "dense_steps must be an int >= 0 or None, got -1"),
    ({"dense_steps": 2.5}, "dense_steps must be an int >= 0 or None, got 2.5")])
def test_a_bad_dense_phase_is_named(options, message):
    with pytest.raises(ValueError, match=re.escape(f"MacKayCallback: {message}")):
        MacKayCallback(**options)


def test_trainer_with_mackay_adam(tmp_path):
    callback = MacKayCallback(**PRUNING)
    trainer = _train(tmp_path, callback, optimizers=("mackay", None))
    assert callback.pruner.fused
    _check_pruned_and_logged(trainer, callback, updates=4)


def test_gradient_accumulation_and_bf16(tmp_path, caplog):
    callback = MacKayCallback(**PRUNING)
    try:
        with caplog.at_level(logging.INFO, logger="mackay_ext.integrations.hf"):
            trainer = _train(tmp_path, callback, gradient_accumulation_steps=2, bf16=True)
    except (ValueError, RuntimeError) as error:   # a CPU/transformers pair without bf16
        if "bf16" not in str(error).lower() and "bfloat16" not in str(error).lower():
            raise
        pytest.skip(f"bf16 refused here: {error}")
    # BERT takes **kwargs, so the Trainer leaves the division by the 2 micro-batches to it, and
    # its classification head computes its own mean: the gradient is twice the batch mean, and
    # gradient_scale 2 makes h = B (g / 2)^2 the estimate of one batch of B = 16 (times the
    # clipping factor of the last step: max_grad_norm is 1 by default)
    assert callback.pruner.batch_size == 8 * 2
    assert callback._gradient_scale == 2.0
    assert "the gradient is 2 times the batch mean; the prior and the curvature take that factor out" in caplog.text
    # on_step_end fires per optimizer step: 20 steps of 2 micro-batches, one update every 5
    assert trainer.state.global_step == 20
    logged = _check_pruned_and_logged(trainer, callback, updates=4)
    print("\n".join(str(entry) for entry in logged))


def test_at_end_sparsify(tmp_path):
    from mackay_ext.sparse import SparseLinear
    # a prior on the classifier only, with a threshold that leaves it mostly pruned
    callback = MacKayCallback(at_end="sparsify", layers=["classifier"], update_every=5, dense_ratio=0, prune="alpha",
                              threshold=1e3)
    # the sparse model is not what Trainer.save_model / from_pretrained can carry: said at the end
    with pytest.warns(UserWarning, match=r"at_end='sparsify'.*from_pretrained does not know.*save_compressed"):
        trainer = _train(tmp_path, callback)
    report = callback.pruner.report()
    assert report["kept"] <= report["total"] // 2
    classifier = trainer.model.classifier
    assert isinstance(classifier, SparseLinear)
    assert classifier.nnz == report["kept"]
    # the pruner still holds the dense Parameter the Trainer trained: same weights, now sparse
    assert torch.equal(classifier.dense_weight(), callback.pruner.weight("classifier").detach())


def test_at_end_sparsify_that_converts_nothing_says_no_more(tmp_path):
    """A model sparsify leaves dense (here: the prior on no layer it converts) was told that it
    now had sparse layers that save_model would lose."""
    callback = MacKayCallback(at_end="sparsify", layers=["bert.embeddings.word_embeddings"], update_every=5,
                              dense_ratio=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = _train(tmp_path, callback)
    assert not any("now has sparse layers" in str(w.message) for w in caught)
    assert not any(type(m).__name__.startswith("Sparse") for m in trainer.model.modules())


def test_at_end_shrink(tmp_path):
    """callback.shrunk_model: the dense model without the pruned rows and columns, computing what
    the Trainer's pruned model computes (the Trainer keeps its model)."""
    example = {"input_ids": torch.randint(0, 50, (4, 9), generator=torch.Generator().manual_seed(2))}
    callback = MacKayCallback(at_end="shrink", example_inputs=example, granularity="output", update_every=5,
                              dense_ratio=0, prune="alpha", threshold=1e3)
    trainer = _train(tmp_path, callback)
    model, small = trainer.model.eval(), callback.shrunk_model.eval()
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(small(**example).logits, model(**example).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("example_inputs, message", [
    ({"input_ids": torch.zeros(2, 9)}, "example_inputs do not run the model"),   # float ids
    ("input_ids", "example_inputs must be a tensor, a tuple of positional inputs or a dict")])
def test_at_end_shrink_inputs_that_cannot_serve_are_said_before_training(tmp_path, example_inputs, message):
    """They were tried only at the end of the run, losing it to a traceback there."""
    callback = MacKayCallback(at_end="shrink", example_inputs=example_inputs, **PRUNING)
    probe = _UpdateSteps(callback)
    with pytest.raises(ValueError, match=rf"MacKayCallback\(at_end='shrink'\): shrink traces the model on "
                                         rf"example_inputs .* fails now: {message}"):
        _train(tmp_path, callback, callbacks=[probe])
    assert probe.steps == []


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"update_every must be an int >= 1, got 0"):
        MacKayCallback(update_every=0)
    with pytest.raises(ValueError, match=r"at_end must be one of \(None, 'sparsify', 'shrink'\), got 'prune'"):
        MacKayCallback(at_end="prune")
    with pytest.raises(ValueError, match="at_end='shrink' needs example_inputs"):
        MacKayCallback(at_end="shrink")
    with pytest.raises(TypeError, match="do not pass them"):
        MacKayCallback(optimizer=None)
    with pytest.raises(ValueError, match=r"prior='penalty' needs pruner.penalty\(\) in the loss"):
        MacKayCallback(prior="penalty")
    with pytest.raises(TypeError, match="resume_from must be a checkpoint folder path, got int"):
        MacKayCallback(resume_from=10)
    # pruner options are checked when the callback is built, not inside train()
    with pytest.raises(TypeError, match=r"MacKayCallback: unknown option 'granularty' \(did you mean 'granularity'\?\)"):
        MacKayCallback(granularty="output")
    with pytest.raises(TypeError, match=r"MacKayCallback: verbose must be one of \(False, True\), got 'yes'"):
        MacKayCallback(verbose="yes")
    with pytest.raises(ValueError, match="MacKayCallback: num_data must be"):
        MacKayCallback(num_data=0)
    # ... and their values that need no model (they failed inside train(), naming MacKayPruner)
    for options, error, message in [
            (dict(rule="bogus"), ValueError, r"MacKayCallback: rule must be one of"),
            (dict(threshold=-1.0), ValueError, r"MacKayCallback: threshold must be finite and >= 0"),
            (dict(granularity="rows"), ValueError, r"MacKayCallback: granularity must be one of"),
            (dict(granularity={"classifier": "channel"}), ValueError, r"couples layers across the whole model"),
            (dict(max_prune_fraction=2.0), ValueError, r"MacKayCallback: max_prune_fraction must be in \(0, 1\]"),
            (dict(curvature_every=0), ValueError, r"MacKayCallback: curvature_every must be an int >= 1"),
            (dict(mac_price=-1.0), ValueError, r"MacKayCallback: mac_price must be a finite number >= 0"),
            (dict(channel_prior="norm-scale"), ValueError, r"channel_prior='norm-scale' .* needs granularity='channel'"),
            (dict(allow_empty_layers="no"), TypeError, r"MacKayCallback: allow_empty_layers must be True or False")]:
        with pytest.raises(error, match=message):
            MacKayCallback(**options)


def test_a_threshold_on_the_other_criterions_scale_is_said_once(tmp_path):
    """The callback checks the pruner's options when built and builds its pruner when training
    starts: the note on a threshold's scale came from each."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        callback = MacKayCallback(num_data=NUM_DATA, update_every=5, prune="alpha", threshold=0.5, dense_ratio=0)
        _train(tmp_path, callback, max_steps=5)
    said = [w for w in caught if "with prune='alpha' prunes every weight" in str(w.message)]
    assert len(said) == 1


def test_mac_price_gets_its_example_inputs(tmp_path):
    example = {"input_ids": torch.zeros(2, 9, dtype=torch.long), "attention_mask": torch.ones(2, 9, dtype=torch.long)}
    callback = MacKayCallback(mac_price=1e-3, example_inputs=example, **PRUNING)
    _train(tmp_path, callback, max_steps=10)
    assert callback.pruner.mac_price == 1e-3 and len(callback.pruner.history) == 2


def test_mackay_adam_gets_no_batch_size_it_would_not_use(tmp_path, recwarn):
    callback = MacKayCallback(**PRUNING)
    _train(tmp_path, callback, optimizers=("mackay", None), max_steps=5)
    assert not [w for w in recwarn if "are MacKayAdam's" in str(w.message)]


# ---------------------------------------------------------------- checkpoints
class _StopAt(transformers.TrainerCallback):
    """Ends train() after `step` optimizer steps, as an interrupted job would (the lr schedule
    still spans max_steps, so the resumed run can match the uninterrupted one)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def _ard_state(pruner):
    return ({name: pruner.alpha(name).clone() for name in pruner.targets},
            {name: pruner.curvature(name).clone() for name in pruner.targets})


@pytest.mark.parametrize("optimizer", ["adamw", "mackay"])
def test_resumed_run_continues_as_the_uninterrupted_one(tmp_path, optimizer):
    optimizers = ("mackay", None) if optimizer == "mackay" else (None, None)
    saving = {"save_strategy": "steps", "save_steps": 10}
    whole = MacKayCallback(**PRUNING)
    uninterrupted = _train(tmp_path / "whole", whole, optimizers, **saving)

    first = MacKayCallback(**PRUNING)
    _train(tmp_path / "parts", first, optimizers, callbacks=[_StopAt(10)], **saving)
    checkpoint = tmp_path / "parts" / "checkpoint-10"
    assert (checkpoint / "mackay_pruner.pt").is_file()
    assert len(first.pruner.history) == 2 and first.pruner.report()["kept"] < first.pruner.report()["total"]
    saved_alpha, saved_curvature = _ard_state(first.pruner)

    loaded = {}

    class _Probe(transformers.TrainerCallback):   # runs after MacKayCallback.on_train_begin
        def on_train_begin(self, args, state, control, **kwargs):
            loaded["state"] = _ard_state(resumed.pruner)

    resumed = MacKayCallback(**PRUNING)
    trainer = _train(tmp_path / "parts", resumed, optimizers, model=_model(initializer_range=0.5),
                     resume=str(checkpoint), callbacks=[_Probe()], **saving)
    # at the resume: the state saved at step 10, not a fresh prior
    for name in saved_alpha:
        assert torch.equal(loaded["state"][0][name], saved_alpha[name])
        assert torch.equal(loaded["state"][1][name], saved_curvature[name])
    # at the end: updates at steps 15 and 20 as in the uninterrupted run, same alpha and masks
    assert trainer.state.global_step == 20
    assert len(resumed.pruner.history) == len(whole.pruner.history) == 4
    assert resumed.pruner.report()["kept"] == whole.pruner.report()["kept"] < whole.pruner.report()["total"]
    for name in whole.pruner.targets:
        ours, theirs = resumed.pruner.alpha(name), whole.pruner.alpha(name)
        assert torch.equal(ours == math.inf, theirs == math.inf), name
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=0)
    for ours, theirs in zip(trainer.model.parameters(), uninterrupted.model.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)
    # the Trainer's logs (the resumed run's history starts with the checkpoint's) agree too
    def logged(run):
        return [(e["mackay_updates"], e["mackay_kept_fraction"]) for e in run.state.log_history if "loss" in e]
    assert logged(trainer) == logged(uninterrupted)
    assert [updates for updates, _ in logged(trainer)] == [1.0, 2.0, 3.0, 4.0]


def test_resume_without_saved_state(tmp_path, caplog):
    _train(tmp_path / "dense", transformers.TrainerCallback(), max_steps=10, save_strategy="steps", save_steps=10)
    checkpoint = str(tmp_path / "dense" / "checkpoint-10")
    with caplog.at_level(logging.WARNING, logger="mackay_ext.integrations.hf"):   # a dense checkpoint
        callback = MacKayCallback(**PRUNING)
        _train(tmp_path / "dense", callback, resume=checkpoint)
    assert "mackay_pruner.pt does not exist: the ARD state starts afresh" in caplog.text
    assert len(callback.pruner.history) == 2   # steps 15 and 20
    with pytest.raises(FileNotFoundError, match=r"resume_from=.*checkpoint-10' has no mackay_pruner.pt"):
        _train(tmp_path / "dense", MacKayCallback(resume_from=checkpoint, **PRUNING), resume=checkpoint)


# ---------------------------------------------------------------- several runs
def _pruned(pruner):
    """Per layer, where alpha is +inf (the weight's shape)."""
    return {name: (pruner.alpha(name) == math.inf).expand_as(target.param).clone()
            for name, target in pruner.targets.items()}


def _check_went_on(first, second, pruned, kept_before):
    """`second` holds `first`'s history and masks: no pruned weight grew back."""
    assert [h["kept"] for h in second.history[:len(kept_before)]] == kept_before
    for name, target in second.targets.items():
        assert bool((second.alpha(name) == math.inf).expand_as(target.param)[pruned[name]].all()), name
        assert not bool(target.param[pruned[name]].any()), name
    assert second.report()["kept"] <= first.report()["kept"]


@pytest.mark.parametrize("optimizer", ["adamw", "mackay"])
@pytest.mark.parametrize("options, steps", [
    ({}, [5, 10, 15, 20]),   # no dense phase from dense_ratio: the model was fitted under its alphas
    ({"dense_steps": 8}, [10, 15, 20]),   # a given dense length still delays the first update
])
def test_a_second_trainer_on_the_same_model_goes_on_with_its_ard_state(tmp_path, recwarn, optimizer, options, steps):
    """A fine-tune stage (a new Trainer with new TrainingArguments, so a new optimizer) on the same
    model with the same callback: the pruner built for the new optimizer loads the previous one's
    state, so the pruned weights stay at 0 with alpha +inf, the history goes on, and the updates
    come from the run's start (they started afresh: alpha 0, an empty history, a dense phase, and
    the pruned weights grew back with no word)."""
    optimizers = ("mackay", None) if optimizer == "mackay" else (None, None)
    callback = MacKayCallback(update_every=5, prune="alpha", threshold=1e5, **options)
    first_trainer = _train(tmp_path / "first", callback, optimizers)   # updates at steps 10, 15, 20
    first, pruned = callback.pruner, _pruned(callback.pruner)
    kept_before = [h["kept"] for h in first.history]
    assert kept_before[-1] < kept_before[0]

    probe = _UpdateSteps(callback)
    probe._seen = len(kept_before)
    trainer = _train(tmp_path / "second", callback, optimizers, model=first_trainer.model, callbacks=[probe],
                     lr_scheduler_type="constant", per_device_train_batch_size=4)
    second = callback.pruner
    assert second is not first and second.model is first.model
    assert second.optimizer is not first.optimizer and second.fused == (optimizer == "mackay")
    _check_went_on(first, second, pruned, kept_before)
    assert probe.steps == steps
    assert len(second.history) == len(kept_before) + len(steps)
    logged = [e["mackay_updates"] for e in trainer.state.log_history if "loss" in e]   # every 5 steps
    assert logged == [float(len(kept_before) + sum(s <= step for s in steps)) for step in (5, 10, 15, 20)]
    assert not [w for w in recwarn if "settings" in str(w.message)]   # (N and B are this run's own)

    # the callback on another model: a fresh pruner, with its dense phase
    other = _train(tmp_path / "other", callback, optimizers, model=_model(initializer_range=0.5))
    history = callback.pruner.history
    assert callback.pruner.model is other.model and len(history) == 3
    assert history[0]["kept"] == history[0]["total"]   # a first update, which never prunes


def test_train_again_on_the_same_trainer_has_no_dense_phase(tmp_path):
    """trainer.train() again: the pruner the first run's end detached is followed by one that goes
    on with its state, and, as a new Trainer's run, without a dense phase (it planned one again,
    leaving half the run without updates)."""
    callback = MacKayCallback(update_every=5, prune="alpha", threshold=1e5)
    probe = _UpdateSteps(callback)
    trainer = _train(tmp_path, callback, callbacks=[probe])
    assert probe.steps == [10, 15, 20]
    first, pruned = callback.pruner, _pruned(callback.pruner)
    kept_before = [h["kept"] for h in first.history]
    probe.steps = []
    trainer.train()
    assert first.detached and probe.steps == [5, 10, 15, 20]
    assert len(callback.pruner.history) == len(kept_before) + 4
    _check_went_on(first, callback.pruner, pruned, kept_before)


def test_a_later_train_whose_layers_changed_says_so(tmp_path):
    """A fine-tune stage with a new head of another shape: the previous run's ARD state does not
    fit the new pruner, and the run is refused with what to do, not started afresh unsaid."""
    callback = MacKayCallback(**PRUNING)
    model = _train(tmp_path, callback, max_steps=10).model
    model.classifier = torch.nn.Linear(32, 4)
    model.num_labels = model.config.num_labels = 4
    with pytest.raises(ValueError, match=r"MacKayCallback: this model's previous train\(\) left an ARD state that "
                                         r"does not fit the pruner built for this one \(.*classifier.*\): its layers "
                                         r"changed .* Pass a new MacKayCallback to start the ARD state afresh"):
        _train(tmp_path, callback, model=model, max_steps=10)
    with pytest.raises(ValueError, match="does not fit the pruner built for this one"):   # (again: not afresh)
        _train(tmp_path, callback, model=model, max_steps=10)
    fresh = MacKayCallback(**PRUNING)
    _train(tmp_path, fresh, model=model, max_steps=10)   # (the refused pruner holds no weight)
    assert len(fresh.pruner.history) == 2


@pytest.mark.parametrize("trainer_of_resume", ["new", "first"])
def test_a_checkpoint_given_to_a_later_train_replaces_the_carried_state(tmp_path, recwarn, trainer_of_resume):
    """train(resume_from_checkpoint=...) with a callback that holds the pruner of an earlier run of
    the same model: the checkpoint's state is the one the run goes on with, as a resumed run (on
    a new Trainer, or on the one that saved it)."""
    saving = {"save_strategy": "steps", "save_steps": 10}
    callback = MacKayCallback(**PRUNING)
    first = _train(tmp_path / "first", callback, **saving)   # updates at steps 5, 10, 15, 20
    _train(tmp_path / "second", callback, model=first.model)   # a fine-tune stage: 4 more updates
    assert len(callback.pruner.history) == 8

    checkpoint = str(tmp_path / "first" / "checkpoint-10")
    # the run's end took the pruner's hooks off the model; its state stays readable
    assert callback.pruner.detached and callback.pruner.report()["kept"] < callback.pruner.report()["total"]
    if trainer_of_resume == "new":
        trainer = _train(tmp_path / "first", callback, model=first.model, resume=checkpoint)
    else:
        trainer = first
        trainer.train(resume_from_checkpoint=checkpoint)
    # the Trainer loaded the checkpoint's weights with no pruner attached to call them stale
    assert not [w for w in recwarn if "model.load_state_dict put nonzero values" in str(w.message)]
    assert len(callback.pruner.history) == 4   # the checkpoint's 2, and updates at steps 15 and 20
    whole = MacKayCallback(**PRUNING)
    uninterrupted = _train(tmp_path / "whole", whole)
    assert callback.pruner.report()["kept"] == whole.pruner.report()["kept"]
    for name in whole.pruner.targets:
        ours, theirs = callback.pruner.alpha(name), whole.pruner.alpha(name)
        assert torch.equal(ours == math.inf, theirs == math.inf), name
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=0)
    for ours, theirs in zip(trainer.model.parameters(), uninterrupted.model.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)


# ------------------------------------------------- curvature of the optimizer's gradient
@pytest.mark.parametrize("optimizer,stock", [("adamw", False), ("mackay", False), ("adamw", True), ("mackay", True)])
def test_accumulation_estimates_what_one_batch_does(tmp_path, optimizer, stock):
    """2 micro-batches of 4 and one batch of 8 on the same examples give the optimizer the same
    gradient; the curvature, hence alpha after the second update, must agree as well. stock: the
    model as transformers makes it, whose loss nobody divides by 2 (the callback sees it)."""
    optimizers = ("mackay", None) if optimizer == "mackay" else (None, None)
    runs = {}
    for batch, accumulation in ((8, 1), (4, 2)):
        model = _model(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        if not stock:
            model.accepts_loss_kwargs = False   # the Trainer divides each micro-batch's loss by 2
        callback = MacKayCallback(update_every=5, prune="alpha", threshold=1e5, dense_ratio=0)
        # stock: no clipping, which would see the doubled gradient and change the training
        _train(tmp_path / str(batch), callback, optimizers, model=model, max_steps=10,
               per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
               **({"max_grad_norm": 0.0} if stock else {}))
        runs[batch] = callback.pruner
        if optimizer == "adamw":
            assert callback.pruner.batch_size == 8
        # the optimizer's gradient over the batch mean's, taken out of the prior and the curvature
        assert callback._gradient_scale == (2.0 if stock and accumulation == 2 else 1.0)
    one, two = runs[8], runs[4]
    assert len(one.history) == len(two.history) == 2
    for name in one.targets:
        curvature = one.curvature(name)
        assert bool((curvature > 0).any())
        if stock:   # the scale is right (it was 2^2 = 4 times too large); AdamW's eps moves the rest
            assert float(two.curvature(name).sum() / curvature.sum()) == pytest.approx(1.0, abs=0.05), name
            continue
        torch.testing.assert_close(two.curvature(name), curvature, rtol=1e-3, atol=1e-3 * float(curvature.max()))
        # alpha = gamma / w^2 magnifies the rounding of weights near 0 (summation order differs):
        # agreement to float precision on the typical weight, to a few percent on every one
        ours, theirs = two.alpha(name), one.alpha(name)
        finite = torch.isfinite(theirs) & torch.isfinite(ours) & (theirs > 0)
        relative = ((ours[finite] - theirs[finite]).abs() / theirs[finite]).double()
        assert torch.equal(ours == math.inf, theirs == math.inf)
        assert float(relative.median()) < 1e-5 and float(relative.max()) < 0.05, name
    assert two.history[-1]["gamma_sum"] == pytest.approx(one.history[-1]["gamma_sum"], rel=1e-2 if stock else 1e-4)


@pytest.mark.parametrize("max_grad_norm, clipped", [(1e-3, True), (0.0, False), (1e6, False)])
def test_clipping_is_taken_out_of_the_prior_and_the_curvature(tmp_path, recwarn, max_grad_norm, clipped):
    """The Trainer clips before any callback runs: hooks measure the norm before it, and each
    step's clipping factor c becomes the pruner's gradient_scale (the prior's pull times c, h
    from (g / c)^2). Read as clipped, a clip at 0.05 pruned a small net to 38 of its 1,536
    weights (146 unclipped), and the default max_grad_norm=1 a tiny BERT to 17 of 21,760."""
    callback = MacKayCallback(**PRUNING)
    seen = []

    class _Probe(transformers.TrainerCallback):   # after the MacKayCallback: its scale of this step
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            seen.append(callback.pruner.gradient_scale)

    _train(tmp_path, callback, max_grad_norm=max_grad_norm, callbacks=[_Probe()])
    assert not [w for w in recwarn if "clipped the gradient" in str(w.message)]
    assert callback.clipping.clipped == callback.clipping.corrected == (20 if clipped else 0)
    assert len(seen) == 20
    if clipped:   # the factor clip_grad_norm_ applied (test_the_factor_matches_...)
        assert all(0 < c < 1 for c in seen), seen
    else:
        assert seen == [1.0] * 20
    if max_grad_norm:   # the hooks are removed at the end of training
        assert callback._norm_before_clipping is None


def test_the_factor_matches_the_norm_clip_grad_norm_saw(tmp_path):
    """c = max_norm / (norm + 1e-6), norm the one the Trainer logs as grad_norm (before clipping)."""
    callback = MacKayCallback(**PRUNING)
    factors = []

    class _Probe(transformers.TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            factors.append(callback.pruner.gradient_scale)

    trainer = _train(tmp_path, callback, max_grad_norm=0.01, logging_steps=1, callbacks=[_Probe()])
    norms = [e["grad_norm"] for e in trainer.state.log_history if "grad_norm" in e]
    assert len(norms) == len(factors) == 20
    for norm, factor in zip(norms, factors):
        assert factor == pytest.approx(min(1.0, 0.01 / (norm + 1e-6)), rel=1e-4)


def test_clipping_it_cannot_measure_is_said_once(tmp_path, recwarn, monkeypatch):
    """On several processes the hooks would see each rank's gradient before the all-reduce: no
    correction there, and a warning where clipping acted (emulated: no hooks)."""
    monkeypatch.setattr(MacKayCallback, "_watch_norm", lambda self, args, model: None)
    callback = MacKayCallback(**PRUNING)
    _train(tmp_path, callback, max_grad_norm=1e-3)
    said = [w for w in recwarn if "clipped the gradient" in str(w.message)]
    assert len(said) == 1
    assert "at 5 of the 5 optimizer steps so far (max_grad_norm=0.001)" in str(said[0].message)
    assert "TrainingArguments(max_grad_norm=0)" in str(said[0].message)
    assert callback.clipping.clipped == 20 and callback.clipping.corrected == 0


def _counting_task(n, seed):
    """Is the sequence mostly tokens below 50? (every position counts: attention must pool)"""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 100, (n, 12), generator=generator)
    return tokens, ((tokens < 50).sum(1) > 6).long()


@pytest.mark.parametrize("max_grad_norm", [0.0, 1.0])
def test_the_trainers_adamw_keeps_a_network_that_works(tmp_path, max_grad_norm):
    """The Trainer's default AdamW (the pruner's proximal prior): a tiny BERT trained to a fit
    lost 99.9% of its weights at the first pruning update and fell to the majority class (test
    0.65), because the prior took a step of lr where AdamW moves a weight lr / sqrt(v) per unit of
    gradient (mackay_ext.prior_step). MacKayAdam keeps 600 weights at 0.871 here, the dense run 0.905.
    Under the Trainer's default clipping (max_grad_norm=1, acting at 316 of the 800 steps, by
    factors down to 0.01) it kept 17 weights at 0.650 too, until the clipping factor was taken
    out of the prior and the curvature (631 kept, 0.840). Since the callbacks prune at most 90% of
    a layer per update, no update takes everything at once: 916 kept at 0.898 unclipped, 1,070 at
    0.879 clipped."""
    x, y = _counting_task(512, seed=1)
    x_test, y_test = _counting_task(1000, seed=99)
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32, num_labels=2,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, learning_rate=1e-3, per_device_train_batch_size=32,
        max_steps=800, save_strategy="no", disable_tqdm=True, seed=0, lr_scheduler_type="constant",
        weight_decay=0.0, max_grad_norm=max_grad_norm)
    callback = MacKayCallback(update_every=100, dense_steps=600)
    trainer = transformers.Trainer(model=model, args=args, callbacks=[callback],
                                   train_dataset=[{"input_ids": a, "labels": b} for a, b in zip(x, y)])
    with warnings.catch_warnings():   # (uncapped, the first prune took > 95% and warned: the
        warnings.simplefilter("error", RuntimeWarning)   # callbacks' 0.9 cap thins over updates)
        trainer.train()
    report = callback.pruner.report()
    model.eval()
    with torch.no_grad():
        accuracy = float((model(input_ids=x_test).logits.argmax(1) == y_test).float().mean())
    print(f"kept {report['kept']} of {report['total']}, test accuracy {accuracy:.3f}")
    assert report["kept"] >= 200 and accuracy >= 0.8


def _tiny_gpt2(tmp_path):
    """A one-layer GPT-2 (its loss a mean over label tokens), 16 sequences of 8 tokens (7 label
    tokens each: the first has none), and two Trainer steps of 8 sequences."""
    config = transformers.GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    ids = torch.randint(0, 32, (16, 8))
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, max_steps=2,
                                          per_device_train_batch_size=8, save_strategy="no", disable_tqdm=True)
    return model, ids, args


@pytest.mark.parametrize("given", [False, True])
def test_a_causal_lm_is_told_that_n_counts_tokens(tmp_path, given):
    """GPT-2 divides its loss by num_items_in_batch (label tokens): with N and B counting
    sequences, a next-token task fell from 1.000 to 0.089 accuracy (402 of 26,112 weights kept;
    2,944 at 1.000 with token counts), and nothing said so."""
    model, ids, args = _tiny_gpt2(tmp_path)
    options = {"num_data": 16 * 8, "batch_size": 8 * 8} if given else {}
    trainer = transformers.Trainer(model=model, args=args, callbacks=[MacKayCallback(update_every=5, dense_ratio=0, **options)],
                                   train_dataset=[{"input_ids": t, "labels": t} for t in ids])
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        trainer.train()
    told = [w for w in said if "divides its loss by num_items_in_batch" in str(w.message)]
    assert len(told) == (0 if given else 1)
    if not given:
        assert "num_data defaulted to the 16 examples" in str(told[0].message)


@pytest.mark.parametrize("optimizer", ["adamw", "mackay"])
def test_a_causal_lms_b_follows_a_num_data_given_in_tokens(tmp_path, optimizer):
    """num_data in label tokens, batch_size left out: B was the step's 8 sequences, h 8x too small
    here (a GPT-2 next-token run kept 3.1% of its weights at 0.011 accuracy, 13.7% at 0.994 with
    B in tokens), and nothing said so. B now counts tokens too, said; MacKayAdam's B is checked
    against it (a warning, not a log line)."""
    model, ids, args = _tiny_gpt2(tmp_path)
    optimizers = (None, None)
    if optimizer == "mackay":   # its B in sequences: the one the callback now says is not the step's
        optimizers = (MacKayAdam(ard_param_groups(model), lr=1e-3, num_data=16 * 7, batch_size=8), None)
    callback = MacKayCallback(16 * 7, update_every=5, dense_ratio=0)   # 7 label tokens a row (shifted)
    trainer = transformers.Trainer(model=model, args=args, callbacks=[callback], optimizers=optimizers,
                                   train_dataset=[{"input_ids": t, "labels": t} for t in ids])
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        trainer.train()
    told = [str(w.message) for w in said if "batch_size was not given: B is read in the same unit" in str(w.message)]
    assert len(told) == 1 and "the step's 8 rows x 7 = 56 label tokens" in told[0]
    if optimizer == "adamw":
        assert callback.pruner.batch_size == 56
    else:
        assert any("the MacKayAdam's batch_size is 8.0, but one optimizer step of this Trainer reads a gradient "
                   "whose curvature needs batch_size=56" in str(w.message) for w in said)


@pytest.mark.parametrize("stock", [False, True])
def test_ef_exact_under_accumulation_reads_what_one_batch_does(tmp_path, recwarn, stock):
    """ef-exact counts a step's backward passes as micro-batches of one mean loss: the Trainer
    divides each by the accumulation steps, except for a model that computes its own mean loss
    (stock transformers heads), whose undivided micro-batch means the callback reads as they are
    (read as divided, its curvature was 2^2 = 4 times too large, and warned about)."""
    runs = {}
    for batch, accumulation in ((8, 1), (4, 2)):
        model = _model(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        if not stock:
            model.accepts_loss_kwargs = False   # the Trainer divides each micro-batch's loss by 2
        linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]   # (not the embeddings)
        callback = MacKayCallback(update_every=5, prune="alpha", threshold=1e5, dense_ratio=0, curvature="ef-exact",
                                  layers=linear)
        _train(tmp_path / str(batch), callback, model=model, max_steps=10, per_device_train_batch_size=batch,
               gradient_accumulation_steps=accumulation, max_grad_norm=0.0)
        runs[batch] = callback.pruner
    assert not [w for w in recwarn if "backward passes in one optimizer step" in str(w.message)]
    for name in runs[8].targets:
        ratio = float(runs[4].curvature(name).sum() / runs[8].curvature(name).sum())
        assert ratio == pytest.approx(1.0, abs=0.05), name
