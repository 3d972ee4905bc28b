"""What an update reads of large layers in few passes (mackay_ext.alpha_stats, _validate's
all_finite / any_nan, AlphaView's fields formed when read): the same answers as the entry-wise
computations, on small tensors with the sample size made small."""
import math
import warnings

import pytest
import torch
from torch import nn

from mackay_ext import alpha_stats
from mackay_ext._validate import all_finite, any_nan
from mackay_ext.optim import MacKayAdam, ard_param_groups
from mackay_ext.pruner import MacKayPruner


def reference_quantiles(alpha: torch.Tensor) -> dict[str, float]:
    finite = alpha[torch.isfinite(alpha)].double().flatten()
    if finite.numel() == 0:
        return {}
    q = torch.quantile(finite, torch.tensor([0.0, 0.05, 0.5, 0.95, 1.0], dtype=torch.float64))
    return dict(zip(("min", "p5", "p50", "p95", "max"), (float(v) for v in q)))


def alphas(shape, pruned_share: float, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    alpha = torch.rand(shape, generator=generator).pow(3) * 1e4   # skewed, as alphas are
    alpha[torch.rand(shape, generator=generator) < pruned_share] = math.inf
    return alpha


@pytest.mark.parametrize("shape", [(7,), (3, 5), (37, 41), (300, 1), (0,)])
def test_quantiles_are_exact_up_to_twice_the_sample(shape):
    alpha = alphas(shape, 0.3)
    assert alpha_stats.quantiles(alpha) == pytest.approx(reference_quantiles(alpha), rel=1e-12)


@pytest.mark.parametrize("shape", [(64, 160), (160, 64), (10_240, 1), (8, 10, 128)])
def test_quantiles_of_a_large_layer_come_from_a_spread_sample_with_exact_extremes(monkeypatch, shape):
    monkeypatch.setattr(alpha_stats, "QUANTILE_SAMPLE", 1024)
    monkeypatch.setattr(alpha_stats, "CHUNK", 1000)   # several chunks, the last one short
    alpha = alphas(shape, 0.4)
    got, expected = alpha_stats.quantiles(alpha), reference_quantiles(alpha)
    assert got["min"] == expected["min"] and got["max"] == expected["max"]
    finite = alpha[torch.isfinite(alpha)].double()
    for key, share in (("p5", 0.05), ("p50", 0.5), ("p95", 0.95)):
        rank = float((finite <= got[key]).double().mean())   # where the sampled value stands in all
        assert abs(rank - share) < 0.04, (key, rank)


def test_a_sample_that_skips_columns_would_read_the_wrong_quantiles(monkeypatch):
    """Columns of very different alpha (inputs that matter and inputs that do not): a stride
    dividing the row length would read the same few columns of every row."""
    monkeypatch.setattr(alpha_stats, "QUANTILE_SAMPLE", 256)
    alpha = torch.ones(64, 128)
    alpha[:, 1::2] = 1000.0   # every odd column
    got = alpha_stats.quantiles(alpha)
    assert got["p5"] == 1.0 and got["p95"] == 1000.0


def test_a_layer_nearly_all_pruned_reads_every_finite_alpha(monkeypatch):
    monkeypatch.setattr(alpha_stats, "QUANTILE_SAMPLE", 1024)
    alpha = torch.full((100, 100), math.inf)
    alpha.view(-1)[torch.randperm(10_000, generator=torch.Generator().manual_seed(1))[:37]] = \
        torch.arange(1.0, 38.0)
    assert alpha_stats.quantiles(alpha) == pytest.approx(reference_quantiles(alpha), rel=1e-12)
    assert alpha_stats.quantiles(torch.full((100, 100), math.inf)) == {}


def test_quantiles_set_nan_and_minus_inf_aside_as_the_entrywise_reading_does(monkeypatch):
    monkeypatch.setattr(alpha_stats, "QUANTILE_SAMPLE", 1024)
    alpha = alphas((90, 91), 0.2)
    alpha[3, 4], alpha[50, 7], alpha[89, 90] = float("nan"), -math.inf, -math.inf
    got, expected = alpha_stats.quantiles(alpha), reference_quantiles(alpha)
    assert got["min"] == expected["min"] and got["max"] == expected["max"]
    assert all(math.isfinite(value) for value in got.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_all_finite_and_any_nan_agree_with_the_entrywise_tests(dtype):
    big = torch.finfo(dtype).max
    cases = [torch.randn(5, 7), torch.empty(0), torch.tensor([1.0, math.inf]), torch.tensor([1.0, -math.inf]),
             torch.tensor([math.inf, -math.inf]), torch.tensor([2.0, math.nan]),
             torch.randn(4, 6).t()]            # not contiguous
    cases = [case.to(dtype) for case in cases] + [torch.full((3,), big, dtype=dtype)]   # finite; its sum overflows
    for tensor in cases:
        assert all_finite(tensor) == bool(torch.isfinite(tensor).all()), tensor
        assert any_nan(tensor) == bool(torch.isnan(tensor).any()), tensor


def test_mackay_adams_pruner_holds_no_per_weight_copy_of_alpha_it_does_not_read():
    """Under MacKayAdam (whose fused step reads alpha itself) a pruner's view of alpha holds the
    pruned mask alone: alpha read as 0 where pruned and the weight-dtype mask are formed when
    a foreign optimizer's step first asks for them (they were 8 bytes a weight for nothing)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 4))
    optimizer = MacKayAdam(ard_param_groups(model), num_data=640, batch_size=8)
    pruner = MacKayPruner(model, optimizer, num_data=640)
    x, y = torch.randn(64, 20), torch.randint(0, 4, (64,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for update in range(3):
            for batch in range(8):
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(x[batch::8]), y[batch::8]).backward()
                optimizer.step()
            pruner.update(prune=update > 0)
    views = [pruner._alpha_view(name) for name in pruner.targets]
    assert any(view.any_pruned for view in views)
    assert all({"keep", "finite", "any_prior"}.isdisjoint(vars(view)) for view in views)
    view = views[0]   # read when asked, and right
    alpha = pruner.alpha(next(iter(pruner.targets)))
    assert torch.equal(view.keep, (alpha != math.inf).float())
    assert torch.equal(view.finite, torch.where(alpha == math.inf, torch.zeros_like(alpha), alpha))
    assert view.any_prior


def test_kept_counts_follow_alpha_at_every_granularity():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 5))
    optimizer = torch.optim.Adam(model.parameters())
    for granularity in ("weight", "input", "output", "filter"):
        pruner = MacKayPruner(model, optimizer, num_data=100, batch_size=10, granularity=granularity)
        for name, target in pruner.targets.items():
            alpha = pruner.alpha(name)
            alpha.fill_(1.0)
            alpha.view(-1)[::3] = math.inf
            expected = int((alpha != math.inf).expand_as(target.param).sum())
            layer = next(entry for entry in pruner.report()["layers"] if entry["name"] == name)
            assert (layer["kept"], layer["groups_kept"]) == (expected, int((alpha != math.inf).sum()))
        pruner.detach()
