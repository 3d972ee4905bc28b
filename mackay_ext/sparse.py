"""Sparse layers for pruned networks: the compressed model runs, trains and is stored sparse.

SparseLinear / SparseConv2d keep W in CSR (the nonzero values are Parameters, the pattern is
fixed); `sparsify` swaps them in for pruned Linear/Conv2d layers (and rebinds an optimizer to the
kept values), `densify` swaps them back, and save_compressed / load_compressed store only the
nonzeros with indices in the narrowest integer type.

Each layer fixes its path when it is built, from the crossover measured on its device
(CROSSOVER), and again when .to() moves it to another kind of device: "csr" runs the CSR
kernels; "dense" runs dense GEMM (F.linear / F.conv2d) on a dense weight scattered from the
values once and rebuilt only when they change, so a dense-path layer costs its dense twin's
GEMM plus about 0.7 us of bookkeeping a call (the digits MLP, every layer on the dense path:
1.06x the dense model's time at batch 1, 1.03x at batch 256, one CPU thread), and no batch-size
branch reaches a traced graph (torch.export with a dynamic batch).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook

from . import _extension
from .csr import check_csr, crow_from_rows, csr_linear, row_indices, transpose_index

# Measured crossover (bench/bench_sparse.py -> bench/results/sparse_crossover.md and
# sparse_crossover_cuda.md, float32, densities 1/2/5/10/25/50%): the highest density at which the
# CSR kernel still beat dense GEMM, by device type, layer size (weights), batch and whether a
# backward pass follows.
#   layer size    forward: batch < 8, >= 8    forward+backward: batch < 8, >= 8
CROSSOVER = {
    "cpu": (   # 2-core CPU, BLAS GEMM
        (40_000, (0.0, 0.0), (0.0, 0.0)),         # LeNet 100x300: dense won (nearly) everywhere
        (1_000_000, (0.05, 0.25), (0.0, 0.10)),   # LeNet 300x784
        (math.inf, (0.25, 0.25), (0.10, 0.25)),   # 4096x4096
    ),
    "cuda": (  # NVIDIA H200, cuBLAS (at batch 256 a 4096x4096 layer at 10% ran 1.9x dense's time)
        (40_000, (0.0, 0.0), (0.0, 0.0)),         # LeNet 100x300
        (1_000_000, (0.0, 0.01), (0.0, 0.0)),     # LeNet 300x784
        (math.inf, (0.25, 0.02), (0.0, 0.02)),    # 4096x4096
    ),
}
PATHS = ("csr", "dense")

# torch.func transforms (grad, vmap: per-example gradients) wrap tensors in ones without storage:
# the dense path's cache key (data_ptr) and the csr ops' kernels cannot read them, so such calls
# take the scatter + dense product, which the transforms differentiate and batch
# (one global check, 40 ns; dynamo cannot trace it, and a compiled program holds no such tensors)
_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)


def _under_torch_func() -> bool:
    return not torch.compiler.is_compiling() and _functorch_active()

# Whether torch.onnx.export is running. The public torch.onnx.is_in_onnx_export imports two
# modules on every call (about 1.2 us, 7% of a LeNet-300-100 forward at batch 1 over its three
# layers); the flags it reads are read here directly, with the public call where they moved.
# Under torch.compile / torch.export only the dynamo exporter's flag can be set (the TorchScript
# exporter does not trace with dynamo), and dynamo refuses to trace the TorchScript one's
# property: reading it broke the graph at every sparse layer.
try:
    from torch.onnx._internal.exporter import _flags as _onnx_flags
    from torch.onnx._internal.torchscript_exporter._globals import GLOBALS as _onnx_globals

    def _onnx_exporting() -> bool:
        if torch.compiler.is_compiling():
            return _onnx_flags._is_onnx_exporting
        return _onnx_globals.in_onnx_export or _onnx_flags._is_onnx_exporting
except ImportError:   # another torch's layout
    _onnx_exporting = torch.onnx.is_in_onnx_export


def crossover_density(weights: int, batch: int, training: bool = False, device_type: str = "cpu") -> float:
    """Density above which dense GEMM is faster for a layer of `weights` weights on a device of
    this type; 0 (dense always) on a device type nobody measured."""
    for size, forward, train in CROSSOVER.get(device_type, ()):
        if weights <= size:
            small, large = train if training else forward
            return small if batch < 8 else large
    return 0.0


def layer_path(weights: int, nnz: int, device_type: str = "cpu") -> str:
    """The path a layer of `weights` weights with `nnz` nonzeros fixes when built: "csr" only
    where the CSR forward beat dense GEMM at every batch size on that device type (density at or
    below the smallest forward crossover), else "dense". A layer with no nonzeros needs no GEMM
    at all ("csr")."""
    if nnz == 0:
        return "csr"
    smallest = min(min(crossover_density(weights, batch, device_type=device_type) for batch in (1, 8)), 1.0)
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
    the crossover on the values' device: layer_path) is fixed here too, and chosen again when
    .to() moves an automatically placed layer to another device type."""

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
        self._path_by_device = path is None   # a path the caller chose stays on any device
        if path is None:
            path = layer_path(self.out_features * self.in_features, values.numel(), values.device.type)
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

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        """load_state_dict copies the pattern into the buffers in place: the incoming CSR arrays
        are checked first (a layer with bad ones loads nothing), and the index derived from them
        (the transposed index, flat_index) is rebuilt after, or the dense path, densify and ONNX
        would scatter the new values into the old pattern."""
        incoming = {name: state_dict.get(prefix + name) for name in ("crow_indices", "col_indices", "values")}
        if all(isinstance(t, torch.Tensor) for t in incoming.values()):
            dtype = self.crow_indices.dtype
            try:
                check_csr(incoming["crow_indices"].to(dtype), incoming["col_indices"].to(dtype),
                          incoming["values"], (self.out_features, self.in_features))
            except (TypeError, ValueError) as error:
                error_msgs.append(f"{prefix or 'the layer'}: its CSR arrays are not a valid pattern of a "
                                  f"{self.out_features} x {self.in_features} weight: {error}")
                return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        with torch.no_grad():
            crow_t, row_t, perm_t = transpose_index(self.crow_indices, self.col_indices, self.in_features)
            for buffer, rebuilt in ((self.crow_t, crow_t), (self.row_t, row_t), (self.perm_t, perm_t)):
                buffer.copy_(rebuilt)
            self.flat_index = row_indices(self.crow_indices) * self.in_features + self.col_indices.long()
        self._dense, self._dense_key = None, None

    @property
    def nnz(self) -> int:
        return self.values.numel()

    @property
    def density(self) -> float:
        return self.nnz / max(self.in_features * self.out_features, 1)

    def _runs_dense(self) -> bool:
        """The dense GEMM on the scattered weight: the "dense" path, and every path under
        torch.onnx.export and torch.func. ONNX has no CSR product, so there the csr path is
        written as the same arithmetic in standard ops (ScatterElements of the nonzeros, then
        MatMul / Conv): the file keeps only the nonzeros and runs in any ONNX runtime."""
        return self.path == "dense" or _onnx_exporting() or _under_torch_func()

    def dense_weight(self) -> torch.Tensor:
        """W as a dense (out x in) matrix, a new tensor differentiable in the values."""
        size = self.out_features * self.in_features
        # under torch.onnx.export's TorchScript exporter a zeros tensor of W's size is written into
        # the file as a constant of that size (larger than the dense model); one zero expanded
        # is written as ConstantOfShape + Expand, and the file keeps only the nonzeros
        flat = self.values.new_zeros(1).expand(size) if _onnx_exporting() else self.values.new_zeros(size)
        return flat.scatter(0, self.flat_index, self.values).view(self.out_features, self.in_features)

    def __getstate__(self):
        """A pickled or deep-copied layer leaves the dense path's cached weight behind (a full
        dense matrix per layer, 8x a 1.25%-kept LeNet-300-100's nonzeros); the copy rebuilds it."""
        state = dict(super().__getstate__())
        state["_dense"], state["_dense_key"] = None, None
        return state

    def _apply(self, fn, recurse=True):
        self._dense, self._dense_key = None, None  # .to() / .half(): the cache is rebuilt
        result = super()._apply(fn, recurse)
        if getattr(self, "_path_by_device", False):   # the crossover of the device it now lives on
            self.path = layer_path(self.out_features * self.in_features, self.nnz, self.values.device.type)
        return result

    def train(self, mode: bool = True):
        """Also drops the dense path's cached weight (model.eval() after writing the values
        through .data makes the next call see them; see _weight_for_gemm)."""
        self._dense, self._dense_key = None, None
        return super().train(mode)

    def _param(self, name: str):
        """self.values / self.bias read from _parameters directly: nn.Module's __getattr__ costs
        0.6 us, a third of what a dense-path layer adds to its dense twin's batch-1 forward.
        (functional_call and load_state_dict(assign=True) write _parameters too.)"""
        parameters = self._parameters
        return parameters[name] if name in parameters else getattr(self, name)

    def _weight_for_gemm(self, shape: tuple[int, ...]) -> torch.Tensor:
        """The dense path's weight, viewed as `shape` (the GEMM's or the conv's). Traced
        (torch.compile / export / ONNX export): the scatter itself. Eager: the scatter, cached
        until the values change (an in-place write or any optimizer step); in train mode rebuilt
        every call, since a training loop may write the values through .data, which leaves no
        trace. The cache is what an inference call pays for on top of the dense layer, so it
        checks little: .to() and .half() clear it (_apply), new storage assigned through .data
        moves data_ptr, and train() / eval() drop it. An in-place write through .data to an
        eval-mode layer (an EMA copy updated with p.data.mul_(...)) leaves no trace at all;
        reading every value per call to catch it would cost up to a sixth of a batch-1 forward,
        so such code calls model.eval() again after the write (or writes under torch.no_grad()
        without .data, which bumps the version)."""
        values = self._param("values")
        if torch.compiler.is_compiling() or _onnx_exporting() or _functorch_active():
            return self.dense_weight().view(shape)   # in the program: the nonzeros, not W
        key = (values._version, values.data_ptr(), _optimizer_steps)
        if self.training or self._dense is None or self._dense_key != key:
            with torch.no_grad():
                # a new tensor, never an in-place refresh: a pending backward may hold the old one
                self._dense = self.dense_weight().view(shape)
            self._dense_key = key
        if torch.is_grad_enabled() and values.requires_grad:
            return _CachedWeight.apply(values, self._dense, self.flat_index)
        return self._dense

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x W^T + b over x's last dimension (the "csr" path)."""
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__}: x's last dimension must be in_features = "
                             f"{self.in_features}, got x of shape {tuple(x.shape)}")
        if self._runs_dense():
            return F.linear(x, self._weight_for_gemm((self.out_features, self.in_features)), self._param("bias"))
        # the buffers read from _buffers directly, as _param does: through nn.Module's
        # __getattr__ the five of them cost 3-4 us a call, a third of a 256x256 layer's batch-1 time
        buffers = self._buffers
        return csr_linear(x, buffers["crow_indices"], buffers["col_indices"], self._param("values"),
                          self._param("bias"), in_features=self.in_features,
                          transposed=(buffers["crow_t"], buffers["row_t"], buffers["perm_t"]), check_indices=False,
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
        """From an nn.Linear; `mask` (default weight != 0) marks the weights kept. The new layer
        takes the layer's mode (train / eval), as does to_dense's."""
        crow, col, values, _ = _csr_from_dense(layer.weight.detach(), mask)
        return cls(layer.out_features, layer.in_features, crow, col, values,
                   None if layer.bias is None else layer.bias.detach(), path=path).train(layer.training)

    def to_dense(self) -> nn.Linear:
        layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                          device=self.values.device, dtype=self.values.dtype).train(self.training)
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
                   layer.dilation, path=path).train(layer.training)

    def to_dense(self) -> nn.Conv2d:
        layer = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                          self.padding, self.dilation, bias=self.bias is not None,
                          device=self.values.device, dtype=self.values.dtype).train(self.training)
        with torch.no_grad():
            layer.weight.copy_(self.dense_weight().reshape(layer.weight.shape))
            if self.bias is not None:
                layer.bias.copy_(self.bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"SparseConv2d: expected input (N, {self.in_channels}, H, W), got {tuple(x.shape)}")
        if self._runs_dense():
            weight = self._weight_for_gemm((self.out_channels, self.in_channels, *self.kernel_size))
            return F.conv2d(x, weight, self._param("bias"), self.stride, self.padding, self.dilation)
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


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


# sparsify / densify and the compressed file format live beside the layers; their names stay
# reachable here (mackay_ext.sparse.sparsify, ...), as before the split
from .convert import densify, sparsify  # noqa: E402,F401
from .compressed import FORMAT, load_compressed, save_compressed  # noqa: E402,F401
