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
            digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
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
    else:   # check_plain refused anything else before a save; a load refused it before this
        raise TypeError(f"payload_digest: cannot digest a {type(obj).__name__}")


def check_plain(value: Any, name: str, where: str) -> None:
    """`value` holds only what a file may (torch.load(weights_only=True) reads it back, and the
    digest covers it): None, bool, int, float, str, dense tensors, lists, tuples and dicts of
    those (dict keys: str or int)."""
    if value is None or type(value) in (bool, int, float, str):   # not numpy's subclasses: a
        return                                                       # pickled numpy scalar is refused
    if isinstance(value, torch.Tensor):
        if value.layout != torch.strided:
            raise TypeError(f"{where}: {name} holds a {value.layout} tensor; store it dense (to_dense())")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int)) or isinstance(key, bool):
                raise TypeError(f"{where}: {name} has a key {key!r} of type {type(key).__name__}; "
                                "keys must be str or int")
            check_plain(item, f"{name}[{key!r}]", where)
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            check_plain(item, f"{name}[{i}]", where)
        return
    raise TypeError(f"{where}: {name} is a {type(value).__name__}; a file holds None, bool, int, float, "
                    "str, tensors and lists / tuples / dicts of them (e.g. a numpy number: float(x))")
