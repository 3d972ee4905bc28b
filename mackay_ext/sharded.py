"""Parameters sharded across ranks (FSDP): refused where a pruner or MacKayAdam is built.

The prior, the curvature and the update are per weight of a whole layer; under FSDP no rank
holds one. fully_shard (FSDP2) makes every parameter a DTensor, which the compiled ops refuse
only at the first step or update, deep in torch ("got mixed torch.Tensor and DTensor"), after
the pruner and the optimizer were built without a word; FullyShardedDataParallel (FSDP1) flattens
them into 1-D shards, which a pruner took for biases ("1-D ...: no prior") and refused for a
reason that was not the one. Said at once, naming FSDP and what does work (DDP)."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

WHAT_WORKS = ("FSDP is not covered: the prior, the curvature and the update are per weight of a whole layer, "
              "which no rank holds there. Train with DistributedDataParallel (every rank holds the whole "
              "model; README 'DDP'), or without sharding")


try:
    from torch.distributed.tensor import DTensor
except ImportError:   # a torch built without distributed: no DTensor parameter can exist
    DTensor = None


def _is_dtensor(param: torch.Tensor) -> bool:
    return DTensor is not None and isinstance(param, DTensor)


def sharded_names(named: Iterable[tuple[str, torch.Tensor]], model: nn.Module | None = None) -> list[str]:
    """The names of the parameters FSDP shards: DTensors (fully_shard), FSDP1's flat parameters,
    and every parameter of a model holding a FullyShardedDataParallel module."""
    found = [name for name, param in named if _is_dtensor(param) or type(param).__name__ == "FlatParameter"]
    if model is not None and any(type(module).__name__ == "FullyShardedDataParallel" for module in model.modules()):
        found = found or [name for name, _ in model.named_parameters()]
    return found


def refuse_sharded(named: Iterable[tuple[str, torch.Tensor]], where: str, model: nn.Module | None = None) -> None:
    names = sharded_names(named, model)
    if names:
        shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        raise ValueError(f"{where}: the parameters are sharded by FSDP (fully_shard or FullyShardedDataParallel): "
                         f"{shown}. {WHAT_WORKS}")
