"""What a pruner's report says of a layer's alphas, in a few passes however large the layer:
its update's report listed quantiles read by sorting every alpha in float64, 2 of the 3.4 s an
update of a 29M-weight MLP took on one thread (the precision update itself: 0.03 s)."""
from __future__ import annotations

import math

import torch

QUANTILE_SAMPLE = 1 << 18   # above twice this many alphas, p5/p50/p95 come from a sample of about this many
CHUNK = 1 << 22             # entries a pass over a large layer reads at a time (bounds its temporaries)


def quantiles(alpha: torch.Tensor) -> dict[str, float]:
    """min, p5, p50, p95 and max of the finite alphas ({} if none). min and max are exact; the
    three others are exact up to 2 x QUANTILE_SAMPLE alphas, and above that read from an evenly
    spread sample of about QUANTILE_SAMPLE (all the finite ones where under 1/16 of the sample
    is finite: a layer nearly all pruned)."""
    flat = alpha.detach().reshape(-1)
    if flat.numel() > 2 * QUANTILE_SAMPLE:
        stride = _sample_stride(flat.numel(), alpha.shape[-1] if alpha.dim() else 1)
        sample = flat[stride // 2::stride]
        finite = sample[torch.isfinite(sample)]
        if finite.numel() >= QUANTILE_SAMPLE // 16:
            low, high = _finite_range(flat)
            return _summary(low, finite, high)
    finite = flat[torch.isfinite(flat)]
    if finite.numel() == 0:
        return {}
    return _summary(float(finite.min()), finite, float(finite.max()))


def _summary(low: float, finite: torch.Tensor, high: float) -> dict[str, float]:
    q = torch.quantile(finite.double().cpu(), torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64))
    return dict(zip(("min", "p5", "p50", "p95", "max"), (low, *(float(v) for v in q), high)))


def _sample_stride(numel: int, row: int) -> int:
    """A stride near numel / QUANTILE_SAMPLE that shares no factor with the row length, so that
    the sample walks across the columns (a layer's inputs) instead of reading the same few
    columns of every row."""
    stride = max(2, numel // QUANTILE_SAMPLE)
    while math.gcd(stride, row) != 1:
        stride += 1
    return stride


def _finite_range(flat: torch.Tensor) -> tuple[float, float]:
    """(smallest, largest) finite entry of a flat tensor, a chunk at a time."""
    low, high = math.inf, -math.inf
    for part in flat.split(CHUNK):
        smallest = float(part.min())   # (+inf, pruned, is never below a finite entry)
        largest = float(part.masked_fill(part == math.inf, -math.inf).max())
        if math.isnan(smallest) or smallest == -math.inf:   # a NaN or -inf there: set aside too
            other = ~torch.isfinite(part)
            smallest = float(part.masked_fill(other, math.inf).min())
            largest = float(part.masked_fill(other, -math.inf).max())
        low, high = min(low, smallest), max(high, largest)
    return low, high
