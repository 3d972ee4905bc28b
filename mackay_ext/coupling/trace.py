"""trace_coupling: export the model once and read its coupled groups off the ATen graph."""
from __future__ import annotations

import torch
from torch import nn

from .groups import ChannelGroup, Coupling, CouplingError, collect
from .ties import canonical_names


def channel_groups(model: nn.Module, example_inputs) -> list[ChannelGroup]:
    """Coupled channel groups of `model`, found from one traced forward on `example_inputs`.

    example_inputs: a tensor, a tuple of positional inputs, or a dict of keyword inputs that
    runs the model. Returns groups in the order their first member appears in the model.
    """
    return trace_coupling(model, example_inputs).groups


def trace_coupling(model: nn.Module, example_inputs) -> Coupling:
    """As channel_groups, also returning the blocked classes with the reason each is blocked."""
    from .graph import propagate
    if not isinstance(model, nn.Module):
        raise TypeError(f"trace_coupling: model must be a torch.nn.Module, got {type(model).__name__}")
    args, kwargs = split_inputs(example_inputs)
    was_training = model.training
    model.eval()   # dropout off, BatchNorm in inference form: the form shrink must preserve
    try:
        try:
            with torch.no_grad():
                model(*args, **kwargs)
        except Exception as err:
            raise CouplingError(f"example_inputs do not run the model: {type(err).__name__}: {err}") from err
        try:
            program = torch.export.export(model, args, kwargs)
        except Exception as err:
            # a Hugging Face model returns its key/value cache by default, which torch.export
            # cannot flatten; the forward's own cache switch is the way out
            hint = (" (a Hugging Face model: build it with use_cache=False in its config, or pass "
                    "use_cache=False among the example inputs)" if "Cache" in str(err) else "")
            raise CouplingError(f"torch.export could not trace the model, so its channel coupling is "
                                f"unknown{hint}: {type(err).__name__}: {str(err)[:2000]}") from err
    finally:
        model.train(was_training)
    atoms = propagate(program, canonical_names(model))
    return collect(atoms, model)


def split_inputs(example_inputs):
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise TypeError("example_inputs must be a tensor, a tuple of positional inputs or a dict of keyword "
                    f"inputs, got {type(example_inputs).__name__}")


