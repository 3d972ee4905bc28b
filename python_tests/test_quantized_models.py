"""A model quantized by torch.ao meets the library's conversions: each says so, naming the layers
and the order that works (prune -> sparsify or shrink the float model -> quantize); and
save_compressed says when mostly-zero layers go into the file dense (sparsify forgotten)."""
import warnings

import pytest
import torch
from torch import nn

import mackay_ext


def _pruned_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    with torch.no_grad():
        model[0].weight[:, :6] = 0   # 75% of the first layer pruned
    return model


def _quantized(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # (torch.ao's deprecation notices)
        return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


def test_save_compressed_and_shrink_refuse_a_quantized_model_by_name(tmp_path):
    quantized = _quantized(_pruned_mlp())
    with pytest.raises(TypeError, match=r"save_compressed: the model has layers quantized by torch.ao \(0, 2\).*"
                                        r"after loading, densify or shrink it and quantize that"):
        mackay_ext.save_compressed(quantized, str(tmp_path / "q.pt"))
    assert not (tmp_path / "q.pt").exists()
    with pytest.raises(TypeError, match=r"shrink: the model has layers quantized by torch.ao \(0, 2\).*"
                                        r"shrink the float model, then quantize"):
        mackay_ext.shrink(quantized, (torch.randn(2, 8),))


def test_sparsify_says_it_leaves_quantized_layers():
    quantized = _quantized(_pruned_mlp())
    with pytest.warns(UserWarning, match=r"sparsify: 2 layer\(s\) are quantized by torch.ao \(0, 2\): left as they are"):
        mackay_ext.sparsify(quantized)
    assert type(quantized[0]).__module__.startswith("torch.ao")


def test_the_order_that_works_keeps_the_zeros_in_int8():
    """Quantizing the pruned float model: its pruned weights are exact zeros in int8 too."""
    model = _pruned_mlp()
    quantized = _quantized(model)
    weight = quantized[0].weight().dequantize()   # the int8 weight, as floats
    assert torch.equal(weight[:, :6], torch.zeros(16, 6))
    x = torch.randn(5, 8)
    torch.testing.assert_close(quantized(x), model(x), rtol=0.1, atol=0.05)


def test_save_compressed_says_when_mostly_zero_layers_go_in_dense(tmp_path):
    model = _pruned_mlp()
    with pytest.warns(UserWarning, match=r"save_compressed: 1 dense layer\(s\) are mostly zeros \(0 75%\).*"
                                         r"call mackay_ext.sparsify\(model\) before save_compressed"):
        mackay_ext.save_compressed(model, str(tmp_path / "dense.pt"))
    mackay_ext.sparsify(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mackay_ext.save_compressed(model, str(tmp_path / "sparse.pt"))
