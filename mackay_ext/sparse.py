"""Sparse layers for pruned networks: the compressed model runs, trains and is stored sparse.

SparseLinear / SparseConv2d keep W in CSR (the nonzero values are Parameters, the pattern is
fixed); `sparsify` swaps them in for pruned Linear/Conv2d layers, and save_compressed /
load_compressed store only the nonzeros with indices in the narrowest integer type.
"""
from __future__ import annotations

import io
import math
import os

import torch
from torch import nn
from torch.nn import functional as F

from ._files import load_plain, save_atomic
from .csr import check_csr, crow_from_rows, csr_linear, to_dense, transpose_index

# Measured crossover (bench/bench_sparse.py -> bench/results/sparse_crossover.md, 2-core CPU,
# float32, densities 1/2/5/10/25/50%): the highest density at which the CSR kernel still beat
# dense GEMM, by layer size (weights), batch and whether a backward pass follows. Above it a
# sparse layer runs as dense GEMM on its scattered weight.
#   layer size    forward: batch < 8, >= 8    forward+backward: batch < 8, >= 8
CROSSOVER = (
    (40_000, (0.0, 0.0), (0.0, 0.0)),         # LeNet 100x300: dense won (nearly) everywhere
    (1_000_000, (0.05, 0.25), (0.0, 0.10)),   # LeNet 300x784
    (math.inf, (0.25, 0.25), (0.10, 0.25)),   # 4096x4096
)


def crossover_density(weights: int, batch: int, training: bool = False) -> float:
    """Density above which dense GEMM is faster for a layer of `weights` weights."""
    for size, forward, train in CROSSOVER:
        if weights <= size:
            small, large = train if training else forward
            return small if batch < 8 else large
    return 0.0


def _index_dtype(upper: int) -> torch.dtype:
    return torch.int32 if upper < 2 ** 31 else torch.int64


def _storage_dtype(upper: int) -> torch.dtype:
    """Narrowest signed integer type holding 0..upper (for files)."""
    for dtype, limit in ((torch.uint8, 255), (torch.int16, 2 ** 15 - 1), (torch.int32, 2 ** 31 - 1)):
        if upper <= limit:
            return dtype
    return torch.int64


class _CSRWeight(nn.Module):
    """The CSR pattern and values of an (out x in) weight, with the transposed index for the
    backward. The O(nnz) index checks run here, once."""

    def __init__(self, out_features, in_features, crow_indices, col_indices, values, bias=None):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        for name, t in (("crow_indices", crow_indices), ("col_indices", col_indices)):
            if not isinstance(t, torch.Tensor) or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
                raise TypeError(f"{type(self).__name__}: {name} must be an integer tensor (int32 or int64), "
                                f"got {getattr(t, 'dtype', type(t).__name__)}")
        dtype = _index_dtype(max(in_features, values.numel()))
        crow_indices, col_indices = crow_indices.to(dtype), col_indices.to(dtype)
        check_csr(crow_indices, col_indices, values, (self.out_features, self.in_features))
        self.register_buffer("crow_indices", crow_indices)
        self.register_buffer("col_indices", col_indices)
        self.values = nn.Parameter(values.detach().clone())
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        crow_t, row_t, perm_t = transpose_index(crow_indices, col_indices, self.in_features)
        self.register_buffer("crow_t", crow_t)
        self.register_buffer("row_t", row_t)
        self.register_buffer("perm_t", perm_t)

    @property
    def nnz(self) -> int:
        return self.values.numel()

    @property
    def density(self) -> float:
        return self.nnz / max(self.in_features * self.out_features, 1)

    def dense_weight(self) -> torch.Tensor:
        """W as a dense (out x in) matrix (differentiable in the values)."""
        return to_dense(self.crow_indices, self.col_indices, self.values,
                        (self.out_features, self.in_features))

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__}: x's last dimension must be in_features = "
                             f"{self.in_features}, got x of shape {tuple(x.shape)}")
        batch = x.numel() // max(x.shape[-1], 1)
        training = torch.is_grad_enabled() and (self.values.requires_grad or x.requires_grad)
        limit = crossover_density(self.in_features * self.out_features, batch, training)
        if self.nnz and self.density > limit:
            return F.linear(x, self.dense_weight(), self.bias)
        return csr_linear(x, self.crow_indices, self.col_indices, self.values, self.bias,
                          in_features=self.in_features,
                          transposed=(self.crow_t, self.row_t, self.perm_t), check_indices=False)


def _csr_from_dense(weight2d: torch.Tensor, mask2d: torch.Tensor | None):
    keep = weight2d != 0 if mask2d is None else mask2d.bool()
    rows, cols = keep.nonzero(as_tuple=True)
    return crow_from_rows(rows, weight2d.shape[0]), cols, weight2d[rows, cols]


class SparseLinear(_CSRWeight):
    """nn.Linear with W in CSR: y = x W^T + b, x of shape (..., in_features)."""

    @classmethod
    def from_dense(cls, layer: nn.Linear, mask: torch.Tensor | None = None) -> "SparseLinear":
        """From an nn.Linear; `mask` (default weight != 0) marks the weights kept."""
        crow, col, values = _csr_from_dense(layer.weight.detach(), mask)
        return cls(layer.out_features, layer.in_features, crow, col, values,
                   None if layer.bias is None else layer.bias.detach())

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
        return f"in_features={self.in_features}, out_features={self.out_features}, nnz={self.nnz} ({100 * self.density:.2f}%)"


class SparseConv2d(_CSRWeight):
    """nn.Conv2d (groups=1, zero padding) with the (out, in*kh*kw) weight matrix in CSR; runs as
    unfold + the CSR product."""

    def __init__(self, in_channels, out_channels, kernel_size, crow_indices, col_indices, values,
                 bias=None, stride=1, padding=0, dilation=1):
        self.kernel_size = nn.modules.utils._pair(kernel_size)
        self.stride, self.padding = nn.modules.utils._pair(stride), nn.modules.utils._pair(padding)
        self.dilation = nn.modules.utils._pair(dilation)
        self.in_channels, self.out_channels = in_channels, out_channels
        super().__init__(out_channels, in_channels * self.kernel_size[0] * self.kernel_size[1],
                         crow_indices, col_indices, values, bias)

    @classmethod
    def from_dense(cls, layer: nn.Conv2d, mask: torch.Tensor | None = None) -> "SparseConv2d":
        if layer.groups != 1 or layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            raise ValueError("SparseConv2d: only groups=1, numeric zero padding are supported")
        weight = layer.weight.detach().reshape(layer.out_channels, -1)
        crow, col, values = _csr_from_dense(weight, None if mask is None else mask.reshape(layer.out_channels, -1))
        return cls(layer.in_channels, layer.out_channels, layer.kernel_size, crow, col, values,
                   None if layer.bias is None else layer.bias.detach(), layer.stride, layer.padding,
                   layer.dilation)

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
        n, _, h, w = x.shape
        kh, kw = self.kernel_size
        ho = (h + 2 * self.padding[0] - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
        wo = (w + 2 * self.padding[1] - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
        columns = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)
        y = self.matmul(columns.transpose(1, 2))            # (N, L, out)
        return y.transpose(1, 2).reshape(n, self.out_channels, ho, wo)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, nnz={self.nnz} ({100 * self.density:.2f}%)")


def _pruning_mask(module: nn.Module, optimizer) -> torch.Tensor:
    weight = module.weight
    state = getattr(optimizer, "state", {}).get(weight) if optimizer is not None else None
    if state is not None and "alpha" in state:
        return (state["alpha"] != math.inf).expand_as(weight)
    return weight != 0


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


@torch.no_grad()
def sparsify(model: nn.Module, optimizer=None, min_sparsity: float = 0.5) -> nn.Module:
    """Replace every nn.Linear / nn.Conv2d (groups=1) whose sparsity reaches `min_sparsity` by
    its sparse twin, in place; returns the model. Sparsity comes from the optimizer's alpha
    (+inf = pruned) when given, else from exact zeros. Build a new optimizer afterwards: the
    sparse layers' parameters are their nonzero values."""
    if not 0.0 <= min_sparsity <= 1.0:
        raise ValueError(f"sparsify: min_sparsity must be in [0, 1], got {min_sparsity}")
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Conv2d) and (module.groups != 1 or module.padding_mode != "zeros"
                                              or isinstance(module.padding, str)):
            continue
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            mask = _pruning_mask(module, optimizer)
            if 1.0 - mask.float().mean().item() >= min_sparsity:
                sparse_cls = SparseLinear if isinstance(module, nn.Linear) else SparseConv2d
                _set_module(model, name, sparse_cls.from_dense(module, mask))
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
