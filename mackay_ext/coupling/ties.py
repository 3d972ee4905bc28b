"""Tied parameters: one Parameter (or buffer) reached under several names.

A language model whose output layer reuses the embedding table (`head.weight = emb.weight`)
holds one tensor under two names. named_parameters() gives it once, under the first name met
(the *canonical* name, the one every Member uses); torch.export may name it by either. The
coupling treats it as one tensor: every slice of it is one member, and the channels that slice
serves in each use go together (graph.Atoms.attach). shrink cuts it once and puts the same new
Parameter in every module that held it.
"""
from __future__ import annotations

from torch import nn


def _named_tensors(model: nn.Module):
    yield from model.named_parameters(remove_duplicate=False)
    yield from model.named_buffers(remove_duplicate=False)


def canonical_names(model: nn.Module) -> dict[str, str]:
    """Every parameter and buffer name -> the name named_parameters() / named_buffers() give its tensor."""
    first: dict[int, str] = {}
    names: dict[str, str] = {}
    for name, tensor in _named_tensors(model):
        names[name] = first.setdefault(id(tensor), name)
    return names


def tied_names(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """canonical name -> every name of that tensor (canonical first), for tensors with several names."""
    aliases: dict[str, list[str]] = {}
    for name, canonical in canonical_names(model).items():
        aliases.setdefault(canonical, []).append(name)
    return {c: tuple(names) for c, names in aliases.items() if len(names) > 1}


def modules_of(names) -> str:
    """'emb' and 'head' for ('emb.weight', 'head.weight'): the modules a tie joins, for messages."""
    return " and ".join(f"'{n.rpartition('.')[0] or '<root>'}'" for n in names)
