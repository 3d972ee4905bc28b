"""The exact curvature's shares under torch.distributed, in checkpoints.

Between two updates each rank's FisherAccumulator holds the squares of its own examples only;
the update sums the shares over the ranks (FisherAccumulator.all_reduce). A checkpoint of one
rank's pruner state therefore holds one share: loaded on every rank of a resumed run, the other
ranks' examples since the last update were lost and that rank's counted once per rank (a new
user's 2-rank resume kept 867 weights where the uninterrupted run kept 881, 2.2 points less
accurate). MacKayPruner.consolidate_curvature() sums the shares onto rank 0 before it saves; the
state records which share it holds (`source`), and a load puts it on one rank only, so that the
next update counts every example in it once.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from ._validate import user_stacklevel
from .ddp_lockstep import rank_and_world

# what a state saved before the shares were recorded holds: read as the whole estimate
_WHOLE = {"rank": 0, "world_size": 1, "whole": True}


def source(accumulator) -> dict[str, Any]:
    """What this rank's sums hold, for its state_dict: the whole estimate (one process, or rank 0
    after consolidate_curvature with no example added since) or this rank's share."""
    rank, world = rank_and_world()
    whole_at = getattr(accumulator, "whole_at", None)   # (absent from a copy made before it was kept)
    whole = world == 1 or (rank == 0 and whole_at is not None and whole_at == accumulator.num_examples)
    return {"rank": rank, "world_size": world, "whole": whole}


def check_source(saved: Any, where: str) -> dict[str, Any]:
    """The saved `exact_curvature_ranks` entry, checked (None: saved before it was recorded)."""
    if saved is None:
        return dict(_WHOLE)
    fields = ("rank", "world_size", "whole")
    if not isinstance(saved, Mapping) or set(saved) != set(fields) or not isinstance(saved["whole"], bool) \
            or not all(isinstance(saved[k], int) and not isinstance(saved[k], bool) for k in fields[:2]) \
            or not 0 <= saved["rank"] < saved["world_size"]:
        raise ValueError(f"{where}: exact_curvature_ranks must be a dict from MacKayPruner.state_dict() "
                         f"(rank, world_size: ints with 0 <= rank < world_size; whole: bool), got {saved!r}")
    return dict(saved)


def place_loaded(accumulator, saved: dict[str, Any]) -> None:
    """Keep the loaded sums on the one rank that should add them at the next update, and reset them
    on the others: rank 0 for a whole estimate; for one rank's share, that rank (each rank loading
    its own state: the run goes on exactly) or, where the ranks differ, rank 0, with a warning that
    the other ranks' examples since the last update are not in it."""
    rank, world = rank_and_world()
    if saved["whole"]:
        keeper, lost = 0, False
    else:
        keeper = saved["rank"] if saved["rank"] < world else 0
        own = world == saved["world_size"] and rank == saved["rank"]
        lost = not own and accumulator.num_examples > 0
    if lost:
        warnings.warn(
            f"MacKayPruner.load_state_dict: the state's exact curvature is rank {saved['rank']}'s share of a "
            f"{saved['world_size']}-rank run (its examples since the last update; the update sums every rank's): "
            "the other ranks' share is not in it, and the next update's estimate lacks those examples. Save "
            "after pruner.consolidate_curvature() on every rank (it sums the shares into rank 0's state), or "
            "save and load each rank's own state", RuntimeWarning, stacklevel=user_stacklevel())
    if rank != keeper:
        accumulator.reset()
