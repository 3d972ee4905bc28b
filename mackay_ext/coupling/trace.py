"""trace_coupling: export the model once and read its coupled groups off the ATen graph."""
from __future__ import annotations

import itertools
import warnings

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm
from torch.utils._pytree import tree_map

from .groups import ChannelGroup, Coupling, CouplingError, InputsDoNotRun, collect
from .ties import canonical_names


# what a reentrant torch.utils.checkpoint in the forward warns when run without gradients, as the
# trace's and shrink's read-only runs are: nothing of the user's
CHECKPOINT_WITHOUT_GRADIENTS = "None of the inputs have requires_grad=True"


def channel_groups(model: nn.Module, example_inputs) -> list[ChannelGroup]:
    """Coupled channel groups of `model`, found from one traced forward on `example_inputs`.

    example_inputs: a tensor, a tuple of positional inputs, or a dict of keyword inputs that
    runs the model. Returns groups in the order their first member appears in the model.
    """
    if not isinstance(model, nn.Module):   # named here, not in trace_coupling
        raise TypeError(f"channel_groups: model must be a torch.nn.Module (the first argument), got "
                        f"{type(model).__name__}")
    return trace_coupling(model, example_inputs).groups


def trace_coupling(model: nn.Module, example_inputs) -> Coupling:
    """As channel_groups, also returning the blocked classes with the reason each is blocked."""
    from .graph import propagate
    if not isinstance(model, nn.Module):
        raise TypeError(f"trace_coupling: model must be a torch.nn.Module, got {type(model).__name__}")
    args, kwargs = split_inputs(example_inputs, model)
    was_training = model.training
    model.eval()   # dropout off, BatchNorm in inference form: the form shrink must preserve
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=CHECKPOINT_WITHOUT_GRADIENTS)
            # nn.RNN's forward re-lists its weights (_flat_weights) as it runs, as the hook form
            # of weight_norm sets the weight: torch.export's advice on that is for its own users
            warnings.filterwarnings("ignore", message=r"The tensor attributes? .* (was|were) assigned during export")
            try:
                with torch.no_grad():
                    model(*args, **kwargs)
            except Exception as err:
                raise InputsDoNotRun(f"example_inputs do not run the model: {type(err).__name__}: {err}") from err
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
    try:
        atoms = propagate(program, canonical_names(model))
    except CouplingError as err:
        parametrized = parametrized_layers(model)
        if not parametrized:
            raise
        raise CouplingError(f"{str(err).rstrip('.')}. The model computes weights through a parametrization ("
                            f"{', '.join(parametrized)}), which the trace cannot follow in any case (a layer's "
                            "weight must be a parameter for its channels to be cut): remove it first "
                            "(torch.nn.utils.parametrize.remove_parametrizations(layer, 'weight'); the hook "
                            "forms: torch.nn.utils.remove_weight_norm, remove_spectral_norm)") from err
    return collect(atoms, model)


def parametrized_layers(model: nn.Module) -> list[str]:
    """Names of the modules whose weight a parametrization computes (torch.nn.utils.parametrize,
    or the hook forms of weight_norm and spectral_norm), each with the parametrization's kind."""
    found = []
    for name, module in model.named_modules():
        kinds = [type(p).__name__ for plist in getattr(module, "parametrizations", {}).values() for p in plist] \
            if parametrize.is_parametrized(module) else []
        kinds += [type(hook).__name__ for hook in module._forward_pre_hooks.values()
                  if isinstance(hook, (WeightNorm, SpectralNorm))]
        if kinds:
            found.append(f"{name or 'the model'}: {', '.join(kinds)}")
    return found


def split_inputs(example_inputs, model: nn.Module | None = None):
    """(args, kwargs) of example_inputs; with `model`, every tensor in them moved to the device the
    model's parameters and buffers sit on (example inputs made on the CPU for a model moved to a
    GPU, or the other way round, trace the same graph)."""
    if isinstance(example_inputs, torch.Tensor):
        args, kwargs = (example_inputs,), {}
    elif isinstance(example_inputs, dict):
        args, kwargs = (), dict(example_inputs)
    elif isinstance(example_inputs, (tuple, list)):
        args, kwargs = tuple(example_inputs), {}
    else:
        raise TypeError("example_inputs must be a tensor, a tuple of positional inputs or a dict of keyword "
                        f"inputs, got {type(example_inputs).__name__}")
    device = None if model is None else _single_device(model)
    if device is None:
        return args, kwargs

    def to_device(value):
        if isinstance(value, torch.Tensor) and value.device != device and value.device.type != "meta":
            return value.to(device)
        return value
    return tree_map(to_device, args), tree_map(to_device, kwargs)


def _single_device(model: nn.Module) -> torch.device | None:
    """The one device of the model's tensors; None if it has none, several, or the meta device."""
    devices = {t.device for t in itertools.chain(model.parameters(), model.buffers())}
    if len(devices) != 1:
        return None
    device = devices.pop()
    return None if device.type == "meta" else device


