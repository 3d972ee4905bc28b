"""The issue's end-to-end path on its seven test models, with the groups chosen by channel ARD
itself rather than zeroed by hand (test_shrink.py does that): MacKayPruner(granularity="channel")
trains a few steps on random data with a threshold that prunes, then shrink gives a plain, smaller
model whose outputs equal the pruned model's (float64, relative 1e-10), which torch.export serves
at another batch size and onnxruntime runs."""
import math

import pytest
import torch
import torch.nn.functional as F

import mackay_ext
from mackay_ext.pruner import MacKayPruner

from test_shrink import MODELS, assert_equal_outputs, assert_exports, build, logits, to_double

STEPS_PER_UPDATE = 3


def random_batches(inputs, count, seed):
    """`count` batches shaped like `inputs`: token ids stay ids below the largest one seen."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        batch = []
        for t in inputs:
            if t.is_floating_point():
                batch.append(torch.randn(t.shape, generator=generator, dtype=t.dtype))
            else:
                batch.append(torch.randint(0, int(t.max()) + 1, t.shape, generator=generator))
        batches.append(tuple(batch))
    return batches


@pytest.mark.parametrize("name", MODELS)
def test_channel_ard_prunes_then_shrinks_to_an_equal_exportable_model(name):
    model, inputs = to_double(*build(name))
    model.train()
    batches = random_batches(inputs, 3 * STEPS_PER_UPDATE, seed=1)
    with torch.no_grad():
        targets = [torch.randn_like(logits(model, b)) for b in batches]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    # a threshold far above any group's SNR prunes whatever the evidence allows; the cap keeps
    # half of each layer's groups per update, so every layer keeps channels to shrink to
    pruner = MacKayPruner(model, optimizer, num_data=64, granularity="channel", example_inputs=inputs,
                          batch_size=len(inputs[0]), threshold=1e6, max_prune_fraction=0.5)

    def train(first, count):
        for batch, target in zip(batches[first:first + count], targets[first:first + count]):
            optimizer.zero_grad()
            F.mse_loss(logits(model, batch), target).backward()
            optimizer.step()

    train(0, STEPS_PER_UPDATE)
    assert pruner.update()["channel"]["warmup"]          # the first update only moves alpha
    train(STEPS_PER_UPDATE, STEPS_PER_UPDATE)
    pruner.update()
    groups = pruner.channel.groups
    pruned = [g for g, alpha in zip(groups, pruner.channel.alpha) if alpha == math.inf]
    assert 0 < len(pruned) < len(groups), name
    train(2 * STEPS_PER_UPDATE, STEPS_PER_UPDATE)      # pruned groups stay exactly 0 under training
    assert all(g.is_zero(model) for g in pruned)

    pruner.detach()
    model.eval()
    with torch.no_grad():
        expected = logits(model, inputs)
    small, report = mackay_ext.shrink(model, inputs, report=True)
    assert len(report.removed) + len(report.kept_zero) == len(pruned)
    assert report.removed, name
    assert sum(p.numel() for p in small.parameters()) == report.params_after < report.params_before
    assert report.macs_after < report.macs_before
    assert all(type(m).__module__.split(".")[0] != "mackay_ext" for m in small.modules())
    with torch.no_grad():
        assert_equal_outputs(expected, logits(small, inputs))
    assert_exports(small, inputs)
