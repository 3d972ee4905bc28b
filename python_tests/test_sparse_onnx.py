"""ONNX export of sparsified models, with no densify first: under torch.onnx.export each sparse
layer is written as the scatter of its nonzeros into the weight and a standard MatMul / Conv (ONNX
has no CSR product), on both paths; onnxruntime then gives the sparse model's outputs at any batch,
and the file holds the nonzeros, not the dense weights."""
import copy
import io

import pytest
import torch
from torch import nn

from mackay_ext import models
from mackay_ext.sparse import SparseConv2d, SparseLinear, sparsify

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def pruned(name, density, seed=0):
    torch.manual_seed(seed)
    model = models.create(name).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                module.weight.mul_(torch.rand(module.weight.shape, generator=generator) < density)
    return model


def lenet5_on_both_paths():
    """LeNet-5 with conv2 and fc1 on the CSR path and the rest on the dense path."""
    model = pruned("lenet-5-caffe", 0.03)
    dense = copy.deepcopy(model)
    for index, layer in enumerate(model):
        if isinstance(layer, nn.Conv2d):
            model[index] = SparseConv2d.from_dense(layer, path="csr" if index == 2 else "dense")
        elif isinstance(layer, nn.Linear):
            model[index] = SparseLinear.from_dense(layer, path="csr" if index == 5 else "dense")
    return model, dense


def run_onnx(model_bytes, x):
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


@pytest.mark.parametrize("name", ["lenet-300-100", "lenet-5-caffe"])
def test_sparsified_model_exports_to_onnx_on_both_paths(name):
    if name == "lenet-300-100":
        dense = pruned(name, 0.0125)
        model = sparsify(copy.deepcopy(dense)).eval()
    else:
        model, dense = lenet5_on_both_paths()
    paths = {layer.path for layer in model.modules() if isinstance(layer, (SparseLinear, SparseConv2d))}
    assert paths == {"csr", "dense"}
    x = torch.randn(7, 1, 28, 28)
    with torch.no_grad():
        expected = model(x)
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.onnx.export(model, (x[:2],), dynamo=True, dynamic_shapes=({0: batch},), verbose=False)
    sparse_bytes = program.model_proto.SerializeToString()
    for size in (1, 7):                                   # one file serves every batch
        torch.testing.assert_close(run_onnx(sparse_bytes, x[:size]), expected[:size], rtol=1e-5, atol=1e-5)
    dense_bytes = torch.onnx.export(dense, (x[:2],), dynamo=True, verbose=False).model_proto.SerializeToString()
    assert len(sparse_bytes) * 5 < len(dense_bytes)       # the nonzeros are stored, not W
    assert isinstance(model[1] if name == "lenet-300-100" else model[5], SparseLinear)   # export changed nothing


@pytest.mark.parametrize("folding", [True, False])
def test_legacy_exporter_gives_the_same_outputs_and_stores_the_nonzeros(folding):
    """The TorchScript exporter wrote a zeros constant of each weight's full size into the file,
    which came out larger than the dense model's."""
    model, dense = lenet5_on_both_paths()
    x = torch.randn(3, 1, 28, 28)
    buffers = {}
    for name, net in (("sparse", model), ("dense", dense)):
        buffers[name] = io.BytesIO()
        with pytest.warns(DeprecationWarning):
            torch.onnx.export(net, (x,), buffers[name], dynamo=False, do_constant_folding=folding)
    with torch.no_grad():
        torch.testing.assert_close(run_onnx(buffers["sparse"].getvalue(), x), model(x), rtol=1e-5, atol=1e-5)
    assert len(buffers["sparse"].getvalue()) * 5 < len(buffers["dense"].getvalue())


def test_eager_forward_after_export_still_uses_each_layers_path():
    """The ONNX route is taken only while exporting: afterwards the CSR layers run the CSR
    product again, and the model still computes what the pruned dense one does."""
    model, dense = lenet5_on_both_paths()
    x = torch.randn(2, 1, 28, 28)
    torch.onnx.export(model, (x,), dynamo=True, verbose=False)
    assert not torch.onnx.is_in_onnx_export()
    assert not any(layer._runs_dense() for layer in (model[2], model[5]))
    with torch.no_grad():
        torch.testing.assert_close(model(x), dense(x), rtol=1e-5, atol=1e-5)
