"""One rule per ATen op: how channel labels flow through elementwise, shape and mixing ops.

Rules for ops that hold parameters (norms, linear, conv, embedding, attention) are in layers.py.
See graph.py for what a label is.
"""
from __future__ import annotations

import numpy as np
import torch

from .graph import PIN, V, node_shape, where

RULES: dict = {}


def rule(*names):
    def register(fn):
        for n in names:
            RULES[n] = fn
        return fn
    return register


def align(labels: np.ndarray, ndim: int) -> np.ndarray:
    return labels.reshape((1,) * (ndim - labels.ndim) + labels.shape)


def merge_along(g, labels: np.ndarray, dims) -> np.ndarray:
    """Merge the atoms along `dims` for each position of the other dims (kept, size 1)."""
    dims = [d % labels.ndim for d in dims if labels.shape[d % labels.ndim] > 1]
    if not dims:
        return labels
    keep = [d for d in range(labels.ndim) if d not in dims]
    moved = np.transpose(labels, keep + dims)
    rows = moved.reshape(int(np.prod([labels.shape[d] for d in keep], dtype=np.int64)), -1)
    merged = np.array([g.atoms.merge(r) for r in rows], dtype=np.int64)
    out_shape = [labels.shape[d] if d in keep else 1 for d in range(labels.ndim)]
    return merged.reshape(out_shape)


def elementwise_values(g, vals: list[V], out_shape) -> V:
    """Labels of an elementwise op over already-broadcast operands (see the module docstring)."""
    nd = len(out_shape)
    items = [(align(v.labels, nd), (1,) * (nd - len(v.shape)) + v.shape, v.from_param) for v in vals]
    varies = [[lab.shape[d] > 1 for d in range(nd)] for lab, _, _ in items]
    direct, spread = [], []
    for i, (lab, shape, from_param) in enumerate(items):
        bdims = [d for d in range(nd) if shape[d] == 1 and out_shape[d] > 1]
        conflict = [d for d in bdims if any(varies[j][d] for j in range(len(items)) if j != i)]
        if not conflict:
            direct.append(lab)
        elif from_param:   # one parameter entry serves several atoms: they go together
            spread.append((lab, conflict))
    if not direct:   # an outer-product-like broadcast: keep it conservative
        root = g.atoms.merge(np.concatenate([lab.ravel() for lab, _, _ in items]))
        return V(np.full((1,) * nd, root, dtype=np.int64), out_shape)
    combined = direct[0]
    for lab in direct[1:]:
        g.atoms.union_arrays(combined, lab)
        combined = np.broadcast_arrays(combined, lab)[0] if combined.size >= lab.size else \
            np.broadcast_arrays(lab, combined)[0]
    for lab, conflict in spread:
        g.atoms.union_arrays(merge_along(g, combined, conflict), lab)
    return V(np.ascontiguousarray(combined), out_shape, all(f for _, _, f in items))


@rule("add", "sub", "mul", "div", "where", "maximum", "minimum", "eq", "ne", "lt", "le", "gt", "ge",
      "logical_and", "logical_or", "logical_not", "masked_fill", "pow", "rsub", "clamp", "clamp_min",
      "clamp_max", "relu", "hardtanh", "gelu", "silu", "sigmoid", "tanh", "dropout", "contiguous",
      "clone", "detach", "alias", "neg", "abs", "exp", "log", "sqrt", "rsqrt", "erf", "hardswish",
      "hardsigmoid", "leaky_relu", "elu", "relu6", "softplus", "mish", "_to_copy", "to", "type_as",
      "lift_fresh_copy", "square", "reciprocal", "sign", "cos", "sin", "bitwise_not", "copy",
      "bitwise_and", "bitwise_or", "lerp", "fill", "zero", "native_dropout", "_assert_tensor_metadata",
      "feature_dropout", "alpha_dropout", "feature_alpha_dropout")   # identities in eval mode
def _elementwise(g, node, *args, **kwargs):
    out_shape = node_shape(node)
    vals = [g.value(a) for a in list(args) + list(kwargs.values())
            if isinstance(a, torch.fx.Node) and node_shape(a) is not None]
    if out_shape is None:   # e.g. native_dropout returns (out, mask); asserts return nothing
        out = node.meta.get("val")
        if isinstance(out, (tuple, list)) and vals:
            v = elementwise_values(g, vals, tensor_shape(out[0]))
            return [v] + [V(v.labels, tensor_shape(o)) for o in out[1:]]
        return None
    if node.target.__name__.startswith("type_as") or node.target.__name__.startswith("to."):
        vals = vals[:1]
    return elementwise_values(g, vals, out_shape)


def tensor_shape(t) -> tuple[int, ...]:
    return tuple(int(s) for s in t.shape)


@rule("arange", "zeros", "ones", "full", "empty", "scalar_tensor", "zeros_like", "ones_like",
      "full_like", "empty_like", "new_zeros", "new_ones", "new_full", "new_empty", "rand", "randn",
      "rand_like", "randn_like", "tensor", "sym_size", "_assert_scalar", "sym_constrain_range_for_size",
      "_local_scalar_dense", "item")
def _constant(g, node, *args, **kwargs):
    shape = node_shape(node)
    return g.pinned(shape) if shape is not None else None


# -- shapes ------------------------------------------------------------------------------
@rule("view", "reshape", "_unsafe_view", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as",
      "reshape_as")
def _reshape(g, node, x, *args, **kwargs):
    out = V(g.full(x).reshape(node_shape(node)), node_shape(node), g.value(x).from_param)
    if _varying_dims(out.labels) > max(_varying_dims(g.value(x).labels), 1):   # a channel dim split
        g.splits.append((node, out.labels))
    return out


def _varying_dims(labels: np.ndarray) -> int:
    return sum(size > 1 for size in labels.shape)


@rule("expand", "expand_as", "broadcast_to")
def _expand(g, node, x, *args, **kwargs):
    out = node_shape(node)
    return V(np.broadcast_to(align(g.value(x).labels, len(out)), out), out, g.value(x).from_param)


@rule("permute")
def _permute(g, node, x, dims):
    return V(np.transpose(g.value(x).labels, [d % len(dims) for d in dims]), node_shape(node), g.value(x).from_param)


@rule("transpose", "t", "swapaxes")
def _transpose(g, node, x, d0=0, d1=1):
    return V(np.swapaxes(g.value(x).labels, d0, d1), node_shape(node), g.value(x).from_param)


def _fixed_positions(g, node, lab: np.ndarray, dim: int) -> None:
    """Indexing at fixed positions of a channel dimension: after a removal they would pick other channels."""
    if lab.shape[dim] > 1 and all(s == 1 for d, s in enumerate(lab.shape) if d != dim):
        for a in np.unique(lab):
            g.atoms.fixed.setdefault(int(a), f"forward code in {where(node)} indexes its channels at fixed "
                                              "positions (a slice, select or split)")


@rule("select")
def _select(g, node, x, dim, index):
    v = g.value(x)
    lab = v.labels
    _fixed_positions(g, node, lab, dim % lab.ndim)
    return V(lab.take(0 if lab.shape[dim] == 1 else index, axis=dim), node_shape(node), v.from_param)


def _slice_labels(lab: np.ndarray, dim: int, sl: slice) -> np.ndarray:
    if lab.shape[dim] == 1:
        return lab
    index = [slice(None)] * lab.ndim
    index[dim] = sl
    return lab[tuple(index)]


def _sliced(g, node, v: V, dim: int, sl: slice) -> V:
    dim %= v.labels.ndim
    if range(*sl.indices(v.shape[dim])) != range(v.shape[dim]):
        _fixed_positions(g, node, v.labels, dim)
    return V(_slice_labels(v.labels, dim, sl), node_shape(node), v.from_param)


@rule("slice")
def _slice(g, node, x, dim=0, start=None, end=None, step=1):
    return _sliced(g, node, g.value(x), dim, slice(start, end, step))


@rule("narrow")
def _narrow(g, node, x, dim, start, length):
    return _sliced(g, node, g.value(x), dim, slice(start, start + length))


@rule("unbind", "split", "split_with_sizes", "chunk", "tensor_split")
def _split(g, node, x, *args, **kwargs):
    v = g.value(x)
    outs = [tensor_shape(o) for o in node.meta["val"]]
    if node.target.__name__.startswith("unbind"):
        dim = (args[0] if args else kwargs.get("dim", 0)) % len(v.shape)
        _fixed_positions(g, node, v.labels, dim)
        return [V(v.labels.take(0 if v.labels.shape[dim] == 1 else i, axis=dim), o, v.from_param)
                for i, o in enumerate(outs)]
    dim = kwargs.get("dim", args[1] if len(args) > 1 else 0) % len(v.shape)
    if len(outs) > 1:
        _fixed_positions(g, node, v.labels, dim)
    result, start = [], 0
    for o in outs:
        result.append(V(_slice_labels(v.labels, dim, slice(start, start + o[dim])), o, v.from_param))
        start += o[dim]
    return result


def _same_sizes_across(g, labels: list[np.ndarray], dim: int) -> None:
    """cat and stack need their inputs' sizes equal along every dim but `dim`: a channel removed
    from one input must leave each other input at the same position, so their atoms go together
    position by position (as an elementwise op's operands do). Inputs whose labels vary along
    `dim` itself (a cat along the channels) have nothing at the same position to tie."""
    flat = [lab for lab in labels if lab.shape[dim] == 1]
    for lab in flat[1:]:
        g.atoms.union_arrays(flat[0], lab)


@rule("cat", "concat", "concatenate")
def _cat(g, node, tensors, dim=0):
    out = node_shape(node)
    dim %= len(out)
    vals = [g.value(t) for t in tensors if len(node_shape(t)) == len(out)]   # legacy empty 1-D inputs drop out
    _same_sizes_across(g, [align(v.labels, len(out)) for v in vals], dim)
    sizes = [max(v.labels.shape[d] for v in vals) for d in range(len(out))]
    parts = []
    for v in vals:
        target = [v.shape[d] if d == dim or sizes[d] > 1 else 1 for d in range(len(out))]
        parts.append(np.broadcast_to(v.labels, target))
    return V(np.concatenate(parts, axis=dim), out, all(v.from_param for v in vals))


@rule("stack")
def _stack(g, node, tensors, dim=0):
    out = node_shape(node)
    dim %= len(out)
    vals = [g.value(t) for t in tensors]
    labels = [np.expand_dims(align(v.labels, len(out) - 1), dim) for v in vals]
    _same_sizes_across(g, labels, dim)
    sizes = [max(lab.shape[d] for lab in labels) for d in range(len(out))]
    parts = [np.broadcast_to(lab, sizes[:dim] + [1] + sizes[dim + 1:]) for lab in labels]
    return V(np.concatenate(parts, axis=dim), out, all(v.from_param for v in vals))


@rule("pad", "constant_pad_nd")
def _pad(g, node, x, pad, mode="constant", value=None):
    v = g.value(x)
    lab, mode = v.labels, mode if isinstance(mode, str) else "constant"
    for i in range(0, len(pad), 2):
        dim, lo, hi = lab.ndim - 1 - i // 2, pad[i], pad[i + 1]
        if lab.shape[dim] == 1 or (lo == 0 and hi == 0):
            continue
        if lo < 0 or hi < 0:
            lab = _slice_labels(lab, dim, slice(max(-lo, 0), lab.shape[dim] - max(-hi, 0)))
            lo, hi = max(lo, 0), max(hi, 0)
        if mode != "constant":   # reflect/replicate copy channel values into the new positions
            lab = merge_along(g, lab, [dim])
            continue
        parts = []
        for n in (lo, hi):
            fresh = g.atoms.new(n)
            for a in fresh:
                g.atoms.fixed[int(a)] = (f"its channel is made of constant padding in {where(node)}; "
                                         "shrinking it would need other pad widths in forward code")
            shape = [1] * lab.ndim
            shape[dim] = n
            target = list(lab.shape)
            target[dim] = n
            parts.append(np.broadcast_to(fresh.reshape(shape), target))
        lab = np.concatenate([parts[0], lab, parts[1]], axis=dim)
    return V(lab, node_shape(node), v.from_param)


# -- mixing along dimensions -------------------------------------------------------------
def _dims_arg(dims, ndim):
    if dims is None or dims == []:
        return list(range(ndim))
    return [d % ndim for d in ([dims] if isinstance(dims, int) else dims)]


@rule("mean", "sum", "amax", "amin", "max", "min", "var", "std", "prod", "logsumexp", "linalg_vector_norm",
      "norm", "any", "all", "argmax", "argmin", "var_mean", "std_mean")
def _reduce(g, node, x, dims=None, *args, **kwargs):
    v = g.value(x)
    ndim = len(v.shape)
    if not isinstance(dims, (int, list, tuple)) or (isinstance(dims, (list, tuple)) and
                                                    not all(isinstance(d, int) for d in dims)):
        dims = None    # e.g. norm(x, p) or sum(x, dtype=...): over everything
    if node.target.__name__.startswith(("norm", "linalg_vector_norm")):
        dims = args[0] if args else kwargs.get("dim")
    dims = _dims_arg(dims, ndim)
    lab = merge_along(g, v.labels, dims)
    outs = node.meta["val"]
    outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
    result = []
    for o in outs:
        shape = tensor_shape(o)
        keep = lab if len(shape) == ndim else lab.reshape([s for d, s in enumerate(lab.shape) if d not in dims])
        result.append(V(keep, shape, v.from_param))
    return result if len(result) > 1 else result[0]


@rule("softmax", "_softmax", "log_softmax", "_log_softmax", "cumsum", "sort", "topk", "argsort")
def _along(g, node, x, dim=-1, *args, **kwargs):
    v = g.value(x)
    lab = merge_along(g, v.labels, [dim])
    outs = node.meta["val"]
    outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
    result = [V(lab, tensor_shape(o), v.from_param) for o in outs]
    return result if len(result) > 1 else result[0]


@rule("max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
      "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d",
      "adaptive_max_pool2d", "adaptive_max_pool3d", "max_pool2d_with_indices", "max_pool3d_with_indices",
      "_adaptive_avg_pool2d", "upsample_nearest2d", "upsample_bilinear2d", "interpolate")
def _pool(g, node, x, *args, **kwargs):
    v = g.value(x)
    name = node.target.__name__
    k = 1 if "1d" in name else 3 if "3d" in name else 2
    lab = merge_along(g, v.labels, list(range(len(v.shape) - k, len(v.shape))))
    outs = node.meta["val"]
    outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
    result = [V(lab, tensor_shape(o)) for o in outs]
    return result if len(result) > 1 else result[0]


@rule("index_select", "gather", "index", "scatter", "index_put")
def _indexed(g, node, x, *args, **kwargs):
    v = g.value(x)
    out = node_shape(node)
    if (v.labels == PIN).all() and not v.from_param:
        return g.pinned(out)
    root = g.atoms.merge(v.labels)   # data-dependent positions: whatever it reads goes together
    return V(np.full((1,) * len(out), root, dtype=np.int64), out)


from . import layers  # noqa: F401  (registers the parameterised ops in RULES)
