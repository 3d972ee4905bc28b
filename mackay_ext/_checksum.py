"""A SHA-256 digest of a file's plain-data payload (tensors, numbers, strings, None, lists,
tuples and dicts), stored beside it: torch's zip reader does not check its records' CRCs, so a
file whose tensor bytes were damaged (a bad copy, bit rot, an edit) would otherwise load and
compute something else without a word."""
from __future__ import annotations

import hashlib
from typing import Any

import torch


def payload_digest(payload: Any) -> str:
    """Hex SHA-256 of `payload`: every tensor's dtype, shape and bytes, every key and value, in a
    fixed order (dict keys sorted), so equal contents give equal digests wherever they live."""
    digest = hashlib.sha256()
    _feed(digest, payload)
    return digest.hexdigest()


def _feed(digest, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        tensor = obj.detach().cpu().contiguous()
        digest.update(f"T{tensor.dtype}{tuple(tensor.shape)};".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        digest.update(f"D{len(obj)};".encode())
        for key in sorted(obj, key=repr):
            _feed(digest, key)
            _feed(digest, obj[key])
    elif isinstance(obj, (list, tuple)):
        digest.update(f"{'L' if isinstance(obj, list) else 'U'}{len(obj)};".encode())
        for item in obj:
            _feed(digest, item)
    elif obj is None or isinstance(obj, (bool, int, float, str)):
        digest.update(f"{type(obj).__name__}:{obj!r};".encode())
    else:   # the package writes nothing else; a loader refused anything else before this
        raise TypeError(f"payload_digest: cannot digest a {type(obj).__name__}")
