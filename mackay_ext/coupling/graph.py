"""Channel labels through an exported ATen graph: the op table behind mackay_ext.coupling.

Every position of every tensor carries an atom (an int). Positions whose values must be removed
together share a union-find class. Label arrays broadcast like the tensors they describe: a
dimension of size 1 in the label array means every position along it has the same atom, so a
(B, C, H, W) activation costs C labels. Atom 0 is PIN: positions fixed by a model input or a
constant made in forward (never removable).

The rule behind every op: the value at an output position depends on a set of input positions;
when that set carries several atoms, they can only be removed together, so they are merged
(a reduction over channels, softmax, LayerNorm statistics, the contraction of q with k inside a
head). Parameterised readers (conv, linear) instead attach their input slice as a member of the
atom they read, and their output rows get fresh atoms.
"""
from __future__ import annotations

import operator

import numpy as np
import torch

from .groups import CouplingError

PIN = 0
# Regions of a forward that torch.export keeps as a subgraph called by a higher-order op: code
# under torch.no_grad() / torch.enable_grad() (a reentrant torch.utils.checkpoint runs its block
# so) and under torch.autocast. The ops inside couple channels as they would outside: the walk
# goes through the body as if it were inline.
INLINED_REGIONS = ("wrap_with_set_grad_enabled", "wrap_with_autocast")


class Atoms:
    """Union-find over atoms, with what each atom owns."""

    def __init__(self) -> None:
        self.parent: list[int] = [PIN]
        self.members: dict[int, list[tuple[str, int, int]]] = {}
        self.entry: dict[int, tuple[str, int]] = {}
        self.blocked: dict[int, str] = {PIN: "fixed by a model input or a constant made in forward"}
        self.fixed: dict[int, str] = {}
        self.head: dict[int, str] = {}
        self.transposed: set[str] = set()   # weights stored (in, out), as transformers' Conv1D
        self.attached: dict[tuple[str, int, int], int] = {}

    @property
    def count(self) -> int:
        return len(self.parent)

    def new(self, n: int) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return np.arange(start, start + n, dtype=np.int64)

    def find(self, a: int) -> int:
        parent = self.parent
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(int(a)), self.find(int(b))
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)   # PIN (0) stays the root of its class

    def union_arrays(self, x: np.ndarray, y: np.ndarray) -> None:
        x, y = np.broadcast_arrays(x, y)
        pairs = np.stack([x.ravel(), y.ravel()], 1)
        for a, b in np.unique(pairs[pairs[:, 0] != pairs[:, 1]], axis=0):
            self.union(a, b)

    def merge(self, labels: np.ndarray) -> int:
        atoms = np.unique(labels)
        for a in atoms[1:]:
            self.union(atoms[0], a)
        return self.find(int(atoms[0]))

    def attach(self, atom: int, name: str, dim: int, index: int) -> None:
        """Make slice `index` along `dim` of parameter `name` a member of `atom`'s class.

        A slice attached twice (a module called twice, or a tied parameter read by two modules)
        is one tensor slice serving two channels: it cannot be cut for one and kept for the
        other, so the two channels join one class."""
        key = (name, dim, int(index))
        first = self.attached.setdefault(key, int(atom))
        if first != int(atom):
            self.union(first, atom)
        self.members.setdefault(int(atom), []).append(key)


class V:
    """Labels of one tensor: `labels` broadcasts to `shape`; from_param: derived from parameters only."""
    __slots__ = ("from_param", "labels", "shape")

    def __init__(self, labels: np.ndarray, shape, from_param: bool = False) -> None:
        self.labels, self.shape, self.from_param = _compress(labels), tuple(shape), from_param


def _compress(labels: np.ndarray) -> np.ndarray:
    for d in range(labels.ndim):
        if labels.shape[d] > 1:
            first = labels.take([0], axis=d)
            if (labels == first).all():
                labels = first
    return labels


def node_shape(node) -> tuple[int, ...] | None:
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return tuple(int(s) for s in val.shape) if isinstance(val, torch.Tensor) else None


def module_of(node) -> tuple[str, str] | None:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    path, cls = list(stack.values())[-1]
    cls = cls if isinstance(cls, str) else getattr(cls, "__qualname__", str(cls))
    return path, cls.rsplit(".", 1)[-1]


def module_path(node) -> str:
    found = module_of(node)
    return found[0] if found else ""


def where(node) -> str:
    found = module_of(node)
    return f"module '{found[0]}' ({found[1]})" if found else "the model's own forward"


class Graph:
    """Walks an ExportedProgram once and fills `atoms`."""

    def __init__(self, program, canonical: dict[str, str] | None = None) -> None:
        self.atoms = Atoms()
        self.canonical = canonical or {}   # any name of a tied parameter -> its named_parameters() name
        self.env: dict[torch.fx.Node, object] = {}
        self.params: dict[torch.fx.Node, str] = {}   # placeholder -> parameter/buffer FQN
        self.entries: dict[str, np.ndarray] = {}
        self.splits: list[tuple[torch.fx.Node, np.ndarray]] = []   # reshapes that split channels
        self.program = program
        self.scopes = [program.graph_module]   # the module whose get_attr the graph being walked reads

    # -- values ---------------------------------------------------------------------------
    def value(self, x) -> V | None:
        if not isinstance(x, torch.fx.Node):
            return None
        v = self.env.get(x)
        if isinstance(v, str):    # a parameter or buffer, labelled entry by entry on first use
            v = V(self.entry_atoms(v, x), node_shape(x), from_param=True)
            self.env[x] = v
        return v

    def entry_atoms(self, name: str, node) -> np.ndarray:
        if name not in self.entries:
            shape = node_shape(node)
            if not node.meta["val"].is_floating_point():
                return np.zeros([1] * len(shape), dtype=np.int64)
            labels = self.atoms.new(int(np.prod(shape, dtype=np.int64))).reshape(shape)
            for flat, atom in enumerate(labels.ravel()):
                self.atoms.entry[int(atom)] = (name, flat)
            self.entries[name] = labels
        return self.entries[name]

    def param_name(self, x, node, role: str) -> str:
        name = self.params.get(x) if isinstance(x, torch.fx.Node) else None
        if name is None:
            raise CouplingError(f"{node.target} in {where(node)}: its {role} is computed in forward, "
                                "not a parameter; channel coupling through it is not supported")
        return name

    def full(self, x) -> np.ndarray:
        v = self.value(x)
        return np.broadcast_to(v.labels, v.shape)

    def pinned(self, shape) -> V:
        return V(np.zeros([1] * len(shape), dtype=np.int64), shape)

    # -- walking --------------------------------------------------------------------------
    def run(self) -> Atoms:
        from .rules import RULES
        sig = self.program.graph_signature
        kinds = {}
        for spec in sig.input_specs:
            kinds[spec.arg.name] = spec
        user_outputs = set(sig.user_outputs)
        for node in self.program.graph.nodes:
            if node.op == "placeholder":
                spec = kinds.get(node.name)
                kind = spec.kind.name if spec is not None else "USER_INPUT"
                if kind in ("PARAMETER", "BUFFER") and node_shape(node) is not None:
                    target = self.canonical.get(spec.target, spec.target)
                    self.params[node] = target
                    self.env[node] = target
                elif node_shape(node) is not None:
                    self.env[node] = self.pinned(node_shape(node))
            elif node.op == "call_function":
                self.call(node, RULES)
            elif node.op == "output":
                for out in torch.utils._pytree.tree_leaves(node.args[0]):
                    if isinstance(out, torch.fx.Node) and out.name in user_outputs and self.value(out) is not None:
                        for a in np.unique(self.value(out).labels):
                            self.atoms.blocked.setdefault(int(a), "it reaches the model output")
        self.check_splits()
        return self.atoms

    def check_splits(self) -> None:
        """A reshape that splits a channel dimension into a grid (heads x head width, or a channel
        shuffle's groups x channels) stays a grid only if what goes is whole slices of it: a
        head, or a position in every group. Run once every union is made: a class that is no
        whole slice along any dimension of a grid is kept by shrink (zeroing it stays exact)."""
        for node, labels in self.splits:
            grid = np.squeeze(labels)
            roots = np.vectorize(self.atoms.find, otypes=[np.int64])(grid)
            for root in np.unique(roots):
                mask = roots == root
                if root == PIN or any(np.array_equal(mask, np.broadcast_to(
                        mask.any(axis=tuple(d for d in range(mask.ndim) if d != k), keepdims=True), mask.shape))
                        for k in range(mask.ndim)):
                    continue
                self.atoms.fixed.setdefault(int(root), (
                    f"forward code in {where(node)} reshapes its channels into a {tuple(grid.shape)} grid "
                    "(heads, or a channel shuffle) and this group is no whole slice of it"))

    def call(self, node, rules) -> None:
        target = node.target
        if target is operator.getitem:
            seq = self.env.get(node.args[0])
            self.env[node] = seq[node.args[1]] if isinstance(seq, list) else None
            return
        name = getattr(getattr(target, "_overloadpacket", None), "__name__", None) or str(target)
        if name in INLINED_REGIONS:
            self.inline(node)
            return
        in_place = name.endswith("_") and not name.endswith("__")
        rule = rules.get(name[:-1] if in_place else name)
        tensor_args = [a for a in torch.utils._pytree.tree_leaves((node.args, node.kwargs))
                       if isinstance(a, torch.fx.Node) and a in self.env and self.env[a] is not None]
        out_shape = node_shape(node)
        if rule is None:
            vals = [self.value(a) for a in tensor_args]
            if all(not v.from_param and (v.labels == PIN).all() for v in vals):
                self.env[node] = self.pinned(out_shape) if out_shape is not None else None
                return   # made only of inputs and constants: no channel passes through it
            raise CouplingError(f"cannot follow {target} in {where(node)}: its channel coupling is "
                                "unknown, so no group through it can be shrunk safely")
        result = rule(self, node, *node.args, **node.kwargs)
        self.env[node] = result
        if in_place and node.args and isinstance(node.args[0], torch.fx.Node):
            self.env[node.args[0]] = result    # an in-place op: later readers of its input see the result

    def inline(self, node) -> None:
        """Walk the body of an INLINED_REGIONS call: (..., body, *operands), body a get_attr of
        the graph module, its placeholders the operands in order; the call's value is the list
        of the body's outputs, which getitem nodes read."""
        from .rules import RULES
        at = next(i for i, a in enumerate(node.args) if isinstance(a, torch.fx.Node) and a.op == "get_attr")
        body = getattr(self.scopes[-1], node.args[at].target)
        operands = iter(node.args[at + 1:])
        self.scopes.append(body)
        try:
            for sub in body.graph.nodes:
                if sub.op == "placeholder":
                    source = next(operands)
                    self.env[sub] = self.env.get(source) if isinstance(source, torch.fx.Node) else None
                    if source in self.params:
                        self.params[sub] = self.params[source]
                elif sub.op == "call_function":
                    self.call(sub, RULES)
                elif sub.op == "output":
                    self.env[node] = [self.value(out) if isinstance(out, torch.fx.Node) else None
                                      for out in torch.utils._pytree.tree_leaves(sub.args[0])]
        finally:
            self.scopes.pop()


def propagate(program, canonical: dict[str, str] | None = None) -> Atoms:
    """Union-find of channel atoms for an ExportedProgram.

    canonical: parameter/buffer name -> the name it is known by (ties.canonical_names), so a tied
    parameter the program reaches under another name is the same tensor."""
    return Graph(program, canonical).run()
