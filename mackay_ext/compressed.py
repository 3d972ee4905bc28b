"""The compressed file: a model's sparse layers stored as nonzeros only (indices in the
narrowest integer type), everything else as a state_dict; loaded with weights_only=True."""
from __future__ import annotations

import io
import os

import torch
from torch import nn

from ._files import CorruptFileError, load_plain, save_atomic
from ._validate import check_module
from .sparse import SparseConv2d, SparseLinear, _CSRWeight, _set_module, _storage_dtype


def _serialized_size(obj) -> int:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.tell()


FORMAT = "mackay_ext.compressed.v1"


def _check_save_args(model, path, model_name) -> None:
    where = "save_compressed"
    check_module(model, "model", where)
    if model_name is not None:
        # load_compressed rebuilds the model by this name: an unknown one would make a file that
        # cannot be loaded without `model=`, found out only then
        from .models import MODELS
        if model_name not in MODELS:
            raise ValueError(f"{where}: model_name: unknown model {model_name!r}; choose one of "
                             f"{tuple(MODELS)} (or None, and pass `model=` to load_compressed)")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{where}: path must be a file name, got {type(path).__name__}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{where}: path {os.fspath(path)!r}: the folder {folder} does not "
                                "exist; create it first")


def save_compressed(model: nn.Module, path: str, model_name: str | None = None, *,
                    model_kwargs: dict | None = None, metadata: dict | None = None) -> dict[str, int]:
    """Store `model` with its sparse layers as nonzeros only (indices in the narrowest integer
    type). model_name and model_kwargs (numbers and strings, e.g. num_classes, in_channels) let
    load_compressed rebuild it by itself; metadata (plain values) is stored as it is. Returns
    {"bytes": file size, "dense_bytes": size of the equivalent dense state_dict}.

    Layers left dense (not sparse enough, tied, or kept dense by sparsify) are stored dense, so
    the file can be larger than the dense state_dict when few layers are sparse. The folder of
    `path` must exist (a typo in it is an error, not a new directory)."""
    _check_save_args(model, path, model_name)
    sparse, dense_state = {}, {}
    skip = set()
    for name, module in model.named_modules():
        if isinstance(module, _CSRWeight):
            prefix = f"{name}." if name else ""
            skip.update(prefix + key for key in module.state_dict())
            entry = {"kind": "conv2d" if isinstance(module, SparseConv2d) else "linear",
                     "out": module.out_features, "in": module.in_features,
                     "crow": module.crow_indices.cpu().to(_storage_dtype(module.nnz)),
                     "col": module.col_indices.cpu().to(_storage_dtype(max(module.in_features - 1, 0))),
                     "values": module.values.detach().cpu(),
                     "bias": None if module.bias is None else module.bias.detach().cpu()}
            if isinstance(module, SparseConv2d):
                entry.update(in_channels=module.in_channels, out_channels=module.out_channels,
                             kernel_size=module.kernel_size, stride=module.stride,
                             padding=module.padding, dilation=module.dilation)
            sparse[name] = entry
            dense = module.to_dense()
            dense_state.update({prefix + k: v for k, v in dense.state_dict().items()})
    rest = {k: v.cpu() for k, v in model.state_dict().items() if k not in skip}
    dense_state.update(rest)
    payload = {"format": FORMAT, "model_name": model_name, "sparse": sparse, "state": rest,
               "model_kwargs": dict(model_kwargs or {}), "metadata": dict(metadata or {})}
    save_atomic(payload, path)  # never half a file
    return {"bytes": os.path.getsize(path), "dense_bytes": _serialized_size(dense_state)}


def load_compressed(path: str, model: nn.Module | None = None, map_location="cpu") -> nn.Module:
    """Rebuild a model saved by save_compressed. `model` is a freshly built network of the same
    architecture (dense); without it, the saved model_name is looked up in mackay_ext.models."""
    payload = load_plain(path, "compressed model", map_location=map_location)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise RuntimeError(f"load_compressed: {path} is not a file written by save_compressed")
    if not isinstance(payload.get("sparse"), dict) or not isinstance(payload.get("state"), dict):
        raise CorruptFileError(f"load_compressed: {path} lacks its 'sparse' or 'state' entry (damaged, or "
                               "edited after save_compressed wrote it)")
    if model is None:
        if not payload.get("model_name"):
            raise ValueError("load_compressed: pass `model` (this file names no model)")
        from . import models
        model = models.create(payload["model_name"], **payload.get("model_kwargs", {}))
    check_module(model, "model", "load_compressed")
    for name, entry in payload["sparse"].items():   # every layer checked before any is replaced
        _check_sparse_entry(path, name, entry, model)
    for name, entry in payload["sparse"].items():
        crow, col = entry["crow"].long(), entry["col"].long()
        if entry["kind"] == "linear":
            layer = SparseLinear(entry["out"], entry["in"], crow, col, entry["values"], entry["bias"])
        else:
            layer = SparseConv2d(entry["in_channels"], entry["out_channels"], entry["kernel_size"], crow,
                                 col, entry["values"], entry["bias"], entry["stride"],
                                 entry["padding"], entry["dilation"])
        _set_module(model, name, layer)
    missing, unexpected = model.load_state_dict(payload["state"], strict=False)
    sparse_keys = {f"{n}.{k}" if n else k for n in payload["sparse"]
                   for k in model.get_submodule(n).state_dict()}
    missing = [k for k in missing if k not in sparse_keys]
    if missing or unexpected:
        raise RuntimeError(f"load_compressed: the model does not match the file (missing {missing}, "
                           f"unexpected {unexpected})")
    return model.to(map_location) if isinstance(map_location, (str, torch.device)) else model


_ENTRY_KEYS = {"linear": ("out", "in", "crow", "col", "values", "bias"),
               "conv2d": ("in_channels", "out_channels", "kernel_size", "crow", "col", "values", "bias",
                          "stride", "padding", "dilation")}


def _check_sparse_entry(path: str, name: str, entry, model: nn.Module) -> None:
    """The file's sparse layer `name` is whole and fits the model's layer of that name."""
    kind = entry.get("kind") if isinstance(entry, dict) else None
    if kind not in _ENTRY_KEYS or any(key not in entry for key in _ENTRY_KEYS[kind]):
        raise CorruptFileError(f"load_compressed: {path}: sparse layer {name!r} is incomplete (damaged, or "
                               "edited after save_compressed wrote it)")
    try:
        layer = model.get_submodule(name)
    except AttributeError:
        raise RuntimeError(f"load_compressed: the model does not match the file: it has no layer {name!r}") from None
    if kind == "linear":
        saved, expected = (entry["out"], entry["in"]), (getattr(layer, "out_features", None),
                                                        getattr(layer, "in_features", None))
        what = "(out_features, in_features)"
    else:
        saved = (entry["out_channels"], entry["in_channels"], tuple(entry["kernel_size"]))
        expected = (getattr(layer, "out_channels", None), getattr(layer, "in_channels", None),
                    tuple(getattr(layer, "kernel_size", ())))
        what = "(out_channels, in_channels, kernel_size)"
    if saved != expected:
        raise RuntimeError(f"load_compressed: the model does not match the file: layer {name!r} is "
                           f"{type(layer).__name__} {what} = {expected}, the file's is {saved}")
    bias, out = entry["bias"], saved[0]
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (out,)):
        raise CorruptFileError(f"load_compressed: {path}: layer {name!r}'s bias must have {out} entries, "
                               f"got {tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")
