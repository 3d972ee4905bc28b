"""Masked sparse matmul: ops against dense float64 references (gradcheck), sparse layers
against nn.Linear / F.conv2d, sparsify + save/load round trip, opcheck, bad input."""
import copy
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import mackay_ext
from mackay_ext import models, reference
from mackay_ext.csr import csr_linear, transpose_index
from mackay_ext.sparse import SparseConv2d, SparseLinear, load_compressed, save_compressed, sparsify

from conftest import DEVICES


def random_csr(out, inp, density, dtype=torch.float64, device="cpu", index_dtype=torch.int64,
               empty_rows=(), seed=0):
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(out, inp, generator=generator) < density
    for row in empty_rows:
        mask[row] = False
    weight = torch.randn(out, inp, generator=generator, dtype=torch.float64) * mask
    rows, cols = mask.nonzero(as_tuple=True)
    crow = torch.zeros(out + 1, dtype=torch.int64)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=out), 0)
    values = weight[rows, cols].to(dtype)
    return (weight.to(device, dtype), crow.to(device, index_dtype), cols.to(device, index_dtype),
            values.to(device))


CASES = [  # (out, in, density, batch shape, empty rows)
    (37, 53, 0.2, (5,), (0, 7)),
    (37, 53, 0.2, (1,), ()),
    (37, 53, 0.2, (3, 4), ()),          # 3-D input: leading dims flattened
    (64, 100, 0.05, (33,), (1, 2, 3)),  # batch above the small-batch path, not a whole tile
    (300, 784, 0.02, (256,), ()),
    (500, 700, 0.1, (3,), ()),          # small batch, enough work to split over threads
    (16, 9, 1.0, (9,), ()),
    (10, 20, 0.0, (4,), ()),            # 0 nonzeros: a fully pruned layer
    (5, 7, 0.5, (0,), ()),              # empty batch
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_forward_backward_against_dense(device, dtype, index_dtype, case):
    out, inp, density, batch, empty = case
    weight, crow, col, values = random_csr(out, inp, density, dtype, device, index_dtype, empty)
    x = torch.randn(*batch, inp, dtype=dtype, device=device, requires_grad=True)
    bias = torch.randn(out, dtype=dtype, device=device, requires_grad=True)
    values = values.requires_grad_()
    y = csr_linear(x, crow, col, values, bias)
    dense_weight = weight.clone().requires_grad_()
    y_ref = F.linear(x.double(), dense_weight.double(), bias.double())
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    assert y.shape == (*batch, out) and y.dtype == dtype
    torch.testing.assert_close(y.double(), y_ref, **tol)
    grad = torch.randn_like(y)
    gx, gv, gb = torch.autograd.grad(y, (x, values, bias), grad)
    rx, rw, rb = torch.autograd.grad(y_ref, (x, dense_weight, bias), grad.double())
    rows = torch.repeat_interleave(torch.arange(out, device=device), (crow[1:] - crow[:-1]).long())
    torch.testing.assert_close(gx.double(), rx.double(), **tol)
    torch.testing.assert_close(gv.double(), rw[rows, col.long()].double(), **tol)
    torch.testing.assert_close(gb.double(), rb.double(), **tol)


HALF_DTYPES = [torch.float16, torch.bfloat16]
# one rounding of the result (unit roundoff 2^-11, 2^-8) over a float32 sum, with headroom
HALF_TOLERANCE = {torch.float16: dict(rtol=2e-3, atol=2e-3), torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["ext", "torch"])
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_half_precision_against_float64(device, backend, dtype, case):
    """float16/bfloat16 operands in, the same dtype out, against float64 on the same rounded
    operands: forward, grad_x, grad_values, grad_bias."""
    out, inp, density, batch, empty = case
    weight, crow, col, values = random_csr(out, inp, density, dtype, device, torch.int32, empty)
    x = torch.randn(*batch, inp, device=device).to(dtype).requires_grad_()
    bias = torch.randn(out, device=device).to(dtype).requires_grad_()
    values.requires_grad_()
    y = csr_linear(x, crow, col, values, bias, backend=backend)
    assert y.shape == (*batch, out) and y.dtype == dtype
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, weight, bias))
    y_ref = F.linear(x64, w64, b64)
    torch.testing.assert_close(y.double(), y_ref, **HALF_TOLERANCE[dtype])
    grad = torch.randn_like(y)
    gx, gv, gb = torch.autograd.grad(y, (x, values, bias), grad)
    rx, rw, rb = torch.autograd.grad(y_ref, (x64, w64, b64), grad.double())
    assert gx.dtype == gv.dtype == gb.dtype == dtype
    rows = torch.repeat_interleave(torch.arange(out, device=device), (crow[1:] - crow[:-1]).long())
    for got, want in ((gx, rx), (gv, rw[rows, col.long()]), (gb, rb)):
        torch.testing.assert_close(got.double(), want, **HALF_TOLERANCE[dtype])


# A running sum of 0.25s held in float16 stalls at 512 (512 + 0.25 rounds back to 512), in
# bfloat16 at 64; 131072 of them split over even 32 partial sums still stall. Summed in float32
# they reach 32768 = 2^15, which both types hold exactly.
TERMS, QUARTER, TOTAL = 131072, 0.25, 32768.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["ext", "torch"])
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("batch", [1, 40])
def test_half_precision_sums_in_float(device, backend, dtype, batch):
    # forward: W (2 x TERMS) of 0.25s times x of ones
    crow = torch.tensor([0, TERMS, 2 * TERMS], device=device)
    col = torch.arange(TERMS, device=device).repeat(2)
    values = torch.full((2 * TERMS,), QUARTER, dtype=dtype, device=device)
    x = torch.ones(batch, TERMS, dtype=dtype, device=device)
    assert torch.all(csr_linear(x, crow, col, values, backend=backend) == TOTAL)
    # grad_x: W (TERMS x 1) of 0.5s, grad_out of 0.5s: grad_x sums over TERMS rows
    crow_t = torch.arange(TERMS + 1, device=device).clamp(max=TERMS)
    col_t = torch.zeros(TERMS, dtype=torch.int64, device=device)
    values_t = torch.full((TERMS,), 0.5, dtype=dtype, device=device, requires_grad=True)
    x_t = torch.ones(batch, 1, dtype=dtype, device=device, requires_grad=True)
    y = csr_linear(x_t, crow_t, col_t, values_t, backend=backend)
    (grad_x,) = torch.autograd.grad(y, x_t, torch.full_like(y, 0.5))
    assert torch.all(grad_x == TOTAL)
    # grad_values: one weight, a batch of TERMS: the SDDMM sums over the batch
    one = torch.full((1,), 0.5, dtype=dtype, device=device, requires_grad=True)
    x_b = torch.full((TERMS, 1), 0.5, dtype=dtype, device=device)
    y = csr_linear(x_b, torch.tensor([0, 1], device=device), torch.tensor([0], device=device), one,
                   backend=backend)
    (grad_values,) = torch.autograd.grad(y, one, torch.full_like(y, 0.5))
    assert grad_values.item() == TOTAL


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck(device):
    weight, crow, col, values = random_csr(6, 9, 0.4, device=device, empty_rows=(2,))
    x = torch.randn(4, 9, dtype=torch.float64, device=device, requires_grad=True)
    bias = torch.randn(6, dtype=torch.float64, device=device, requires_grad=True)
    values.requires_grad_()
    transposed = transpose_index(crow, col, 9)
    assert torch.autograd.gradcheck(
        lambda x, v, b: csr_linear(x, crow, col, v, b, transposed=transposed), (x, values, bias))
    x12 = torch.randn(12, 9, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, v: csr_linear(x, crow, col, v), (x12, values))


@pytest.mark.parametrize("device", DEVICES)
def test_gradgradcheck(device, monkeypatch):
    """Second derivatives (a physics-informed network's u_xx through a sparsified layer, a
    gradient penalty): the op's backward kernels have none, and u_xx's came out 0 with no error."""
    weight, crow, col, values = random_csr(6, 9, 0.4, device=device, empty_rows=(2,))
    x = torch.randn(2, 3, 9, dtype=torch.float64, device=device, requires_grad=True)
    bias = torch.randn(6, dtype=torch.float64, device=device, requires_grad=True)
    values.requires_grad_()
    transposed = transpose_index(crow, col, 9)
    assert torch.autograd.gradgradcheck(
        lambda x, v, b: torch.tanh(csr_linear(x, crow, col, v, b, transposed=transposed)), (x, values, bias))
    one = torch.randn(9, dtype=torch.float64, device=device, requires_grad=True)   # an unbatched input
    assert torch.autograd.gradgradcheck(
        lambda x, v, b: torch.tanh(csr_linear(x, crow, col, v, b, transposed=transposed)), (one, values, bias))
    # d2u/dx2 of u = sum(tanh(W x)) against the dense layer's
    point = torch.randn(5, 9, dtype=torch.float64, device=device, requires_grad=True)
    second = []
    for layer in (lambda t: csr_linear(t, crow, col, values.detach(), transposed=transposed),
                  lambda t: t @ weight.t()):
        (first,) = torch.autograd.grad(torch.tanh(layer(point)).sum(), point, create_graph=True)
        second.append(torch.autograd.grad(first[:, 0].sum(), point)[0])
    torch.testing.assert_close(second[0], second[1], rtol=1e-12, atol=1e-14)
    # the values' gradient gathered a chunk of rows at a time (a large, very sparse layer's way)
    from mackay_ext import csr
    monkeypatch.setattr(csr, "GATHER_ELEMENTS", 7)
    assert torch.autograd.gradgradcheck(
        lambda x, v: torch.tanh(csr_linear(x, crow, col, v, transposed=transposed)), (x[:, :1], values))


def test_fallback_matches():
    weight, crow, col, values = random_csr(20, 30, 0.3)
    x = torch.randn(7, 30, dtype=torch.float64)
    torch.testing.assert_close(csr_linear(x, crow, col, values, backend="torch"), x @ weight.T)
    torch.testing.assert_close(reference.csr_linear(x, crow, col, values), x @ weight.T)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    weight, crow, col, values = random_csr(11, 13, 0.3, torch.float32, device, torch.int32)
    transposed = transpose_index(crow, col, 13)
    for batch in (2, 40):
        x = torch.randn(batch, 13, device=device, requires_grad=True)
        bias = torch.randn(11, device=device, requires_grad=True)
        torch.library.opcheck(torch.ops.mackay_ext.csr_linear.default,
                              (x, crow, col, values.clone().requires_grad_(), bias, *transposed))
        torch.library.opcheck(torch.ops.mackay_ext.csr_matmul.default, (x.detach(), crow, col, values, 13))
        g = torch.randn(batch, 11, device=device)
        torch.library.opcheck(torch.ops.mackay_ext.csr_sddmm.default, (g, x.detach(), crow, col, 13))
    for dtype in HALF_DTYPES:
        x = torch.randn(9, 13, device=device, dtype=dtype)
        torch.library.opcheck(torch.ops.mackay_ext.csr_matmul.default, (x, crow, col, values.to(dtype), 13))
        g = torch.randn(9, 11, device=device, dtype=dtype)
        torch.library.opcheck(torch.ops.mackay_ext.csr_sddmm.default, (g, x, crow, col, 13))


@pytest.mark.parametrize("path", ["csr", "dense"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_torch_compile_sparse_layers_in_one_graph(path, training):
    """fullgraph=True: no sparse layer breaks the graph (the csr path used to, reading the
    TorchScript ONNX exporter's flag, which dynamo will not trace); gradients match eager."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 6, 3, padding=1)
    with torch.no_grad():
        conv.weight.mul_(torch.rand_like(conv.weight) < 0.2)
    model = nn.Sequential(SparseConv2d.from_dense(conv, path=path), nn.ReLU(), nn.Flatten(),
                          SparseLinear.from_dense(_pruned_linear(6 * 5 * 5, 7, 0.1), path=path)).train(training)
    x = torch.randn(4, 3, 5, 5)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out, expected = compiled(x), model(x)
    torch.testing.assert_close(out, expected)
    if training:
        grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
        expected_grads = torch.autograd.grad(expected.square().sum(), list(model.parameters()))
        for got, want in zip(grads, expected_grads):
            torch.testing.assert_close(got, want)


def _pruned_linear(inp, out, density, seed=0):
    torch.manual_seed(seed)
    layer = nn.Linear(inp, out)
    with torch.no_grad():
        layer.weight.mul_(torch.rand_like(layer.weight) < density)
    return layer


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch_shape", [(1,), (64,), (2, 5)], ids=str)
def test_sparse_linear_layer(device, batch_shape):
    dense = _pruned_linear(50, 30, 0.1).to(device)
    sparse = SparseLinear.from_dense(dense)
    assert sparse.nnz == int((dense.weight != 0).sum())
    x = torch.randn(*batch_shape, 50, device=device)
    torch.testing.assert_close(sparse(x), dense(x), rtol=1e-5, atol=1e-5)
    back = sparse.to_dense()
    torch.testing.assert_close(back.weight, dense.weight)
    # it trains: the values are the parameters, the pattern stays
    optimizer = torch.optim.SGD(sparse.parameters(), lr=0.1)
    sparse(x).square().sum().backward()
    assert sparse.values.grad is not None and sparse.bias.grad is not None
    optimizer.step()
    assert torch.all(sparse.to_dense().weight[dense.weight == 0] == 0)


def test_from_dense_with_mask():
    dense = _pruned_linear(20, 10, 1.0)
    mask = torch.zeros(10, 20, dtype=torch.bool)
    mask[:, :3] = True
    sparse = SparseLinear.from_dense(dense, mask)
    assert sparse.nnz == 30
    x = torch.randn(300, 20)
    torch.testing.assert_close(sparse(x), F.linear(x, dense.weight * mask, dense.bias))


@pytest.mark.parametrize("density", [0.03, 0.6])
def test_path_fixed_when_built(monkeypatch, density):
    """The crossover picks a layer's path once, when it is built: the CSR op below it, dense
    GEMM above it, whatever the batch; both give the dense layer's output."""
    from mackay_ext import sparse as sparse_module
    dense = _pruned_linear(400, 300, density)
    layer = SparseLinear.from_dense(dense)
    expected = "csr" if density <= min(sparse_module.crossover_density(120_000, b) for b in (1, 8)) else "dense"
    assert layer.path == expected
    calls = []
    original = sparse_module.csr_linear
    monkeypatch.setattr(sparse_module, "csr_linear", lambda *a, **k: calls.append(1) or original(*a, **k))
    for batch in (1, 7, 8, 64):
        x = torch.randn(batch, 400)
        torch.testing.assert_close(layer(x), dense(x), rtol=1e-4, atol=1e-4)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), dense(x), rtol=1e-4, atol=1e-4)
    assert len(calls) == (8 if expected == "csr" else 0)
    assert sparse_module.crossover_density(100, 1) == 0.0  # tiny layers: dense always measured faster
    assert sparse_module.layer_path(100, 0) == "csr"      # nothing to multiply
    assert sparse_module.layer_path(100, 1) == "dense"


def test_the_crossover_is_the_devices_own():
    """The GPU's cuBLAS beats the CSR kernel at densities the CPU's BLAS does not (H200 against
    2-core CPU): the same layer picks its path by where it runs; an unmeasured device: dense."""
    from mackay_ext.sparse import layer_path
    lenet = 300 * 784
    assert layer_path(lenet, round(0.0125 * lenet), "cpu") == "csr"      # the MNIST recipe's 1.25%
    assert layer_path(lenet, round(0.0125 * lenet), "cuda") == "dense"
    big = 4096 * 4096
    assert [layer_path(big, round(d * big), "cpu") for d in (0.01, 0.1, 0.5)] == ["csr", "csr", "dense"]
    assert [layer_path(big, round(d * big), "cuda") for d in (0.01, 0.1, 0.5)] == ["csr", "dense", "dense"]
    assert layer_path(big, round(0.01 * big), "xpu") == "dense" and layer_path(big, 0, "xpu") == "csr"


def test_moving_a_layer_chooses_its_path_again_unless_the_caller_fixed_it():
    dense = _pruned_linear(400, 300, 0.03)
    automatic, fixed = SparseLinear.from_dense(dense), SparseLinear.from_dense(dense, path="csr")
    assert automatic.path == fixed.path == "csr"
    automatic.to("meta")      # a device type with no measured crossover: dense GEMM
    fixed.to("meta")
    assert automatic.path == "dense" and fixed.path == "csr"
    automatic.to_empty(device="cpu")   # and back on the CPU: its crossover again
    assert automatic.path == "csr"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_sparsified_model_on_cuda_uses_the_gpu_crossover():
    model = models.create("lenet-300-100")
    with torch.no_grad():
        for layer in (model[1], model[3]):   # LeNet-300-100 is a Sequential: its two hidden Linears
            layer.weight.mul_(torch.rand_like(layer.weight) < 0.0125)
    cpu_paths = {m.path for m in sparsify(model.cpu()).modules() if isinstance(m, SparseLinear)}
    gpu_paths = {m.path for m in model.cuda().modules() if isinstance(m, SparseLinear)}
    assert "csr" in cpu_paths and gpu_paths == {"dense"}


@pytest.mark.parametrize("path", ["csr", "dense"])
def test_both_paths_train_and_agree(path):
    """Either path: same output, same gradients (x, values, bias) as the dense layer, in float64."""
    dense = _pruned_linear(23, 17, 0.3).double()
    layer = SparseLinear.from_dense(dense, path=path)
    x = torch.randn(5, 23, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(5, 17, dtype=torch.float64)
    gx, gv, gb = torch.autograd.grad(layer(x), (x, layer.values, layer.bias), grad)
    weight = dense.weight.detach().clone().requires_grad_()
    rx, rw, rb = torch.autograd.grad(F.linear(x, weight, dense.bias), (x, weight, dense.bias), grad)
    rows, cols = (dense.weight != 0).nonzero(as_tuple=True)
    torch.testing.assert_close(gx, rx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gv, rw[rows, cols], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gb, rb, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="path must be one of"):
        SparseLinear.from_dense(dense, path="gemm")



@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", ["csr", "dense"])
@pytest.mark.parametrize("case", ["linear 2-D", "linear 3-D", "linear bfloat16", "conv 1x1", "conv 3x3"])
def test_an_in_place_op_after_a_sparse_layer_trains(device, path, case):
    """nn.ReLU(inplace=True) after a sparse layer (VGG's classifier, most hand-written nets): the
    csr kernels returned a view of their own result, and autograd refuses an in-place op on a
    custom op's output that is a view, so the forward failed whenever autograd was on."""
    torch.manual_seed(0)
    dtype = torch.bfloat16 if "bfloat16" in case else torch.float64
    if case.startswith("linear"):
        dense, x = _pruned_linear(23, 17, 0.05), torch.randn(*((4, 3) if "3-D" in case else (5,)), 23)
        sparse = SparseLinear.from_dense(dense, path=path)
    else:
        kernel = 1 if "1x1" in case else 3
        dense, x = nn.Conv2d(6, 9, kernel, padding=kernel // 2), torch.randn(2, 6, 5, 4)
        with torch.no_grad():
            dense.weight.mul_(torch.rand_like(dense.weight) < 0.05)
        sparse = SparseConv2d.from_dense(dense, path=path)
    dense, sparse = (m.to(device, dtype) for m in (dense, sparse))
    x = x.to(device, dtype)
    outputs = []
    for model in (nn.Sequential(dense, nn.ReLU(inplace=True)), nn.Sequential(sparse, nn.ReLU(inplace=True))):
        xg = x.clone().requires_grad_()
        y = model(xg)
        (y * y).sum().backward()
        outputs.append((y.detach(), xg.grad, model[0].bias.grad))
    tolerance = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-10, atol=1e-10)
    for got, want in zip(outputs[1], outputs[0]):
        torch.testing.assert_close(got, want, **tolerance)


def test_dense_path_cache_follows_the_values():
    """The dense path's cached weight is rebuilt after any change of the values: an in-place
    write, an optimizer step (MacKayAdam's fused op bumps no version), a dtype change, a
    load_state_dict; in train mode also after writes through .data."""
    dense = _pruned_linear(30, 20, 0.5)
    layer = SparseLinear.from_dense(dense, path="dense").eval()
    x = torch.randn(4, 30)

    def check():
        with torch.no_grad():
            torch.testing.assert_close(layer(x), F.linear(x.to(layer.values.dtype), layer.dense_weight(), layer.bias))
    check()
    with torch.no_grad():
        layer.values.mul_(2)
    check()
    optimizer = mackay_ext.MacKayAdam(layer.parameters(), lr=0.1, num_data=10)
    layer(x).sum().backward()
    optimizer.step()
    check()
    layer.load_state_dict({k: v + 1 if k == "values" else v for k, v in layer.state_dict().items()})
    check()
    layer.double()
    x = x.double()
    check()
    layer.train()
    layer.values.data.add_(1)
    check()
    layer.eval()
    check()
    layer.values.data.mul_(0.5)   # an EMA copy's update in eval mode: eval() again drops the cache
    layer.eval()
    check()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("conv", [dict(stride=1, padding=0), dict(stride=2, padding=1),
                                  dict(stride=(1, 2), padding=(2, 1), dilation=2)], ids=str)
def test_sparse_conv2d(device, conv):
    torch.manual_seed(0)
    layer = nn.Conv2d(3, 7, (3, 5), **conv).to(device)
    with torch.no_grad():
        layer.weight.mul_(torch.rand_like(layer.weight) < 0.3)
    sparse = SparseConv2d.from_dense(layer)
    x = torch.randn(2, 3, 13, 11, device=device)
    torch.testing.assert_close(sparse(x), layer(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sparse.to_dense().weight, layer.weight)
    with pytest.raises(ValueError, match="expected input"):
        sparse(torch.randn(2, 4, 13, 11, device=device))


def _pruned_lenet():
    torch.manual_seed(0)
    model = models.create("lenet-5-caffe")
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                module.weight.mul_(torch.rand_like(module.weight) < 0.05)
    return model


def test_sparsify_save_load_round_trip(tmp_path):
    model = _pruned_lenet()
    x = torch.randn(4, 1, 28, 28)
    expected = model(x)
    sparsify(model)
    assert sum(isinstance(m, (SparseLinear, SparseConv2d)) for m in model.modules()) == 4
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    sizes = save_compressed(model, str(tmp_path / "lenet.pt"), model_name="lenet-5-caffe")
    assert sizes["bytes"] < 0.2 * sizes["dense_bytes"]
    loaded = load_compressed(str(tmp_path / "lenet.pt"))
    torch.testing.assert_close(loaded(x), model(x))
    for a, b in zip(loaded.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    again = load_compressed(str(tmp_path / "lenet.pt"), models.create("lenet-5-caffe"))
    torch.testing.assert_close(again(x), model(x))



class _SharedBlock(nn.Module):
    """One Linear under two attribute names (ALBERT-style sharing), applied twice."""

    def __init__(self, alias=True):
        super().__init__()
        self.inp, self.block, self.out = nn.Linear(8, 32), nn.Linear(32, 32), nn.Linear(32, 3)
        self.block2 = self.block if alias else nn.Linear(32, 32)

    def forward(self, x):
        h = torch.relu(self.block(torch.relu(self.inp(x))))
        return self.out(torch.relu(self.block2(h)))


def test_a_layer_under_two_names_round_trips(tmp_path):
    """save_compressed stored the shared layer's sparse arrays under its second name as plain
    state, and load_compressed replaced the first name only: the file could not be loaded."""
    torch.manual_seed(0)
    model = _SharedBlock()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(torch.rand_like(p) < 0.1)
    x = torch.randn(5, 8)
    expected = model(x)
    sparsify(model)
    save_compressed(model, str(tmp_path / "shared.pt"))
    loaded = load_compressed(str(tmp_path / "shared.pt"), model=_SharedBlock())
    assert isinstance(loaded.block, SparseLinear) and loaded.block is loaded.block2
    torch.testing.assert_close(loaded(x), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match=r"does not match the file \(missing \['block2.weight'"):
        load_compressed(str(tmp_path / "shared.pt"), model=_SharedBlock(alias=False))


class _OwnForward(nn.Linear):
    def forward(self, x):
        return super().forward(x).relu()


@pytest.mark.parametrize("layer, message", [
    (nn.Conv2d(8, 8, 3, padding=1, groups=8), "an nn.Conv2d with groups=8"),
    (nn.Conv2d(8, 8, 3, padding=1, padding_mode="circular"), "an nn.Conv2d with groups=1, padding_mode='circular'"),
    (nn.Linear(8 * 9, 8), "a Linear"),
], ids=["grouped", "circular", "another kind"])
def test_load_compressed_refuses_a_conv_it_would_silently_replace(tmp_path, layer, message):
    """groups and padding_mode were not compared: a depthwise or circular conv was swapped for
    an ungrouped, zero-padded SparseConv2d without a word."""
    conv = nn.Conv2d(8, 8, 3, padding=1)
    with torch.no_grad():
        conv.weight.mul_(torch.rand_like(conv.weight) < 0.1)
    save_compressed(sparsify(nn.Sequential(conv)), str(tmp_path / "conv.pt"))
    with pytest.raises(RuntimeError, match=f"layer '0' is {message}"):
        load_compressed(str(tmp_path / "conv.pt"), model=nn.Sequential(layer))


def test_load_compressed_refuses_a_linear_with_its_own_forward(tmp_path):
    linear = nn.Linear(6, 4)
    with torch.no_grad():
        linear.weight.mul_(torch.rand_like(linear.weight) < 0.1)
    save_compressed(sparsify(nn.Sequential(linear)), str(tmp_path / "linear.pt"))
    with pytest.raises(RuntimeError, match="layer '0' is a _OwnForward with its own forward"):
        load_compressed(str(tmp_path / "linear.pt"), model=nn.Sequential(_OwnForward(6, 4)))
    loaded = load_compressed(str(tmp_path / "linear.pt"), model=nn.Sequential(nn.Linear(6, 4)))
    assert isinstance(loaded[0], SparseLinear)


def test_sparsify_min_sparsity_and_optimizer_alpha():
    model = nn.Sequential(nn.Linear(10, 8), nn.Linear(8, 4))
    with torch.no_grad():
        model[1].weight[:, :6] = 0  # 75% sparse; model[0] stays dense
    optimizer = mackay_ext.MacKayAdam(model.parameters(), lr=1e-3, num_data=10)
    alpha = optimizer.ard_state(model[0].weight)["alpha"]
    alpha[:6] = math.inf  # 75% pruned by alpha, the weights not zero yet: kept (no output changes), and said
    with pytest.warns(UserWarning, match=r"sparsify: 60 nonzero weights sit where the optimizer's alpha is \+inf "
                                         r"\(0: 60\): kept, so that no output changes"):
        sparsify(*copy.deepcopy((model, optimizer)), min_sparsity=0.0)   # (one copy of both)
    with torch.no_grad():
        model[0].weight[:6] = 0   # as a pruning update leaves them
    sparsify(model, optimizer, min_sparsity=0.6)
    assert isinstance(model[0], SparseLinear) and model[0].nnz == 20
    assert isinstance(model[1], SparseLinear) and model[1].nnz == 8
    dense = nn.Linear(4, 4)
    assert isinstance(sparsify(nn.Sequential(dense))[0], nn.Linear)
    with pytest.raises(ValueError, match="min_sparsity"):
        sparsify(model, min_sparsity=2.0)
    for bad in ("0.5", None, True):
        with pytest.raises(TypeError, match="sparsify: min_sparsity must be a number in \\[0, 1\\], got"):
            sparsify(model, min_sparsity=bad)
    with torch.device("meta"):
        on_meta = nn.Sequential(nn.Linear(20, 30))
    with pytest.raises(ValueError, match="sparsify: layer '0' is on the meta device, whose tensors hold no values"):
        sparsify(on_meta)


def test_narrow_index_types_on_disk(tmp_path):
    model = nn.Sequential(_pruned_linear(200, 100, 0.05))
    sparsify(model)
    save_compressed(model, str(tmp_path / "m.pt"))
    payload = torch.load(str(tmp_path / "m.pt"), weights_only=True)
    entry = payload["sparse"]["0"]
    assert entry["col"].dtype == torch.uint8 and entry["crow"].dtype in (torch.int16, torch.int32)


def test_load_compressed_errors(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(RuntimeError, match="corrupt or truncated"):
        load_compressed(str(tmp_path / "junk.pt"))
    torch.save({"format": "other"}, tmp_path / "other.pt")
    with pytest.raises(RuntimeError, match="not a file written by save_compressed"):
        load_compressed(str(tmp_path / "other.pt"))
    model = nn.Sequential(_pruned_linear(20, 10, 0.1))
    sparsify(model)
    save_compressed(model, str(tmp_path / "m.pt"))
    with pytest.raises(ValueError, match="pass `model`"):
        load_compressed(str(tmp_path / "m.pt"))
    data = (tmp_path / "m.pt").read_bytes()
    for cut in (len(data) // 2, len(data) - 7, 10):  # truncated files
        (tmp_path / "cut.pt").write_bytes(data[:cut])
        with pytest.raises(RuntimeError, match="corrupt or truncated"):
            load_compressed(str(tmp_path / "cut.pt"), nn.Sequential(nn.Linear(20, 10)))
    with pytest.raises(RuntimeError, match="does not match"):
        load_compressed(str(tmp_path / "m.pt"), nn.Sequential(nn.Linear(20, 10), nn.Linear(10, 2)))


BAD_CSR = [
    ("crow length", lambda c, k, v: (c[:-1], k, v), "out_features \\+ 1|end at nnz"),
    ("decreasing crow", lambda c, k, v: (torch.tensor([0, 3, 2, 4, 4, 4]), k[:4], v[:4]), "non-decreasing"),
    ("crow end", lambda c, k, v: (c, k[:-1], v[:-1]), "end at nnz"),
    ("col out of range", lambda c, k, v: (c, torch.where(k == k[0], 99, k), v), "col_indices must lie"),
    ("negative col", lambda c, k, v: (c, torch.where(k == k[0], -1, k), v), "col_indices must lie"),
    ("lengths", lambda c, k, v: (c, k, v[:-1]), "one entry per nonzero"),
    ("index dtype", lambda c, k, v: (c.float(), k, v), "int32 or int64"),
    ("mixed index dtypes", lambda c, k, v: (c.int(), k, v), "share a dtype"),
    # as torch's CSR tensors: the kernels sum a repeated column, the dense path and ONNX keep one
    ("repeated col", lambda c, k, v: (c, _in_first_long_row(c, k, lambda a, b: (a, a)), v),
     "increase strictly within each row"),
    ("unsorted cols", lambda c, k, v: (c, _in_first_long_row(c, k, lambda a, b: (b, a)), v),
     "increase strictly within each row"),
]


def _in_first_long_row(crow, col, change):
    """col with its first two entries of the first row holding two or more replaced by change(a, b)."""
    row = next(r for r in range(len(crow) - 1) if crow[r + 1] - crow[r] >= 2)
    start, col = int(crow[row]), col.clone()
    col[start], col[start + 1] = map(int, change(int(col[start]), int(col[start + 1])))
    return col


@pytest.mark.parametrize("name,damage,message", BAD_CSR, ids=[b[0] for b in BAD_CSR])
def test_bad_csr_rejected(name, damage, message):
    weight, crow, col, values = random_csr(5, 8, 0.5)
    crow, col, values = damage(crow, col, values)
    x = torch.randn(3, 8, dtype=torch.float64)
    with pytest.raises((ValueError, TypeError), match=message):
        csr_linear(x, crow, col, values)
    if name == "mixed index dtypes":  # a layer converts integer indices to one type itself
        return
    with pytest.raises((ValueError, TypeError), match=message):
        SparseLinear(5, 8, crow, col, values)


@pytest.mark.parametrize("dtype,index_dtype", [(torch.float64, torch.int64), (torch.float32, torch.int32)],
                         ids=str)
def test_raw_op_never_reads_out_of_bounds(dtype, index_dtype):
    # 40 x 60 at 50%: rows long enough for the vectorised gather path (float32 / int32)
    weight, crow, col, values = random_csr(40, 60, 0.5, dtype, index_dtype=index_dtype)
    for position in (0, 13, int(crow[3])):
        bad_col = col.clone()
        bad_col[position] = 10 ** 9 if position else -5
        for batch in (1, 2, 40):
            x = torch.randn(batch, 60, dtype=dtype)
            with pytest.raises(RuntimeError, match="malformed CSR"):
                torch.ops.mackay_ext.csr_matmul(x, crow, bad_col, values, 60)
    bad_crow = crow.clone()
    bad_crow[2] = 10 ** 6
    for batch in (1, 40):
        with pytest.raises(RuntimeError, match="malformed CSR"):
            torch.ops.mackay_ext.csr_matmul(torch.randn(batch, 60, dtype=dtype), bad_crow, col, values, 60)


def test_bad_inputs_to_the_op():
    weight, crow, col, values = random_csr(5, 8, 0.5)
    with pytest.raises(RuntimeError, match="last dimension must be in_features = 8"):
        csr_linear(torch.randn(3, 7, dtype=torch.float64), crow, col, values, in_features=8)
    with pytest.raises(TypeError, match="x must have the dtype of values"):
        csr_linear(torch.randn(3, 8), crow, col, values)
    with pytest.raises(RuntimeError, match="bias must have shape"):
        csr_linear(torch.randn(3, 8, dtype=torch.float64), crow, col, values,
                   torch.zeros(4, dtype=torch.float64))
    layer = SparseLinear.from_dense(_pruned_linear(8, 5, 0.5))
    with pytest.raises(ValueError, match="in_features = 8"):
        layer(torch.randn(2, 9))


@pytest.mark.parametrize("backend", ["ext", "torch"])
def test_csr_linear_names_a_0d_input_and_a_meta_one(backend):
    dense = _pruned_linear(4, 3, 0.5)
    csr = dense.weight.detach().to_sparse_csr()
    args = (csr.crow_indices(), csr.col_indices(), csr.values(), dense.bias.detach())
    with pytest.raises(ValueError, match="csr_linear: x must be a tensor of shape \\(..., in_features\\), got a 0-d"):
        csr_linear(torch.tensor(1.0), *args, backend=backend)
    with pytest.raises(RuntimeError, match="csr_linear: crow_indices is on cpu but x is on meta"):
        csr_linear(torch.ones(2, 4, device="meta"), *args, backend=backend)
    with pytest.raises(RuntimeError, match=r"csr_linear: bias must have shape \(3,\), one entry per row of W, got \(4,\)"):
        csr_linear(torch.ones(2, 4), *args[:3], torch.zeros(4), backend=backend)


def test_csr_linear_without_in_features_suspects_x_when_the_columns_do_not_fit():
    dense = _pruned_linear(8, 3, 0.9)
    csr = dense.weight.detach().to_sparse_csr()
    with pytest.raises(ValueError, match=r"no in_features given, so x's last dimension \(6\) is taken as W's "
                                         r"width, and then csr: col_indices must lie in \[0, in_features = 6\)"):
        csr_linear(torch.ones(2, 6), csr.crow_indices(), csr.col_indices(), csr.values())


def _two_patterns_of_one_size(make, seed_a=0, seed_b=1):
    """Two sparse copies of one layer whose masks keep the same number of weights at other places."""
    layers = []
    for seed in (seed_a, seed_b):
        torch.manual_seed(seed)
        dense = make()
        mask = torch.zeros(dense.weight.numel(), dtype=torch.bool)
        mask[torch.randperm(mask.numel())[:mask.numel() // 5]] = True
        layers.append((dense, mask.view_as(dense.weight)))
    return layers


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("path", ["csr", "dense"])
def test_load_state_dict_of_another_pattern_follows_it_on_every_path(kind, path):
    """Two layers of one size and nnz but different patterns: load_state_dict copied the pattern
    into the buffers and left flat_index, so the dense path, dense_weight and densify scattered the
    new values into the old pattern (output off by 0.1) while the csr path was right."""
    if kind == "linear":
        (a, mask_a), (b, mask_b) = _two_patterns_of_one_size(lambda: nn.Linear(13, 7))
        sparse_a, sparse_b = (SparseLinear.from_dense(layer, mask, path=path)
                              for layer, mask in ((a, mask_a), (b, mask_b)))
        x = torch.randn(5, 13)
    else:
        (a, mask_a), (b, mask_b) = _two_patterns_of_one_size(lambda: nn.Conv2d(3, 4, 3, padding=1))
        sparse_a, sparse_b = (SparseConv2d.from_dense(layer, mask, path=path)
                              for layer, mask in ((a, mask_a), (b, mask_b)))
        x = torch.randn(2, 3, 6, 5)
    assert not torch.equal(sparse_a.col_indices, sparse_b.col_indices)
    sparse_a.eval(), sparse_b.eval()
    sparse_a(x)   # fills the dense path's cache with the old weight
    sparse_a.load_state_dict(sparse_b.state_dict())
    torch.testing.assert_close(sparse_a(x), sparse_b(x), rtol=0, atol=0)
    torch.testing.assert_close(sparse_a.dense_weight(), sparse_b.dense_weight(), rtol=0, atol=0)
    torch.testing.assert_close(sparse_a.to_dense().weight, b.weight * mask_b, rtol=0, atol=0)
    for name in ("crow_t", "row_t", "perm_t"):
        assert torch.equal(getattr(sparse_a, name), getattr(sparse_b, name)), name


def test_load_state_dict_refuses_csr_arrays_that_are_not_a_pattern_and_keeps_the_layer():
    (a, mask_a), _ = _two_patterns_of_one_size(lambda: nn.Linear(13, 7))
    layer = SparseLinear.from_dense(a, mask_a)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    state = layer.state_dict()
    bad = dict(state, col_indices=state["col_indices"].flip(0))   # columns no longer increase per row
    with pytest.raises(RuntimeError, match="its CSR arrays are not a valid pattern of a 7 x 13 weight"):
        layer.load_state_dict(bad)
    out_of_range = dict(state, col_indices=torch.full_like(state["col_indices"], 13))
    with pytest.raises(RuntimeError, match="7 x 13 weight"):
        layer.load_state_dict(out_of_range)
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_load_compressed_into_a_model_with_sparse_layers_and_into_a_frozen_eval_model(tmp_path):
    """A model loaded before (its layers already sparse twins) failed with AttributeError 'weight'
    half way through the swap; and the loaded layers came back in train mode with requires_grad,
    undoing a deploy script's eval() and requires_grad_(False)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5))
    with torch.no_grad():
        for layer in (net[0], net[2]):
            layer.weight.mul_((torch.rand_like(layer.weight) < 0.1).float())
    x = torch.randn(4, 20)
    expected = net(x)
    path = tmp_path / "net.pt"
    save_compressed(sparsify(net), path)
    twice = load_compressed(path, model=nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5)))
    twice = load_compressed(path, model=twice)
    half = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), load_compressed(path, model=twice)[2])
    for model in (twice, load_compressed(path, model=half)):
        assert isinstance(model[0], SparseLinear) and isinstance(model[2], SparseLinear)
        torch.testing.assert_close(model(x), expected)
    frozen = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5)).eval().requires_grad_(False)
    loaded = load_compressed(path, model=frozen)
    assert not any(module.training for module in loaded.modules())
    assert not any(p.requires_grad for p in loaded.parameters())
    assert not loaded(x).requires_grad
    training = load_compressed(path, model=nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5)))
    assert all(module.training for module in training.modules())
    assert all(p.requires_grad for p in training.parameters())


@pytest.mark.parametrize("path", ["csr", "dense"])
@pytest.mark.parametrize("training", [True, False])
def test_torch_func_per_example_gradients_of_a_sparse_model(path, training):
    """torch.func's grad and vmap over functional_call (per-example gradients, e.g. for DP
    fine-tuning) failed on every sparse layer: 'Cannot access data pointer of Tensor that doesn't
    have storage' (the dense path's cache key; the csr kernels cannot read wrapped tensors
    either). They now take the scatter and the dense product, and match autograd example by example."""
    from torch.func import functional_call, grad, vmap
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 3, 5))
    with torch.no_grad():
        for layer in (dense[0], dense[3]):
            layer.weight.mul_((torch.rand_like(layer.weight) < 0.4).float())
    model = sparsify(dense, min_sparsity=0.0)
    for layer in (model[0], model[3]):
        layer.path = path
    model.train(training)
    x, y = torch.randn(4, 2, 6, 5), torch.randint(0, 5, (4,))
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss(p, xb, yb):
        return F.cross_entropy(functional_call(model, p, (xb[None],)), yb[None])

    per_example = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    for i in range(len(x)):
        model.zero_grad()
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(per_example[name][i], p.grad, rtol=1e-5, atol=1e-6)


def test_a_pickled_or_copied_sparse_model_leaves_the_dense_cache_behind():
    """torch.save of the module (or deepcopy) carried each dense-path layer's cached dense weight:
    224 KB for a 1.25%-kept LeNet-300-100 against about 26 KB of nonzeros."""
    import copy
    import io
    import pickle
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(300, 200), nn.ReLU(), nn.Linear(200, 10))
    with torch.no_grad():
        for layer in (dense[0], dense[2]):
            layer.weight.mul_((torch.rand_like(layer.weight) < 0.02).float())
    model = sparsify(dense).eval()
    for layer in (model[0], model[2]):
        layer.path = "dense"
    x = torch.randn(3, 300)
    with torch.no_grad():
        expected = model(x)
    assert model[0]._dense is not None   # the cache the eval forward made
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert twin[0]._dense is None and twin[2]._dense is None
        with torch.no_grad():
            torch.testing.assert_close(twin(x), expected, rtol=0, atol=0)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    assert len(buffer.getvalue()) < 300 * 200 * 4 / 4   # nonzeros and indices, not the dense matrix
    assert model[0]._dense is not None   # the original keeps its cache


@pytest.mark.parametrize("training", [False, True])
def test_converted_layers_keep_the_models_mode(training):
    """sparsify / densify of a model in eval mode gave train-mode layers (its eval-mode fast path
    unused: batch-1 latency 2.28x dense where it is 1.20x after .eval())."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Conv2d(1, 1, 1), nn.Linear(10, 3)).train(training)
    with torch.no_grad():
        for layer in (model[0], model[2], model[3]):
            layer.weight.mul_((torch.rand_like(layer.weight) < 0.2).float())
        model[2].weight.zero_()   # (a 1x1 conv: all but nothing pruned; the model is converted, not run)
    mackay_ext.sparsify(model, min_sparsity=0.5)
    assert isinstance(model[0], mackay_ext.sparse.SparseLinear) and isinstance(model[2], mackay_ext.sparse.SparseConv2d)
    assert all(m.training == training for m in model.modules())
    mackay_ext.densify(model)
    assert isinstance(model[0], nn.Linear) and all(m.training == training for m in model.modules())


@pytest.mark.parametrize("out_features, batch", [(0, (0,)), (0, (2,)), (2, (0,)), (0, ()), (2, (0, 4)), (2, ())])
@pytest.mark.parametrize("create_graph", [False, True])
def test_empty_layers_and_batches_have_gradients(out_features, batch, create_graph):
    """No rows, no examples, an unbatched input, with a bias: every gradient of the right shape
    (a layer of 0 outputs raised reshaping its bias gradient)."""
    crow, col = torch.zeros(out_features + 1, dtype=torch.int32), torch.zeros(0, dtype=torch.int32)
    values = torch.zeros(0, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(out_features, dtype=torch.float64, requires_grad=True)
    x = torch.randn(*batch, 3, dtype=torch.float64, requires_grad=True)
    out = csr_linear(x, crow, col, values, bias, in_features=3)
    grads = torch.autograd.grad(out.sum(), (x, values, bias), create_graph=create_graph)
    assert [g.shape for g in grads] == [x.shape, values.shape, bias.shape]
    assert not bool(grads[0].any()) and torch.equal(grads[2], torch.full_like(bias, float(math.prod(batch))))
