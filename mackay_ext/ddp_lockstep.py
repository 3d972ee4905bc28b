"""Under torch.distributed every rank must call MacKayPruner.update() at the same optimizer step.

A rank that updates a step later than the others re-estimates alpha from other weights and
curvature: under ef-batch nothing collective happens at an update, so the ranks' alphas, masks
and then weights drift apart without a word. Each update records the optimizer steps its rank
has taken in the process group's key-value store (no collective: a collective here would pair
with DDP's gradient all-reduce on a rank that is a step behind). The next update compares the
records of the previous one across ranks and raises if they differ, naming them.
"""
from __future__ import annotations

import collections
import datetime
import hashlib
import itertools

import torch

# records missing at the next update mean a rank is far behind, or that update() ran twice
# with no step between (then the others write theirs at once): wait this long before saying so
WAIT = datetime.timedelta(seconds=300)

# pruners built so far by what they cover: a rank that alone builds another pruner (on a teacher,
# a helper model) leaves the others' numbering alone (one count for all made the same pruner's
# records go under other keys on that rank, and updates in lockstep waited, then raised)
_pruner_ids: collections.defaultdict[str, itertools.count] = collections.defaultdict(itertools.count)


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the processes in the default process group ((0, 1) without one)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def world_size() -> int:
    """Processes in the default process group (1 without one)."""
    return rank_and_world()[1]


def _store():
    dist = torch.distributed
    if world_size() < 2:
        return None
    try:
        return dist.distributed_c10d._get_default_store()
    except (AttributeError, RuntimeError, ValueError):   # a group without a store of its own
        return None


class Lockstep:
    """The records of one pruner's updates (see the module docstring)."""

    def __init__(self, layers: dict[str, tuple[int, ...]]) -> None:
        """`layers`: the pruner's layer names and weight shapes, the same on every rank."""
        signature = hashlib.sha1(repr(sorted(layers.items())).encode()).hexdigest()[:16]
        self.prefix = f"mackay_ext/update_steps/{signature}/{next(_pruner_ids[signature])}"
        self.updates = 0

    def check(self, steps: int, before_collective: bool = False) -> None:
        """Record this rank's optimizer steps at this update; raise if the previous update's
        records differ between ranks. before_collective: this update is about to run a collective
        (the exact curvature's all-reduce), which on a rank that is not updating would pair with
        another collective (DDP's gradient all-reduce: gloo aborted the process, "collective
        mismatch"): wait for this update's records instead, and compare those."""
        store = _store()
        if store is None:
            return
        dist = torch.distributed
        rank, world = dist.get_rank(), dist.get_world_size()
        store.set(f"{self.prefix}/{self.updates}/{rank}", str(int(steps)))
        self.updates += 1
        compared = self.updates if before_collective else self.updates - 1   # (update numbers from 1)
        if compared == 0:
            return
        keys = [f"{self.prefix}/{compared - 1}/{r}" for r in range(world)]
        try:
            store.wait(keys, WAIT)
        except RuntimeError:   # the store's timeout (DistStoreError is a RuntimeError)
            missing = [str(r) for r, key in enumerate(keys) if not store.check([key])]
            who = f"rank {', '.join(missing)} has" if missing else "some rank has"
            raise RuntimeError(
                f"MacKayPruner.update: {who} not made update number {compared} "
                f"within {WAIT.seconds} s of rank {rank}'s update number {self.updates}: every rank must "
                "call update() at the same optimizer step") from None
        steps_by_rank = {r: int(store.get(key)) for r, key in enumerate(keys)}
        if len(set(steps_by_rank.values())) > 1:
            said = ", ".join(f"rank {r} after {s} steps" for r, s in steps_by_rank.items())
            raise RuntimeError(
                f"MacKayPruner.update: the ranks made update number {compared} at different "
                f"optimizer steps ({said}): their alphas and masks have diverged. Under "
                "DistributedDataParallel every rank must call update() at the same step")
