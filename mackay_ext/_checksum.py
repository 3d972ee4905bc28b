"""A SHA-256 digest of a file's plain-data payload (tensors, numbers, strings, None, lists,
tuples and dicts), stored beside it: torch's zip reader does not check its records' CRCs, so a
file whose tensor bytes were damaged (a bad copy, bit rot, an edit) would otherwise load and
compute something else without a word. Every file this package writes is sealed so
(save_sealed / load_sealed): compressed models, training checkpoints, the integrations' states."""
from __future__ import annotations

import hashlib
import warnings
from typing import Any

import torch

from ._files import CorruptFileError, load_plain, save_atomic

DIGEST_KEY = "digest"


def payload_digest(payload: Any) -> str:
    """Hex SHA-256 of `payload`: every tensor's dtype, shape and bytes, every key and value, in a
    fixed order (dict keys sorted), so equal contents give equal digests wherever they live."""
    digest = hashlib.sha256()
    _feed(digest, payload)
    return digest.hexdigest()


def save_sealed(payload: dict, path: str) -> None:
    """save_atomic of `payload` with its digest beside it (under DIGEST_KEY)."""
    save_atomic({**payload, DIGEST_KEY: payload_digest(payload)}, path)


def load_sealed(path: str, what: str, map_location: Any = "cpu") -> Any:
    """load_plain of a file save_sealed wrote, with its digest checked and removed: a file whose
    contents differ is refused (CorruptFileError); one without a digest (written by an older
    mackay_ext) loads with a warning. `what` names the file in messages."""
    loaded = load_plain(path, what, map_location=map_location)
    if isinstance(loaded, dict):
        check_seal(loaded, path, what)
    return loaded


def check_seal(payload: dict, path: str, what: str) -> None:
    """Pop `payload`'s digest and compare it with its contents (see load_sealed)."""
    digest = payload.pop(DIGEST_KEY, None)
    if digest is None:
        warnings.warn(f"{what} {path} carries no checksum (written by an older mackay_ext), so damage "
                      "to it cannot be detected; save it again to add one", UserWarning, stacklevel=3)
    elif not isinstance(digest, str) or digest != payload_digest(payload):
        raise CorruptFileError(f"{what} {path}: its contents do not match the checksum saved with them "
                               "(damaged, or edited after mackay_ext wrote it)")


def _feed(digest, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        tensor = obj.detach().cpu()
        if tensor.layout != torch.strided:   # torch.sparse tensors a user's model may hold
            tensor = tensor.to_dense()
        if tensor.is_quantized:
            tensor = tensor.dequantize()
        tensor = tensor.contiguous()
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
    # the rest of what torch.load(weights_only=True) reads back (a model's state or an optimizer's
    # options may hold them); their repr is their value
    elif isinstance(obj, (bytes, bytearray)):
        digest.update(f"B{len(obj)};".encode())
        digest.update(bytes(obj))
    elif isinstance(obj, (set, frozenset)):
        digest.update(f"S{len(obj)};".encode())
        for item in sorted(obj, key=repr):
            _feed(digest, item)
    elif isinstance(obj, (complex, torch.dtype, torch.device, torch.layout, torch.memory_format, torch.qscheme)):
        digest.update(f"{type(obj).__name__}:{obj!r};".encode())
    else:   # what torch.load(weights_only=True) cannot read back either
        raise TypeError(f"payload_digest: cannot digest a {type(obj).__name__}, which a file read with "
                        "torch.load(weights_only=True) cannot hold")


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
