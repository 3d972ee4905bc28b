"""FSDP shards every parameter across ranks, and no rank holds a whole layer's weights: a pruner
or a MacKayAdam on them is refused when built, naming FSDP and DDP (fully_shard's DTensors were
taken without a word and failed at the first step or update deep in torch; FullyShardedDataParallel's
flat shards were refused as '1-D ...: no prior'). Run in a process of its own: a process group of
one rank on the CPU (gloo), which the other tests must not see."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch.distributed as dist

SCRIPT = textwrap.dedent("""
    import os, socket, sys, warnings
    import torch, torch.distributed as dist
    from torch import nn
    warnings.simplefilter("ignore")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    from mackay_ext.optim import MacKayAdam, ard_param_groups
    from mackay_ext.pruner import MacKayPruner

    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))

    def said(build):
        try:
            build()
        except ValueError as error:
            return str(error)
        return "built"

    if sys.argv[1] == "zero":   # a warning, read as the message of the line
        from torch.distributed.optim import ZeroRedundancyOptimizer
        model = net()
        optimizer = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.Adam)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            MacKayPruner(model, optimizer, num_data=100, batch_size=8)
        print("PRUNER:", " | ".join(str(w.message) for w in caught))
        dist.destroy_process_group()
        sys.exit(0)
    if sys.argv[1] == "fully_shard":
        from torch.distributed.fsdp import fully_shard
        model = fully_shard(net())
    else:
        from torch.distributed.fsdp import FullyShardedDataParallel
        model = FullyShardedDataParallel(net(), use_orig_params=True, device_id=torch.device("cpu"))
    print("OPTIMIZER:", said(lambda: MacKayAdam(ard_param_groups(model), num_data=100, batch_size=8)))
    print("PRUNER:", said(lambda: MacKayPruner(model, torch.optim.Adam(model.parameters()), num_data=100,
                                               batch_size=8)))
    dist.destroy_process_group()
""")


def _run(case: str, tmp_path) -> subprocess.CompletedProcess:
    # (from a folder of its own: run from a source checkout, the unbuilt tree would shadow the install)
    return subprocess.run([sys.executable, "-c", SCRIPT, case], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.skipif(not dist.is_available(), reason="torch built without torch.distributed")
@pytest.mark.parametrize("wrapper", ["fully_shard", "FullyShardedDataParallel"])
def test_fsdp_is_refused_when_built_naming_what_works(wrapper, tmp_path):
    result = _run(wrapper, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = {line.split(":", 1)[0]: line.split(":", 1)[1] for line in result.stdout.splitlines() if ":" in line}
    expected = "sharded by FSDP (fully_shard or FullyShardedDataParallel)"
    assert expected in lines["PRUNER"] and "Train with DistributedDataParallel" in lines["PRUNER"]
    if wrapper == "fully_shard":   # (FSDP1's flat shards hide the layers from ard_param_groups: no ARD group)
        assert expected in lines["OPTIMIZER"] and lines["OPTIMIZER"].startswith(" MacKayAdam:")


@pytest.mark.skipif(not dist.is_available(), reason="torch built without torch.distributed")
def test_zero_redundancy_is_said_to_be_not_covered(tmp_path):
    """Its warning described a fall-back step, not that the result is wrong (488 weights kept
    where one process keeps 370)."""
    result = _run("zero", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ZeroRedundancyOptimizer is not covered: it shards its state over the ranks" in result.stdout
