"""mackay_ext.weight_sites: a layer's weight read outside the layer's own call is said, since the
exact estimators' hooks do not see that read's share of the gradient (a new user's curvature came
out 2.4x too small, with no word); legitimate forwards say nothing."""
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import prune

from mackay_ext import MacKayPruner
from mackay_ext.curvature import FisherAccumulator


class ReadTwice(nn.Module):
    """mid is called, and its weight read again by hand."""

    def __init__(self):
        super().__init__()
        self.inp, self.mid, self.out = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.mid(torch.tanh(self.inp(x))))
        return self.out(torch.tanh(F.linear(h, self.mid.weight)))


class CalledTwice(nn.Module):
    """mid is called twice: both calls are its own, every share captured."""

    def __init__(self):
        super().__init__()
        self.inp, self.mid, self.out = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.mid(torch.tanh(self.mid(torch.tanh(self.inp(x)))))))


def _said(model, steps=3, curvature="ef-exact", penalty=False):
    torch.manual_seed(0)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruner = MacKayPruner(model, optimizer, num_data=64, batch_size=16, curvature=curvature)
        for step in range(steps):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            if penalty:   # an L2 term read outside the forward: no data gradient, rightly not squared
                loss = loss + 1e-3 * sum(p.square().sum() for p in model.parameters())
            loss.backward()
            optimizer.step()
            if step == 1:
                pruner.update(prune=False)
    return [w for w in caught if "reads the weight outside" in str(w.message)], pruner


def test_a_weight_read_outside_its_layer_is_said_once():
    said, _ = _said(ReadTwice(), steps=4)
    assert len(said) == 1   # once, though a later window's first forward is watched again
    assert "mid (by linear)" in str(said[0].message) and "curvature='ef-batch'" in str(said[0].message)
    assert said[0].filename == __file__
    assert torch._C._len_torch_function_stack() == 0   # the watch ended with its forward


class ReadsThatAddNoGradient(CalledTwice):
    """The forward reads mid's weight, but nothing it makes is in the graph."""

    def forward(self, x):
        width = self.mid.weight.size(0) + self.mid.weight.new_zeros(1).numel()
        self.norm = float(self.mid.weight.detach().norm())   # a logged statistic
        with torch.no_grad():
            self.mid.weight.clamp_(-10, 10)                    # a max-norm style constraint
        return super().forward(x) * width / (width + 0.0)


@pytest.mark.parametrize("model", [CalledTwice(), ReadsThatAddNoGradient(), nn.Linear(6, 3),
                                   nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))])
def test_forwards_that_call_their_layers_say_nothing(model):
    said, _ = _said(model, penalty=True)
    assert not said


def test_a_masked_layer_is_read_by_its_own_mask_hook():
    """torch.nn.utils.prune computes weight = weight_orig * mask in a pre-hook of the layer."""
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.nn.utils.prune")
        said, _ = _said(model)
    assert not said


def test_ef_batch_and_forwards_without_capture_are_not_watched():
    said, _ = _said(ReadTwice(), curvature="ef-batch")
    assert not said   # ef-batch reads the whole gradient
    model = ReadTwice()
    accumulator = FisherAccumulator(model)
    with torch.no_grad():
        model(torch.randn(4, 6))   # nothing captured: the watch waits for a forward that is
    assert accumulator._sites.due
    with pytest.warns(RuntimeWarning, match=r"reads the weight outside them: mid \(by linear\)"):
        with accumulator:
            model(torch.randn(4, 6)).sum().backward()


def test_a_forward_that_raises_ends_the_watch():
    class Raises(ReadTwice):
        def forward(self, x):
            super().forward(x)
            raise ValueError("the user's")
    model = Raises()
    FisherAccumulator(model)
    with pytest.raises(ValueError, match="the user's"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model(torch.randn(4, 6))
    assert torch._C._len_torch_function_stack() == 0


def test_an_interrupted_watch_is_dropped_at_the_next_forward():
    """Ctrl-C inside the watched forward skips the always_call hooks (torch runs them for an
    Exception only): the next forward drops the left-over watch and what it noted meanwhile (the
    user's own reads between the two forwards), and watches itself instead."""
    class Interrupted(CalledTwice):
        interrupt = True

        def forward(self, x):
            out = super().forward(x)
            if self.interrupt:
                raise KeyboardInterrupt
            return out
    model = Interrupted()
    accumulator = FisherAccumulator(model)
    with accumulator, pytest.raises(KeyboardInterrupt):
        model(torch.randn(4, 6))
    assert torch._C._len_torch_function_stack() == 1   # left on: no hook ran
    F.linear(torch.randn(2, 8), model.mid.weight).sum().backward()   # the user's, outside any forward
    model.interrupt = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with accumulator:
            model(torch.randn(4, 6)).sum().backward()
    assert torch._C._len_torch_function_stack() == 0
    assert not accumulator._sites.due   # this forward was the window's watched one


class _Product(torch.autograd.Function):
    """A hand-written kernel's autograd (h @ W^T), as a fused op or a custom SpMM is wrapped."""

    @staticmethod
    def forward(ctx, h, weight):
        ctx.save_for_backward(h, weight)
        return h @ weight.t()

    @staticmethod
    def backward(ctx, grad):
        h, weight = ctx.saved_tensors
        return grad @ weight, grad.t() @ h


class ReadThroughAFunction(ReadTwice):
    """mid's weight read again through a custom Function, whose forward runs with gradients off."""

    def forward(self, x):
        h = torch.tanh(self.mid(torch.tanh(self.inp(x))))
        return self.out(torch.tanh(_Product.apply(h, self.mid.weight)))


class FunctionLinear(nn.Linear):
    """A layer whose own forward is that Function: its calls are its own."""

    def forward(self, x):
        return _Product.apply(x, self.weight) + self.bias


def test_a_weight_read_through_a_custom_function_is_said():
    said, _ = _said(ReadThroughAFunction(), steps=2)
    assert len(said) == 1 and "mid (by _Product.apply)" in str(said[0].message)
    model = nn.Sequential(FunctionLinear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    said, _ = _said(model, steps=2)
    assert said == []
