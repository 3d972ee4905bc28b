"""An update() that stopped part-way (Ctrl-C in a notebook, an error) is finished by the next one.

update() re-estimates and prunes one layer after another, and records the update (history, the
steps since it) at the end. A notebook user who pressed Ctrl-C in the warm-up update and ran the
cell again got a second call that found the first layer's alpha already set, took that layer as
past its warm-up, and pruned it on a prior the weights had never trained under: 1,606 of 4,736
weights kept where the warm-up keeps all of them, no word; a pruning update re-estimated and
pruned the layers it had reached twice. Now a layer stopped part-way puts its weight and alpha
back (MacKayPruner._update_one), the update keeps a record of where it stands, and the next
update(), when nothing changed the weights or the alphas since the stop (no optimizer step, no
load), goes on from there without moving the curvature in again (the stopped update did, and
reset the accumulator): the layers done keep their result, the others are updated as they would
have been. After a change, the next update is a new one; a layer whose warm-up ran in the stopped
update is warming up still in it, as no update has completed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class UnfinishedUpdate:
    """Where one update() stands: the layers in warm-up at its start, the report entries of the
    layers done, and (once it has stopped) the marks of the weights and alphas at the stop."""
    warmup: set[str]
    done: dict[str, dict[str, Any]] = field(default_factory=dict)
    marks: dict[str, tuple[int, int, int]] | None = None


def marks(params: dict[str, torch.Tensor], alphas: dict[str, torch.Tensor]) -> dict[str, tuple[int, int, int]]:
    """What any change of the weights or the alphas advances: their in-place versions (an
    optimizer step, masked_fill_, copy_, load_state_dict) and the alpha tensor's identity."""
    return {name: (param._version, id(alphas[name]), alphas[name]._version) for name, param in params.items()}
