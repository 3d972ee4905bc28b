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
    optimizer, pruner = build(model, world, curvature)
    take_steps(model, optimizer, pruner, rank, world, curvature, range(STEPS))
    return result(model, world, pruner)


def build(model, world, curvature):
    num_data = STEPS * GLOBAL_BATCH
    target = model.module if world > 1 else model
    optimizer = MacKayAdam(ard_param_groups(target), lr=1e-2, num_data=num_data, batch_size=GLOBAL_BATCH)
    return optimizer, MacKayPruner(target, optimizer, num_data=num_data, curvature=curvature, threshold=0.5)


def result(model, world, pruner):
    target = model.module if world > 1 else model
    return {"weights": [p.detach().clone() for p in target.parameters()],
            "alpha": [pruner.alpha(n).clone() for n in pruner.layers]}


def take_steps(model, optimizer, pruner, rank, world, curvature, steps):
    x, y = make_data()
    local = GLOBAL_BATCH // world
    for step in steps:
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


def extra_pruner_worker(rank, world):
    """Rank 0 alone builds a pruner on a helper model first; the training pruner's updates then
    come at the same steps on both ranks."""
    import datetime

    import mackay_ext.ddp_lockstep as lockstep
    lockstep.WAIT = datetime.timedelta(seconds=20)   # (a false wait would raise in 20 s, not 300)
    if rank == 0:
        helper = nn.Linear(5, 5)
        MacKayPruner(helper, torch.optim.SGD(helper.parameters(), lr=0.1), num_data=10, batch_size=2)
    model = make_model()   # (no DDP wrapper, as in skewed_worker)
    optimizer, pruner = build(model, 1, "ef-batch")
    take_steps(model, optimizer, pruner, rank, world, "ef-batch", range(STEPS))
    return {"updates": len(pruner.history)}


def test_a_pruner_one_rank_alone_builds_leaves_the_others_in_lockstep(tmp_path):
    """The update records were keyed by a count of every pruner a process built: an extra pruner on
    rank 0 put its training pruner's records under other keys, and updates in lockstep waited 300 s,
    then raised "some rank has not made update number 1"."""
    assert [r["updates"] for r in run_on_ranks(extra_pruner_worker, tmp_path, world=WORLD)] == [3, 3]


def rank0_updates_worker(rank, world):
    """ef-exact, and only rank 0 calls update(). No DDP wrapper (see skewed_worker)."""
    import datetime

    import mackay_ext.ddp_lockstep as lockstep
    lockstep.WAIT = datetime.timedelta(seconds=10)
    model = make_model()
    x, y = make_data()
    optimizer = MacKayAdam(ard_param_groups(model), lr=1e-2, num_data=len(x), batch_size=GLOBAL_BATCH)
    pruner = MacKayPruner(model, optimizer, num_data=len(x), curvature="ef-exact", threshold=0.5)
    local = GLOBAL_BATCH // world
    for step in range(UPDATES[0] + 1):
        start = step * GLOBAL_BATCH + rank * local
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[start:start + local]), y[start:start + local]).backward()
        optimizer.step()
    if rank == 0:
        pruner.update()
    else:   # (not in a collective when rank 0 raises: the launcher then reports rank 0's error)
        import time
        time.sleep(60)
    return {}


def test_an_exact_update_on_one_rank_alone_is_named_before_its_collective(tmp_path):
    """The exact curvature's all-reduce at an update paired with whatever collective the other
    rank ran next: gloo aborted the process ("collective mismatch", SIGABRT). The update now
    waits for every rank's record of it first, and says which is missing."""
    with pytest.raises(Exception, match=r"rank 1 has not made update number 1 within 10 s of rank 0's"):
        run_on_ranks(rank0_updates_worker, tmp_path, world=WORLD)


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


CHECKPOINT = 12   # between the updates at steps 8 and 16: each rank holds its share of the squares


def resumed_worker(rank, world, curvature, consolidate, path):
    """Train to CHECKPOINT, save rank 0's state (model, optimizer, pruner), build everything anew
    as a new process would, load it on every rank and go on to the end."""
    import warnings
    model = nn.parallel.DistributedDataParallel(make_model())
    optimizer, pruner = build(model, world, curvature)
    take_steps(model, optimizer, pruner, rank, world, curvature, range(CHECKPOINT + 1))
    if consolidate:
        pruner.consolidate_curvature()
    if rank == 0:
        torch.save({"model": model.module.state_dict(), "optimizer": optimizer.state_dict(),
                    "pruner": pruner.state_dict()}, path)
    torch.distributed.barrier()
    model = nn.parallel.DistributedDataParallel(make_model())
    optimizer, pruner = build(model, world, curvature)
    state = torch.load(path, weights_only=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        pruner.load_state_dict(state["pruner"])
    take_steps(model, optimizer, pruner, rank, world, curvature, range(CHECKPOINT + 1, STEPS))
    return dict(result(model, world, pruner), said=[str(w.message) for w in caught if "MacKay" in str(w.message)])


@pytest.mark.parametrize("consolidate", [True, False])
def test_a_resumed_ddp_run_keeps_every_ranks_exact_curvature(tmp_path, consolidate):
    """ef-exact between two updates: rank 0's saved state, after consolidate_curvature() on every
    rank, resumes as the uninterrupted run goes on (every example since the last update counted
    once); without it, the rank whose share is lost says so (it was silent: a new user's resumed
    run kept 867 weights against 881)."""
    (tmp_path / "whole").mkdir()
    (tmp_path / "resumed").mkdir()
    whole = run_on_ranks(worker, tmp_path / "whole", "ef-exact", world=WORLD)[0]
    ranks = run_on_ranks(resumed_worker, tmp_path / "resumed", "ef-exact", consolidate,
                         str(tmp_path / "state.pt"), world=WORLD)
    if not consolidate:
        assert not ranks[0]["said"]   # rank 0 loaded its own share
        assert len(ranks[1]["said"]) == 1 and "rank 0's share of a 2-rank run" in ranks[1]["said"][0]
        return
    assert not ranks[0]["said"] and not ranks[1]["said"]
    for key in ("weights", "alpha"):
        for ours, theirs in zip(ranks[0][key], ranks[1][key]):
            assert torch.equal(ours, theirs), f"{key} differ between ranks"
    for ours, theirs in zip(ranks[0]["alpha"], whole["alpha"]):
        assert torch.equal(ours == float("inf"), theirs == float("inf"))
        finite = torch.isfinite(theirs)
        torch.testing.assert_close(ours[finite], theirs[finite], rtol=1e-5, atol=0)
    for ours, theirs in zip(ranks[0]["weights"], whole["weights"]):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)



def trainer_checkpoint_worker(rank, world, path):
    """The Trainer's checkpoint under DDP: rank 0's file holds every rank's exact curvature since
    the last update and every rank's random state; a resumed Trainer puts each back on its rank."""
    from mackay_ext.data import Splits
    from mackay_ext.train import FitConfig, Trainer
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(84, 6, generator=generator)
    y = (x[:, 0] > 0).long()
    splits = Splits(x[:64], y[:64], x[64:74], y[64:74], x[74:], y[74:], name="mine")
    config = FitConfig(pretrain_epochs=1, rounds=1, epochs=2, batch_size=16, finetune_epochs=0)

    def trainer():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
        return Trainer(net, splits, config, pruner_options={"curvature": "ef-exact"}, checkpoint=path)

    first = trainer()
    first.pretrain()
    first._update_precisions()
    first._run_phase(1)   # an epoch of 32 examples on each rank since the update, then a checkpoint
    torch.manual_seed(100 + rank)   # each rank's own random stream from here
    stream = torch.get_rng_state()
    first.save_checkpoint()
    torch.distributed.barrier()
    resumed = trainer()
    resumed.load_checkpoint(path)
    return {"after_save": first.pruner.accumulator.num_examples,
            "loaded": resumed.pruner.accumulator.num_examples,
            "same_stream": torch.equal(torch.get_rng_state(), stream)}


def test_the_trainers_ddp_checkpoint_holds_every_rank(tmp_path):
    ranks = run_on_ranks(trainer_checkpoint_worker, tmp_path, str(tmp_path / "checkpoint.pt"), world=WORLD)
    # rank 0 holds both shares (64 examples), and the next update's sum over the ranks counts each
    # example once (each rank held its own 32; rank 0's file held 32, loaded on both ranks)
    assert [r["after_save"] for r in ranks] == [64, 0]
    assert [r["loaded"] for r in ranks] == [64, 0]
    assert all(r["same_stream"] for r in ranks)   # (rank 1 took rank 0's stream)
