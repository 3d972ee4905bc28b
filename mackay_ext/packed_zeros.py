"""Mostly-zero dense tensors as a save_compressed file stores them: their nonzeros only.

Only Linear and Conv2d layers have a sparse form (sparsify); the weights of a pruned LSTM, GRU,
embedding or Conv1d, and any layer left dense, went to the file with their zeros (a new user's
LSTM at 71% zeros wrote a file larger than its dense state_dict). Such a tensor is stored as its
nonzero values plus where they are: a bitmask of its entries (one bit each), or, when few enough
are nonzero, their flat positions (in the narrowest integer type); whichever is smaller, and only
where that is smaller than the tensor. load_compressed unpacks them, so the loaded model is the
saved one and those layers run dense. A negative zero is a zero and loads as +0 (a weight pruned
by a product with a 0/1 mask is -0 where it was negative: counted as nonzeros, half the pruned
weights would be stored); NaN and inf are values like any other.
"""
from __future__ import annotations

import math

import torch

from ._files import CorruptFileError
from .sparse import _storage_dtype

MIN_NUMEL = 256       # smaller tensors: the entry's own overhead eats what packing saves
MAX_SHARE = 0.9       # packed only when at most this share of the dense bytes
_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack(tensor: torch.Tensor) -> dict | None:
    """The packed entry of `tensor` (CPU), or None where storing it whole is as small."""
    if not tensor.is_floating_point() or tensor.is_meta or tensor.numel() < MIN_NUMEL:
        return None
    flat = tensor.detach().cpu().reshape(-1)
    nonzero = flat != 0
    count, numel, size = int(nonzero.sum()), flat.numel(), flat.element_size()
    index_dtype = _storage_dtype(numel - 1)
    by_position = count * (size + torch.empty((), dtype=index_dtype).element_size())
    by_mask = (numel + 7) // 8 + count * size
    if min(by_position, by_mask) > MAX_SHARE * numel * size:
        return None
    entry = {"shape": list(tensor.shape), "values": flat[nonzero].clone()}
    if by_position <= by_mask:
        entry["positions"] = nonzero.nonzero().squeeze(1).to(index_dtype)
    else:
        entry["mask"] = _bits(nonzero)
    return entry


def unpack(entry, key: str, path: str, expected: tuple[int, ...]) -> torch.Tensor:
    """The dense tensor of a packed entry, checked whole before it is built: its shape must be
    `expected` (the model's tensor's, so an edited file cannot make it allocate more)."""
    def corrupt(problem: str) -> CorruptFileError:
        return CorruptFileError(f"load_compressed: {path}: packed tensor {key!r}: {problem} (damaged, or "
                                "edited after save_compressed wrote it)")

    if not isinstance(entry, dict) or "shape" not in entry or "values" not in entry \
            or ("positions" in entry) == ("mask" in entry):
        raise corrupt("incomplete")
    shape, values = entry["shape"], entry["values"]
    if not isinstance(shape, (list, tuple)) or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape):
        raise corrupt(f"its shape must be a list of ints, got {shape!r:.80}")
    if tuple(shape) != tuple(expected):
        raise RuntimeError(f"load_compressed: the model does not match the file: {key} is {tuple(shape)} in "
                           f"the file, {tuple(expected)} in the model")
    if not (isinstance(values, torch.Tensor) and values.dim() == 1 and values.is_floating_point()):
        raise corrupt("its values must be a 1-D floating tensor")
    numel = math.prod(shape)
    if "positions" in entry:
        positions = entry["positions"]
        if not (isinstance(positions, torch.Tensor) and positions.dim() == 1 and not positions.is_floating_point()
                and positions.dtype != torch.bool and positions.numel() == values.numel()):
            raise corrupt("its positions must be a 1-D integer tensor with one entry per value")
        positions = positions.long()
        if positions.numel() and (int(positions[0]) < 0 or int(positions[-1]) >= numel
                                  or bool((positions[1:] <= positions[:-1]).any())):
            raise corrupt(f"its positions must increase strictly within [0, {numel})")
        nonzero = torch.zeros(numel, dtype=torch.bool)
        nonzero[positions] = True
    else:
        mask = entry["mask"]
        if not (isinstance(mask, torch.Tensor) and mask.dtype == torch.uint8 and mask.shape == ((numel + 7) // 8,)):
            raise corrupt(f"its mask must be a uint8 tensor of {(numel + 7) // 8} bytes")
        bits = ((mask.unsqueeze(1) & _BIT_WEIGHTS) != 0).reshape(-1)
        if bool(bits[numel:].any()) or int(bits.sum()) != values.numel():
            raise corrupt("its mask does not mark one entry per value")
        nonzero = bits[:numel]
    dense = torch.zeros(numel, dtype=values.dtype)
    dense[nonzero] = values
    return dense.reshape(shape)


def _bits(flags: torch.Tensor) -> torch.Tensor:
    """A bool vector as bytes, eight flags each (the first flag in the lowest bit)."""
    padded = torch.zeros((flags.numel() + 7) // 8 * 8, dtype=torch.uint8)
    padded[:flags.numel()] = flags
    return (padded.view(-1, 8) * _BIT_WEIGHTS).sum(1, dtype=torch.uint8)
