"""The compiled squared GEMM, out += s (a*a)^T (b*b), against a float64 reference on the inputs its
paths and their edges are chosen by: batches of 2-8 on an out above 1 MB and of 1 on an out above
32 MB (register-blocked pass), all others (panels of 256 examples through addmm_), odd sizes, out taller than
wide (the transposed thread split), strided and broadcast operands, 1 and 2 threads; with and
without bias_out (the bias's share, bias_out += s sum_n a[n]^2, on every path); and its scratch,
which must stay far below squared copies of a and b."""

import pytest
import torch
from conftest import DEVICES

from mackay_ext.curvature import sq_gemm_accumulate_

DTYPES = [torch.float32, torch.float64]
# (batch, out, in): one example; small batches on a small out; the register-blocked pass (2-8
# examples, out > 1 MB; row blocks of 6 and vectors of 16 columns, with tails); just above it;
# below, at and across the panel depth; odd; out taller than wide; big enough for 2 threads to
# split it (> 2^20 multiply-adds each); on CUDA, the edges of the few-examples kernel's bounds
# (16, 32 examples) and of its 32-row, 256-column tiles.
SHAPES = [(1, 1, 1), (1, 7, 300), (3, 5, 2), (8, 13, 70), (2, 601, 603), (8, 600, 600), (9, 600, 600),
          (255, 9, 17), (256, 31, 33), (257, 33, 31), (600, 65, 3), (600, 3, 65), (300, 64, 400),
          (300, 400, 64), (16, 33, 257), (17, 31, 255), (32, 65, 513), (33, 40, 300)]


def reference(out, a, b, scale):
    return out.double() + scale * (a.double() ** 2).t() @ (b.double() ** 2)


def check(out, a, b, scale=0.5, bias=None):
    expected = reference(out, a, b, scale)
    expected_bias = None if bias is None else bias.double() + scale * (a.double() ** 2).sum(0)
    sq_gemm_accumulate_(out, a, b, scale, backend="ext", bias_out=bias)
    tol = 1e-12 if out.dtype == torch.float64 else 2e-5
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)
    if bias is not None:
        torch.testing.assert_close(bias.double(), expected_bias, rtol=tol, atol=tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
def test_matches_float64(device, dtype, shape, with_bias, threads):
    n, o, i = shape
    a = torch.randn(n, o, dtype=dtype, device=device)
    b = torch.randn(n, i, dtype=dtype, device=device)
    bias = torch.randn(o, dtype=dtype, device=device) if with_bias else None
    check(torch.randn(o, i, dtype=dtype, device=device), a, b, bias=bias)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["transposed", "column-sliced", "row-sliced", "broadcast"])
@pytest.mark.parametrize("n", [5, 300])
def test_strided_operands(device, dtype, layout, n, threads):
    o, i = 400, 701  # out > 1 MB: 5 examples take the register-blocked pass
    kw = {"dtype": dtype, "device": device}
    if layout == "transposed":  # column-major, as delta.t() of a [out, N] buffer would be
        a, b = torch.randn(o, n, **kw).t(), torch.randn(i, n, **kw).t()
    elif layout == "column-sliced":
        a, b = torch.randn(n, 2 * o, **kw)[:, ::2], torch.randn(n, i + 5, **kw)[:, 3:3 + i]
    elif layout == "row-sliced":
        a, b = torch.randn(2 * n, o, **kw)[::2], torch.randn(n + 4, i, **kw)[4:]
    else:  # one example repeated with stride 0
        a, b = torch.randn(1, o, **kw).expand(n, o), torch.randn(n, 1, **kw).expand(n, i)
    assert not (a.is_contiguous() and b.is_contiguous())
    check(torch.randn(o, i, **kw), a, b, scale=1.5, bias=torch.randn(o, **kw))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_empty_batch_and_empty_out_leave_out_alone(device, dtype):
    kw = {"dtype": dtype, "device": device}
    out = torch.randn(4, 6, **kw)
    before = out.clone()
    sq_gemm_accumulate_(out, torch.randn(0, 4, **kw), torch.randn(0, 6, **kw), 2.0, backend="ext")
    assert torch.equal(out, before)
    empty = torch.zeros(0, 6, **kw)
    sq_gemm_accumulate_(empty, torch.randn(5, 0, **kw), torch.randn(5, 6, **kw), backend="ext")
    assert empty.shape == (0, 6)
    bias = torch.randn(4, **kw)
    bias_before = bias.clone()
    sq_gemm_accumulate_(out, torch.randn(0, 4, **kw), torch.randn(0, 6, **kw), 2.0, backend="ext", bias_out=bias)
    assert torch.equal(out, before) and torch.equal(bias, bias_before)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["ext", "torch"])
def test_a_layer_without_inputs_still_adds_its_bias(device, backend):
    """in = 0 (out is [out, 0]): nothing to add to out, but the bias's squares are still owed."""
    a = torch.randn(7, 3, dtype=torch.float64, device=device)
    out, bias = torch.zeros(3, 0, dtype=torch.float64, device=device), torch.zeros(3, dtype=torch.float64, device=device)
    sq_gemm_accumulate_(out, a, torch.randn(7, 0, dtype=torch.float64, device=device), 0.5, backend=backend,
                        bias_out=bias)
    torch.testing.assert_close(bias, 0.5 * (a ** 2).sum(0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_the_torch_backend_adds_what_the_extension_adds(device):
    a, b = torch.randn(37, 11, device=device), torch.randn(37, 23, device=device)
    results = {}
    for backend in ("ext", "torch"):
        out, bias = torch.ones(11, 23, device=device), torch.ones(11, device=device)
        sq_gemm_accumulate_(out, a, b, 0.25, backend=backend, bias_out=bias)
        results[backend] = (out, bias)
    torch.testing.assert_close(results["ext"], results["torch"], rtol=2e-5, atol=2e-5)


def test_one_example_on_an_out_above_32_mb(threads):
    """A rank-one update of an out too big for a cache takes the register-blocked pass."""
    a, b = torch.randn(1, 2900), torch.randn(1, 2901)
    out = torch.rand(2900, 2901)
    assert out.numel() * out.element_size() > 32 << 20
    check(out, a, b)


def test_non_finite_inputs_propagate():
    a, b = torch.randn(300, 8), torch.randn(300, 9)
    a[280, 3] = float("inf")  # in the second panel
    b[5, 2] = float("nan")
    out = torch.zeros(8, 9)
    sq_gemm_accumulate_(out, a, b, backend="ext")
    expected = reference(torch.zeros(8, 9), a, b, 1.0)
    torch.testing.assert_close(out.double(), expected, rtol=2e-5, atol=2e-5, equal_nan=True)


def allocated_bytes(function):
    """Bytes the CPU allocator handed out while `function` ran (freed or not)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as prof:
        function()
    return sum(e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0)


def test_scratch_stays_below_squared_copies():
    """Squared copies of a and b (the torch fallback's) take batch x (out + in) values; the op
    may hold one panel (256 examples) of them per thread, an eighth of that here."""
    n, o, i = 4096, 64, 192
    a, b, out = torch.randn(n, o), torch.randn(n, i), torch.zeros(o, i)
    squared_copies = n * (o + i) * a.element_size()
    # the measurement sees squares when they are made
    assert allocated_bytes(lambda: sq_gemm_accumulate_(out, a, b, backend="torch")) >= squared_copies
    assert allocated_bytes(lambda: sq_gemm_accumulate_(out, a, b, backend="ext")) <= squared_copies // 8
    bias = torch.zeros(o)
    assert allocated_bytes(lambda: sq_gemm_accumulate_(out, a, b, backend="ext", bias_out=bias)) <= squared_copies // 8


def test_a_meta_operand_among_cpu_ones_is_refused_not_skipped():
    """A 'meta' tensor sends the call to the fake kernel, which returned without a word and left
    `out` unchanged (a new-user pass); it names the devices now, as the other ops' fakes do."""
    out = torch.zeros(3, 4)
    with pytest.raises(RuntimeError, match="sq_gemm_accumulate_: a is on meta but out is on cpu"):
        sq_gemm_accumulate_(out, torch.ones(5, 3, device="meta"), torch.ones(5, 4))
    with pytest.raises(RuntimeError, match="sq_gemm_accumulate_: a is on cpu but out is on meta"):
        sq_gemm_accumulate_(torch.zeros(3, 4, device="meta"), torch.ones(5, 3), torch.ones(5, 4))


@pytest.mark.parametrize("backend", ["ext", "torch"])
def test_both_backends_refuse_the_same_calls(backend):
    """The torch backend accepted a float16, integer or strided out and gave raw torch errors for
    3-D or mixed-dtype operands (a new-user pass); it checks what the compiled op checks now."""
    a, b = torch.randn(5, 3), torch.randn(5, 4)
    cases = [(torch.zeros(3, 4, dtype=torch.float16), a, b, TypeError, "out must be float32 or float64"),
             (torch.zeros(3, 4, dtype=torch.int64), a, b, TypeError, "out must be float32 or float64"),
             (torch.zeros(4, 3).t(), a, b, RuntimeError, "out must be contiguous"),
             (torch.zeros(3, 4), a.double(), b, TypeError, "a and b must have out's dtype"),
             (torch.zeros(3, 4), a[None], b, RuntimeError, "out, a and b must be 2-D")]
    for out, left, right, error, message in cases:
        before = out.clone()
        with pytest.raises(error, match=f"sq_gemm_accumulate_: {message}"):
            sq_gemm_accumulate_(out, left, right, backend=backend)
        assert torch.equal(out, before)
