"""Where a Linear layer's weights are still kept, as a pattern for the exact curvature.

A weight the pruner has pruned (alpha = +inf) is held at 0 for good, and its curvature is never
read again. Once most of a layer is pruned, ef-exact's dense squared GEMM (sq_gemm_accumulate_)
spends most of its work on such weights; sq_sddmm_accumulate_ adds the same sums at the kept
weights only. FisherAccumulator looks at a layer's pattern on every batch, so it keeps the one
`build` made and makes a new one only when the alpha tensor it came from was replaced or changed
in place (`is_current`: identity and _version, which masked_fill_, copy_ and
mackay_ext.ops.mackay_update_ all advance).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# At or below this kept fraction the sparse kernel is used. The line depends on the CPU's GEMM
# (the LeNet layers, 500x800 and 1024x1024, batches 32 and 128, 1 and 2 threads): on a 2-core EPYC
# the sparse kernel took 0.44x-0.90x the dense product's time at 10% kept; on a 2-core Xeon whose
# MKL runs AVX-512, 0.77x-1.74x at 10% and 0.47x-1.10x at 5% (bench/results/sq_sddmm.md). The slow
# end is batch 32 on 2 threads: with few examples a nonzero is little work. 5%: still the sparse
# kernel for most of a pruning run (the lenet-300-100-weight recipe spends 90% of its MacKay
# epochs below 6.2% kept), never much slower than the dense product on either machine.
MAX_SPARSE_DENSITY = 0.05


@dataclass(frozen=True)
class KeptPattern:
    """The kept weights of one (out, in) weight, in the column blocks sq_sddmm_accumulate_ takes
    (blocked_csr), or None there when too many are kept for the sparse kernel to pay (the dense
    product is then used)."""
    alpha: torch.Tensor      # the alphas it was read from, held so that their identity stays unique
    version: int             # alpha._version when it was read
    kept: torch.Tensor       # bool, the weight's shape
    blocks: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None   # col_splits, block_crow, col_indices

    @property
    def sparse(self) -> bool:
        return self.blocks is not None


def blocked_csr(kept: torch.Tensor, blocks: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The nonzeros of a 2-D mask as sq_sddmm_accumulate_ takes them: col_splits [B + 1] cutting
    the columns into B = min(blocks, columns) blocks of about equal nonzero count, block_crow
    [B * rows + 1] over the virtual rows j * rows + o, col_indices (int64, each row's in order)."""
    rows, cols = kept.shape
    blocks = max(1, min(blocks, cols))
    device = kept.device
    cumulative = kept.sum(0).cumsum(0)
    nnz = int(cumulative[-1]) if cols else 0
    if nnz:   # block j ends at the first column where the count reaches j/B of the nonzeros
        targets = torch.arange(1, blocks, device=device, dtype=torch.float64) * (nnz / blocks)
        inner = torch.searchsorted(cumulative.double(), targets) + 1
    else:
        inner = torch.arange(1, blocks, device=device) * cols // blocks
    col_splits = torch.cat([torch.zeros(1, dtype=torch.int64, device=device), inner.clamp(max=cols),
                            torch.full((1,), cols, dtype=torch.int64, device=device)])
    row, col = kept.nonzero().unbind(1)   # by row, then column
    block = torch.searchsorted(col_splits[1:-1], col, right=True)
    virtual = block * rows + row
    order = torch.argsort(virtual, stable=True)
    block_crow = torch.zeros(blocks * rows + 1, dtype=torch.int64, device=device)
    torch.cumsum(torch.bincount(virtual, minlength=blocks * rows), 0, out=block_crow[1:])
    return col_splits, block_crow, col[order].contiguous()


def build(weight: torch.Tensor, alpha: torch.Tensor) -> KeptPattern:
    """The pattern of `weight` (2-D) under `alpha` (broadcastable to it; +inf = pruned)."""
    kept = (alpha != math.inf).expand_as(weight)
    blocks = None
    if weight.dim() == 2 and weight.numel() and int(kept.sum()) <= MAX_SPARSE_DENSITY * weight.numel():
        # 4 blocks a thread, as measured (bench/results/sq_sddmm.md); at::parallel_for hands each
        # thread a contiguous run of them, so it is their equal nonzero counts that balance the work
        blocks = blocked_csr(kept, 4 * torch.get_num_threads())
    return KeptPattern(alpha, alpha._version, kept.clone(), blocks)


def is_current(pattern: KeptPattern | None, alpha: torch.Tensor) -> bool:
    return pattern is not None and pattern.alpha is alpha and pattern.version == alpha._version
