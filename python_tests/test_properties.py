"""Property-based tests (hypothesis): random shapes, strides, broadcast alpha patterns and CSR
patterns, compiled kernels against the pure-PyTorch reference; malformed input rejected with
an error, never a crash."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mackay_ext import reference
from mackay_ext.csr import crow_from_rows, csr_linear
from mackay_ext.ops import mackay_update_

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def update_cases(draw):
    dims = draw(st.integers(0, 3))
    shape = tuple(draw(st.integers(0, 6)) for _ in range(dims))
    # each dimension of alpha: the weight's size (one alpha per index) or 1 (reduced over)
    keep = [draw(st.booleans()) for _ in range(dims)]
    drop_leading = draw(st.integers(0, dims))
    alpha_shape = tuple(s if k else 1 for s, k in zip(shape, keep))[drop_leading:]
    seed = draw(st.integers(0, 2 ** 16))
    transpose = dims >= 2 and draw(st.booleans())
    rule = draw(st.sampled_from(["mackay", "em", "paper"]))
    prune = draw(st.sampled_from(["alpha", "snr"]))
    return shape, alpha_shape, seed, transpose, rule, prune


@SETTINGS
@given(update_cases())
def test_update_matches_reference(case):
    shape, alpha_shape, seed, transpose, rule, prune = case
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=g, dtype=torch.float64) * 0.05
    curvature = torch.rand(shape, generator=g, dtype=torch.float64) * 1e-3
    alpha = torch.rand(alpha_shape, generator=g, dtype=torch.float64) * 2e3
    if alpha.numel() > 1:
        alpha.view(-1)[0] = math.inf
        alpha.view(-1)[-1] = 0.0
    if transpose:  # a non-contiguous weight with the same values
        weight = weight.transpose(0, 1).contiguous().transpose(0, 1)
    threshold = 3e3 if prune == "alpha" else 0.5
    w1, a1, w2, a2 = weight.clone(), alpha.clone(), weight.clone(), alpha.clone()
    s1 = mackay_update_(w1, curvature, a1, num_data=6e4, rule=rule, prune=prune, threshold=threshold)
    s2 = reference.mackay_update_(w2, curvature, a2, num_data=6e4, rule=rule, prune=prune, threshold=threshold)
    assert torch.equal(a1 == math.inf, a2 == math.inf)
    torch.testing.assert_close(a1, a2, rtol=1e-12, atol=0)
    assert torch.equal(w1, w2)
    assert int(s1.num_pruned) == int(s2.num_pruned)
    torch.testing.assert_close(s1.gamma_sum, s2.gamma_sum, rtol=1e-9, atol=1e-9)


@st.composite
def csr_cases(draw):
    out = draw(st.integers(0, 12))
    inp = draw(st.integers(1, 12))
    density = draw(st.floats(0, 1))
    batch = draw(st.sampled_from([(0,), (1,), (3,), (9,), (2, 5), (33,)]))
    return out, inp, density, batch, draw(st.integers(0, 2 ** 16)), draw(st.sampled_from([torch.int32, torch.int64]))


def random_csr(out, inp, density, generator):
    """A random (out x in) float64 matrix and its CSR arrays (row pointers, rows, columns)."""
    mask = torch.rand(out, inp, generator=generator) < density
    weight = torch.randn(out, inp, generator=generator, dtype=torch.float64) * mask
    rows, cols = mask.nonzero(as_tuple=True)
    return weight, crow_from_rows(rows, out), rows, cols


@SETTINGS
@given(csr_cases())
def test_csr_linear_matches_dense(case):
    out, inp, density, batch, seed, index_dtype = case
    g = torch.Generator().manual_seed(seed)
    weight, crow, rows, cols = random_csr(out, inp, density, g)
    x = torch.randn(*batch, inp, generator=g, dtype=torch.float64)
    y = csr_linear(x, crow.to(index_dtype), cols.to(index_dtype), weight[rows, cols])
    torch.testing.assert_close(y, x @ weight.t())


@SETTINGS
@given(st.integers(0, 10 ** 6), st.integers(-3, 3), st.integers(1, 8))
def test_malformed_csr_is_an_error_not_a_crash(seed, shift, batch):
    g = torch.Generator().manual_seed(seed)
    out, inp = 6, 7
    nnz = int(torch.randint(1, 20, (1,), generator=g))
    crow = torch.sort(torch.randint(0, nnz + 1, (out + 1,), generator=g)).values
    crow[0], crow[-1] = 0, nnz
    col = torch.randint(0, inp, (nnz,), generator=g)
    position = int(torch.randint(0, nnz, (1,), generator=g))
    col[position] += shift * inp  # shift != 0: out of range
    crow_bad = crow.clone()
    if shift < 0:
        crow_bad[1 + position % out] = nnz + 5  # and crow past the end
    values = torch.randn(nnz, dtype=torch.float64)
    x = torch.randn(batch, inp, dtype=torch.float64)
    if shift == 0:
        torch.ops.mackay_ext.csr_matmul(x, crow, col, values, inp)
        return
    with pytest.raises(RuntimeError, match="malformed CSR"):
        torch.ops.mackay_ext.csr_matmul(x, crow_bad, col, values, inp)
    with pytest.raises((ValueError, TypeError)):
        csr_linear(x, crow_bad, col, values)


@st.composite
def adam_cases(draw):
    tensors = []
    for _ in range(draw(st.integers(1, 4))):
        dims = draw(st.integers(1, 4))
        shape = tuple(draw(st.integers(0, 5)) for _ in range(dims))
        keep = [draw(st.booleans()) for _ in range(dims)]
        alpha_shape = tuple(s if k else 1 for s, k in zip(shape, keep))[draw(st.integers(0, dims)):]
        tensors.append((shape, alpha_shape, draw(st.booleans())))
    return tensors, draw(st.integers(0, 2 ** 16)), draw(st.booleans()), draw(st.booleans())


@SETTINGS
@given(adam_cases())
def test_adam_step_matches_fallback(case):
    from mackay_ext.ops import mackay_adam_step_
    tensors, seed, decoupled, with_curvature = case
    g = torch.Generator().manual_seed(seed)
    ard = [(s, a) for s, a, is_ard in tensors if is_ard]
    plain = [(s, a) for s, a, is_ard in tensors if not is_ard]
    shapes = [s for s, _ in ard + plain]
    state = {
        "params": [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes],
        "grads": [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes],
        "exp_avgs": [torch.randn(s, generator=g, dtype=torch.float64) * 0.1 for s in shapes],
        "exp_avg_sqs": [torch.rand(s, generator=g, dtype=torch.float64) * 0.1 for s in shapes],
        "steps": [torch.full((), 3.0) for _ in shapes],
        "curvatures": [torch.rand(s, generator=g, dtype=torch.float64) for s, _ in ard] if with_curvature else [],
    }
    alphas = []
    for _, a in ard:
        alpha = torch.rand(a, generator=g) * 10
        if alpha.numel():
            alpha.view(-1)[0] = math.inf
        alphas.append(alpha)
    kwargs = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.01,
                  decoupled_weight_decay=decoupled, num_data=50.0, batch_size=8.0, curvature_decay=0.9)
    results = []
    for backend in ("ext", "torch"):
        copy = {k: [t.clone() for t in v] for k, v in state.items()}
        mackay_adam_step_(copy["params"], copy["grads"], copy["exp_avgs"], copy["exp_avg_sqs"],
                          copy["steps"], copy["curvatures"], alphas, backend=backend, **kwargs)
        results.append(copy)
    for key in ("params", "exp_avgs", "exp_avg_sqs", "steps", "curvatures"):
        for a, b in zip(results[0][key], results[1][key]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@SETTINGS
@given(st.integers(0, 40), st.integers(0, 9), st.integers(0, 37), st.integers(0, 2 ** 16),
       st.sampled_from([torch.float32, torch.float64]))
def test_sq_gemm_matches_reference(n, out, inp, seed, dtype):
    from mackay_ext.curvature import sq_gemm_accumulate_
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, out, generator=g, dtype=torch.float64)
    b = torch.randn(n, inp, generator=g, dtype=torch.float64)
    acc = torch.randn(out, inp, generator=g, dtype=torch.float64)
    expected = acc + 0.25 * (a * a).t() @ (b * b)
    result = acc.to(dtype)
    sq_gemm_accumulate_(result, a.to(dtype), b.to(dtype), 0.25)
    tol = 1e-12 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(result.double(), expected, rtol=tol, atol=tol)


@SETTINGS
@given(csr_cases())
def test_csr_linear_gradients_match_dense(case):
    out, inp, density, batch, seed, index_dtype = case
    g = torch.Generator().manual_seed(seed)
    weight, crow, rows, cols = random_csr(out, inp, density, g)
    x = torch.randn(*batch, inp, generator=g, dtype=torch.float64, requires_grad=True)
    values = weight[rows, cols].clone().requires_grad_()
    bias = torch.randn(out, generator=g, dtype=torch.float64, requires_grad=True)
    y = csr_linear(x, crow.to(index_dtype), cols.to(index_dtype), values, bias)
    grad = torch.randn(y.shape, generator=g, dtype=torch.float64)
    gx, gv, gb = torch.autograd.grad(y, (x, values, bias), grad, allow_unused=True)
    dense = weight.clone().requires_grad_()
    rx, rw, rb = torch.autograd.grad(torch.nn.functional.linear(x, dense, bias), (x, dense, bias), grad)
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gv, rw[rows, cols])
    torch.testing.assert_close(gb, rb)
