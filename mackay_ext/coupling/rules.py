"""One rule per ATen op: how channel labels flow from inputs to output (see _coupling_ops)."""
from __future__ import annotations

import numpy as np
import torch

from .graph import PIN, V, _module_path, _shape, _where
from .groups import CouplingError

RULES: dict = {}


def rule(*names):
    def register(fn):
        for n in names:
            RULES[n] = fn
        return fn
    return register


def _align(labels: np.ndarray, ndim: int) -> np.ndarray:
    return labels.reshape((1,) * (ndim - labels.ndim) + labels.shape)


def _merge_along(g, labels: np.ndarray, dims) -> np.ndarray:
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
    items = [(_align(v.labels, nd), (1,) * (nd - len(v.shape)) + v.shape, v.from_param) for v in vals]
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
        g.atoms.union_arrays(_merge_along(g, combined, conflict), lab)
    return V(np.ascontiguousarray(combined), out_shape, all(f for _, _, f in items))


@rule("add", "sub", "mul", "div", "where", "maximum", "minimum", "eq", "ne", "lt", "le", "gt", "ge",
      "logical_and", "logical_or", "logical_not", "masked_fill", "pow", "rsub", "clamp", "clamp_min",
      "clamp_max", "relu", "hardtanh", "gelu", "silu", "sigmoid", "tanh", "dropout", "contiguous",
      "clone", "detach", "alias", "neg", "abs", "exp", "log", "sqrt", "rsqrt", "erf", "hardswish",
      "hardsigmoid", "leaky_relu", "elu", "relu6", "softplus", "mish", "_to_copy", "to", "type_as",
      "lift_fresh_copy", "square", "reciprocal", "sign", "cos", "sin", "bitwise_not", "copy",
      "bitwise_and", "bitwise_or", "lerp", "fill", "zero", "native_dropout", "_assert_tensor_metadata")
def _elementwise(g, node, *args, **kwargs):
    out_shape = _shape(node)
    vals = [g.value(a) for a in list(args) + list(kwargs.values())
            if isinstance(a, torch.fx.Node) and _shape(a) is not None]
    if out_shape is None:   # e.g. native_dropout returns (out, mask); asserts return nothing
        out = node.meta.get("val")
        if isinstance(out, (tuple, list)) and vals:
            v = elementwise_values(g, vals, _shape_of(out[0]))
            return [v] + [V(v.labels, _shape_of(o)) for o in out[1:]]
        return None
    if node.target.__name__.startswith("type_as") or node.target.__name__.startswith("to."):
        vals = vals[:1]
    return elementwise_values(g, vals, out_shape)


def _shape_of(t) -> tuple[int, ...]:
    return tuple(int(s) for s in t.shape)


@rule("arange", "zeros", "ones", "full", "empty", "scalar_tensor", "zeros_like", "ones_like",
      "full_like", "empty_like", "new_zeros", "new_ones", "new_full", "new_empty", "rand", "randn",
      "rand_like", "randn_like", "tensor", "sym_size", "_assert_scalar", "sym_constrain_range_for_size",
      "_local_scalar_dense", "item")
def _constant(g, node, *args, **kwargs):
    shape = _shape(node)
    return g.pinned(shape) if shape is not None else None


# -- shapes ------------------------------------------------------------------------------
@rule("view", "reshape", "_unsafe_view", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as",
      "reshape_as")
def _reshape(g, node, x, *args, **kwargs):
    return V(g.full(x).reshape(_shape(node)), _shape(node), g.value(x).from_param)


@rule("expand", "expand_as", "broadcast_to")
def _expand(g, node, x, *args, **kwargs):
    out = _shape(node)
    return V(np.broadcast_to(_align(g.value(x).labels, len(out)), out), out, g.value(x).from_param)


@rule("permute")
def _permute(g, node, x, dims):
    return V(np.transpose(g.value(x).labels, [d % len(dims) for d in dims]), _shape(node), g.value(x).from_param)


@rule("transpose", "t", "swapaxes")
def _transpose(g, node, x, d0=0, d1=1):
    return V(np.swapaxes(g.value(x).labels, d0, d1), _shape(node), g.value(x).from_param)


def _fixed_positions(g, node, lab: np.ndarray, dim: int) -> None:
    """Indexing at fixed positions of a channel dimension: after a removal they would pick other channels."""
    if lab.shape[dim] > 1 and all(s == 1 for d, s in enumerate(lab.shape) if d != dim):
        for a in np.unique(lab):
            g.atoms.fixed.setdefault(int(a), f"forward code in {_where(node)} indexes its channels at fixed "
                                              "positions (a slice, select or split)")


@rule("select")
def _select(g, node, x, dim, index):
    v = g.value(x)
    lab = v.labels
    _fixed_positions(g, node, lab, dim % lab.ndim)
    return V(lab.take(0 if lab.shape[dim] == 1 else index, axis=dim), _shape(node), v.from_param)


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
    return V(_slice_labels(v.labels, dim, sl), _shape(node), v.from_param)


@rule("slice")
def _slice(g, node, x, dim=0, start=None, end=None, step=1):
    return _sliced(g, node, g.value(x), dim, slice(start, end, step))


@rule("narrow")
def _narrow(g, node, x, dim, start, length):
    return _sliced(g, node, g.value(x), dim, slice(start, start + length))


@rule("unbind", "split", "split_with_sizes", "chunk", "tensor_split")
def _split(g, node, x, *args, **kwargs):
    v = g.value(x)
    outs = [_shape_of(o) for o in node.meta["val"]]
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


@rule("cat", "concat", "concatenate")
def _cat(g, node, tensors, dim=0):
    out = _shape(node)
    dim %= len(out)
    vals = [g.value(t) for t in tensors if len(_shape(t)) == len(out)]   # legacy empty 1-D inputs drop out
    sizes = [max(v.labels.shape[d] for v in vals) for d in range(len(out))]
    parts = []
    for v in vals:
        target = [v.shape[d] if d == dim or sizes[d] > 1 else 1 for d in range(len(out))]
        parts.append(np.broadcast_to(v.labels, target))
    return V(np.concatenate(parts, axis=dim), out, all(v.from_param for v in vals))


@rule("stack")
def _stack(g, node, tensors, dim=0):
    out = _shape(node)
    dim %= len(out)
    parts = [np.expand_dims(np.broadcast_to(g.value(t).labels, g.value(t).shape), dim) for t in tensors]
    return V(np.concatenate(parts, axis=dim), out, all(g.value(t).from_param for t in tensors))


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
            lab = _merge_along(g, lab, [dim])
            continue
        parts = []
        for n in (lo, hi):
            fresh = g.atoms.new(n)
            for a in fresh:
                g.atoms.fixed[int(a)] = (f"its channel is made of constant padding in {_where(node)}; "
                                         "shrinking it would need other pad widths in forward code")
            shape = [1] * lab.ndim
            shape[dim] = n
            target = list(lab.shape)
            target[dim] = n
            parts.append(np.broadcast_to(fresh.reshape(shape), target))
        lab = np.concatenate([parts[0], lab, parts[1]], axis=dim)
    return V(lab, _shape(node), v.from_param)


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
    lab = _merge_along(g, v.labels, dims)
    outs = node.meta["val"]
    outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
    result = []
    for o in outs:
        shape = _shape_of(o)
        keep = lab if len(shape) == ndim else lab.reshape([s for d, s in enumerate(lab.shape) if d not in dims])
        result.append(V(keep, shape, v.from_param))
    return result if len(result) > 1 else result[0]


@rule("softmax", "_softmax", "log_softmax", "_log_softmax", "cumsum", "sort", "topk", "argsort")
def _along(g, node, x, dim=-1, *args, **kwargs):
    v = g.value(x)
    lab = _merge_along(g, v.labels, [dim])
    outs = node.meta["val"]
    outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
    result = [V(lab, _shape_of(o), v.from_param) for o in outs]
    return result if len(result) > 1 else result[0]


@rule("max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
      "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d",
      "adaptive_max_pool2d", "adaptive_max_pool3d", "max_pool2d_with_indices", "max_pool3d_with_indices",
      "_adaptive_avg_pool2d", "upsample_nearest2d", "upsample_bilinear2d", "interpolate")
def _pool(g, node, x, *args, **kwargs):
    v = g.value(x)
    name = node.target.__name__
    k = 1 if "1d" in name else 3 if "3d" in name else 2
    lab = _merge_along(g, v.labels, list(range(len(v.shape) - k, len(v.shape))))
    outs = node.meta["val"]
    outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
    result = [V(lab, _shape_of(o)) for o in outs]
    return result if len(result) > 1 else result[0]


def _per_channel(g, node, labels_shape_v: V, params, channel_dim: int) -> V:
    """Union an activation with per-channel parameters (BatchNorm/GroupNorm weight, bias, stats)."""
    nd = len(labels_shape_v.shape)
    vals = [labels_shape_v]
    for p in params:
        if p is None:
            continue
        pv = g.value(p)
        shape = [1] * nd
        shape[channel_dim] = pv.shape[0]
        vals.append(V(pv.labels.reshape([pv.labels.shape[0] if i == channel_dim else 1 for i in range(nd)]),
                      shape, True))
    return elementwise_values(g, vals, labels_shape_v.shape)


@rule("batch_norm", "_native_batch_norm_legit_no_training", "_native_batch_norm_legit",
      "native_batch_norm", "_native_batch_norm_legit_functional", "instance_norm")
def _batch_norm(g, node, x, weight=None, bias=None, running_mean=None, running_var=None, *args, **kwargs):
    v = _per_channel(g, node, g.value(x), [weight, bias, running_mean, running_var], 1)
    outs = node.meta["val"]
    if isinstance(outs, (tuple, list)):
        return [v] + [g.pinned(_shape_of(o)) for o in outs[1:]]
    return v


@rule("group_norm", "native_group_norm")
def _group_norm(g, node, x, *args, **kwargs):
    if node.target.__name__.startswith("native"):
        weight, bias, groups = args[0], args[1], args[5]
    else:
        groups, weight, bias = args[0], (args[1] if len(args) > 1 else None), (args[2] if len(args) > 2 else None)
    v = g.value(x)
    lab = v.labels
    if lab.shape[1] > 1:   # statistics over the channels of one group merge them
        shape = list(lab.shape)
        split = lab.reshape(shape[:1] + [groups, shape[1] // groups] + shape[2:])
        merged = _merge_along(g, split, [2] + list(range(3, split.ndim)))
        lab = np.broadcast_to(merged, split.shape).reshape(shape)
    out = _per_channel(g, node, V(lab, v.shape), [weight, bias], 1)
    vals = node.meta["val"]
    return [out] + [g.pinned(_shape_of(o)) for o in vals[1:]] if isinstance(vals, (tuple, list)) else out


@rule("layer_norm", "native_layer_norm", "rms_norm", "_fused_rms_norm")
def _layer_norm(g, node, x, normalized_shape, weight=None, bias=None, *args, **kwargs):
    v = g.value(x)
    k = len(normalized_shape)
    nd = len(v.shape)
    lab = _merge_along(g, v.labels, list(range(nd - k, nd)))   # the statistics mix these positions
    vals = [V(lab, v.shape)]
    for p in (weight, bias):
        if isinstance(p, torch.fx.Node):
            pv = g.value(p)
            vals.append(V(_align(pv.labels, nd), (1,) * (nd - k) + pv.shape, True))
    out = elementwise_values(g, vals, v.shape)
    outs = node.meta["val"]
    return [out] + [g.pinned(_shape_of(o)) for o in outs[1:]] if isinstance(outs, (tuple, list)) else out


# -- parameterised readers ---------------------------------------------------------------
def _column_atoms(g, lab: np.ndarray, dim: int, size: int) -> np.ndarray:
    """One representative atom per index along `dim`: the merge of every atom in that slice."""
    merged = _merge_along(g, lab, [d for d in range(lab.ndim) if d != dim]).reshape(-1)
    return np.broadcast_to(merged, (size,)) if merged.size == 1 else merged


def _fresh_outputs(g, node, weight_name: str, bias, count: int, dim: int, ndim: int) -> np.ndarray:
    fresh = g.atoms.new(count)
    for o, a in enumerate(fresh):
        g.atoms.attach(a, weight_name, 0, o)
    if isinstance(bias, torch.fx.Node):
        g.atoms.union_arrays(fresh, g.value(bias).labels.reshape(-1))
    shape = [1] * ndim
    shape[dim] = count
    return fresh.reshape(shape)


@rule("linear")
def _linear(g, node, x, weight, bias=None):
    name = g.param_name(weight, node, "weight")
    v = g.value(x)
    out_f, in_f = _shape(weight)
    for j, a in enumerate(_column_atoms(g, _align(v.labels, len(v.shape)), len(v.shape) - 1, in_f)):
        g.atoms.attach(a, name, 1, j)
    out = _shape(node)
    return V(_fresh_outputs(g, node, name, bias, out_f, len(out) - 1, len(out)), out)


@rule("conv1d", "conv2d", "conv3d", "convolution", "_convolution")
def _conv(g, node, x, weight, bias=None, *args, **kwargs):
    if node.target.__name__.startswith(("convolution", "_convolution")):
        if args[3]:
            raise CouplingError(f"transposed convolution in {_where(node)} is not supported")
        groups = args[5]
    else:
        groups = args[3] if len(args) > 3 else kwargs.get("groups", 1)
    name = g.param_name(weight, node, "weight")
    v = g.value(x)
    out = _shape(node)
    c_out, c_in_g = _shape(weight)[:2]
    c_in = v.shape[1]
    columns = _column_atoms(g, v.labels, 1, c_in)
    if groups == 1:
        for c, a in enumerate(columns):
            g.atoms.attach(a, name, 1, c)
        return V(_fresh_outputs(g, node, name, bias, c_out, 1, len(out)), out)
    if groups == c_in == c_out:   # depthwise: output channel c is input channel c
        for c, a in enumerate(columns):
            g.atoms.attach(a, name, 0, c)
        lab = np.ascontiguousarray(columns).reshape([c_out if d == 1 else 1 for d in range(len(out))])
        if isinstance(bias, torch.fx.Node):
            g.atoms.union_arrays(lab.reshape(-1), g.value(bias).labels.reshape(-1))
        return V(lab, out)
    fresh = _fresh_outputs(g, node, name, bias, c_out, 1, len(out))
    reason = f"grouped convolution ({groups} groups) in {_where(node)}"
    for a in list(columns) + list(fresh.reshape(-1)):
        g.atoms.blocked.setdefault(int(a), reason)
    return V(fresh, out)


@rule("embedding")
def _embedding(g, node, weight, indices, *args, **kwargs):
    name = g.param_name(weight, node, "weight")
    out = _shape(node)
    fresh = g.atoms.new(out[-1])
    for d, a in enumerate(fresh):
        g.atoms.attach(a, name, 1, d)
    return V(fresh.reshape((1,) * (len(out) - 1) + (out[-1],)), out)


def _per_batch(g, node, operands, out, head: bool) -> V:
    """Merge everything each batch position of the operands holds (attention: one head)."""
    batch = out[:-2]
    nb = len(batch)
    rows = []
    for t in operands:
        v = g.value(t)
        lab = _align(v.labels, nb + 2)
        lab = _merge_along(g, lab, [nb, nb + 1])
        rows.append(np.broadcast_to(lab.reshape(lab.shape[:nb]), batch) if nb else lab.reshape(()))
    merged = rows[0].copy()
    for r in rows[1:]:
        g.atoms.union_arrays(merged, r)
    if head:
        for a in np.unique(merged):
            g.atoms.head.setdefault(int(a), _module_path(node))
    return V(merged.reshape(batch + (1, 1)), out)


@rule("scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
      "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention")
def _sdpa(g, node, q, k, v, *args, **kwargs):
    if kwargs.get("enable_gqa") or _shape(k)[:-2] != _shape(q)[:-2]:
        raise CouplingError(f"attention with grouped/broadcast key-value heads in {_where(node)} is not supported")
    out = _shape(node) or _shape_of(node.meta["val"][0])
    res = _per_batch(g, node, [q, k, v], out, head=True)
    vals = node.meta["val"]
    return [res] + [g.pinned(_shape_of(o)) for o in vals[1:] if hasattr(o, "shape")] \
        if isinstance(vals, (tuple, list)) else res


@rule("matmul", "bmm", "mm")
def _matmul(g, node, a, b):
    for t in (a, b):
        if g.value(t).from_param or len(_shape(t)) < 2:
            raise CouplingError(f"{node.target} in {_where(node)} multiplies by a parameter or a vector; "
                                "use nn.Linear for channel coupling through it")
    return _per_batch(g, node, [a, b], _shape(node), head=len(_shape(node)) > 2)


@rule("index_select", "gather", "index", "embedding_bag", "scatter", "index_put")
def _indexed(g, node, x, *args, **kwargs):
    v = g.value(x)
    out = _shape(node)
    if (v.labels == PIN).all() and not v.from_param:
        return g.pinned(out)
    root = g.atoms.merge(v.labels)   # data-dependent positions: whatever it reads goes together
    return V(np.full((1,) * len(out), root, dtype=np.int64), out)
