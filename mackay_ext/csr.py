"""Masked sparse matmul ops (docs/mathematics.md section 3): W (out x in) in CSR, y = x W^T + b.

`csr_linear` is differentiable in x, values and bias: grad_x is a sparse product with W^T (whose
index, `transpose_index`, a layer builds once), grad_values an SDDMM (grad^T x sampled at the
nonzeros). The O(nnz) index checks (`check_csr`) run once per layer, not per call. Values may be
float32/float64 or float16/bfloat16 (stored so, summed in float32); under autocast the op runs in
autocast's dtype, as F.linear would.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from . import _extension
from ._validate import BACKENDS, FLOAT_DTYPES, check_choice, check_one_device

INDEX_DTYPES = (torch.int32, torch.int64)


GATHER_ELEMENTS = 1 << 24   # a double backward's gathered products per chunk (64 MiB in float32)


class TransposeIndex(NamedTuple):
    """CSR index of W^T: row pointers over W's columns, W's row of each, and the permutation
    from W^T's order to W's values (values_t = values[perm])."""

    crow: torch.Tensor
    row: torch.Tensor
    perm: torch.Tensor


def check_csr(crow_indices: torch.Tensor, col_indices: torch.Tensor, values: torch.Tensor,
              shape: tuple[int, int]) -> None:
    """Full validation of CSR arrays for an (out x in) matrix; raises a clear error naming the
    argument. O(nnz) with one host synchronisation: run it when a layer is built."""
    out_features, in_features = shape
    for name, t in (("crow_indices", crow_indices), ("col_indices", col_indices)):
        if not isinstance(t, torch.Tensor) or t.dtype not in INDEX_DTYPES or t.dim() != 1:
            raise TypeError(f"csr: {name} must be a 1-D int32 or int64 tensor, got "
                            f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
    if crow_indices.dtype != col_indices.dtype:
        raise TypeError(f"csr: crow_indices and col_indices must share a dtype, got "
                        f"{crow_indices.dtype} and {col_indices.dtype}")
    if not isinstance(values, torch.Tensor) or values.dim() != 1 or values.dtype not in FLOAT_DTYPES:
        raise TypeError("csr: values must be a 1-D float32, float64, float16 or bfloat16 tensor, got "
                        f"{getattr(values, 'dtype', type(values).__name__)} "
                        f"{tuple(getattr(values, 'shape', ()))}")
    if not (crow_indices.device == col_indices.device == values.device):
        raise RuntimeError(f"csr: crow_indices, col_indices and values must be on one device, got "
                           f"{crow_indices.device}, {col_indices.device}, {values.device}")
    if crow_indices.numel() != out_features + 1:
        raise ValueError(f"csr: crow_indices must have out_features + 1 = {out_features + 1} entries, "
                         f"got {crow_indices.numel()}")
    if col_indices.numel() != values.numel():
        raise ValueError(f"csr: col_indices ({col_indices.numel()}) and values ({values.numel()}) must "
                         "have one entry per nonzero")
    nnz = values.numel()
    if int(crow_indices[0]) != 0 or int(crow_indices[-1]) != nnz:
        raise ValueError(f"csr: crow_indices must start at 0 and end at nnz = {nnz}, got "
                         f"{int(crow_indices[0])}..{int(crow_indices[-1])}")
    if out_features and bool((crow_indices[1:] < crow_indices[:-1]).any()):
        raise ValueError("csr: crow_indices must be non-decreasing")
    if nnz and (int(col_indices.min()) < 0 or int(col_indices.max()) >= in_features):
        raise ValueError(f"csr: col_indices must lie in [0, in_features = {in_features}), got "
                         f"{int(col_indices.min())}..{int(col_indices.max())}")
    if nnz > 1:   # as torch's own CSR tensors: a repeat would be summed by the kernels, kept once by W
        rows = row_indices(crow_indices)
        same_row = rows[1:] == rows[:-1]
        unsorted = same_row & (col_indices[1:] <= col_indices[:-1])
        if bool(unsorted.any()):
            at = int(unsorted.nonzero()[0, 0])
            raise ValueError(f"csr: col_indices must increase strictly within each row (sorted, no column "
                             f"twice), got {int(col_indices[at])} then {int(col_indices[at + 1])} in row "
                             f"{int(rows[at])}")


def row_indices(crow_indices: torch.Tensor) -> torch.Tensor:
    """The row of every nonzero (int64), expanded from the row pointers."""
    rows = torch.arange(crow_indices.numel() - 1, device=crow_indices.device)
    return torch.repeat_interleave(rows, (crow_indices[1:] - crow_indices[:-1]).long())


def crow_from_rows(rows: torch.Tensor, num_rows: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Row pointers of nonzeros sorted by row, given the row of each."""
    crow = torch.zeros(num_rows + 1, dtype=dtype, device=rows.device)
    crow[1:] = torch.cumsum(torch.bincount(rows.long(), minlength=num_rows), 0)
    return crow


def to_dense(crow_indices: torch.Tensor, col_indices: torch.Tensor, values: torch.Tensor,
             shape: tuple[int, int]) -> torch.Tensor:
    """W as a dense matrix (differentiable in the values)."""
    weight = values.new_zeros(shape)
    return weight.index_put((row_indices(crow_indices), col_indices.long()), values)


def transpose_index(crow_indices: torch.Tensor, col_indices: torch.Tensor, in_features: int) -> TransposeIndex:
    """The CSR index of W^T (a counting sort of the nonzeros by column), built once per layer."""
    out_features = crow_indices.numel() - 1
    rows = row_indices(crow_indices)
    order = torch.argsort(col_indices.long() * max(out_features, 1) + rows, stable=True)
    crow_t = crow_from_rows(col_indices, in_features, crow_indices.dtype)
    return TransposeIndex(crow_t, rows[order].to(crow_indices.dtype), order.to(crow_indices.dtype))


def csr_linear(x: torch.Tensor, crow_indices: torch.Tensor, col_indices: torch.Tensor,
               values: torch.Tensor, bias: torch.Tensor | None = None, *,
               in_features: int | None = None, transposed: TransposeIndex | None = None,
               check_indices: bool = True, backend: str = "ext") -> torch.Tensor:
    """y = x W^T + b with W (out x in) in CSR; x: (..., in) -> y: (..., out). Differentiable in
    x, values and bias. in_features defaults to x.shape[-1]; pass `transposed` (from
    transpose_index) and check_indices=False when the index is reused (as SparseLinear does)."""
    check_choice("backend", backend, BACKENDS, "csr_linear")
    if check_indices:   # the validating call (layers reusing an index pass check_indices=False)
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            raise ValueError(f"csr_linear: x must be a tensor of shape (..., in_features), got "
                             f"{'a 0-d tensor' if isinstance(x, torch.Tensor) else type(x).__name__}")
        check_one_device("csr_linear", x=x, crow_indices=crow_indices, col_indices=col_indices,
                         values=values, bias=bias)
        rows = crow_indices.numel() - 1
        if bias is not None and tuple(bias.shape) != (rows,):
            raise RuntimeError(f"csr_linear: bias must have shape ({rows},), one entry per row of W, got "
                               f"{tuple(bias.shape)}")
    from_x = in_features is None
    in_features = x.shape[-1] if from_x else in_features
    x, values, bias = _autocast(x, values, bias)
    if check_indices:
        try:
            check_csr(crow_indices, col_indices, values, (crow_indices.numel() - 1, in_features))
        except ValueError as error:
            if from_x and "col_indices must lie" in str(error):   # x's width is the suspect, not W
                raise ValueError(f"csr_linear: no in_features given, so x's last dimension ({in_features}) is "
                                 f"taken as W's width, and then {error}; is x of the wrong width?") from None
            raise
    if backend == "torch":
        from . import reference
        return reference.csr_linear(x, crow_indices, col_indices, values, bias, in_features=in_features)
    _extension.require()
    if transposed is None:
        transposed = transpose_index(crow_indices, col_indices, in_features)
    op = torch.ops.mackay_ext.csr_linear.default
    if not torch.is_grad_enabled() or not (x.requires_grad or values.requires_grad or
                                           (bias is not None and bias.requires_grad)):
        # No gradient wanted: go straight to the kernels. The autograd kernel (registered from
        # Python below) would only find that out itself, at a third of a small layer's time.
        with torch._C._AutoDispatchBelowAutograd():
            return op(x, crow_indices, col_indices, values, bias, *transposed)
    return op(x, crow_indices, col_indices, values, bias, *transposed)


def _autocast(x, values, bias):
    """Autocast has no rule for a custom op: cast as it casts F.linear's operands (every
    floating tensor but float64, to the autocast dtype of x's device)."""
    if not torch._C._is_any_autocast_enabled():  # the cheap check first: this runs every call
        return x, values, bias
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        return x, values, bias
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t):
        return t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
    return cast(x), cast(values), cast(bias)


def _setup_context(ctx, inputs, output):
    x, crow, col, values, bias, crow_t, row_t, perm_t = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, crow, col, values, crow_t, row_t, perm_t)


def _backward(ctx, grad):
    x, crow, col, values, crow_t, row_t, perm_t = ctx.saved_tensors
    in_features, out_features = crow_t.numel() - 1, crow.numel() - 1
    grad = grad.contiguous()
    if torch.is_grad_enabled():   # create_graph: these gradients are differentiated again
        return _differentiable_backward(ctx, grad, x, crow, col, values, crow_t, row_t, perm_t)
    grad_x = grad_values = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.ops.mackay_ext.csr_matmul(grad, crow_t, row_t, values[perm_t.long()], out_features)
    if ctx.needs_input_grad[3]:
        grad_values = torch.ops.mackay_ext.csr_sddmm(grad, x, crow, col, in_features)
    if ctx.has_bias and ctx.needs_input_grad[4]:
        grad_bias = _rows_of(grad).sum(0)   # (a 1-D input's too)
    return grad_x, None, None, grad_values, grad_bias, None, None, None


def _rows_of(t: torch.Tensor) -> torch.Tensor:
    """[rows, features] of an input or output gradient of any leading shape (a 1-D one: one
    row; no reshape(-1, n), which an empty tensor's n = 0 leaves ambiguous)."""
    return t.unsqueeze(0) if t.dim() == 1 else t.flatten(0, -2)


def _differentiable_backward(ctx, grad, x, crow, col, values, crow_t, row_t, perm_t):
    """The backward in operations that have a backward of their own, for a double backward (a
    physics-informed network's u_xx through a sparsified layer, a gradient penalty): csr_matmul
    and csr_sddmm have none, and u_xx came out 1.2e-5 off a value of 4.6e-3 with no error (its
    second derivative read 0). grad_x = grad W is the transposed matrix's csr_linear; the values'
    gradient is the batch's sum of grad[:, row] x[:, col] at the nonzeros."""
    in_features, out_features = crow_t.numel() - 1, crow.numel() - 1
    grad_x = grad_values = grad_bias = None
    if ctx.needs_input_grad[0]:
        # W^T's transposed index is W's own: its nonzeros in W^T's order are put back by the
        # inverse of perm_t (a scatter: no sort, no host sync)
        perm = perm_t.long()
        inverse = torch.empty_like(perm).scatter_(0, perm, torch.arange(perm.numel(), device=perm.device))
        grad_x = torch.ops.mackay_ext.csr_linear(grad, crow_t, row_t, values[perm], None,
                                                 crow, col, inverse.to(perm_t.dtype))
    if ctx.needs_input_grad[3]:
        # at the nonzeros, the dense grad^T x (out x in: a GEMM) or the gathered products of
        # their row and column pairs (a chunk of rows at a time, each chunk's two gathered
        # operands of rows x nonzeros kept for the next derivative), the smaller: the gather
        # alone took 3 GB for 2,048 points through a 512 x 512 layer at half density
        grad2d, x2d = _rows_of(grad), _rows_of(x)
        rows, cols = row_indices(crow), col.long()
        if out_features * in_features <= 2 * grad2d.shape[0] * rows.numel():
            grad_values = (grad2d.t() @ x2d)[rows, cols]
        else:
            chunk = max(1, GATHER_ELEMENTS // max(rows.numel(), 1))
            grad_values = sum((grad2d[start:start + chunk][:, rows] * x2d[start:start + chunk][:, cols]).sum(0)
                              for start in range(0, grad2d.shape[0], chunk))
            if not isinstance(grad_values, torch.Tensor):   # (no rows)
                grad_values = values.new_zeros(values.shape)
    if ctx.has_bias and ctx.needs_input_grad[4]:
        grad_bias = _rows_of(grad).sum(0)
    return grad_x, None, None, grad_values, grad_bias, None, None, None


if _extension.is_loaded():
    @torch.library.register_fake("mackay_ext::csr_matmul")
    def _csr_matmul_fake(x, crow_indices, col_indices, values, in_features):
        check_one_device("csr_matmul", x=x, crow_indices=crow_indices, col_indices=col_indices, values=values)
        torch._check(x.shape[-1] == in_features, lambda: "csr_matmul: x's last dimension must be in_features")
        return x.new_empty((*x.shape[:-1], crow_indices.shape[0] - 1))

    @torch.library.register_fake("mackay_ext::csr_sddmm")
    def _csr_sddmm_fake(grad_out, x, crow_indices, col_indices, in_features):
        check_one_device("csr_sddmm", grad_out=grad_out, x=x, crow_indices=crow_indices, col_indices=col_indices)
        return x.new_empty(col_indices.shape)

    @torch.library.register_fake("mackay_ext::csr_linear")
    def _csr_linear_fake(x, crow_indices, col_indices, values, bias, crow_t, row_t, perm_t):
        check_one_device("csr_linear", x=x, crow_indices=crow_indices, col_indices=col_indices,
                         values=values, bias=bias)
        return x.new_empty((*x.shape[:-1], crow_indices.shape[0] - 1))

    torch.library.register_autograd("mackay_ext::csr_linear", _backward, setup_context=_setup_context)
