"""ef-exact at the kept weights only: once a pruner has pruned most of a Linear layer, the
accumulator adds the squared per-example gradients at the weights still kept (sq_sddmm_accumulate_)
instead of the whole layer. The curvature at kept weights must equal the dense estimate, read 0 at
pruned ones, follow every change of the alphas (in place, by the update kernel, or a new tensor),
and leave MacKayPruner's updates as they were without it."""
import copy
import math

import pytest
import torch
from torch import nn

from mackay_ext import MacKayAdam, MacKayPruner, ard_param_groups, kept_pattern, ops
from mackay_ext.curvature import FisherAccumulator

B = 9


def net(dtype=torch.float64):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(40, 30), nn.Tanh(), nn.Linear(30, 7)).to(dtype)


def backward(model, seed=1, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 40, generator=generator, dtype=dtype)
    y = torch.randint(0, 7, (B,), generator=generator)
    nn.functional.cross_entropy(model(x), y).backward()


def alphas_pruning(model, fraction, seed=0):
    """Alphas of both weights with `fraction` of the entries at +inf (weights zeroed there)."""
    generator = torch.Generator().manual_seed(seed)
    alphas = {}
    with torch.no_grad():
        for layer in (model[0], model[2]):
            pruned = torch.rand(layer.weight.shape, generator=generator) < fraction
            alphas[layer.weight] = torch.ones_like(layer.weight).masked_fill_(pruned, math.inf)
            layer.weight.masked_fill_(pruned, 0)
    return alphas


def dense_twin(model):
    """A copy of `model` with an accumulator that knows no alphas: the dense estimate to compare with."""
    twin = copy.deepcopy(model)
    return twin, FisherAccumulator(twin)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("fraction", [0.98, 0.5, 0.0])
def test_kept_weights_match_the_dense_estimate_and_pruned_read_zero(dtype, fraction):
    model = net(dtype)
    alphas = alphas_pruning(model, fraction)
    dense_model, dense = dense_twin(model)
    sparse = FisherAccumulator(model, alpha_of=alphas.get)
    for seed in (1, 2):
        with sparse, dense:
            backward(model, seed, dtype)
            backward(dense_model, seed, dtype)
    for layer, dense_layer in ((model[0], dense_model[0]), (model[2], dense_model[2])):
        kept = alphas[layer.weight] != math.inf
        expected = dense.curvature(dense_layer.weight)
        got = sparse.curvature(layer.weight)
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(got[kept], expected[kept], rtol=tol, atol=tol)
        assert bool((got[~kept] == 0).all())
        # below the line the sparse kernel ran; above it the dense one
        assert sparse._kept[layer.weight].sparse == (int(kept.sum()) <= kept_pattern.MAX_SPARSE_DENSITY * kept.numel())
        torch.testing.assert_close(sparse.curvature(layer.bias), dense.curvature(dense_layer.bias))


def test_the_pattern_follows_every_change_of_the_alphas():
    model = net()
    alphas = alphas_pruning(model, 0.97)
    weight = model[0].weight
    accumulator = FisherAccumulator(model, alpha_of=alphas.get)
    with accumulator:
        backward(model)
    first = accumulator._kept[weight]
    kept_before = int(first.kept.sum())
    with accumulator:   # unchanged alphas: the cached pattern is reused
        backward(model)
    assert accumulator._kept[weight] is first
    with torch.no_grad():   # in place: more pruned
        alphas[weight].masked_fill_(torch.arange(weight.numel()).view_as(weight) % 2 == 0, math.inf)
    with accumulator:
        backward(model)
    assert int(accumulator._kept[weight].kept.sum()) < kept_before
    # by the update kernel (it writes below autograd; mackay_ext.ops advances the version)
    curvature = torch.full_like(weight, 1e-12)
    ops.mackay_update_(weight.detach(), curvature, alphas[weight], num_data=10.0, threshold=1e-3)
    with accumulator:
        backward(model)
    assert int(accumulator._kept[weight].kept.sum()) == int((alphas[weight] != math.inf).sum())
    alphas[weight] = torch.ones_like(weight)   # a new tensor: nothing pruned any more
    accumulator.reset()
    dense_model, dense = dense_twin(model)
    with accumulator, dense:
        backward(model)
        backward(dense_model)
    assert not accumulator._kept[weight].sparse
    torch.testing.assert_close(accumulator.curvature(weight), dense.curvature(dense_model[0].weight))


def test_weights_kept_again_restart_the_layer_sum():
    # alphas rolled back between two resets (weights pruned, then kept again): the kept-again
    # weights missed the earlier batches' squares, so the layer's estimate restarts, and says so
    model = net()
    alphas = alphas_pruning(model, 0.98)
    weight = model[0].weight
    accumulator = FisherAccumulator(model, alpha_of=alphas.get)
    with accumulator:
        backward(model, seed=1)
    alphas[weight] = torch.ones_like(weight)   # nothing pruned any more (the weights stay 0)
    dense_model, dense = dense_twin(model)
    with accumulator, dense, pytest.warns(RuntimeWarning, match="restarts from this batch"):
        backward(model, seed=2)
        backward(dense_model, seed=2)
    assert accumulator.counts[weight] == B
    torch.testing.assert_close(accumulator.curvature(weight), dense.curvature(dense_model[0].weight))


def run_pruner(restrict: bool):
    model = net()
    optimizer = MacKayAdam(ard_param_groups(model), lr=1e-2, num_data=200, batch_size=B)
    pruner = MacKayPruner(model, optimizer, num_data=200, curvature="ef-exact")
    if not restrict:
        pruner.accumulator.alpha_of = None
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name in pruner.targets:
            weight = pruner.weight(name)
            pruned = torch.rand(weight.shape, generator=generator) < 0.9
            pruner.alpha(name).copy_(torch.ones_like(weight).masked_fill_(pruned, math.inf))
            weight.masked_fill_(pruned, 0)
    reports = []
    for step in range(12):
        optimizer.zero_grad()
        backward(model, seed=step)
        optimizer.step()
        if step % 4 == 3:
            reports.append(pruner.update())
    return pruner, reports


def test_pruner_updates_are_the_same_as_with_the_dense_estimate():
    restricted, reports = run_pruner(restrict=True)
    full, full_reports = run_pruner(restrict=False)
    assert any(restricted.accumulator._kept[restricted.weight(n)].sparse for n in restricted.targets)
    for name in restricted.targets:
        a, b = restricted.alpha(name), full.alpha(name)
        assert torch.equal(a == math.inf, b == math.inf)
        torch.testing.assert_close(a[a != math.inf], b[b != math.inf], rtol=1e-9, atol=0)
        torch.testing.assert_close(restricted.weight(name), full.weight(name), rtol=1e-9, atol=1e-12)
    assert [r["kept"] for r in reports] == [r["kept"] for r in full_reports]
