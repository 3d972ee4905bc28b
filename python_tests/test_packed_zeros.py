"""Mostly-zero dense tensors in a save_compressed file (mackay_ext.packed_zeros): the round trip
is exact (NaN and inf included; a negative zero loads as +0) in every floating dtype, at densities
from none to all, by positions and by bitmask; a pruned LSTM / embedding / Conv1d model (no sparse
form) writes a file smaller than its dense state_dict and loads equal; a tied tensor is packed
once; a file from before packing loads; edited packed entries are refused, before anything of
their size is allocated."""
import math

import pytest
import torch
from torch import nn

from mackay_ext import load_compressed, save_compressed
from mackay_ext._files import CorruptFileError
from mackay_ext.packed_zeros import MIN_NUMEL, pack, unpack

from test_refusals import resealed

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def sparse_tensor(shape, density, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(shape, generator=generator, dtype=torch.float64)
    return (values * (torch.rand(shape, generator=generator) < density)).to(dtype)


def same_values(a, b):
    """Equal shape, dtype and values, NaN equal to NaN (-0 equals +0)."""
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.isnan(), b.isnan()) \
        and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("density", [0.0, 0.004, 0.05, 0.3, 0.6])
@pytest.mark.parametrize("shape", [(257,), (31, 17), (4, 5, 3, 7), (1000, 3)], ids=str)
def test_round_trip_is_exact(dtype, density, shape):
    tensor = sparse_tensor(shape, density, dtype)
    entry = pack(tensor)
    size = tensor.numel() * tensor.element_size()
    if entry is None:   # only where packing would not save a tenth
        assert density >= 0.3
        return
    assert ("positions" in entry) != ("mask" in entry)
    stored = entry["values"].numel() * entry["values"].element_size() + sum(
        entry[k].numel() * entry[k].element_size() for k in ("positions", "mask") if k in entry)
    assert stored <= 0.9 * size
    assert same_values(unpack(entry, "w", "f.pt", shape), tensor)


def test_both_forms_are_chosen_where_smaller():
    assert "positions" in pack(sparse_tensor((100, 100), 0.01, torch.float32))
    assert "mask" in pack(sparse_tensor((100, 100), 0.3, torch.float32))
    assert pack(sparse_tensor((100, 100), 0.95, torch.float32)) is None
    assert pack(torch.zeros(MIN_NUMEL - 1)) is None
    assert pack(torch.zeros(300, dtype=torch.int64)) is None   # integers (counters) stay whole


def test_nan_and_inf_survive_and_a_negative_zero_is_a_zero():
    tensor = torch.zeros(400)
    tensor[[3, 50, 51, 399]] = torch.tensor([-0.0, math.nan, -math.inf, 2.5])
    entry = pack(tensor)
    assert entry is not None and entry["values"].numel() == 3
    assert same_values(unpack(entry, "w", "f.pt", (400,)), tensor)


def test_a_non_contiguous_tensor_packs_its_values_in_order():
    tensor = sparse_tensor((40, 30), 0.05, torch.float32).t()
    assert torch.equal(unpack(pack(tensor), "w", "f.pt", (30, 40)), tensor)


class TextModel(nn.Module):
    """Embedding -> LSTM -> Conv1d -> Linear tied to nothing, and a head tied to the embedding."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(50, 16)
        self.lstm = nn.LSTM(16, 32, batch_first=True)
        self.conv = nn.Conv1d(32, 16, 3, padding=1)
        self.head = nn.Linear(16, 50, bias=False)
        self.head.weight = self.embedding.weight

    def forward(self, tokens):
        hidden, _ = self.lstm(self.embedding(tokens))
        return self.head(torch.relu(self.conv(hidden.transpose(1, 2))).transpose(1, 2))


def pruned_text_model(keep=0.2):
    torch.manual_seed(0)
    model = TextModel()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 or name == "conv.weight":
                p.mul_((torch.rand_like(p) < keep).float())
    return model


def test_a_pruned_lstm_embedding_conv1d_model_writes_a_smaller_file_and_loads_equal(tmp_path):
    model = pruned_text_model()
    tokens = torch.randint(0, 50, (3, 11))
    with torch.no_grad():
        expected = model(tokens)
    sizes = save_compressed(model, tmp_path / "m.pt")
    # a new user's LSTM at 71% zeros wrote a file larger than the dense state_dict
    assert sizes["bytes"] < 0.5 * sizes["dense_bytes"]
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    assert {"embedding.weight", "lstm.weight_ih_l0", "lstm.weight_hh_l0", "conv.weight"} <= set(payload["packed"])
    assert payload["packed"]["head.weight"] == {"same_as": "embedding.weight"}   # the tie: packed once
    loaded = load_compressed(tmp_path / "m.pt", model=TextModel())
    assert loaded.head.weight is loaded.embedding.weight
    with torch.no_grad():
        assert torch.equal(loaded(tokens), expected)
    for key, value in model.state_dict().items():
        assert same_values(loaded.state_dict()[key], value), key


def test_a_file_from_before_packing_loads(tmp_path):
    model = pruned_text_model(keep=1.0)
    save_compressed(model, tmp_path / "m.pt")
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    assert payload.pop("packed") == {}
    torch.save(resealed(payload), tmp_path / "old.pt")
    loaded = load_compressed(tmp_path / "old.pt", model=TextModel())
    assert torch.equal(loaded.lstm.weight_hh_l0, model.lstm.weight_hh_l0)


def test_only_a_file_with_packed_tensors_is_written_as_v2_and_a_newer_format_says_upgrade(tmp_path):
    """A mackay_ext from before packing refuses a v2 file as not its format (it read a v1 file with
    packed tensors as a model missing them); a file without any stays v1, which it reads."""
    save_compressed(pruned_text_model(keep=1.0), tmp_path / "dense.pt")
    save_compressed(pruned_text_model(), tmp_path / "packed.pt")
    assert torch.load(tmp_path / "dense.pt", weights_only=True)["format"] == "mackay_ext.compressed.v1"
    payload = torch.load(tmp_path / "packed.pt", weights_only=True)
    assert payload["format"] == "mackay_ext.compressed.v2"
    torch.save(resealed(dict(payload, format="mackay_ext.compressed.v1")), tmp_path / "v1_packed.pt")
    loaded = load_compressed(tmp_path / "v1_packed.pt", model=TextModel())   # written between the two
    assert torch.equal(loaded.conv.weight, pruned_text_model().conv.weight)
    torch.save(resealed(dict(payload, format="mackay_ext.compressed.v3")), tmp_path / "v3.pt")
    with pytest.raises(RuntimeError, match=r"written by a newer mackay_ext \(format 'v3'; this one reads v1 and v2\)"):
        load_compressed(tmp_path / "v3.pt", model=TextModel())


@pytest.mark.parametrize("edit, error, match", [
    (lambda p: p["packed"]["conv.weight"].update(shape=[16, 32, 10 ** 6]), RuntimeError,
     r"does not match the file: conv.weight is \(16, 32, 1000000\) in the file, \(16, 32, 3\) in the model"),
    (lambda p: p["packed"]["conv.weight"].update(shape="big"), CorruptFileError, "shape must be a list of ints"),
    (lambda p: p["packed"]["lstm.weight_hh_l0"].update(values=torch.zeros(3, dtype=torch.int64)),
     CorruptFileError, "values must be a 1-D floating tensor"),
    (lambda p: p["packed"]["embedding.weight"].pop("values"), CorruptFileError, "incomplete"),
    (lambda p: p["packed"].update(bogus={"same_as": "nowhere"}), RuntimeError, "the model has no bogus"),
    (lambda p: p["packed"]["head.weight"].update(same_as="conv.bias"), CorruptFileError,
     "names no packed tensor it is the same as"),
    (lambda p: p["state"].update({"conv.weight": torch.zeros(16, 32, 3)}), CorruptFileError,
     "stored both whole and packed"),
    (lambda p: p.update(packed=[1, 2]), CorruptFileError, "packed tensors are a list"),
])
def test_edited_packed_entries_are_refused(tmp_path, edit, error, match):
    save_compressed(pruned_text_model(), tmp_path / "m.pt")
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    edit(payload)
    torch.save(resealed(payload), tmp_path / "edited.pt")
    with pytest.raises(error, match=match):
        load_compressed(tmp_path / "edited.pt", model=TextModel())


def test_edited_positions_and_masks_are_refused():
    sparse = sparse_tensor((50, 40), 0.01, torch.float32)
    moderate = sparse_tensor((50, 40), 0.3, torch.float32)
    by_position, by_mask = pack(sparse), pack(moderate)
    assert "positions" in by_position and "mask" in by_mask
    bad = [dict(by_position, positions=by_position["positions"].flip(0)),                    # not increasing
           dict(by_position, positions=by_position["positions"] + 2000),                     # outside
           dict(by_position, positions=by_position["positions"][:-1]),                       # one short
           dict(by_position, positions=by_position["positions"].float()),                    # not integers
           dict(by_mask, mask=by_mask["mask"][:-1]),                                         # short
           dict(by_mask, mask=by_mask["mask"] | 1),                                          # more marked
           dict(by_mask, mask=by_mask["mask"].to(torch.int32)),                              # not bytes
           dict(by_mask, positions=by_position["positions"])]                                # both forms
    for entry in bad:
        with pytest.raises(CorruptFileError, match="packed tensor 'w'"):
            unpack(entry, "w", "f.pt", (50, 40))
