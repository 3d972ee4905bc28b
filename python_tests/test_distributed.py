"""MacKayAdam + MacKayPruner under DistributedDataParallel (2 CPU processes, gloo): after
training with precision updates and pruning, alpha, masks and weights are bitwise identical on
both ranks and match a single-process run on the same global batches."""
import os

import pytest
import torch
from ddp_ranks import run_on_ranks
from torch import nn

from mackay_ext import MacKayAdam, MacKayPruner, ard_param_groups

WORLD = 2
GLOBAL_BATCH = 32
STEPS = 24
UPDATES = (8, 16, 23)


def make_data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(STEPS * GLOBAL_BATCH, 12, generator=g), torch.randint(0, 3, (STEPS * GLOBAL_BATCH,), generator=g)


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 3))


def train(model, rank, world, curvature):
    x, y = make_data()
    optimizer = MacKayAdam(ard_param_groups(model.module if world > 1 else model), lr=1e-2,
                           num_data=len(x), batch_size=GLOBAL_BATCH)
    target = model.module if world > 1 else model
    pruner = MacKayPruner(target, optimizer, num_data=len(x), curvature=curvature,
                          threshold=0.5)
    local = GLOBAL_BATCH // world
    for step in range(STEPS):
        start = step * GLOBAL_BATCH + rank * local
        xb, yb = x[start:start + local], y[start:start + local]
        optimizer.zero_grad()
        if curvature == "fisher-mc":   # as mackay_ext.train does: the sampled backward first
            with pruner.capture_mc():
                logits = model(xb)
            loss = nn.functional.cross_entropy(logits, yb)
            pruner.accumulate_mc_from(logits)
            loss.backward()
        else:
            nn.functional.cross_entropy(model(xb), yb).backward()
        optimizer.step()
        if step in UPDATES:
            pruner.update()
    return {"weights": [p.detach().clone() for p in target.parameters()],
            "alpha": [pruner.alpha(n).clone() for n in pruner.layers]}


def worker(rank, world, curvature):
    model = nn.parallel.DistributedDataParallel(make_model())
    return train(model, rank, world, curvature)


@pytest.mark.parametrize("curvature", ["ef-batch", "ef-exact"])
def test_ddp_ranks_agree_and_match_single_process(curvature, tmp_path):
    results = run_on_ranks(worker, tmp_path, curvature, world=WORLD)
    a, b = results[0], results[1]
    for key in ("weights", "alpha"):
        for ta, tb in zip(a[key], b[key]):
            assert torch.equal(ta, tb), f"{key} differ between ranks"
    assert any(bool((alpha == float("inf")).any()) for alpha in a["alpha"]), "nothing was pruned"
    single = train(make_model(), 0, 1, curvature)
    for ta, ts in zip(a["alpha"], single["alpha"]):
        assert torch.equal(ta == float("inf"), ts == float("inf")), "pruning differs from one process"
        finite = torch.isfinite(ta)
        torch.testing.assert_close(ta[finite], ts[finite], rtol=1e-3, atol=1e-6)
    for ta, ts in zip(a["weights"], single["weights"]):
        torch.testing.assert_close(ta, ts, rtol=1e-3, atol=1e-5)


def test_cli_under_torchrun(tmp_path):
    """`mackay-ext prune` launched by torchrun on 2 CPU processes: rank 0 writes the report of
    a run that trained on both processes' shards."""
    import json
    import subprocess
    import sys

    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "--module", "mackay_ext.cli", "prune", "--quiet", "--pretrain-epochs", "10",
               "--rounds", "4", "--epochs", "8", "--out", str(out)]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["hardware"]["processes"] == 2
    assert report["weights_kept"] < 0.3 * report["weights_total"]
    assert report["test_accuracy"] > report["test_accuracy_dense"] - 0.03
    assert result.stdout.count("weights kept") == 1  # one report, from rank 0


def test_ddp_fisher_mc_from_the_training_forward(tmp_path):
    """fisher-mc's sampled backward on a DistributedDataParallel forward, before the training
    backward: DDP's gradient reduction still runs, and the ranks end bitwise equal (the sums of
    squares are all-reduced before each update). Each rank draws its own labels, so a single
    process is not the reference here."""
    results = run_on_ranks(worker, tmp_path, "fisher-mc", world=WORLD)
    a, b = results[0], results[1]
    for key in ("weights", "alpha"):
        for ta, tb in zip(a[key], b[key]):
            assert torch.equal(ta, tb), f"{key} differ between ranks"
    assert any(bool((alpha == float("inf")).any()) for alpha in a["alpha"]), "nothing was pruned"


def skewed_worker(rank, world):
    """Rank 1 updates one optimizer step after rank 0, at every update. No DDP wrapper: under one,
    the rank that raises first leaves the other in a gradient all-reduce, and which of the two
    failures the launcher reports is a race; here both ranks raise the same error."""
    model = make_model()
    x, y = make_data()
    optimizer = MacKayAdam(ard_param_groups(model), lr=1e-2, num_data=len(x), batch_size=GLOBAL_BATCH)
    pruner = MacKayPruner(model, optimizer, num_data=len(x), threshold=0.5)
    local = GLOBAL_BATCH // world
    for step in range(STEPS):
        start = step * GLOBAL_BATCH + rank * local
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[start:start + local]), y[start:start + local]).backward()
        optimizer.step()
        if step - rank in UPDATES:
            pruner.update()
    return {"updates": len(pruner.history)}


def test_ranks_updating_at_different_steps_are_named(tmp_path):
    """ef-batch has no collective at an update: a rank a step late used to diverge unnoticed."""
    with pytest.raises(Exception, match=r"made update number 1 at different optimizer steps "
                                        r"\(rank 0 after 9 steps, rank 1 after 10 steps\)"):
        run_on_ranks(skewed_worker, tmp_path, world=WORLD)


def batch_size_worker(rank, world):
    """Two pruners over the same DDP model, one given the per-rank batch (the mistake), one the
    step's batch over all ranks: which warn at their first update."""
    import warnings
    x, y = make_data()
    model = make_model()
    ddp = nn.parallel.DistributedDataParallel(model)
    local = GLOBAL_BATCH // world
    said = {}
    for given in (local, GLOBAL_BATCH):
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        pruner = MacKayPruner(model, optimizer, num_data=len(x), batch_size=given)
        for step in range(3):
            start = step * GLOBAL_BATCH + rank * local
            optimizer.zero_grad()
            nn.functional.cross_entropy(ddp(x[start:start + local]), y[start:start + local]).backward()
            optimizer.step()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pruner.update()
        said[given] = [str(w.message) for w in caught if "this rank's batch" in str(w.message)]
        pruner.detach()
    return {"local": said[local], "global": said[GLOBAL_BATCH]}


def test_a_per_rank_batch_size_is_said(tmp_path):
    """Under DDP batch_size is the whole step's batch over the ranks; the per-rank one (a new
    user's 2-rank run: 665 weights kept where the right B keeps 1,042) is warned about."""
    for result in run_on_ranks(batch_size_worker, tmp_path, world=WORLD):
        assert len(result["local"]) == 1 and result["global"] == []
        assert (f"batch_size={GLOBAL_BATCH // WORLD} is this rank's batch (its last optimizer step read "
                f"{GLOBAL_BATCH // WORLD} examples here)") in result["local"][0]
        assert f"pass batch_size={GLOBAL_BATCH}" in result["local"][0]
