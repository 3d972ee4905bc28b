"""Run a function on 2 CPU processes joined by a gloo process group, for the tests that check
what every rank of a DistributedDataParallel run ends with.

The teardown is ordered, because a disorderly one aborted a CI run ("terminate called without an
active exception", SIGABRT in one rank after its work was done):
- the worker returns its result, so its DDP wrapper and reducer (which hold the process group)
  are released before the group is destroyed, not at interpreter exit;
- every rank saves its result and waits at a barrier before destroy_process_group, so no rank
  tears gloo down while the other still talks to it;
- the rendezvous is a file store in the test's tmp_path, not a TCP store served by rank 0, so
  rank 0 exiting first cannot cut the other off from the store."""
import gc
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def run_on_ranks(worker, out, *args, world=WORLD):
    """Call worker(rank, world, *args) on `world` processes; return the list of what each rank's
    call returned (anything torch.save and torch.load(weights_only=True) carry: tensors, dicts,
    lists, numbers). `out` is an empty directory (the test's tmp_path)."""
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    mp.spawn(_rank_main, args=(worker, str(out), world, args), nprocs=world, join=True)
    return [torch.load(os.path.join(out, f"rank{rank}.pt"), weights_only=True) for rank in range(world)]


def _rank_main(rank, worker, out, world, args):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="file://" + os.path.join(out, "store"),
                            rank=rank, world_size=world)
    try:
        result = worker(rank, world, *args)
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
        del result
        gc.collect()   # anything of the worker's that still holds the group goes now
        dist.barrier()
    finally:
        dist.destroy_process_group()
