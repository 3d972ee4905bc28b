"""Rules for ops that hold parameters or define heads: norms, linear, conv, embedding, attention.

Parameterised readers attach their input slice as a member of the atom they read (so a channel's
consumers are in its group) and give their output rows fresh atoms; norms join their per-channel
entries to the channel's atom; attention merges everything inside one head.
"""
from __future__ import annotations

import numpy as np
import torch

from .graph import V, module_path, node_shape, where
from .groups import CouplingError
from .rules import align, elementwise_values, merge_along, rule, tensor_shape


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
        return [v] + [g.pinned(tensor_shape(o)) for o in outs[1:]]
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
        merged = merge_along(g, split, [2] + list(range(3, split.ndim)))
        lab = np.broadcast_to(merged, split.shape).reshape(shape)
    out = _per_channel(g, node, V(lab, v.shape), [weight, bias], 1)
    vals = node.meta["val"]
    return [out] + [g.pinned(tensor_shape(o)) for o in vals[1:]] if isinstance(vals, (tuple, list)) else out


@rule("layer_norm", "native_layer_norm", "rms_norm", "_fused_rms_norm")
def _layer_norm(g, node, x, normalized_shape, weight=None, bias=None, *args, **kwargs):
    v = g.value(x)
    k = len(normalized_shape)
    nd = len(v.shape)
    lab = merge_along(g, v.labels, list(range(nd - k, nd)))   # the statistics mix these positions
    vals = [V(lab, v.shape)]
    for p in (weight, bias):
        if isinstance(p, torch.fx.Node):
            pv = g.value(p)
            vals.append(V(align(pv.labels, nd), (1,) * (nd - k) + pv.shape, True))
    out = elementwise_values(g, vals, v.shape)
    outs = node.meta["val"]
    return [out] + [g.pinned(tensor_shape(o)) for o in outs[1:]] if isinstance(outs, (tuple, list)) else out


# -- parameterised readers ---------------------------------------------------------------
def _column_atoms(g, lab: np.ndarray, dim: int, size: int) -> np.ndarray:
    """One representative atom per index along `dim`: the merge of every atom in that slice."""
    merged = merge_along(g, lab, [d for d in range(lab.ndim) if d != dim]).reshape(-1)
    return np.broadcast_to(merged, (size,)) if merged.size == 1 else merged


def _fresh_outputs(g, node, weight_name: str, bias, count: int, dim: int, ndim: int,
                   weight_dim: int = 0) -> np.ndarray:
    """New atoms for `count` output channels along `dim`, each owning its weight slice along
    weight_dim (0: an (out, in) weight; 1: an (in, out) one) and its bias entry."""
    fresh = g.atoms.new(count)
    for o, a in enumerate(fresh):
        g.atoms.attach(a, weight_name, weight_dim, o)
    if isinstance(bias, torch.fx.Node):
        g.atoms.union_arrays(fresh, g.value(bias).labels.reshape(-1))
    shape = [1] * ndim
    shape[dim] = count
    return fresh.reshape(shape)


@rule("linear")
def _linear(g, node, x, weight, bias=None):
    name = g.param_name(weight, node, "weight")
    v = g.value(x)
    out_f, in_f = node_shape(weight)
    for j, a in enumerate(_column_atoms(g, align(v.labels, len(v.shape)), len(v.shape) - 1, in_f)):
        g.atoms.attach(a, name, 1, j)
    out = node_shape(node)
    return V(_fresh_outputs(g, node, name, bias, out_f, len(out) - 1, len(out)), out)


@rule("addmm")
def _addmm(g, node, bias, x, weight, *, beta=1, alpha=1):
    """bias + x @ W with W an (in, out) parameter: transformers' Conv1D (GPT-2's projections)."""
    name = g.param_name(weight, node, "weight (an (in, out) parameter as stored)")
    g.atoms.transposed.add(name)
    in_f, out_f = node_shape(weight)
    for j, a in enumerate(_column_atoms(g, align(g.value(x).labels, 2), 1, in_f)):
        g.atoms.attach(a, name, 0, j)
    return V(_fresh_outputs(g, node, name, bias, out_f, 1, 2, weight_dim=1), node_shape(node))


@rule("conv1d", "conv2d", "conv3d", "convolution", "_convolution")
def _conv(g, node, x, weight, bias=None, *args, **kwargs):
    if node.target.__name__.startswith(("convolution", "_convolution")):
        if args[3]:
            raise CouplingError(f"transposed convolution in {where(node)} is not supported")
        groups = args[5]
    else:
        groups = args[3] if len(args) > 3 else kwargs.get("groups", 1)
    name = g.param_name(weight, node, "weight")
    v = g.value(x)
    out = node_shape(node)
    c_out, c_in_g = node_shape(weight)[:2]
    c_in = v.shape[1]
    columns = _column_atoms(g, v.labels, 1, c_in)
    if groups == 1:
        for c, a in enumerate(columns):
            g.atoms.attach(a, name, 1, c)
        return V(_fresh_outputs(g, node, name, bias, c_out, 1, len(out)), out)
    if c_in_g == 1:   # depthwise (with a channel multiplier k = c_out / c_in): whole conv groups go
        return _depthwise(g, node, name, bias, columns, c_out // groups, out)
    return _grouped(g, node, name, bias, columns, groups, c_in_g, c_out // groups, out)


def _depthwise(g, node, name: str, bias, columns: np.ndarray, per_group: int, out) -> V:
    """Input channel c alone makes output channels c*k .. c*k+k-1: they are one channel with it.
    shrink removes the conv group (groups, in_channels and out_channels all shrink)."""
    lab = np.repeat(np.ascontiguousarray(columns), per_group)
    for o, a in enumerate(lab):
        g.atoms.attach(a, name, 0, o)
    if isinstance(bias, torch.fx.Node):
        g.atoms.union_arrays(lab, g.value(bias).labels.reshape(-1))
    return V(lab.reshape([lab.size if d == 1 else 1 for d in range(len(out))]), out)


def _grouped(g, node, name: str, bias, columns: np.ndarray, groups: int, c_in_g: int, c_out_g: int, out) -> V:
    """A grouped conv keeps `groups` and needs every conv group the same size, so one position
    inside the groups goes from all of them at once: input position j is input channels
    {j, c_in_g + j, 2 c_in_g + j, ...} (weight column j), output position k is output channels
    {k, c_out_g + k, ...} (weight rows k, c_out_g + k, ...). Both are exact to zero: the rows of
    output position k read nothing else, column j reads only those input channels."""
    by_position = np.ascontiguousarray(columns).reshape(groups, c_in_g)
    for j in range(c_in_g):
        g.atoms.attach(g.atoms.merge(by_position[:, j]), name, 1, j)
    fresh = g.atoms.new(c_out_g)
    lab = np.tile(fresh, groups)   # output channel o is position o % c_out_g of its conv group
    for o, a in enumerate(lab):
        g.atoms.attach(a, name, 0, o)
    if isinstance(bias, torch.fx.Node):
        g.atoms.union_arrays(lab, g.value(bias).labels.reshape(-1))
    return V(lab.reshape([lab.size if d == 1 else 1 for d in range(len(out))]), out)


@rule("embedding")
def _embedding(g, node, weight, indices, *args, **kwargs):
    name = g.param_name(weight, node, "weight")
    out = node_shape(node)
    fresh = g.atoms.new(out[-1])
    for d, a in enumerate(fresh):
        g.atoms.attach(a, name, 1, d)
    return V(fresh.reshape((1,) * (len(out) - 1) + (out[-1],)), out)


@rule("embedding_bag", "_embedding_bag", "_embedding_bag_forward_only")
def _embedding_bag(g, node, weight, indices, *args, **kwargs):
    """Each bag's output channel d sums, averages or takes the max of column d of the rows it
    picks (per-sample weights scale whole rows): the channels are the weight's columns, as for
    embedding. The other outputs (offsets, bag sizes, max indices) are indices."""
    name = g.param_name(weight, node, "weight")
    outs = node.meta["val"]
    out = tensor_shape(outs[0])
    fresh = g.atoms.new(out[-1])
    for d, a in enumerate(fresh):
        g.atoms.attach(a, name, 1, d)
    return [V(fresh.reshape((1,) * (len(out) - 1) + (out[-1],)), out)] + [g.pinned(tensor_shape(o)) for o in outs[1:]]


def _per_batch(g, node, operands, out, head: bool) -> V:
    """Merge everything each batch position of the operands holds (attention: one head)."""
    batch = out[:-2]
    nb = len(batch)
    rows = []
    for t in operands:
        v = g.value(t)
        lab = align(v.labels, nb + 2)
        lab = merge_along(g, lab, [nb, nb + 1])
        rows.append(np.broadcast_to(lab.reshape(lab.shape[:nb]), batch) if nb else lab.reshape(()))
    merged = rows[0].copy()
    for r in rows[1:]:
        g.atoms.union_arrays(merged, r)
    if head:
        for a in np.unique(merged):
            g.atoms.head.setdefault(int(a), module_path(node))
    return V(merged.reshape(batch + (1, 1)), out)


@rule("scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
      "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention")
def _sdpa(g, node, q, k, v, *args, **kwargs):
    if kwargs.get("enable_gqa") or node_shape(k)[:-2] != node_shape(q)[:-2]:
        raise CouplingError(f"attention with grouped/broadcast key-value heads in {where(node)} is not supported")
    out = node_shape(node) or tensor_shape(node.meta["val"][0])
    res = _per_batch(g, node, [q, k, v], out, head=True)
    vals = node.meta["val"]
    return [res] + [g.pinned(tensor_shape(o)) for o in vals[1:] if hasattr(o, "shape")] \
        if isinstance(vals, (tuple, list)) else res


@rule("matmul", "bmm", "mm")
def _matmul(g, node, a, b):
    for t in (a, b):
        if g.value(t).from_param or len(node_shape(t)) < 2:
            raise CouplingError(f"{node.target} in {where(node)} multiplies by a parameter or a vector; "
                                "use nn.Linear for channel coupling through it")
    return _per_batch(g, node, [a, b], node_shape(node), head=len(node_shape(node)) > 2)
