"""N and B counting the values a loss averages over (README 'Regression': MSE over B examples x K
outputs, num_data=N*K, batch_size=B*K; a token-level loss: label tokens): the same objective as
the sum over the values and the mean over the examples with N and B. ef-exact squares each row's
gradient, and read the first convention's curvature K times too small (a new user's 6-output
regression kept 151 weights where ef-batch kept 299). Both conventions now give the same N h."""
import re
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from mackay_ext import MacKayAdam, MacKayPruner, ard_param_groups

EXAMPLES, BATCH, OUTPUTS = 96, 16, 6


def _n_h(values_counted, fused=False, curvature="ef-exact", last_batch=BATCH):
    """num_data x the curvature of the output layer after one epoch at lr 0, under either
    convention; `last_batch` shortens the epoch's last batch."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(EXAMPLES, 5, generator=generator, dtype=torch.float64)
    y = x @ torch.randn(5, OUTPUTS, generator=generator, dtype=torch.float64)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, OUTPUTS)).double()
    scale = OUTPUTS if values_counted else 1
    num_data, batch_size = EXAMPLES * scale, BATCH * scale
    if fused:
        optimizer = MacKayAdam(ard_param_groups(model), lr=0.0, num_data=num_data, batch_size=batch_size)
        pruner = MacKayPruner(model, optimizer, num_data=num_data, curvature=curvature)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        pruner = MacKayPruner(model, optimizer, num_data=num_data, batch_size=batch_size, curvature=curvature)
    ends = list(range(BATCH, EXAMPLES, BATCH)) + [EXAMPLES - BATCH + last_batch]
    start = 0
    for end in ends:
        optimizer.zero_grad()
        out = model(x[start:end])
        loss = (F.mse_loss(out, y[start:end]) if values_counted
                else (out - y[start:end]).square().sum(1).mean())
        loss.backward()
        optimizer.step()
        start = end
    values = pruner._values_per_example() if curvature == "ef-exact" else 1.0   # (ef-batch reads B itself)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner.update(prune=False)
    return num_data * pruner.curvature_estimate("2"), values


@pytest.mark.parametrize("fused", [False, True], ids=["torch-optimizer", "MacKayAdam"])
@pytest.mark.parametrize("curvature", ["ef-exact", "ef-batch"])
def test_both_conventions_read_the_same_curvature(fused, curvature):
    (values_counted, k), (examples_counted, one) = _n_h(True, fused, curvature), _n_h(False, fused, curvature)
    torch.testing.assert_close(values_counted, examples_counted, rtol=1e-9, atol=0)
    assert (k, one) == ((OUTPUTS, 1.0) if curvature == "ef-exact" else (1.0, 1.0))


def test_a_short_last_batch_scales_nothing():
    """B = the batch and an epoch's short last batch: a full step's examples are B, no K (read off
    the mean step, 72 examples in batches of 64 and 8 gave K = 1.8, the curvature 1.8x too large)."""
    assert _n_h(False, last_batch=BATCH // 2)[1] == 1.0
    assert _n_h(True, last_batch=BATCH // 2)[1] == OUTPUTS
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    pruner = MacKayPruner(model, optimizer, num_data=72, batch_size=64, curvature="ef-exact")
    for x in torch.randn(72, 12).split(64):
        optimizer.zero_grad()
        F.cross_entropy(model(x), x[:, :3].argmax(1)).backward()
        optimizer.step()
    assert pruner._values_per_example() == 1.0


@pytest.mark.parametrize("batch_size, said", [
    (16, None), (None, None),
    (96, r"batch_size=96 is 6x the examples ef-exact read in a step \(16: .*reads 6 values.*If each row is one "
         r"example, pass batch_size=16"),
    (4, r"read 16 examples \(rows of the layers' inputs\) in a step where batch_size=4.*examples_of_rows.*"
        r"several backward passes.*If the rows are the step.s examples, pass batch_size=16")])
def test_a_batch_size_other_than_the_rows_is_said_once(batch_size, said):
    """ef-exact reads a step's rows as its examples: a batch_size above them is read as K values
    a row (right for a regression's outputs; off by 2x, the curvature read 2x, no word), one
    below them means rows that are no examples (a Linear on a PackedSequence's data: 3.0x the
    per-utterance curvature, no word) or a wrong batch_size. Said once, at the first update;
    no batch_size given says nothing."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    pruner = MacKayPruner(model, optimizer, num_data=960, batch_size=batch_size, curvature="ef-exact")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            for _ in range(3):
                x = torch.randn(16, 5)
                optimizer.zero_grad()
                F.cross_entropy(model(x), x[:, :3].argmax(1)).backward()
                optimizer.step()
            pruner.update(prune=False)
    messages = [str(w.message) for w in caught if "examples ef-exact read" in str(w.message)
                or "rows of the layers' inputs" in str(w.message)]
    if said is None:
        assert messages == []
    else:
        assert len(messages) == 1 and re.search(said, messages[0]), messages
