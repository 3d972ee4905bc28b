"""mackay_ext.integrations.hf: MacKayCallback inside transformers.Trainer (tiny random BERT)."""
import logging
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")   # Trainer needs it

from mackay_ext import MacKayAdam  # noqa: E402
from mackay_ext.integrations.hf import MacKayCallback  # noqa: E402
from mackay_ext.optim import ard_param_groups  # noqa: E402

NUM_DATA = 48


def _model():
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=37,
                                     max_position_embeddings=16, num_labels=3)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config)


def _dataset():
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 50, (NUM_DATA, 9), generator=generator)
    labels = tokens[:, 0] % 3   # learnable from the first token
    return [{"input_ids": t, "attention_mask": torch.ones_like(t), "labels": y}
            for t, y in zip(tokens, labels)]


def _train(tmp_path, callback, optimizers=(None, None), **options):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, max_steps=20,
        per_device_train_batch_size=8, learning_rate=3e-3, logging_steps=5, save_strategy="no",
        disable_tqdm=True, seed=0, **options)
    model = _model()
    if optimizers[0] == "mackay":
        optimizers = (MacKayAdam(ard_param_groups(model), lr=3e-3, num_data=NUM_DATA,
                                 batch_size=8 * options.get("gradient_accumulation_steps", 1)), None)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_dataset(),
                                   callbacks=[callback], optimizers=optimizers)
    trainer.train()
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


PRUNING = dict(update_every=5, prune="alpha", threshold=1e5)   # alpha >= 1e5: |w| below ~3e-3


def test_trainer_prunes_and_logs(tmp_path, caplog):
    callback = MacKayCallback(verbose=True, **PRUNING)
    with caplog.at_level(logging.INFO, logger="mackay_ext.integrations.hf"):
        trainer = _train(tmp_path, callback)
    assert callback.pruner.prior == "proximal" and callback.pruner.num_data == NUM_DATA
    assert callback.pruner.batch_size == 8
    logged = _check_pruned_and_logged(trainer, callback, updates=4)
    assert "MacKayCallback: step 20:" in caplog.text
    print("\n".join(str(entry) for entry in logged))


def test_trainer_with_mackay_adam(tmp_path):
    callback = MacKayCallback(**PRUNING)
    trainer = _train(tmp_path, callback, optimizers=("mackay", None))
    assert callback.pruner.fused
    _check_pruned_and_logged(trainer, callback, updates=4)


def test_gradient_accumulation_and_bf16(tmp_path):
    callback = MacKayCallback(**PRUNING)
    try:
        trainer = _train(tmp_path, callback, gradient_accumulation_steps=2, bf16=True)
    except (ValueError, RuntimeError) as error:   # a CPU/transformers pair without bf16
        if "bf16" not in str(error).lower() and "bfloat16" not in str(error).lower():
            raise
        pytest.skip(f"bf16 refused here: {error}")
    assert callback.pruner.batch_size == 8 * 2 ** 2
    # on_step_end fires per optimizer step: 20 steps of 2 micro-batches, one update every 5
    assert trainer.state.global_step == 20
    logged = _check_pruned_and_logged(trainer, callback, updates=4)
    print("\n".join(str(entry) for entry in logged))


def test_at_end_sparsify(tmp_path):
    from mackay_ext.sparse import SparseLinear
    # a prior on the classifier only, with a threshold that leaves it mostly pruned
    callback = MacKayCallback(at_end="sparsify", layers=["classifier"], update_every=5, prune="alpha",
                              threshold=1e3)
    trainer = _train(tmp_path, callback)
    report = callback.pruner.report()
    assert report["kept"] <= report["total"] // 2
    classifier = trainer.model.classifier
    assert isinstance(classifier, SparseLinear)
    assert classifier.nnz == report["kept"]
    # the pruner still holds the dense Parameter the Trainer trained: same weights, now sparse
    assert torch.equal(classifier.dense_weight(), callback.pruner.weight("classifier").detach())


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"update_every must be an int >= 1, got 0"):
        MacKayCallback(update_every=0)
    with pytest.raises(ValueError, match=r"at_end must be one of \(None, 'sparsify', 'shrink'\), got 'prune'"):
        MacKayCallback(at_end="prune")
    with pytest.raises(ValueError, match="at_end='shrink' needs example_inputs"):
        MacKayCallback(at_end="shrink")
    with pytest.raises(TypeError, match="do not pass them"):
        MacKayCallback(optimizer=None)
