"""The squared SDDMM, out[o, c] += s sum_n a[n, o]^2 b[n, c]^2 at the nonzeros of a pattern in
column blocks (kept_pattern.blocked_csr; the exact Fisher of a Linear layer at its kept weights),
against a float64 reference: densities from none to all, one block to more blocks than columns,
empty rows and blocks, odd sizes, strided operands, int32 and int64 indices, 1 and 2 threads; the
bias's share; the torch backend; opcheck; bad input, which must leave out unchanged; CUDA refused
with a pointer to the dense op."""

import pytest
import torch

from mackay_ext.curvature import sq_sddmm_accumulate_
from mackay_ext.kept_pattern import blocked_csr

DTYPES = [torch.float32, torch.float64]


def pattern(rows, cols, density, index_dtype=torch.int64, generator=None, blocks=4):
    """A random pattern over a (rows, cols) out: the mask, then col_splits, block_crow, col_indices."""
    kept = torch.rand(rows, cols, generator=generator) < density
    return kept, *(t.to(index_dtype) for t in blocked_csr(kept, blocks))


def test_blocked_csr_lists_every_nonzero_once_in_its_block():
    kept = torch.rand(37, 53) < 0.2
    for blocks in (1, 2, 5, 53, 80):
        splits, crow, col = blocked_csr(kept, blocks)
        count = min(blocks, 53)
        assert splits.tolist()[0] == 0 and splits.tolist()[-1] == 53 and len(splits) == count + 1
        assert bool((splits[1:] >= splits[:-1]).all()) and crow.shape == (count * 37 + 1,)
        rebuilt = torch.zeros_like(kept)
        for virtual in range(count * 37):
            block, row = divmod(virtual, 37)
            columns = col[crow[virtual]:crow[virtual + 1]]
            assert bool(((columns >= splits[block]) & (columns < splits[block + 1])).all())
            assert columns.tolist() == sorted(columns.tolist())
            rebuilt[row, columns] = True
        assert torch.equal(rebuilt, kept) and len(col) == int(kept.sum())


def reference(out, a, b, kept, scale):
    return out.double() + scale * ((a.double() ** 2).t() @ (b.double() ** 2)) * kept



@pytest.mark.parametrize("backend", ["ext", "torch"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 5, 2), (128, 300, 784), (7, 33, 17), (200, 100, 300)], ids=str)
@pytest.mark.parametrize("density", [0.0, 0.003, 0.05, 0.5, 1.0])
@pytest.mark.parametrize("blocks", [1, 3, 64])
def test_matches_float64(backend, dtype, index_dtype, shape, density, blocks, threads):
    n, o, i = shape
    a, b = torch.randn(n, o, dtype=dtype), torch.randn(n, i, dtype=dtype)
    kept, *blocked = pattern(o, i, density, index_dtype, blocks=blocks)
    out = torch.randn(o, i, dtype=dtype)
    expected = reference(out, a, b, kept, 0.75)
    sq_sddmm_accumulate_(out, a, b, *blocked, 0.75, backend=backend)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("layout", ["transposed", "column-sliced", "row-sliced", "broadcast"])
def test_strided_operands(layout, threads):
    n, o, i = 70, 40, 90
    if layout == "transposed":
        a, b = torch.randn(o, n).t(), torch.randn(i, n).t()
    elif layout == "column-sliced":
        a, b = torch.randn(n, 2 * o)[:, ::2], torch.randn(n, i + 5)[:, 3:3 + i]
    elif layout == "row-sliced":
        a, b = torch.randn(2 * n, o)[::2], torch.randn(n + 4, i)[4:]
    else:
        a, b = torch.randn(1, o).expand(n, o), torch.randn(n, 1).expand(n, i)
    kept, *blocked = pattern(o, i, 0.2)
    out = torch.zeros(o, i)
    expected = reference(out, a, b, kept, 2.0)
    sq_sddmm_accumulate_(out, a, b, *blocked, 2.0)
    torch.testing.assert_close(out.double(), expected, rtol=2e-5, atol=2e-5)


def test_empty_batch_and_rows_and_blocks_without_nonzeros():
    out = torch.randn(4, 6)
    before = out.clone()
    # blocks [0, 2), [2, 4), [4, 6): (3, 0) and (1, 1) in the first, none in the second, (1, 5)
    splits = torch.tensor([0, 2, 4, 6])
    crow = torch.tensor([0, 0, 1, 1, 2] + [2] * 4 + [2, 3, 3, 3])
    col = torch.tensor([1, 0, 5])
    sq_sddmm_accumulate_(out, torch.randn(0, 4), torch.randn(0, 6), splits, crow, col, 2.0)
    assert torch.equal(out, before)
    a, b = torch.randn(3, 4), torch.randn(3, 6)
    sq_sddmm_accumulate_(out, a, b, splits, crow, col, 1.0)
    changed = (out != before).nonzero().tolist()
    assert changed == [[1, 1], [1, 5], [3, 0]]


def test_opcheck():
    kept, *blocked = pattern(5, 4, 0.5, generator=torch.Generator().manual_seed(1), blocks=2)
    torch.library.opcheck(torch.ops.mackay_ext.sq_sddmm_accumulate_.default,
                          (torch.zeros(5, 4), torch.randn(3, 5), torch.randn(3, 4), *blocked, 2.0))


# out (3, 4) in two column blocks, [0, 2) and [2, 4): block_crow has 2 * 3 + 1 entries (three
# blocks, 3 * 3 + 1)
@pytest.mark.parametrize("splits, crow, col, message", [
    ([0, 2, 4], [0, 1, 1, 2, 2, 3, 3], [0, 1, 9], "outside its column block"),
    ([0, 2, 4], [0, 1, 1, 2, 2, 3, 3], [2, 1, 3], "outside its column block"),
    ([0, 2, 4], [0, 1, 1, 2, 2, 3, 3], [0, -1, 3], "outside its column block"),
    ([0, 2, 4], [0, 2, 1, 2, 2, 3, 3], [0, 1, 3], "block_crow must be non-decreasing"),
    ([0, 2, 4], [0, 999, 1, 2, 2, 3, 3], [0, 1, 3], "block_crow must be non-decreasing"),   # col not read
    ([0, 2, 4], [1, 1, 1, 2, 2, 3, 3], [0, 1, 3], "block_crow must start at 0 and end at nnz"),
    ([0, 2, 4], [0, 1, 1, 2, 2, 2, 2], [0, 1, 3], "block_crow must start at 0 and end at nnz"),
    ([0, 3, 2, 4], [0, 1, 1, 2, 2, 2, 2, 3, 3, 3], [0, 1, 3], "col_splits must be non-decreasing"),
    ([1, 2, 4], [0, 1, 1, 2, 2, 3, 3], [0, 1, 3], "col_splits must start at 0"),
    ([0, 2, 5], [0, 1, 1, 2, 2, 3, 3], [0, 1, 3], "col_splits must start at 0 and end at out.size\\(1\\)"),
])
@pytest.mark.parametrize("backend", ["ext", "torch"])
def test_malformed_pattern_leaves_out_unchanged(splits, crow, col, message, backend):
    out = torch.randn(3, 4)
    before = out.clone()
    with pytest.raises(RuntimeError, match=message):
        sq_sddmm_accumulate_(out, torch.randn(5, 3), torch.randn(5, 4), torch.tensor(splits), torch.tensor(crow),
                             torch.tensor(col), backend=backend)
    assert torch.equal(out, before)


def test_bad_arguments_are_named():
    a, b = torch.randn(5, 3), torch.randn(5, 4)
    splits, crow, col = torch.tensor([0, 4]), torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2])
    cases = [
        ((torch.zeros(4, 3), a, b, splits, crow, col), "out must have shape"),
        ((torch.zeros(3, 4), a, b[:4], splits, crow, col), "one row per example"),
        ((torch.zeros(3, 4), a.double(), b, splits, crow, col), "must have out's dtype"),
        ((torch.zeros(3, 4, dtype=torch.float16), a.half(), b.half(), splits, crow, col), "float32 or float64"),
        ((torch.zeros(3, 4), a, b, splits, crow.int(), col), "all be int32 or all int64"),
        ((torch.zeros(3, 4), a, b, splits.float(), crow.float(), col.float()), "all be int32 or all int64"),
        ((torch.zeros(3, 4), a, b, splits[:1], crow, col), "at least 2 entries"),
        ((torch.zeros(3, 4), a, b, torch.tensor([0, 2, 4]), crow, col), "B \\* out.size\\(0\\) \\+ 1 = 7"),
        ((torch.zeros(3, 4), a, b, splits, crow, col.view(3, 1)), "col_indices must be 1-D"),
        ((torch.zeros(4, 3).t(), a, b, splits, crow, col), "contiguous"),
        ((torch.zeros(3, 4), a, b, splits, crow, None), "must be tensors"),
    ]
    for args, message in cases:
        with pytest.raises((RuntimeError, TypeError), match=message):
            sq_sddmm_accumulate_(*args)
    with pytest.raises(ValueError, match="backend"):
        sq_sddmm_accumulate_(torch.zeros(3, 4), a, b, splits, crow, col, backend="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_is_refused_with_the_dense_op_named():
    kw = {"device": "cuda"}
    with pytest.raises(RuntimeError, match="sq_gemm_accumulate_"):
        sq_sddmm_accumulate_(torch.zeros(3, 4, **kw), torch.randn(5, 3, **kw), torch.randn(5, 4, **kw),
                             torch.tensor([0, 4], **kw), torch.tensor([0, 1, 2, 3], **kw), torch.tensor([0, 1, 2], **kw))


@pytest.mark.parametrize("backend", ["ext", "torch"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("density", [0.0, 0.1, 1.0])
def test_bias_out_gets_the_bias_share_even_with_every_weight_pruned(backend, dtype, density):
    a, b = torch.randn(11, 6, dtype=dtype), torch.randn(11, 9, dtype=dtype)
    kept, *blocked = pattern(6, 9, density)
    out, bias = torch.randn(6, 9, dtype=dtype), torch.randn(6, dtype=dtype)
    expected_out = reference(out, a, b, kept, 0.25)
    expected_bias = bias.double() + 0.25 * (a.double() ** 2).sum(0)
    sq_sddmm_accumulate_(out, a, b, *blocked, 0.25, backend=backend, bias_out=bias)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(out.double(), expected_out, rtol=tol, atol=tol)
    torch.testing.assert_close(bias.double(), expected_bias, rtol=tol, atol=tol)


def test_opcheck_with_bias_out():
    kept, *blocked = pattern(5, 4, 0.5, generator=torch.Generator().manual_seed(2), blocks=2)
    torch.library.opcheck(torch.ops.mackay_ext.sq_sddmm_accumulate_.default,
                          (torch.zeros(5, 4), torch.randn(3, 5), torch.randn(3, 4), *blocked, 2.0),
                          {"bias_out": torch.zeros(5)})


@pytest.mark.parametrize("bias, message", [
    (torch.zeros(4), "bias_out must be a contiguous 1-D tensor of out.size\\(0\\) = 3"),
    (torch.zeros(3, 1), "bias_out must be a contiguous 1-D tensor"),
    (torch.zeros(6)[::2], "bias_out must be a contiguous 1-D tensor"),
    (torch.zeros(3, dtype=torch.float64), "bias_out must have out's dtype"),
])
def test_bad_bias_out_is_named(bias, message):
    out = torch.zeros(3, 4)
    with pytest.raises((RuntimeError, TypeError), match=message):
        sq_sddmm_accumulate_(out, torch.randn(5, 3), torch.randn(5, 4), torch.tensor([0, 4]),
                             torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2]), bias_out=bias)
    assert bool((out == 0).all())
