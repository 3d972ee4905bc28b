"""MacKayAdam + MacKayPruner under DistributedDataParallel (2 CPU processes, gloo): after
training with precision updates and pruning, alpha, masks and weights are bitwise identical on
both ranks and match a single-process run on the same global batches."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
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
        nn.functional.cross_entropy(model(xb), yb).backward()
        optimizer.step()
        if step in UPDATES:
            pruner.update()
    return {"weights": [p.detach().clone() for p in target.parameters()],
            "alpha": [pruner.alpha(n).clone() for n in pruner.layers]}


def worker(rank, port, curvature, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        model = nn.parallel.DistributedDataParallel(make_model())
        results[rank] = train(model, rank, WORLD, curvature)
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("curvature", ["ef-batch", "ef-exact"])
def test_ddp_ranks_agree_and_match_single_process(curvature):
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(worker, args=(free_port(), curvature, results), nprocs=WORLD, join=True)
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
