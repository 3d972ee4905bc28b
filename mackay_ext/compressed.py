"""The compressed file: a model's sparse layers stored as nonzeros only (indices in the
narrowest integer type), mostly-zero dense tensors as their nonzeros too (packed_zeros: an LSTM's,
an embedding's), everything else as a state_dict; loaded with weights_only=True."""
from __future__ import annotations

import io
import math
import os
import warnings

import torch
from torch import nn

from ._checksum import DIGEST_KEY, check_plain, check_seal, save_sealed
from ._files import CorruptFileError, load_plain
from ._validate import check_module, check_not_quantized
from .convert import MIN_SPARSITY, unconvertible
from .csr import check_csr
from .packed_zeros import pack, unpack
from .sparse import SparseConv2d, SparseLinear, _CSRWeight, _set_module, _storage_dtype


def _serialized_size(obj) -> int:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.tell()


# v1: no packed tensors, which every mackay_ext reads; v2: with packed ones, which a mackay_ext
# from before v2 refuses as not its format (rather than, where it predates packing, loading it and
# finding the packed tensors missing from the model)
FORMAT = "mackay_ext.compressed.v1"
FORMAT_PACKED = "mackay_ext.compressed.v2"
_FORMAT_PREFIX = "mackay_ext.compressed.v"


def is_compressed_payload(payload) -> bool:
    """Whether a loaded file is one save_compressed wrote, of any version."""
    return isinstance(payload, dict) and str(payload.get("format", "")).startswith(_FORMAT_PREFIX)


def _check_save_args(model, path, model_name, model_kwargs, metadata) -> None:
    where = "save_compressed"
    check_module(model, "model", where)
    check_not_quantized(model, where, "export the quantized model (torch.export, ONNX), or store the float "
                        "model (sparsify, then save_compressed) and, after loading, densify or shrink it and "
                        "quantize that (quantize_dynamic leaves sparse layers in float32): its zeros stay "
                        "zeros in int8")
    for name, value in (("model_kwargs", model_kwargs), ("metadata", metadata)):
        if value is not None and not isinstance(value, dict):   # its entries: check_plain
            raise TypeError(f"{where}: {name} must be a dict (or None), got "
                            f"{type(value).__name__} {value!r:.80}")
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

    Every other tensor (layers sparsify leaves dense or has no sparse form for: LSTM, GRU,
    Embedding, Conv1d) is stored whole, or, where it is mostly zeros, as its nonzeros and where they
    are (mackay_ext.packed_zeros); those load as dense tensors again. The folder of `path` must
    exist (a typo in it is an error, not a new directory)."""
    _check_save_args(model, path, model_name, model_kwargs, metadata)
    # torch.compile's wrapper keeps the model as _orig_mod: store the model's own names, which
    # the plain network that load_compressed fills has
    model = getattr(model, "_orig_mod", model) if type(model).__name__ == "OptimizedModule" else model
    check_plain(model_kwargs, "model_kwargs", "save_compressed")
    check_plain(metadata, "metadata", "save_compressed")
    sparse, dense_state = {}, {}
    skip = set()
    for name, module in model.named_modules():
        if isinstance(module, _CSRWeight):
            prefix = f"{name}." if name else ""
            # stored once, under its first name; load_compressed gives it every name the model
            # it fills binds to that layer (state_dict repeats a module registered twice)
            skip.update(f"{alias}.{key}" if alias else key for alias in _names_of(model, module)
                        for key in module.state_dict())
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
    own = {k: v for k, v in model.state_dict().items() if k not in skip}
    rest = {k: v.cpu() for k, v in own.items()}
    check_plain(rest, "the model's state_dict", "save_compressed")
    dense_state.update(rest)
    packed = _packed(rest, own)
    payload = {"format": FORMAT_PACKED if packed else FORMAT, "model_name": model_name, "sparse": sparse,
               "state": {k: v for k, v in rest.items() if k not in packed}, "packed": packed,
               "model_kwargs": dict(model_kwargs or {}), "metadata": dict(metadata or {})}
    if model_name:   # a file that names a model must be one load_compressed can rebuild it from
        problem = _named_model_problem(payload, "this model")
        if problem:
            raise ValueError(f"save_compressed: model_name does not describe this model: {problem}")
    save_sealed(payload, path)  # never half a file; load_compressed refuses one that differs
    _warn_if_sparse_but_dense(model)
    return {"bytes": os.path.getsize(path), "dense_bytes": _serialized_size(dense_state)}


def _packed(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> dict[str, dict]:
    """The packed entries of `state`'s mostly-zero tensors (on the CPU); a tensor under several
    keys (tied weights) is packed once, and its other keys say {"same_as": the first}. `own`: the
    model's own tensors, whose storage tells the ties (a GPU model's CPU copies are one per key)."""
    packed, first_key = {}, {}
    for key, value in state.items():
        source = own[key]
        where = (source.device, source.data_ptr(), source.dtype, tuple(source.shape), source.stride())
        if where in first_key and value.numel():
            if first_key[where] in packed:
                packed[key] = {"same_as": first_key[where]}
            continue
        first_key[where] = key
        entry = pack(value)
        if entry is not None:
            packed[key] = entry
    return packed


def _unpacked_state(path: str, payload: dict, model: nn.Module) -> dict[str, torch.Tensor]:
    """The file's dense state_dict entries, its packed tensors unpacked (each checked against
    the model's tensor of that name before it is built)."""
    packed = payload.get("packed", {})   # (none in a file from before packing)
    if not isinstance(packed, dict):
        raise CorruptFileError(f"load_compressed: {path}: its packed tensors are a {type(packed).__name__}, "
                               "not a dict")
    state, own = dict(payload["state"]), model.state_dict()
    for key, entry in packed.items():
        if key in state:
            raise CorruptFileError(f"load_compressed: {path}: {key!r} is stored both whole and packed")
        if key not in own:
            raise RuntimeError(f"load_compressed: the model does not match the file: the model has no {key}, "
                               "which the file holds")
        if isinstance(entry, dict) and set(entry) == {"same_as"}:
            continue
        state[key] = unpack(entry, key, path, tuple(own[key].shape))
    for key, entry in packed.items():   # tied tensors: the first key's
        if key not in state:
            source = state.get(entry["same_as"]) if isinstance(entry["same_as"], str) else None
            if source is None or entry["same_as"] not in packed:
                raise CorruptFileError(f"load_compressed: {path}: packed tensor {key!r} names no packed "
                                       f"tensor it is the same as ({entry['same_as']!r:.80})")
            state[key] = source
    return state


def _warn_if_sparse_but_dense(model: nn.Module) -> None:
    """Said when the file stores dense layers that are mostly zeros: sparsify was forgotten (a
    new user's MLP at 99.2% zeros wrote 342,741 bytes, more than its dense state_dict)."""
    zeros = {}
    formless = unconvertible(model)   # (sparsify named them, and the file stores their nonzeros)
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)) and not isinstance(module, _CSRWeight) \
                and module not in formless:
            weight = module.weight
            if isinstance(weight, torch.Tensor) and weight.numel() and not weight.is_meta:
                share = float((weight == 0).float().mean())
                if share >= MIN_SPARSITY:   # what sparsify would convert
                    zeros[name] = share
    if zeros:
        shown = ", ".join(f"{name} {share:.0%}" for name, share in list(zeros.items())[:4])
        warnings.warn(f"save_compressed: {len(zeros)} dense layer(s) are mostly zeros ({shown}{', ...' if len(zeros) > 4 else ''}): "
                      "the file holds their nonzeros, but they load as dense layers and compute with "
                      "their zeros: call mackay_ext.sparsify(model) before save_compressed to load them as "
                      "sparse layers", UserWarning, stacklevel=3)


def load_compressed(path: str, model: nn.Module | None = None, map_location="cpu") -> nn.Module:
    """Rebuild a model saved by save_compressed. `model` is a freshly built network of the same
    architecture (dense); without it, the saved model_name is looked up in mackay_ext.models.

    Refused with CorruptFileError: a file whose contents differ from the SHA-256 digest saved
    with them (damaged; a file from before the digest loads with a warning), and fields that
    cannot be what the model runs; RuntimeError: a model that does not match the file."""
    payload = _read(path, "load_compressed", map_location)
    if model is None:
        model = _model_by_name(path, payload)
    check_module(model, "model", "load_compressed")
    on_meta = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if on_meta:   # torch would warn a no-op copy per tensor, then fail deep inside
        raise ValueError(f"load_compressed: model has tensors on the meta device ({', '.join(on_meta[:3])}"
                         f"{', ...' if len(on_meta) > 3 else ''}), which hold no values to load into; "
                         "model.to_empty(device='cpu') first (then its non-persistent buffers need their "
                         "initial values again), or build it on a real device")
    if type(model).__name__ == "OptimizedModule" and hasattr(model, "_orig_mod"):
        # replacing layers under compiled code would leave that code stale
        raise TypeError("load_compressed: model is a torch.compile wrapper; pass the plain network "
                        "(model._orig_mod) and compile the model load_compressed returns")
    for name, entry in payload["sparse"].items():   # every layer checked before any is replaced
        _check_sparse_entry(path, name, entry, model)
    state = _unpacked_state(path, payload, model)
    _check_dense_entries(path, state, model)
    _warn_nonfinite(path, payload, state)
    for name, entry in payload["sparse"].items():
        crow, col = entry["crow"].long(), entry["col"].long()
        old = model.get_submodule(name)   # the dense layer, or a sparse twin (a model loaded before)
        old_weight = old.values if isinstance(old, _CSRWeight) else old.weight
        # in the model's dtype, as load_state_dict copies the dense layers' tensors into it
        values = entry["values"].to(old_weight.dtype)
        bias = None if entry["bias"] is None else entry["bias"].to(old_weight.dtype)
        if entry["kind"] == "linear":
            layer = SparseLinear(entry["out"], entry["in"], crow, col, values, bias)
        else:
            layer = SparseConv2d(entry["in_channels"], entry["out_channels"], entry["kernel_size"], crow,
                                 col, values, bias, entry["stride"], entry["padding"], entry["dilation"])
        # the mode and the freezing of the layer it replaces (a deploy script's eval() and
        # requires_grad_(False) made before loading hold for the loaded layers too)
        layer.train(old.training)
        layer.values.requires_grad_(old_weight.requires_grad)
        if layer.bias is not None and getattr(old, "bias", None) is not None:
            layer.bias.requires_grad_(old.bias.requires_grad)
        for alias in _names_of(model, old):   # e.g. self.block2 = self.block
            _set_module(model, alias, layer)
    missing, unexpected = model.load_state_dict(state, strict=False)
    sparse_keys = {f"{alias}.{k}" if alias else k for n in payload["sparse"]
                   for alias in _names_of(model, model.get_submodule(n))
                   for k in model.get_submodule(n).state_dict()}
    missing = [k for k in missing if k not in sparse_keys]
    if missing or unexpected:
        raise RuntimeError(f"load_compressed: the model does not match the file (missing {missing}, "
                           f"unexpected {unexpected})")
    return model.to(map_location) if isinstance(map_location, (str, torch.device)) else model


def read_metadata(path: str) -> dict:
    """The metadata a save_compressed file holds, read as load_compressed reads the file (plain
    values only, checked against its digest): e.g. the CLI's `input_standardisation`, the mean and
    std a deployed model's inputs need."""
    return dict(_read(path, "read_metadata", "cpu").get("metadata") or {})


def _read(path: str, who: str, map_location) -> dict:
    """A save_compressed file's payload: refused when it is not one, damaged or incomplete."""
    payload = load_plain(path, "compressed model", map_location=map_location)
    if not is_compressed_payload(payload):
        raise RuntimeError(f"{who}: {path} is not a file written by save_compressed")
    if payload["format"] not in (FORMAT, FORMAT_PACKED):
        raise RuntimeError(f"{who}: {path} was written by a newer mackay_ext (format "
                           f"{payload['format'][len(_FORMAT_PREFIX) - 1:]!r}; this one reads v1 and v2): "
                           "upgrade mackay_ext to load it")
    whole = isinstance(payload.get("sparse"), dict) and isinstance(payload.get("state"), dict)
    if whole or DIGEST_KEY in payload:   # (a file without either: its refusal, not the digest's warning)
        check_seal(payload, path, f"{who}:")
    if not whole:
        raise CorruptFileError(f"{who}: {path} lacks its 'sparse' or 'state' entry (damaged, or "
                               "edited after save_compressed wrote it)")
    if not isinstance(payload.get("metadata", {}), dict):
        raise CorruptFileError(f"{who}: {path}: its metadata is a {type(payload['metadata']).__name__}, not a dict")
    return payload


def _names_of(model: nn.Module, module: nn.Module) -> list[str]:
    """Every name `model` registers `module` under (one module may sit under two attributes)."""
    return [name for name, other in model.named_modules(remove_duplicate=False) if other is module]


def _check_dense_entries(path: str, state: dict, model: nn.Module) -> None:
    """Each saved tensor is a tensor of the model's tensor's shape (say which, and why that
    happens, rather than torch's bare size mismatch), and a floating one where the model's is
    (load_state_dict would cast integers into the weights without a word)."""
    own = model.state_dict()
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CorruptFileError(f"load_compressed: {path}: entry {key!r} is a {type(value).__name__}, "
                                   "not a tensor")
        if key in own and own[key].shape != value.shape:
            raise RuntimeError(
                f"load_compressed: the model does not match the file: {key} is {tuple(value.shape)} in the file, "
                f"{tuple(own[key].shape)} in the model. A file of a shrunk model (mackay_ext.shrink) loads "
                "into that shrunk architecture only: store the pruned model and shrink after loading, or "
                "export the shrunk one (torch.export, ONNX)")
        if key in own and own[key].is_floating_point() and not value.is_floating_point():
            raise CorruptFileError(f"load_compressed: {path}: entry {key!r} holds {value.dtype} values where "
                                   f"the model's tensor is {own[key].dtype} (edited after save_compressed wrote it?)")


def _warn_nonfinite(path: str, payload: dict, state: dict[str, torch.Tensor]) -> None:
    """NaN or inf among the stored values loads (a diverged run's file can be worth inspecting),
    but not in silence: the model will compute NaN."""
    tensors = [(f"{name}.values", entry["values"]) for name, entry in payload["sparse"].items()]
    tensors += [(f"{name}.bias", entry["bias"]) for name, entry in payload["sparse"].items()
                if isinstance(entry["bias"], torch.Tensor)]
    tensors += [(key, value) for key, value in state.items() if value.is_floating_point()]
    bad = [name for name, tensor in tensors if not bool(torch.isfinite(tensor).all())]
    if bad:
        warnings.warn(f"load_compressed: {path}: NaN or inf values in {', '.join(bad[:5])}"
                      f"{' and more' if len(bad) > 5 else ''}: the model will compute NaN or inf (was it "
                      "saved after training diverged?)", RuntimeWarning, stacklevel=3)


def _model_by_name(path: str, payload: dict) -> nn.Module:
    """The model the file names, built on the meta device first: its tensors must have the
    file's shapes before any memory is taken (a model_kwargs edited to num_classes=10**9 would
    otherwise allocate whatever it asks)."""
    from . import models
    name, kwargs = payload.get("model_name"), payload.get("model_kwargs", {})
    if not name:
        raise ValueError("load_compressed: pass `model` (this file names no model)")
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise CorruptFileError(f"load_compressed: {path}: model_kwargs must be a dict of keyword "
                               f"arguments, got {type(kwargs).__name__}")
    problem = _named_model_problem(payload, "the file")
    if problem:
        raise CorruptFileError(f"load_compressed: {path}: {problem}")
    model = models.create(name, **kwargs)
    # the model in the file's dtype (a bfloat16 model's file came back float32: twice the memory)
    stored = [entry.get("values") for entry in payload["sparse"].values() if isinstance(entry, dict)]
    stored += list(payload["state"].values())   # (each entry is checked after, against the model)
    packed = payload.get("packed")
    stored += [entry.get("values") for entry in packed.values() if isinstance(entry, dict)] \
        if isinstance(packed, dict) else []
    dtypes = {tensor.dtype for tensor in stored if isinstance(tensor, torch.Tensor) and tensor.is_floating_point()}
    return model.to(dtypes.pop()) if len(dtypes) == 1 else model


def _named_model_problem(payload: dict, whose: str) -> str | None:
    """Why payload's model_name and model_kwargs do not build a model with the payload's tensor
    shapes (None if they do); built on the meta device, so nothing is allocated."""
    from . import models
    # (files written before model_kwargs was saved have none: the model's defaults)
    name, kwargs = payload["model_name"], payload.get("model_kwargs", {})
    try:
        with torch.device("meta"):
            probe = models.create(name, **kwargs)
    except (TypeError, ValueError, RuntimeError) as error:   # RuntimeError: sizes that overflow
        return f"model_name {name!r} and model_kwargs {kwargs} do not build a model ({error})"
    expected = _file_shapes(payload)
    built = {key: tuple(tensor.shape) for key, tensor in probe.state_dict().items()}
    for key in sorted(set(built) | set(expected)):
        if built.get(key) == expected.get(key):
            continue
        model = f"model {name!r} with model_kwargs {kwargs}"
        if key not in expected:
            return f"{model} has {key} of shape {built[key]}, which {whose} lacks"
        if key not in built:
            return f"{model} has no {key}, which {whose} holds (shape {expected[key]})"
        return f"{model} has {key} of shape {built[key]}, where {whose}'s is {expected[key]}"
    return None


def _file_shapes(payload: dict) -> dict[str, tuple[int, ...]]:
    """state_dict key -> shape of the dense model the file describes."""
    shapes = {k: tuple(v.shape) for k, v in payload["state"].items() if isinstance(v, torch.Tensor)}
    packed = payload.get("packed") if isinstance(payload.get("packed"), dict) else {}
    for key, entry in packed.items():   # (unpack checks each entry whole)
        source = packed.get(entry.get("same_as")) if isinstance(entry, dict) and isinstance(entry.get("same_as"), str) \
            else entry
        shape = source.get("shape") if isinstance(source, dict) else None
        if isinstance(shape, (list, tuple)):
            shapes[key] = tuple(shape)
    for name, entry in payload["sparse"].items():
        if not isinstance(entry, dict):
            continue   # _check_sparse_entry names it
        prefix = f"{name}." if name else ""
        if entry.get("kind") == "conv2d":
            kernel = entry.get("kernel_size", ())
            shapes[prefix + "weight"] = (entry.get("out_channels"), entry.get("in_channels"),
                                         *(kernel if isinstance(kernel, (tuple, list)) else ()))
        else:
            shapes[prefix + "weight"] = (entry.get("out"), entry.get("in"))
        if entry.get("bias") is not None:
            shapes[prefix + "bias"] = (entry.get("out_channels", entry.get("out")),)
    return shapes


_ENTRY_KEYS = {"linear": ("out", "in", "crow", "col", "values", "bias"),
               "conv2d": ("in_channels", "out_channels", "kernel_size", "crow", "col", "values", "bias",
                          "stride", "padding", "dilation")}


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_sparse_entry(path: str, name: str, entry, model: nn.Module) -> None:
    """The file's sparse layer `name` is whole and fits the model's layer of that name."""
    kind = entry.get("kind") if isinstance(entry, dict) else None
    if kind not in _ENTRY_KEYS or any(key not in entry for key in _ENTRY_KEYS[kind]):
        raise CorruptFileError(f"load_compressed: {path}: sparse layer {name!r} is incomplete (damaged, or "
                               "edited after save_compressed wrote it)")
    for key, floating in (("crow", False), ("col", False), ("values", True)):
        tensor = entry[key]
        if not (isinstance(tensor, torch.Tensor) and tensor.dim() == 1 and tensor.is_floating_point() == floating):
            what = "floating" if floating else "integer"
            raise CorruptFileError(f"load_compressed: {path}: sparse layer {name!r}: {key} must be a 1-D "
                                   f"{what} tensor, got {_describe(tensor)}")
    for key in _ENTRY_KEYS[kind]:
        value = entry[key]
        if key in ("out", "in", "in_channels", "out_channels") and not _is_count(value):
            raise CorruptFileError(f"load_compressed: {path}: sparse layer {name!r}: {key} must be an int >= 0, "
                                   f"got {type(value).__name__} {value!r:.40}")
        if key in ("kernel_size", "stride", "padding", "dilation") and not (
                _is_count(value) or isinstance(value, (list, tuple)) and all(map(_is_count, value))):
            raise CorruptFileError(f"load_compressed: {path}: sparse layer {name!r}: {key} must be an int >= 0 "
                                   f"or a pair of them, got {type(value).__name__} {value!r:.40}")
    try:   # the arrays themselves, before any layer of the model is replaced
        check_csr(entry["crow"].long(), entry["col"].long(), entry["values"],
                  (entry["out_channels"] if kind == "conv2d" else entry["out"],
                   entry["in_channels"] * math.prod(entry["kernel_size"]) if kind == "conv2d" else entry["in"]))
    except (TypeError, ValueError) as error:
        raise CorruptFileError(f"load_compressed: {path}: sparse layer {name!r}: {error}") from None
    try:
        layer = model.get_submodule(name)
    except AttributeError:
        raise RuntimeError(f"load_compressed: the model does not match the file: it has no layer {name!r}") from None
    problem = _not_replaceable(kind, layer)
    if problem:
        raise RuntimeError(f"load_compressed: the model does not match the file: layer {name!r} is "
                           f"{problem}, the file holds the sparse twin of a plain "
                           f"{'nn.Linear' if kind == 'linear' else 'zero-padded nn.Conv2d with groups=1'}")
    if kind == "linear":
        saved, expected = (entry["out"], entry["in"]), (getattr(layer, "out_features", None),
                                                        getattr(layer, "in_features", None))
        what = "(out_features, in_features)"
    else:
        saved = (entry["out_channels"], entry["in_channels"], tuple(entry["kernel_size"]))
        expected = (getattr(layer, "out_channels", None), getattr(layer, "in_channels", None),
                    tuple(getattr(layer, "kernel_size", ())))
        what = "(out_channels, in_channels, kernel_size)"
    if kind == "conv2d":   # the geometry too: the file's is what the sparse layer will run
        saved += tuple(_pair(entry[key]) for key in ("stride", "padding", "dilation"))
        expected += tuple(_pair(getattr(layer, key, None)) for key in ("stride", "padding", "dilation"))
        what = what[:-1] + ", stride, padding, dilation)"
    if saved != expected:
        raise RuntimeError(f"load_compressed: the model does not match the file: layer {name!r} is "
                           f"{type(layer).__name__} {what} = {expected}, the file's is {saved}")
    bias, out = entry["bias"], saved[0]
    if bias is not None and (not isinstance(bias, torch.Tensor) or not bias.is_floating_point()
                             or tuple(bias.shape) != (out,)):
        raise CorruptFileError(f"load_compressed: {path}: layer {name!r}'s bias must be a floating tensor "
                               f"of {out} entries, got {_describe(bias)}")
    if (bias is None) != (getattr(layer, "bias", None) is None):
        raise RuntimeError(f"load_compressed: the model does not match the file: layer {name!r} "
                           f"{'has' if bias is None else 'has no'} bias in the model, "
                           f"{'none' if bias is None else 'one'} in the file")


def _not_replaceable(kind: str, layer: nn.Module) -> str | None:
    """Why the model's `layer` is not what the file's sparse layer of `kind` stands for (None if it
    is): only what sparsify converts (or its sparse twin) may be swapped for it, or the model's
    own forward, grouping or padding would be dropped without a word."""
    dense, sparse = (nn.Linear, SparseLinear) if kind == "linear" else (nn.Conv2d, SparseConv2d)
    if isinstance(layer, sparse):
        return None
    if not isinstance(layer, dense):
        return f"a {type(layer).__name__}"
    if type(layer).forward is not dense.forward:
        return f"a {type(layer).__name__} with its own forward"
    if kind == "conv2d" and (layer.groups != 1 or layer.padding_mode != "zeros"):
        return f"an nn.Conv2d with groups={layer.groups}, padding_mode={layer.padding_mode!r}"
    return None


def _pair(value):
    """A conv attribute as a tuple (int -> (int, int)); other values as they are, to compare."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    return tuple(value) if isinstance(value, (tuple, list)) else value


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__
