"""transformers' Conv1D (GPT-2's projections: a Linear whose weight is stored (in, out)) takes the
grouped granularities as nn.Linear does, its groups read along the transposed axes (it fell back
to one alpha per weight, with a warning, so a GPT-2 had no structured ARD but granularity='channel')."""
import warnings

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

from mackay_ext.optim import MacKayAdam, ard_param_groups  # noqa: E402
from mackay_ext.pruner import MacKayPruner  # noqa: E402


class Net(nn.Module):
    """x -> first -> tanh -> second, with both layers nn.Linear or Conv1D, the same function."""

    def __init__(self, transposed: bool):
        super().__init__()
        torch.manual_seed(0)
        linear = [nn.Linear(7, 9).double(), nn.Linear(9, 3).double()]
        if not transposed:
            self.first, self.second = linear
            return
        self.first, self.second = Conv1D(9, 7).double(), Conv1D(3, 9).double()
        with torch.no_grad():
            for conv, lin in zip((self.first, self.second), linear):
                conv.weight.copy_(lin.weight.t())
                conv.bias.copy_(lin.bias)

    def forward(self, x):
        return self.second(torch.tanh(self.first(x)))


def _run(transposed: bool, granularity: str):
    model = Net(transposed)
    optimizer = MacKayAdam(ard_param_groups(model), lr=1e-2, num_data=640, batch_size=8)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*does not apply to")   # no fall-back to per-weight ARD
        pruner = MacKayPruner(model, optimizer, num_data=640, granularity=granularity, threshold=0.3)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(64, 7, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (64,), generator=generator)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for update in range(3):
            for batch in range(8):
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(x[batch::8]), y[batch::8]).backward()
                optimizer.step()
            pruner.update(prune=update > 0)
    return model, pruner


@pytest.mark.parametrize("granularity", ["input", "output", "filter"])
def test_conv1d_groups_are_those_of_the_linear_it_stores_transposed(granularity):
    linear_model, linear = _run(False, granularity)
    conv_model, conv = _run(True, granularity)
    for name in ("first", "second"):
        expected = linear.alpha(name)
        got = conv.alpha(name)
        assert got.shape == expected.t().shape
        torch.testing.assert_close(got, expected.t(), rtol=1e-6, atol=0)
        weight = conv_model.get_submodule(name).weight
        torch.testing.assert_close(weight, linear_model.get_submodule(name).weight.t(), rtol=1e-6, atol=1e-12)
    assert conv.report()["kept"] == linear.report()["kept"] < conv.report()["total"]   # some groups went


def test_mac_price_counts_a_conv1ds_multiply_adds_as_the_linears():
    """mac_price refused every Conv1D ('cannot count the MACs'); a hidden unit's incoming
    column and outgoing row now cost what the Linear network's row and column do."""
    from mackay_ext.mac_price import FreedMacs, weight_uses
    x = torch.randn(4, 5, 7, dtype=torch.float64)   # 5 positions an example
    models = {transposed: Net(transposed) for transposed in (False, True)}
    uses = {transposed: weight_uses(model, x) for transposed, model in models.items()}
    for name in ("first", "second"):
        linear, conv = (id(models[t].get_submodule(name).weight) for t in (False, True))
        assert uses[True][conv] == uses[False][linear] == 5.0
    freed = {t: FreedMacs(models[t], x, uses[t]) for t in models}
    linear = freed[False].group_macs(models[False].second.weight, torch.ones(1, 9))   # per input unit
    conv = freed[True].group_macs(models[True].second.weight, torch.ones(9, 1))
    torch.testing.assert_close(conv, linear.t())
    assert float(conv[0, 0]) == 5.0 * (3 + 7)   # its row in second and its column in first, 5 times
