"""Sparse layers for pruned networks: the compressed model runs, trains and is stored sparse.

SparseLinear / SparseConv2d keep W in CSR (the nonzero values are Parameters, the pattern is
fixed); `sparsify` swaps them in for pruned Linear/Conv2d layers (and rebinds an optimizer to the
kept values), `densify` swaps them back, and save_compressed / load_compressed store only the
nonzeros with indices in the narrowest integer type.

Each layer fixes its path when it is built, from the measured crossover (CROSSOVER): "csr" runs
the CSR kernels; "dense" runs dense GEMM (F.linear / F.conv2d) on a dense weight scattered from
the values once and rebuilt only when they change, so a sparse layer is never slower than its
dense twin and no batch-size branch reaches a traced graph (torch.export with a dynamic batch).
"""
from __future__ import annotations

import functools
import inspect
import io
import math
import os
import re
import warnings

import torch
from torch import nn
from torch.nn import functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook

from . import _extension
from ._files import load_plain, save_atomic
from ._validate import alpha_fits
from .csr import check_csr, crow_from_rows, csr_linear, row_indices, transpose_index

# Measured crossover (bench/bench_sparse.py -> bench/results/sparse_crossover.md, 2-core CPU,
# float32, densities 1/2/5/10/25/50%): the highest density at which the CSR kernel still beat
# dense GEMM, by layer size (weights), batch and whether a backward pass follows.
#   layer size    forward: batch < 8, >= 8    forward+backward: batch < 8, >= 8
CROSSOVER = (
    (40_000, (0.0, 0.0), (0.0, 0.0)),         # LeNet 100x300: dense won (nearly) everywhere
    (1_000_000, (0.05, 0.25), (0.0, 0.10)),   # LeNet 300x784
    (math.inf, (0.25, 0.25), (0.10, 0.25)),   # 4096x4096
)
PATHS = ("csr", "dense")


def crossover_density(weights: int, batch: int, training: bool = False) -> float:
    """Density above which dense GEMM is faster for a layer of `weights` weights."""
    for size, forward, train in CROSSOVER:
        if weights <= size:
            small, large = train if training else forward
            return small if batch < 8 else large
    return 0.0


def layer_path(weights: int, nnz: int) -> str:
    """The path a layer of `weights` weights with `nnz` nonzeros fixes when built: "csr" only
    where the CSR forward beat dense GEMM at every batch size (density at or below the smallest
    forward crossover), else "dense". A layer with no nonzeros needs no GEMM at all ("csr")."""
    if nnz == 0:
        return "csr"
    smallest = min(min(crossover_density(weights, batch) for batch in (1, 8)), 1.0)
    return "csr" if nnz / max(weights, 1) <= smallest else "dense"


def _index_dtype(upper: int) -> torch.dtype:
    return torch.int32 if upper < 2 ** 31 else torch.int64


def _storage_dtype(upper: int) -> torch.dtype:
    """Narrowest signed integer type holding 0..upper (for files)."""
    for dtype, limit in ((torch.uint8, 255), (torch.int16, 2 ** 15 - 1), (torch.int32, 2 ** 31 - 1)):
        if upper <= limit:
            return dtype
    return torch.int64


# Bumped after every optimizer step (a global step hook): an optimizer may write the values
# without bumping their version counter (MacKayAdam's fused op does not), so the dense path's
# cached weight is keyed on this too.
_optimizer_steps = 0


def _count_step(optimizer, args, kwargs) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


register_optimizer_step_post_hook(_count_step)


class _CachedWeight(torch.autograd.Function):
    """The dense weight, already scattered from `values`, as a function of them: the backward
    gathers grad_W at the nonzeros (grad_values[k] = grad_W.flat[flat_index[k]])."""

    @staticmethod
    def forward(ctx, values, dense, flat_index):
        ctx.save_for_backward(flat_index)
        return dense

    @staticmethod
    def backward(ctx, grad_dense):
        (flat_index,) = ctx.saved_tensors
        return grad_dense.reshape(-1)[flat_index], None, None


class _CSRWeight(nn.Module):
    """The CSR pattern and values of an (out x in) weight, with the transposed index for the
    backward. The O(nnz) index checks run here, once. `path` ("csr" or "dense", default from
    the crossover: layer_path) is fixed here too."""

    def __init__(self, out_features, in_features, crow_indices, col_indices, values, bias=None, *,
                 path: str | None = None):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        for name, t in (("crow_indices", crow_indices), ("col_indices", col_indices)):
            if not isinstance(t, torch.Tensor) or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
                raise TypeError(f"{type(self).__name__}: {name} must be an integer tensor (int32 or int64), "
                                f"got {getattr(t, 'dtype', type(t).__name__)}")
        dtype = _index_dtype(max(in_features, values.numel()))
        crow_indices, col_indices = crow_indices.to(dtype), col_indices.to(dtype)
        check_csr(crow_indices, col_indices, values, (self.out_features, self.in_features))
        if path is None:
            path = layer_path(self.out_features * self.in_features, values.numel())
        if path not in PATHS:
            raise ValueError(f"{type(self).__name__}: path must be one of {PATHS} or None, got {path!r}")
        self.path = path
        self.register_buffer("crow_indices", crow_indices)
        self.register_buffer("col_indices", col_indices)
        self.values = nn.Parameter(values.detach().clone())
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        crow_t, row_t, perm_t = transpose_index(crow_indices, col_indices, self.in_features)
        self.register_buffer("crow_t", crow_t)
        self.register_buffer("row_t", row_t)
        self.register_buffer("perm_t", perm_t)
        # position of each nonzero in the flattened (out x in) weight: a scatter with static
        # shapes (torch.export traces it), not rebuilt from the row pointers per call
        flat_index = row_indices(crow_indices) * self.in_features + col_indices.long()
        self.register_buffer("flat_index", flat_index, persistent=False)
        self._dense, self._dense_key = None, None

    @property
    def nnz(self) -> int:
        return self.values.numel()

    @property
    def density(self) -> float:
        return self.nnz / max(self.in_features * self.out_features, 1)

    def dense_weight(self) -> torch.Tensor:
        """W as a dense (out x in) matrix, a new tensor differentiable in the values."""
        flat = self.values.new_zeros(self.out_features * self.in_features)
        return flat.scatter(0, self.flat_index, self.values).view(self.out_features, self.in_features)

    def _apply(self, fn, recurse=True):
        self._dense, self._dense_key = None, None  # .to() / .half(): the cache is rebuilt
        return super()._apply(fn, recurse)

    def _weight_for_gemm(self) -> torch.Tensor:
        """The dense path's weight. Traced (torch.compile / export): the scatter itself. Eager:
        the scatter, cached until the values change (an in-place write or any optimizer step);
        in train mode rebuilt every call, since a training loop may write the values through
        .data, which leaves no trace."""
        values = self.values
        if torch.compiler.is_compiling():
            return self.dense_weight()
        key = (values._version, values.data_ptr(), values.dtype, values.device, _optimizer_steps)
        if self.training or self._dense is None or self._dense_key != key:
            with torch.no_grad():
                # a new tensor, never an in-place refresh: a pending backward may hold the old one
                self._dense = self.dense_weight()
            self._dense_key = key
        if torch.is_grad_enabled() and values.requires_grad:
            return _CachedWeight.apply(values, self._dense, self.flat_index)
        return self._dense

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x W^T + b over x's last dimension (the "csr" path)."""
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__}: x's last dimension must be in_features = "
                             f"{self.in_features}, got x of shape {tuple(x.shape)}")
        if self.path == "dense":
            return F.linear(x, self._weight_for_gemm(), self.bias)
        return csr_linear(x, self.crow_indices, self.col_indices, self.values, self.bias,
                          in_features=self.in_features,
                          transposed=(self.crow_t, self.row_t, self.perm_t), check_indices=False,
                          backend="ext" if _extension.is_loaded() else "torch")

    def _density_repr(self) -> str:
        return f"nnz={self.nnz} ({100 * self.density:.2f}%), path={self.path}"


def _csr_from_dense(weight2d: torch.Tensor, mask2d: torch.Tensor | None):
    """(crow, col, values, rows) of the kept entries of a 2-D weight, row-major (the order of
    the values, and of any optimizer state gathered for them)."""
    keep = weight2d != 0 if mask2d is None else mask2d.bool()
    rows, cols = keep.nonzero(as_tuple=True)
    return crow_from_rows(rows, weight2d.shape[0]), cols, weight2d[rows, cols], rows


class SparseLinear(_CSRWeight):
    """nn.Linear with W in CSR: y = x W^T + b, x of shape (..., in_features)."""

    @classmethod
    def from_dense(cls, layer: nn.Linear, mask: torch.Tensor | None = None, *,
                   path: str | None = None) -> SparseLinear:
        """From an nn.Linear; `mask` (default weight != 0) marks the weights kept."""
        crow, col, values, _ = _csr_from_dense(layer.weight.detach(), mask)
        return cls(layer.out_features, layer.in_features, crow, col, values,
                   None if layer.bias is None else layer.bias.detach(), path=path)

    def to_dense(self) -> nn.Linear:
        layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                          device=self.values.device, dtype=self.values.dtype)
        with torch.no_grad():
            layer.weight.copy_(self.dense_weight())
            if self.bias is not None:
                layer.bias.copy_(self.bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self._density_repr()}"


class SparseConv2d(_CSRWeight):
    """nn.Conv2d (groups=1, zero padding) with the (out, in*kh*kw) weight matrix in CSR; the
    "csr" path runs unfold + the CSR product, the "dense" path F.conv2d."""

    def __init__(self, in_channels, out_channels, kernel_size, crow_indices, col_indices, values,
                 bias=None, stride=1, padding=0, dilation=1, *, path: str | None = None):
        self.kernel_size = nn.modules.utils._pair(kernel_size)
        self.stride, self.padding = nn.modules.utils._pair(stride), nn.modules.utils._pair(padding)
        self.dilation = nn.modules.utils._pair(dilation)
        self.in_channels, self.out_channels = in_channels, out_channels
        super().__init__(out_channels, in_channels * self.kernel_size[0] * self.kernel_size[1],
                         crow_indices, col_indices, values, bias, path=path)

    @classmethod
    def from_dense(cls, layer: nn.Conv2d, mask: torch.Tensor | None = None, *,
                   path: str | None = None) -> SparseConv2d:
        if layer.groups != 1 or layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            raise ValueError("SparseConv2d: only groups=1, numeric zero padding are supported")
        weight = layer.weight.detach().reshape(layer.out_channels, -1)
        crow, col, values, _ = _csr_from_dense(
            weight, None if mask is None else mask.reshape(layer.out_channels, -1))
        return cls(layer.in_channels, layer.out_channels, layer.kernel_size, crow, col, values,
                   None if layer.bias is None else layer.bias.detach(), layer.stride, layer.padding,
                   layer.dilation, path=path)

    def to_dense(self) -> nn.Conv2d:
        layer = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                          self.padding, self.dilation, bias=self.bias is not None,
                          device=self.values.device, dtype=self.values.dtype)
        with torch.no_grad():
            layer.weight.copy_(self.dense_weight().reshape(layer.weight.shape))
            if self.bias is not None:
                layer.bias.copy_(self.bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"SparseConv2d: expected input (N, {self.in_channels}, H, W), got {tuple(x.shape)}")
        if self.path == "dense":
            weight = self._weight_for_gemm().view(self.out_channels, self.in_channels, *self.kernel_size)
            return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation)
        n, _, h, w = x.shape
        kh, kw = self.kernel_size
        ho = (h + 2 * self.padding[0] - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
        wo = (w + 2 * self.padding[1] - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
        columns = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)
        y = self.matmul(columns.transpose(1, 2))            # (N, L, out)
        return y.transpose(1, 2).reshape(n, self.out_channels, ho, wo)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, {self._density_repr()}")


# ---------------------------------------------------------------- sparsify / densify

def _pruning_mask(module: nn.Module, optimizer) -> torch.Tensor:
    weight = module.weight
    state = getattr(optimizer, "state", {}).get(weight) if optimizer is not None else None
    if state is not None and "alpha" in state:
        return (state["alpha"] != math.inf).expand_as(weight)
    return weight != 0


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


@functools.cache
def _weight_reads(cls: type) -> frozenset:
    """Names n for which code of `cls` (and of its bases other than nn.Module) reads `n.weight`
    itself instead of calling module n: nn.MultiheadAttention reads out_proj.weight, and
    TransformerEncoder(Layer)'s fast path linear1.weight. Constructors and initialisers are left
    out: they ran before sparsify."""
    names = set()
    for klass in cls.__mro__:
        if klass in (nn.Module, object):
            continue
        for attr, function in vars(klass).items():
            function = getattr(function, "__func__", function)
            if not inspect.isfunction(function) or "init" in attr or "reset" in attr:
                continue
            try:
                source = inspect.getsource(function)
            except (OSError, TypeError):  # defined where no source is kept
                continue
            names.update(re.findall(r"(\w+)\.weight\b", source))
    return frozenset(names)


def _user_hooks(module: nn.Module) -> list:
    """The module's hooks, except this package's own curvature hooks (bound to the dense layer,
    dropped with it: a model copied mid-pruning still converts)."""
    hooks = [hook for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                               "_backward_pre_hooks") for hook in getattr(module, attr, {}).values()]
    return [hook for hook in hooks if not getattr(hook, "__module__", "").startswith("mackay_ext.")]


def _why_not_convertible(model, names, module, holders) -> str | None:
    """Why the layer `module` (reached as every name in `names`) must stay dense, or None."""
    if isinstance(module, nn.Conv2d) and (module.groups != 1 or module.padding_mode != "zeros"
                                          or isinstance(module.padding, str)):
        return "a grouped, string-padded or non-zero-padded Conv2d has no sparse twin"
    if type(module).forward not in (nn.Linear.forward, nn.Conv2d.forward):
        return f"{type(module).__name__} has its own forward, which the sparse twin would drop"
    if not isinstance(module.weight, nn.Parameter) or isinstance(module.weight, nn.UninitializedParameter):
        return ("its weight is not a plain Parameter (uninitialised, parametrized or under "
                "torch.nn.utils.prune: remove that first)")
    if _user_hooks(module):
        return "it has hooks, which would be lost"
    others = holders.get(id(module.weight), set()) - {id(module)}
    if others:
        return "its weight is tied to another module (it would be untied)"
    if "" in names:
        return "it is the model itself (sparsify replaces submodules in place)"
    for name in names:
        parts = name.split(".")
        for depth in range(len(parts) - 1, -1, -1):  # nearest ancestor first
            ancestor_name = ".".join(parts[:depth])
            ancestor = model.get_submodule(ancestor_name)
            if parts[-1] in _weight_reads(type(ancestor)):
                return (f"{type(ancestor).__name__} ({ancestor_name or 'the model'}) reads "
                        f"{parts[-1]}.weight directly")
    return None


def _exclusion(model: nn.Module, exclude):
    """A predicate (name, module) -> bool from module names and/or predicates."""
    items = [exclude] if isinstance(exclude, str) or callable(exclude) else list(exclude or ())
    names = [item for item in items if isinstance(item, str)]
    predicates = [item for item in items if callable(item)]
    bad = [item for item in items if not isinstance(item, str) and not callable(item)]
    if bad:
        raise TypeError(f"sparsify: exclude must hold module names (str) or predicates "
                        f"(name, module) -> bool, got {bad!r}")
    known = {name for name, _ in model.named_modules(remove_duplicate=False)}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"sparsify: exclude names modules the model does not have: {unknown} "
                         f"(its modules: {sorted(known - {''})[:20]})")

    def excluded(name, module):
        return (any(name == n or name.startswith(n + ".") or n == "" for n in names)
                or any(p(name, module) for p in predicates))
    return excluded


def _find_layers(model: nn.Module, types):
    """[(names, module)] of the modules of `types`, every name a module is registered under
    (a module used twice is converted once and stays shared), and {id(param): ids of the
    modules holding it} to spot tied weights."""
    names_of, holders = {}, {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, types):
            names_of.setdefault(id(module), (module, []))[1].append(name)
        for param in module._parameters.values():
            if param is not None:
                holders.setdefault(id(param), set()).add(id(module))
    return [(names, module) for module, names in names_of.values()], holders


# Optimizers whose state is not one number per weight (factored second moments, a history of
# flat vectors): it cannot be carried to the kept values.
_UNCARRIABLE = tuple(getattr(torch.optim, name) for name in ("LBFGS", "Adafactor", "SparseAdam")
                     if hasattr(torch.optim, name))


def _check_optimizer(optimizer, where: str) -> None:
    if optimizer is None:
        return
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"{where}: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if isinstance(optimizer, _UNCARRIABLE):
        raise ValueError(f"{where}: the state of {type(optimizer).__name__} is not one number per weight "
                         "and cannot be carried over; call it without the optimizer and build a new one")


def _carry_state(state: dict, shape, take, where: str) -> dict:
    """Per-parameter optimizer state moved to a reshaped parameter: tensors of the old
    parameter's shape, or broadcastable to it (MacKayAdam's per-group alpha), go through
    `take` (expanded first); scalars (step) and None are copied."""
    carried = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            if not alpha_fits(value.shape, shape):
                raise ValueError(f"{where}: optimizer state {key!r} has shape {tuple(value.shape)}, "
                                 f"neither the weight's {tuple(shape)} nor broadcastable to it")
            carried[key] = take(key, value.expand(shape))
        else:
            carried[key] = value.clone() if isinstance(value, torch.Tensor) else value
    return carried


def _rebind(optimizer, old: nn.Parameter, new: nn.Parameter, state: dict | None) -> None:
    """In place: `new` takes `old`'s slot in its param group, and the carried state."""
    for group in optimizer.param_groups:
        for i, param in enumerate(group["params"]):
            if param is old:
                group["params"][i] = new
    optimizer.state.pop(old, None)
    if state:
        optimizer.state[new] = state


@torch.no_grad()
def sparsify(model: nn.Module, optimizer=None, min_sparsity: float = 0.5, *, exclude=()) -> nn.Module:
    """Replace every nn.Linear / nn.Conv2d (groups=1) whose sparsity reaches `min_sparsity` by
    its sparse twin, in place; returns the model. Sparsity comes from the optimizer's alpha
    (+inf = pruned) when given, else from exact zeros.

    optimizer: rebound in place, so it trains the sparse layers: each converted weight Parameter
        is replaced in its param group by the layer's `values`, and its state carried over
        (tensors of the weight's shape or broadcastable to it, such as exp_avg, momentum_buffer
        or MacKayAdam's alpha, gathered at the kept weights; step and other scalars copied).
        The bias Parameter is kept as it is.
    exclude: module names (a name excludes everything inside it) and/or predicates
        (name, module) -> bool; layers left dense on request.
    A layer sparse enough but left dense for another reason is named in one warning, with the
    reason: its weight tied to another module, read directly by an enclosing module (as
    nn.MultiheadAttention reads out_proj.weight), hooks, a subclass with its own forward, a
    grouped or non-zero-padded Conv2d.
    """
    if not 0.0 <= min_sparsity <= 1.0:
        raise ValueError(f"sparsify: min_sparsity must be in [0, 1], got {min_sparsity}")
    _check_optimizer(optimizer, "sparsify")
    excluded = _exclusion(model, exclude)
    layers, holders = _find_layers(model, (nn.Linear, nn.Conv2d))
    plan, skipped = [], []
    for names, module in layers:
        if any(excluded(name, module) for name in names):
            continue
        weight = module.weight
        if isinstance(weight, nn.UninitializedParameter) or weight.numel() == 0:
            continue
        mask = _pruning_mask(module, optimizer)
        if 1.0 - mask.float().mean().item() < min_sparsity:
            continue
        reason = _why_not_convertible(model, names, module, holders)
        if reason:
            skipped.append(f"{names[0]} ({reason})")
            continue
        plan.append((names, module, mask))
    # build everything (and check the optimizer state carries) before changing anything
    built = []
    for names, module, mask in plan:
        weight = module.weight
        sparse_cls = SparseLinear if isinstance(module, nn.Linear) else SparseConv2d
        sparse = sparse_cls.from_dense(module, mask)
        sparse.values.requires_grad_(weight.requires_grad)
        sparse.bias = module.bias  # the same Parameter: its optimizer slot and state stay valid
        state = None
        if optimizer is not None and optimizer.state.get(weight):
            weight2d = weight.reshape(weight.shape[0], -1)
            _, cols, _, rows = _csr_from_dense(weight2d, mask.reshape(weight2d.shape))

            def gather(key, t, shape2d=weight2d.shape, rows=rows, cols=cols):
                return t.reshape(shape2d)[rows, cols].contiguous()
            state = _carry_state(optimizer.state[weight], weight.shape, gather, f"sparsify ({names[0]})")
        built.append((names, weight, sparse, state))
    for names, weight, sparse, state in built:
        for name in names:
            _set_module(model, name, sparse)
        if optimizer is not None:
            _rebind(optimizer, weight, sparse.values, state)
    if skipped:
        warnings.warn("sparsify: left dense, though sparse enough: " + "; ".join(skipped) +
                      ". Pass exclude= to leave layers dense on purpose.", stacklevel=2)
    return model


@torch.no_grad()
def densify(model: nn.Module, optimizer=None) -> nn.Module:
    """Replace every SparseLinear / SparseConv2d by the equal nn.Linear / nn.Conv2d, in place
    (the inverse of sparsify; a plain PyTorch model); returns the model.

    optimizer: rebound in place, as sparsify does: each `values` Parameter is replaced by the
        new dense weight, its state scattered to the weight's shape (zeros at the weights not
        stored; MacKayAdam's alpha +inf there, so they stay pruned); the bias is kept.
    """
    _check_optimizer(optimizer, "densify")
    layers, _ = _find_layers(model, _CSRWeight)
    if any("" in names for names, _ in layers):
        raise ValueError("densify: the model itself is a sparse layer; call its to_dense()")
    for names, sparse in layers:
        dense = sparse.to_dense()
        dense.weight.requires_grad_(sparse.values.requires_grad)
        dense.bias = sparse.bias
        state = None
        if optimizer is not None and optimizer.state.get(sparse.values):
            size = dense.weight.numel()

            def scatter(key, t, sparse=sparse, size=size, shape=dense.weight.shape):
                fill = math.inf if key == "alpha" else 0.0  # MacKayAdam: +inf = pruned
                return t.new_full((size,), fill).index_copy_(0, sparse.flat_index, t).view(shape)
            state = _carry_state(optimizer.state[sparse.values], sparse.values.shape, scatter,
                                 f"densify ({names[0]})")
        for name in names:
            _set_module(model, name, dense)
        if optimizer is not None:
            _rebind(optimizer, sparse.values, dense.weight, state)
    return model


def _serialized_size(obj) -> int:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.tell()


FORMAT = "mackay_ext.compressed.v1"


def save_compressed(model: nn.Module, path: str, model_name: str | None = None) -> dict[str, int]:
    """Store `model` with its sparse layers as nonzeros only (indices in the narrowest integer
    type). Returns {"bytes": file size, "dense_bytes": size of the equivalent dense state_dict}."""
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
    payload = {"format": FORMAT, "model_name": model_name, "sparse": sparse, "state": rest}
    save_atomic(payload, path)  # never half a file
    return {"bytes": os.path.getsize(path), "dense_bytes": _serialized_size(dense_state)}


def load_compressed(path: str, model: nn.Module | None = None, map_location="cpu") -> nn.Module:
    """Rebuild a model saved by save_compressed. `model` is a freshly built network of the same
    architecture (dense); without it, the saved model_name is looked up in mackay_ext.models."""
    payload = load_plain(path, "compressed model", map_location=map_location)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise RuntimeError(f"load_compressed: {path} is not a file written by save_compressed")
    if model is None:
        if not payload.get("model_name"):
            raise ValueError("load_compressed: pass `model` (this file names no model)")
        from . import models
        model = models.create(payload["model_name"])
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
