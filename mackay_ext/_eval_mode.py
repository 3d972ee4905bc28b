"""A forward that must not change the model: every module in eval mode, each flag restored."""
from __future__ import annotations

import contextlib

from torch import nn


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Every module of `model` in eval mode inside (BatchNorm statistics do not move, dropout is
    off); each module's own training flag back afterwards, however they were mixed."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes.items():
            module.training = training
