"""A compressed file that is not what save_compressed wrote is refused at load time with the file
and the field named: damaged bytes (a SHA-256 digest is stored beside the contents), and, past
the digest (an edit that made it again), fields that do not fit the model or cannot be what the
layer runs. Files written before the digest existed still load, with a warning."""
import pytest
import torch
from torch import nn

import mackay_ext
from mackay_ext import load_compressed, models, save_compressed, sparsify
from mackay_ext._files import CorruptFileError

from test_refusals import resealed


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.fc = nn.Linear(64, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = Net()
    with torch.no_grad():
        for p in (model.conv.weight, model.fc.weight):
            p.mul_((torch.rand_like(p) < 0.3).float())
    sparsify(model)
    path = tmp_path / "good.pt"
    save_compressed(model, path)
    x = torch.randn(2, 2, 6, 6)
    with torch.no_grad():
        return path, x, model(x)


def test_damaged_bytes_are_refused(saved, tmp_path):
    path, _, _ = saved
    raw = bytearray(path.read_bytes())
    values = torch.load(path, weights_only=True)["sparse"]["fc"]["values"]
    at = raw.find(values.numpy().tobytes()[:16])   # the stored nonzeros
    assert at > 0
    raw[at:at + 8] = bytes([0x7F] * 8)
    (tmp_path / "damaged.pt").write_bytes(raw)
    with pytest.raises(CorruptFileError, match="do not match the checksum"):
        load_compressed(tmp_path / "damaged.pt", model=Net())


def test_an_edited_field_is_refused_even_with_the_digest_made_again(saved, tmp_path):
    path, _, _ = saved
    original = torch.load(path, weights_only=True)

    def load_edited(edit, model=Net):
        payload = torch.load(path, weights_only=True)
        edit(payload)
        torch.save(resealed(payload), tmp_path / "edited.pt")
        return load_compressed(tmp_path / "edited.pt", model=model() if model else None)

    with pytest.raises(RuntimeError, match=r"layer 'fc' has bias in the model, none in the file"):
        load_edited(lambda p: p["sparse"]["fc"].__setitem__("bias", None))
    with pytest.raises(CorruptFileError, match=r"'fc': values must be a 1-D floating tensor, got list"):
        load_edited(lambda p: p["sparse"]["fc"].__setitem__("values", p["sparse"]["fc"]["values"].tolist()))
    with pytest.raises(CorruptFileError, match=r"'conv': col must be a 1-D integer tensor"):
        load_edited(lambda p: p["sparse"]["conv"].__setitem__("col", p["sparse"]["conv"]["col"].float()))
    with pytest.raises(CorruptFileError, match=r"'conv': dilation must be an int >= 0 or a pair of them, got tuple"):
        load_edited(lambda p: p["sparse"]["conv"].__setitem__("dilation", (-1, -1)))
    for key, value in (("stride", (0, 0)), ("dilation", (0, 0)), ("padding", (1000, 1000))):
        with pytest.raises(RuntimeError, match=r"layer 'conv' is Conv2d .*stride, padding, dilation"):
            load_edited(lambda p: p["sparse"]["conv"].__setitem__(key, value))
    assert original["sparse"]["conv"]["stride"] == (1, 1)


def test_values_of_another_dtype_take_the_models_as_load_state_dict_does(saved, tmp_path):
    path, x, expected = saved
    payload = torch.load(path, weights_only=True)
    payload["sparse"]["fc"]["values"] = payload["sparse"]["fc"]["values"].double()
    torch.save(resealed(payload), tmp_path / "double.pt")
    model = load_compressed(tmp_path / "double.pt", model=Net())
    assert model.fc.values.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)


def test_model_kwargs_that_build_no_model_or_another_one_are_refused_before_allocating(tmp_path):
    lenet = models.create("lenet-300-100")
    save_compressed(lenet, tmp_path / "lenet.pt", model_name="lenet-300-100")
    payload = torch.load(tmp_path / "lenet.pt", weights_only=True)
    for kwargs, message in (({"evil": 1}, r"do not build a model \(.*evil"),
                            ({"num_classes": 10 ** 9}, r"has 5.bias of shape \(1000000000,\), where the file's is \(10,\)"),
                            ("num_classes=10", "model_kwargs must be a dict")):
        payload["model_kwargs"] = kwargs
        torch.save(resealed(payload), tmp_path / "edited.pt")
        with pytest.raises(CorruptFileError, match=message):
            load_compressed(tmp_path / "edited.pt")
    # a file that names a model and holds none of its tensors: refused before the model is built
    empty = {"format": payload["format"], "model_name": "lenet-300-100", "sparse": {}, "state": {},
             "model_kwargs": {"num_classes": 10 ** 9}, "metadata": {}}
    torch.save(resealed(empty), tmp_path / "empty.pt")
    with pytest.raises(CorruptFileError, match=r"has 1.bias of shape \(300,\), which the file lacks"):
        load_compressed(tmp_path / "empty.pt")


def test_a_file_written_before_the_digest_loads_with_a_warning(saved, tmp_path):
    path, x, expected = saved
    payload = torch.load(path, weights_only=True)
    del payload["digest"]
    torch.save(payload, tmp_path / "old.pt")
    with pytest.warns(UserWarning, match="carries no checksum"):
        model = load_compressed(tmp_path / "old.pt", model=Net())
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)


def test_a_named_file_written_before_model_kwargs_were_saved_loads_by_name(tmp_path):
    """Files written before model_kwargs joined the payload (every CLI model.pt of then) name
    their model alone: read with the model's defaults (a bare KeyError: 'model_kwargs' before)."""
    torch.manual_seed(0)
    model = models.create("lenet-300-100").eval()
    save_compressed(model, tmp_path / "named.pt", model_name="lenet-300-100")
    payload = torch.load(tmp_path / "named.pt", weights_only=True)
    del payload["digest"], payload["model_kwargs"]
    torch.save(payload, tmp_path / "old.pt")
    with pytest.warns(UserWarning, match="carries no checksum"):
        loaded = load_compressed(tmp_path / "old.pt")
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_a_named_model_whose_sparse_layers_have_no_bias_loads_by_name(tmp_path):
    """ResNet convs have no bias: the file's shapes must not claim one (the meta-device check)."""
    torch.manual_seed(0)
    model = models.create("resnet-20").eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                module.weight.mul_((torch.rand_like(module.weight) < 0.2).float())
    sparsify(model)
    save_compressed(model, tmp_path / "resnet.pt", model_name="resnet-20")
    loaded = load_compressed(tmp_path / "resnet.pt").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_a_view_that_repeats_its_storage_is_refused_before_any_copy(saved, tmp_path):
    """torch.save keeps views: 4 bytes expanded to 4 TB would be allocated by the first copy."""
    path, _, _ = saved
    payload = torch.load(path, weights_only=True)
    del payload["digest"]   # no digest to compute either: the check comes first
    payload["state"]["fc.bias"] = torch.zeros(1).expand(10 ** 6, 10 ** 6)
    torch.save(payload, tmp_path / "expanded.pt")
    with pytest.raises(CorruptFileError, match=r"shape \(1000000, 1000000\) .* over 4 bytes of storage"):
        load_compressed(tmp_path / "expanded.pt", model=Net())


def test_metadata_and_model_kwargs_must_be_plain_values(tmp_path):
    import numpy as np
    model = Net()
    for metadata, message in (({"x": 1 + 2j}, r"metadata\['x'\] is a complex"),
                              ({"x": np.float64(3.0)}, r"metadata\['x'\] is a float64"),
                              ({"x": {1, 2}}, r"metadata\['x'\] is a set"),
                              ({("a", 1): 1}, r"metadata has a key \('a', 1\) of type tuple")):
        with pytest.raises(TypeError, match=message):
            save_compressed(model, tmp_path / "m.pt", metadata=metadata)
    with pytest.raises(TypeError, match=r"model_kwargs\['n'\] is a int64"):
        save_compressed(model, tmp_path / "m.pt", model_kwargs={"n": np.int64(3)})
    save_compressed(model, tmp_path / "m.pt", metadata={"run": "a", "scores": [1.5, None], "mask": torch.ones(2)})
    assert torch.load(tmp_path / "m.pt", weights_only=True)["metadata"]["scores"] == [1.5, None]


def test_a_compiled_model_is_stored_under_its_own_names(tmp_path):
    """torch.compile's wrapper holds the model as _orig_mod; the file keeps the model's names, so
    the plain network loads it."""
    torch.manual_seed(0)
    model = Net()
    with torch.no_grad():
        model.fc.weight.mul_((torch.rand_like(model.fc.weight) < 0.3).float())
    sparsify(model)
    path = tmp_path / "compiled.pt"
    save_compressed(torch.compile(model), path)
    loaded = load_compressed(path, Net())
    x = torch.randn(2, 2, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_loading_into_a_compiled_model_names_the_plain_one(saved):
    path, _, _ = saved
    with pytest.raises(TypeError, match=r"torch.compile wrapper; pass the plain network \(model._orig_mod\)"):
        load_compressed(path, torch.compile(Net()))


def test_a_model_name_that_does_not_build_the_model_is_refused_when_saving(tmp_path):
    """A file naming a model it does not hold could not be loaded by name later (where it read as
    corrupt): save_compressed refuses it, naming the first tensor that differs, and writes nothing."""
    net = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 4))
    path = tmp_path / "net.pt"
    with pytest.raises(ValueError, match=r"save_compressed: model_name does not describe this model: model "
                                         r"'lenet-300-100' with model_kwargs \{\} has no 0.bias, which this "
                                         r"model holds \(shape \(16,\)\)"):
        save_compressed(net, path, model_name="lenet-300-100")
    with pytest.raises(ValueError, match=r"model_kwargs \{'num_classes': 3\} has 5.bias of shape \(3,\), where this model's is \(10,\)"):
        save_compressed(models.create("lenet-300-100"), path, model_name="lenet-300-100",
                        model_kwargs={"num_classes": 3})
    assert not path.exists()
    save_compressed(models.create("lenet-300-100", num_classes=3), path, model_name="lenet-300-100",
                    model_kwargs={"num_classes": 3})
    assert load_compressed(path)[5].out_features == 3


def test_integer_values_for_a_dense_weight_are_refused_even_with_the_digest_made_again(tmp_path):
    """load_state_dict would cast them into the float weight without a word (a new-user pass
    edited a file so, resealed it, and got other outputs)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        model[2].weight.mul_((torch.rand_like(model[2].weight) < 0.2).float())
    sparsify(model)
    path = tmp_path / "m.pt"
    save_compressed(model, path)
    payload = torch.load(path, weights_only=True)
    assert "0.weight" in payload["state"]
    payload["state"]["0.weight"] = (payload["state"]["0.weight"] * 10).long()
    torch.save(resealed(payload), tmp_path / "edited.pt")
    fresh = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(CorruptFileError, match=r"entry '0.weight' holds torch.int64 values where the model's "
                                               r"tensor is torch.float32"):
        load_compressed(tmp_path / "edited.pt", model=fresh)
    payload["state"]["0.weight"] = [1.0]
    torch.save(resealed(payload), tmp_path / "edited.pt")
    with pytest.raises(CorruptFileError, match=r"entry '0.weight' is a list, not a tensor"):
        load_compressed(tmp_path / "edited.pt", model=fresh)
    loaded = load_compressed(path, model=nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)))
    x = torch.randn(5, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))   # the file as written still loads


def test_a_column_twice_in_a_row_is_refused_and_nan_values_said(saved, tmp_path):
    """Both loaded in silence: with a repeat the csr kernel summed both entries while densify()
    and ONNX kept one (the same model gave two answers); NaN values gave NaN outputs."""
    path, x, _ = saved
    payload = torch.load(path, weights_only=True)
    entry = payload["sparse"]["fc"]
    crow = entry["crow"].long()
    row = next(r for r in range(len(crow) - 1) if crow[r + 1] - crow[r] >= 2)
    col = entry["col"].clone()
    col[crow[row] + 1] = col[crow[row]]
    entry["col"] = col
    torch.save(resealed(payload), tmp_path / "repeat.pt")
    model = Net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CorruptFileError, match=rf"sparse layer 'fc': csr: col_indices must increase strictly "
                                               rf"within each row .* in row {row}"):
        load_compressed(tmp_path / "repeat.pt", model=model)
    assert isinstance(model.conv, nn.Conv2d) and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    payload = torch.load(path, weights_only=True)
    payload["sparse"]["fc"]["values"] = torch.full_like(payload["sparse"]["fc"]["values"], float("nan"))
    torch.save(resealed(payload), tmp_path / "nan.pt")
    with pytest.warns(RuntimeWarning, match=r"NaN or inf values in fc.values: the model will compute NaN"):
        load_compressed(tmp_path / "nan.pt", model=Net())
    payload = torch.load(path, weights_only=True)
    payload["sparse"]["fc"]["bias"][0] = float("inf")   # loaded without a word
    torch.save(resealed(payload), tmp_path / "inf_bias.pt")
    with pytest.warns(RuntimeWarning, match=r"NaN or inf values in fc.bias: the model will compute NaN"):
        load_compressed(tmp_path / "inf_bias.pt", model=Net())
    for key, value, expected in (("out", "10", "out must be an int >= 0, got str '10'"),
                                 ("in", -3, "in must be an int >= 0, got int -3"),
                                 ("in", True, "in must be an int >= 0, got bool True")):
        payload = torch.load(path, weights_only=True)
        payload["sparse"]["fc"][key] = value   # "can only concatenate str (not "int") to str"
        torch.save(resealed(payload), tmp_path / "edited.pt")
        with pytest.raises(CorruptFileError, match=rf"sparse layer 'fc': {expected}"):
            load_compressed(tmp_path / "edited.pt", model=Net())


def test_a_shrunk_models_file_into_the_full_architecture_says_why(tmp_path):
    """torch's bare 'size mismatch' came back, with no hint that the file holds a shrunk model."""
    import copy

    from mackay_ext import shrink

    def full():
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(8, 4)).eval()
    model = full()
    with torch.no_grad():
        model[0].weight[:5] = 0
        model[0].bias[:5] = 0
        model[4].weight[:, :5] = 0
    x = torch.randn(2, 3, 8, 8)
    small = shrink(model, (x,))
    save_compressed(small, tmp_path / "small.pt")
    with pytest.raises(RuntimeError, match=r"0.weight is \(3, 3, 3, 3\) in the file, \(8, 3, 3, 3\) in the model\. "
                                           r"A file of a shrunk model \(mackay_ext.shrink\) loads into that shrunk"):
        load_compressed(tmp_path / "small.pt", model=full())
    twin = load_compressed(tmp_path / "small.pt", model=copy.deepcopy(small))
    with torch.no_grad():
        torch.testing.assert_close(twin(x), model(x))


def test_a_bad_map_location_or_path_is_named_not_blamed_on_the_file(saved):
    """A device that does not exist here, or is not a device, failed inside torch.load and was
    reported as a corrupt file (a user would throw a good file away); 'meta' and a path that is
    not a file name gave torch's or os's own errors."""
    path, x, expected = saved
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match=r"map_location 'cuda': this torch sees 0 CUDA device"):
            load_compressed(path, Net(), map_location="cuda")
    with pytest.raises(ValueError, match="map_location 'cpux' is not a device"):
        load_compressed(path, Net(), map_location="cpux")
    with pytest.raises(TypeError, match="map_location must be a device .* got int 3"):
        load_compressed(path, Net(), map_location=3)
    with pytest.raises(ValueError, match="map_location='meta' would drop the file's values"):
        load_compressed(path, Net(), map_location="meta")
    with pytest.raises(TypeError, match=r"path must be a file name \(str or os.PathLike\), got NoneType"):
        load_compressed(None, Net())
    with pytest.raises(TypeError, match="got int"):   # not file descriptor 3
        load_compressed(3, Net())
    loaded = load_compressed(path, Net(), map_location=torch.device("cpu"))
    torch.testing.assert_close(loaded(x), expected)


def test_save_compressed_names_a_bad_argument_and_a_failed_write(saved, tmp_path, monkeypatch):
    path, x, expected = saved
    model = load_compressed(path, Net())
    with pytest.raises(TypeError, match=r"save_compressed: metadata must be a dict \(or None\), got str"):
        save_compressed(model, tmp_path / "m.pt", metadata="abc")
    with pytest.raises(TypeError, match=r"save_compressed: model_kwargs must be a dict \(or None\), got list"):
        save_compressed(model, tmp_path / "m.pt", model_kwargs=[1])
    with pytest.raises(IsADirectoryError, match="is a directory: give the name of a file"):
        save_compressed(model, tmp_path)
    before = path.read_bytes()

    def disk_full(obj, handle):   # torch's writer reports ENOSPC as a RuntimeError
        handle.write(b"part of a file")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1280 vs 1174")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match=r"could not write .*good.pt \(\[enforce fail.*is the disk full"):
        save_compressed(model, path)
    assert path.read_bytes() == before and not (tmp_path / "good.pt.tmp").exists()

    def unsavable(obj, handle):   # not the writer's error: not blamed on the disk
        raise RuntimeError("Cannot serialize a tensor of this kind")

    monkeypatch.setattr(torch, "save", unsavable)
    with pytest.raises(RuntimeError, match="^Cannot serialize a tensor of this kind$"):
        save_compressed(model, path)
    assert path.read_bytes() == before


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_a_model_loaded_by_name_comes_back_in_the_files_dtype(tmp_path, dtype):
    """Loaded by its model_name, a bfloat16 model's file came back float32 (twice the memory)."""
    torch.manual_seed(0)
    model = models.create("lenet-300-100")
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_((torch.rand_like(p) < 0.05).float())
    model = sparsify(model.to(dtype))
    save_compressed(model, tmp_path / "m.pt", model_name="lenet-300-100")
    loaded = load_compressed(tmp_path / "m.pt")
    assert {p.dtype for p in loaded.parameters()} == {dtype}
    x = torch.randn(2, 1, 28, 28, dtype=dtype)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_read_metadata_gives_what_was_saved_and_refuses_what_load_refuses(saved, tmp_path):
    """The CLI's model.pt holds the input standardisation a deployed model needs, and no public
    call returned it (a model fed raw pixels fell from 97.8% to 83.4%, with no error)."""
    path, _, _ = saved
    model = load_compressed(path, model=Net())
    standardisation = {"mean": 0.1307, "std": 0.3081, "formula": "(x - mean) / std"}
    save_compressed(model, tmp_path / "with.pt", metadata={"input_standardisation": standardisation})
    assert mackay_ext.read_metadata(tmp_path / "with.pt") == {"input_standardisation": standardisation}
    assert mackay_ext.read_metadata(path) == {}
    payload = torch.load(tmp_path / "with.pt", weights_only=True)
    payload["metadata"]["input_standardisation"]["mean"] = 0.5      # edited, digest left as it was
    torch.save(payload, tmp_path / "edited.pt")
    with pytest.raises(CorruptFileError, match="do not match the checksum"):
        mackay_ext.read_metadata(tmp_path / "edited.pt")
    torch.save({"w": torch.ones(2)}, tmp_path / "other.pt")
    with pytest.raises(RuntimeError, match=r"read_metadata: .*other.pt is not a file written by save_compressed"):
        mackay_ext.read_metadata(tmp_path / "other.pt")
