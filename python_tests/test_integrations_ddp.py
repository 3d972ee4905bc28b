"""The training-loop callbacks under DistributedDataParallel: 2 CPU processes (gloo), each running
the framework's own trainer as torchrun would start it (RANK / WORLD_SIZE / LOCAL_RANK in the
environment). With the Trainer's AdamW (not a MacKayAdam) every rank must end with the same alpha,
masks and weights: the curvature is read from the all-reduced gradient of each optimizer step,
not from the rank's own backward (which gave every rank its own alpha)."""
import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

WORLD = 2


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(worker, out, *args):
    port = _free_port()
    mp.spawn(worker, args=(port, str(out), *args), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD)]


def _environment(rank, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), NODE_RANK="0",
                      LOCAL_WORLD_SIZE=str(WORLD), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)


def _result(pruner, model):
    return {"alpha": {name: pruner.alpha(name).clone() for name in pruner.targets},
            "curvature": {name: pruner.curvature(name).clone() for name in pruner.targets},
            "weights": {name: p.detach().clone() for name, p in model.named_parameters()},
            "batch_size": float(pruner.batch_size), "updates": len(pruner.history),
            "kept": pruner.report()["kept"], "total": pruner.report()["total"]}


def _check_ranks_agree(results, batch_size, updates):
    first, second = results
    assert first["updates"] == second["updates"] == updates
    for key in ("curvature", "alpha", "weights"):
        assert first[key].keys() == second[key].keys()
        for name in first[key]:
            assert torch.equal(first[key][name], second[key][name]), f"{key} of {name} differs between ranks"
    assert 0 < first["kept"] < first["total"], "nothing was pruned: the masks were not compared"
    assert any(bool((alpha == math.inf).any()) for alpha in first["alpha"].values())
    assert first["batch_size"] == second["batch_size"] == batch_size   # the global batch


# ----------------------------------------------------------------------------- HF Trainer
def _hf_worker(rank, port, out):
    _environment(rank, port)
    import transformers

    from mackay_ext.integrations.hf import MacKayCallback

    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=37,
                                     max_position_embeddings=16, num_labels=3)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 50, (48, 9), generator=generator)
    data = [{"input_ids": t, "attention_mask": torch.ones_like(t), "labels": t[0] % 3} for t in tokens]
    args = transformers.TrainingArguments(
        output_dir=out, report_to="none", use_cpu=True, ddp_backend="gloo", max_steps=15,
        per_device_train_batch_size=4, learning_rate=3e-3, logging_steps=5, save_strategy="no",
        disable_tqdm=True, seed=0)
    callback = MacKayCallback(update_every=5, prune="alpha", threshold=1e5, dense_ratio=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    trainer.train()
    assert args.world_size == WORLD
    torch.save(_result(callback.pruner, model), os.path.join(out, f"rank{rank}.pt"))


def test_hf_trainer_ranks_agree(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    results = _launch(_hf_worker, tmp_path)
    _check_ranks_agree(results, batch_size=4 * WORLD, updates=3)


# ------------------------------------------------------------------------------ Lightning
def _lightning_worker(rank, port, out):
    _environment(rank, port)
    import lightning.pytorch as pl
    from torch import nn

    from mackay_ext.integrations.lightning import MacKayPruning

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(7, 17), nn.Tanh(), nn.Linear(17, 3))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    generator = torch.Generator().manual_seed(1)
    x = torch.randn(96, 7, generator=generator)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 1).long()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    torch.manual_seed(rank)   # different initial weights: DDP must broadcast rank 0's
    module = Tiny()
    callback = MacKayPruning(update_every=2, update_on="step", prune="alpha", threshold=2e3, dense_ratio=0)
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=WORLD, strategy="ddp", logger=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, callbacks=[callback])
    trainer.fit(module, train_dataloaders=loader)
    assert trainer.world_size == WORLD and trainer.global_rank == rank
    torch.save(_result(callback.pruner, module), os.path.join(out, f"rank{rank}.pt"))


def test_lightning_ddp_ranks_agree(tmp_path):
    pytest.importorskip("lightning.pytorch")
    results = _launch(_lightning_worker, tmp_path)
    # 96 examples over 2 ranks in batches of 8: 6 steps an epoch, updates at steps 2, 4, ..., 12
    _check_ranks_agree(results, batch_size=8 * WORLD, updates=6)
