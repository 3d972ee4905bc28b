"""fisher-mc from the training forward: capture_mc() records the forward, accumulate_mc_from(logits)
adds the squared per-example gradients of labels sampled from those logits, before the training
backward, which then gives the gradient it gives without them."""

import warnings

import pytest
import torch
from test_curvature_paths import InPlaceHead, ReusedConv
from torch import nn
from torch.func import functional_call, grad, vmap

from mackay_ext import MacKayAdam, MacKayPruner, ard_param_groups
from mackay_ext.curvature import FisherAccumulator

MODELS = {   # name -> (model, input shape, classes)
    "mlp": (lambda: nn.Sequential(nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 4)), (8, 7)),
    "conv": (lambda: nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 5 * 4, 4)), (8, 2, 7, 6)),
    "in-place": (InPlaceHead, (8, 2, 7, 6)),
    "reused-conv": (ReusedConv, (8, 4, 6)),
}


def sampled_squares(model, x, labels):
    """sum_n (d -log p(y_n | x_n) / d theta)^2 by vmap(grad), the reference."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    per_example = vmap(grad(lambda p, xi, yi: nn.functional.cross_entropy(
        functional_call(model, p, (xi[None],)), yi[None], reduction="sum")), in_dims=(None, 0, 0))(params, x, labels)
    return {name: (g ** 2).sum(0) for name, g in per_example.items()}


@pytest.mark.parametrize("samples", [1, 3])
@pytest.mark.parametrize("name", list(MODELS))
def test_captured_forward_gives_the_sampled_fisher_and_leaves_training_alone(name, samples):
    factory, shape = MODELS[name]
    torch.manual_seed(0)
    model = factory().double()
    x = torch.randn(shape, dtype=torch.float64)
    y = torch.randint(0, 3, (shape[0],))
    plain = {}
    nn.functional.cross_entropy(model(x), y).backward()
    for n, p in model.named_parameters():
        plain[n], p.grad = p.grad.clone(), None

    acc = FisherAccumulator(model, mode="fisher-mc")
    with acc.capture_mc():
        logits = model(x)
    loss = nn.functional.cross_entropy(logits, y)
    torch.manual_seed(1)
    acc.accumulate_mc_from(logits, num_samples=samples)
    assert all(p.grad is None for p in model.parameters())
    loss.backward()   # the retained graph: the training gradient as without the sampled Fisher
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[n], rtol=1e-12, atol=1e-14)

    torch.manual_seed(1)   # the same draws, one per sample
    expected = None
    for _ in range(samples):
        with torch.no_grad():
            labels = torch.multinomial(torch.softmax(logits.detach().float(), 1), 1).squeeze(1)
        squares = sampled_squares(model, x, labels)
        expected = squares if expected is None else {k: expected[k] + squares[k] for k in squares}
    for n, p in model.named_parameters():
        assert acc.counts[p] == samples * shape[0]
        torch.testing.assert_close(acc.sums[p], expected[n], rtol=1e-9, atol=1e-12)


def test_accumulate_mc_from_needs_its_captured_forward():
    model = nn.Sequential(nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 4))
    x = torch.randn(4, 7)
    acc = FisherAccumulator(model, mode="fisher-mc")
    with pytest.raises(RuntimeError, match="no forward was captured"):
        acc.accumulate_mc_from(model(x))
    with acc.capture_mc(), torch.no_grad():
        logits = model(x)
    with pytest.raises(RuntimeError, match="no forward was captured"):
        acc.accumulate_mc_from(logits)
    with acc.capture_mc():
        logits = model(x)
    with pytest.raises(ValueError, match="must return logits"):
        acc.accumulate_mc_from(logits[:, :, None])
    with pytest.raises(RuntimeError, match="mode='fisher-mc'"), FisherAccumulator(model).capture_mc():
        pass
    assert acc.num_examples == 0
    with pytest.raises(ZeroDivisionError), acc.capture_mc():   # a forward that fails half-way
        model[0](x)
        raise ZeroDivisionError
    with pytest.raises(RuntimeError, match="no forward was captured"):
        acc.accumulate_mc_from(logits)


def test_one_output_column_is_refused_and_two_logits_make_a_binary_classifier():
    """softmax over one column is 1: a regression output (or a single logit) would give a Fisher
    of 0 everywhere, and MacKay's rule would prune the network for want of curvature."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    x = torch.randn(16, 4, dtype=torch.float64)
    acc = FisherAccumulator(model, mode="fisher-mc")
    with acc.capture_mc():
        z = model(x)
    with pytest.raises(ValueError, match=r"1 \(shape \(16, 1\)\).*ef-batch.*torch.cat"):
        acc.accumulate_mc_from(z)
    with pytest.raises(ValueError, match="categorical likelihood"):
        acc.accumulate_mc(x)
    assert acc.num_examples == 0
    # the binary classifier the message suggests: the Bernoulli likelihood of sigmoid(z)
    with acc.capture_mc():
        z = model(x)
    torch.manual_seed(1)
    acc.accumulate_mc_from(torch.cat([torch.zeros_like(z), z], 1))
    torch.manual_seed(1)
    p = torch.sigmoid(z.detach()).squeeze(1)
    labels = torch.multinomial(torch.stack([1 - p, p], 1).float(), 1).squeeze(1)
    head = model[2].weight
    assert acc.curvature(head).sum() > 0
    params = {k: v.detach() for k, v in model.named_parameters()}
    bce = vmap(grad(lambda q, xi, yi: nn.functional.binary_cross_entropy_with_logits(
        functional_call(model, q, (xi[None],)).squeeze(), yi.double(), reduction="sum")), in_dims=(None, 0, 0))
    expected = (bce(params, x, labels)["2.weight"] ** 2).mean(0)
    torch.testing.assert_close(acc.curvature(head), expected, rtol=1e-9, atol=1e-12)


def test_after_sparsify_the_pruner_says_its_layers_were_replaced():
    import mackay_ext
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))
    optimizer = MacKayAdam(ard_param_groups(model), lr=1e-2, num_data=100, batch_size=8)
    pruner = MacKayPruner(model, optimizer, num_data=100, curvature="fisher-mc")
    x = torch.randn(8, 10)
    for step in range(30):   # pruned enough for sparsify to convert the layers
        optimizer.zero_grad()
        with pruner.capture_mc():
            logits = model(x)
        pruner.accumulate_mc_from(logits)
        nn.functional.cross_entropy(logits, torch.randint(0, 3, (8,))).backward()
        optimizer.step()
        if step % 10 == 9:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pruner.update()
    mackay_ext.sparsify(model, optimizer)
    assert type(model[0]) is not nn.Linear
    with pruner.capture_mc():
        logits = model(x)
    with pytest.raises(RuntimeError,
                       match=r"accumulate_mc_from: the weights of 0, 2 are no longer the model's.*sparsify"):
        pruner.accumulate_mc_from(logits)


def test_pruner_samples_one_captured_step_in_k():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3))
    optimizer = MacKayAdam(ard_param_groups(net), lr=1e-2, num_data=100, batch_size=5)
    pruner = MacKayPruner(net, optimizer, num_data=100, curvature="fisher-mc", curvature_every=3)
    with pytest.raises(RuntimeError, match="capture_mc"):
        pruner.accumulate_mc_from(net(torch.randn(5, 6)))
    with pytest.raises(RuntimeError, match="cannot be multiplied"), pruner.capture_mc():
        net(torch.randn(5, 7))   # the wrong input width: the forward fails, and counts for nothing
    with pytest.raises(RuntimeError, match="capture_mc"):
        pruner.accumulate_mc_from(net(torch.randn(5, 6)))
    for _ in range(7):
        x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
        optimizer.zero_grad()
        with pruner.capture_mc():
            logits = net(x)
        loss = nn.functional.cross_entropy(logits, y)
        pruner.accumulate_mc_from(logits)
        loss.backward()
        optimizer.step()
    assert pruner.accumulator.num_examples == 5 * 3   # steps 0, 3 and 6
    pruner.update()
    pruner.detach()
    ef_exact = MacKayPruner(net, None, num_data=10, curvature="ef-exact", prior="penalty")
    with pytest.raises(RuntimeError, match="curvature='fisher-mc'"), ef_exact.capture_mc():
        pass


def test_trainer_feeds_fisher_mc_from_its_training_forward(monkeypatch):
    """mackay_ext.train with curvature='fisher-mc': one sampled-label backward per training step,
    on the logits of that step's forward (no forward of its own), and the updates use it."""
    from mackay_ext import data, models
    from mackay_ext.train import FitConfig, Trainer, set_seed
    calls = []
    original = FisherAccumulator.accumulate_mc_from

    def counting(self, logits, num_samples=1):
        calls.append((logits.shape[0], logits.requires_grad))
        return original(self, logits, num_samples)

    monkeypatch.setattr(FisherAccumulator, "accumulate_mc_from", counting)
    monkeypatch.setattr(FisherAccumulator, "accumulate_mc", lambda *a, **k: pytest.fail("a forward of its own"))
    set_seed(0)
    digits = data.load("digits")
    trainer = Trainer(models.create("digits-mlp"), digits,
                      FitConfig(pretrain_epochs=1, rounds=1, epochs=1, batch_size=256, patience=3),
                      pruner_options={"curvature": "fisher-mc"})
    trainer.run()
    steps_per_epoch = -(-len(digits.x_train) // 256)
    epochs = len(trainer.history)
    assert len(calls) == epochs * steps_per_epoch and all(grad for _, grad in calls)
    assert trainer.pruner.kept_weights() < sum(p.numel() for p in trainer.model.parameters() if p.dim() > 1)


def _mc_training_warnings(loss_of, dtype=torch.float32, steps=4):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    pruner = MacKayPruner(model, optimizer, num_data=256, batch_size=32, curvature="fisher-mc")
    x, y = torch.randn(32, 6, dtype=dtype), torch.randn(32, 3, dtype=dtype)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            optimizer.zero_grad()
            with pruner.capture_mc():
                out = model(x)
            pruner.accumulate_mc_from(out)
            loss_of(out, y).backward()
            optimizer.step()
    return [w for w in caught if "not a function of softmax(logits)" in str(w.message)]


def test_a_regression_loss_under_fisher_mc_is_said_once():
    """A (mean, log-variance) or 3-output regression head passes fisher-mc's shape checks: its
    curvature read thousands of times too small, 169 of 4,864 weights kept (a new user's pass)."""
    said = _mc_training_warnings(lambda out, y: nn.functional.mse_loss(out, y))
    assert len(said) == 1 and "curvature='ef-exact' or 'ef-batch'" in str(said[0].message)
    assert said[0].filename == __file__


@pytest.mark.parametrize("loss", ["cross-entropy", "label-smoothing", "distillation"])
def test_softmax_losses_say_nothing(loss):
    def loss_of(out, y):
        labels = y.argmax(1)
        if loss == "cross-entropy":
            return nn.functional.cross_entropy(out, labels)
        if loss == "label-smoothing":
            return nn.functional.cross_entropy(out, labels, label_smoothing=0.1)
        teacher = torch.softmax(y, 1)
        return nn.functional.kl_div(torch.log_softmax(out, 1), teacher, reduction="batchmean")
    assert _mc_training_warnings(loss_of) == []
    assert _mc_training_warnings(loss_of, dtype=torch.bfloat16) == []


def _two_captured_steps(pruner, optimizer, model, x, given, loss_of) -> list:
    """Two training steps with the forward under capture_mc, fisher-mc given `given(logits)`, the
    training loss `loss_of(logits)`; the warnings said."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            optimizer.zero_grad()
            with pruner.capture_mc():
                logits = model(x)
            pruner.accumulate_mc_from(given(logits))
            loss_of(logits).backward()
            optimizer.step()
    return caught


@pytest.mark.parametrize("loss", ["pixel-bce", "cross-entropy"])
def test_logits_passed_as_a_view_the_loss_does_not_use_are_checked(loss):
    """A pixel decoder's (N, 1, 4, 4) logits passed as logits.flatten(1), the loss on the 4-D
    tensor: no gradient comes through the view, and the check never looked (a VAE's Bernoulli
    pixels read as one softmax over 16 of them, no word). A softmax loss on another view of the
    same tensor says nothing."""
    torch.manual_seed(0)
    decoder = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 16), nn.Unflatten(1, (1, 4, 4)))
    optimizer = torch.optim.SGD(decoder.parameters(), lr=0.01)
    pruner = MacKayPruner(decoder, optimizer, num_data=256, batch_size=8, curvature="fisher-mc")
    z, pixels, labels = torch.randn(8, 3), (torch.rand(8, 1, 4, 4) > 0.5).float(), torch.randint(0, 16, (8,))
    caught = _two_captured_steps(
        pruner, optimizer, decoder, z, lambda logits: logits.flatten(1),
        (lambda logits: nn.functional.binary_cross_entropy_with_logits(logits, pixels)) if loss == "pixel-bce"
        else (lambda logits: nn.functional.cross_entropy(logits.view(8, 16), labels)))
    said = [w for w in caught if "not a function of softmax(logits)" in str(w.message)]
    assert len(said) == (1 if loss == "pixel-bce" else 0)


@pytest.mark.parametrize("passed", ["flatten(1)", "pixel rows", "one softmax over all"])
def test_per_pixel_logits_flattened_into_one_softmax_are_said(passed):
    """A segmentation's [N, C, H, W] logits with a per-pixel cross-entropy, given to fisher-mc
    as logits.flatten(1): one label drawn over all C*H*W entries (the rows' sums are 0 there
    too), a head bias read 1/(H*W) of the per-pixel Fisher, no word. Said; the pixels as rows,
    and a loss that is one softmax over all entries (a spatial softmax), say nothing. The 4-D
    tensor itself is refused, naming the pixel rows."""
    torch.manual_seed(0)
    segmenter = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 3, 1))
    optimizer = torch.optim.SGD(segmenter.parameters(), lr=0.01)
    pruner = MacKayPruner(segmenter, optimizer, num_data=256 * 16, batch_size=8 * 16, curvature="fisher-mc")
    x, labels = torch.randn(8, 2, 4, 4), torch.randint(0, 3, (8, 4, 4))
    with pytest.raises(ValueError, match=r"got \(8, 3, 4, 4\).*movedim\(1, -1\)\.reshape\(-1, C\)"):
        with pruner.capture_mc():
            pruner.accumulate_mc_from(segmenter(x))
    caught = _two_captured_steps(
        pruner, optimizer, segmenter, x,
        (lambda logits: logits.movedim(1, -1).reshape(-1, 3)) if passed == "pixel rows"
        else (lambda logits: logits.flatten(1)),
        (lambda logits: nn.functional.cross_entropy(logits.flatten(1), labels.flatten(1)[:, 0]))
        if passed == "one softmax over all" else (lambda logits: nn.functional.cross_entropy(logits, labels)))
    said = [w for w in caught if "positions" in str(w.message) and "fisher-mc" in str(w.message)]
    assert len(said) == (1 if passed == "flatten(1)" else 0), [str(w.message) for w in caught]
    if said:
        assert "[N, C*16]" in str(said[0].message) and "movedim(1, -1).reshape(-1, C)" in str(said[0].message)


def test_the_softmax_check_reads_a_sample_of_rows_in_float32_sums():
    """A language model's logits' gradient can be gigabytes: the check reads at most ROWS rows
    (views, float32 sums, no copy of the whole), a bfloat16 one too."""
    from mackay_ext import mc_likelihood
    softmax_like = torch.full((3 * mc_likelihood.ROWS, 5), -0.25)
    softmax_like[:, 0] = 1.0                                  # rows summing to 0
    softmax_like[mc_likelihood.ROWS:, 1] = 5.0                # past the sample: not read
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mc_likelihood.SoftmaxLossCheck()._look(softmax_like.to(torch.bfloat16))
    with pytest.warns(RuntimeWarning, match="not a function of softmax"):
        mc_likelihood.SoftmaxLossCheck()._look(torch.ones(3 * mc_likelihood.ROWS, 5, dtype=torch.bfloat16))


def test_reentrant_checkpoint_is_named_with_the_way_out():
    """Under checkpoint(use_reentrant=True) a new user got torch's error naming .grad(), which
    they never called: the sampled-label backward is named, with use_reentrant=False and the
    other estimators; the accumulator goes on (a layer the refused backward reached before the
    checkpoint keeps that batch's squares with its count: its mean stays one)."""
    torch.manual_seed(0)
    stem, block, head = nn.Linear(5, 6), nn.Sequential(nn.Linear(6, 6), nn.ReLU()), nn.Linear(6, 3)
    model = nn.Sequential(stem, block, head)
    accumulator = FisherAccumulator(model, mode="fisher-mc")
    x = torch.randn(4, 5)
    with accumulator.capture_mc():
        logits = head(torch.utils.checkpoint.checkpoint(block, stem(x), use_reentrant=True))
    with pytest.raises(RuntimeError, match="use_reentrant=True.*use_reentrant=False.*ef-exact"):
        accumulator.accumulate_mc_from(logits)
    assert accumulator.counts[stem.weight] == 0 and accumulator.counts[head.weight] == 4
    accumulator.accumulate_mc(x)
    assert accumulator.counts[stem.weight] == 4 and accumulator.counts[head.weight] == 8


def test_a_head_beside_the_sampled_logits_is_named_for_what_it_is():
    """An actor-critic with a shared trunk: fisher-mc samples from the policy's logits, and the
    value head, called in the same forward, gets none of that loss's gradient. The update said
    the hooks never saw its forward (blaming a parent module or checkpointing)."""
    class ActorCritic(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh())
            self.pi, self.v = torch.nn.Linear(8, 2), torch.nn.Linear(8, 1)

        def forward(self, x):
            hidden = self.trunk(x)
            return self.pi(hidden), self.v(hidden).squeeze(-1)

    torch.manual_seed(0)
    model = ActorCritic()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    pruner = MacKayPruner(model, optimizer, num_data=100, batch_size=8, curvature="fisher-mc")
    for _ in range(3):
        x, action, ret = torch.randn(8, 4), torch.randint(0, 2, (8,)), torch.randn(8)
        with pruner.capture_mc():
            logits, value = model(x)
        pruner.accumulate_mc_from(logits)
        log_p = torch.distributions.Categorical(logits=logits).log_prob(action)
        loss = -(log_p * (ret - value).detach()).mean() + 0.5 * (ret - value).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with pytest.raises(RuntimeError, match=r"v had gradients, but their outputs do not reach the logits fisher-mc "
                                           r"samples labels from"):
        pruner.update()


def test_per_pixel_fisher_through_the_pruner_counts_pixels():
    """fisher-mc given a segmentation's pixels as rows, num_data and batch_size counting pixels
    (the per-pixel mean loss's N and B): each image's sampled Fisher sums its P pixels', and the
    pruner read it P = 25 times too large; it now divides by the values a row, against the exact
    per-pixel Fisher of the 1x1 head (sum over pixels of a^2 p (1 - p), mean over images, / P)."""
    torch.manual_seed(0)
    segmenter = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 3, 1)).double()
    images, pixels = 4, 25
    x = torch.randn(images, 2, 5, 5, dtype=torch.float64)
    labels = torch.randint(0, 3, (images, 5, 5))
    optimizer = torch.optim.SGD(segmenter.parameters(), lr=0.0)
    pruner = MacKayPruner(segmenter, optimizer, num_data=64 * pixels, batch_size=images * pixels,
                          curvature="fisher-mc")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # (the note on the values a row)
        for _ in range(4):
            optimizer.zero_grad()
            with pruner.capture_mc():
                logits = segmenter(x)
            pruner.accumulate_mc_from(logits.movedim(1, -1).reshape(-1, 3), num_samples=400)
            nn.functional.cross_entropy(logits, labels).backward()
            optimizer.step()
        pruner.update(prune=False)
    with torch.no_grad():
        features = torch.tanh(segmenter[0](x))                          # [images, 4, 5, 5]
        p = torch.softmax(segmenter(x), 1)                              # [images, 3, 5, 5]
        per_image = torch.einsum("nkhw,nchw->nck", features ** 2, p * (1 - p))
        expected = per_image.mean(0) / pixels                           # [3, 4], the 1x1 head's
    got = pruner.curvature_estimate("2").reshape(3, 4)
    assert abs(float(got.sum() / expected.sum()) - 1) < 0.05
    torch.testing.assert_close(got, expected, rtol=0.15, atol=0)


def test_a_global_pool_classifier_flattened_says_nothing():
    """[N, C, 1, 1] logits of a pooled all-conv classifier, given flattened: one position is one
    softmax either way (the per-position check once said it)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 5, 3), nn.AdaptiveAvgPool2d(1))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    pruner = MacKayPruner(net, optimizer, num_data=64, batch_size=8, curvature="fisher-mc")
    x, y = torch.randn(8, 2, 6, 6), torch.randint(0, 5, (8,))
    caught = _two_captured_steps(pruner, optimizer, net, x, lambda out: out.flatten(1),
                                 lambda out: nn.functional.cross_entropy(out[:, :, 0, 0], y))
    assert [str(w.message) for w in caught if "fisher-mc" in str(w.message)] == []
