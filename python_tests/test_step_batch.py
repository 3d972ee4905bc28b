"""batch_size is the batch of one optimizer step (mackay_ext.step_batch): under gradient
accumulation one micro-batch given as batch_size made the ef-batch curvature A times too small
(95% of a network pruned under A = 4, no word); it is said once. Steps that are one batch (no
accumulation, two views of each example with one backward, the right B) say nothing."""
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from mackay_ext import MacKayPruner
from mackay_ext.optim import MacKayAdam, ard_param_groups

MICRO = 16


class ByKeyword(nn.Module):
    """Called as Hugging Face models are, model(input_ids=x): no positional argument."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))

    def forward(self, input_ids=None, attention_mask=None):
        return self.body(input_ids)


def _said(batch_size, passes=4, views=1, fused=False, steps=3, keyword=False):
    torch.manual_seed(0)
    model = ByKeyword() if keyword else nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))
    if fused:
        optimizer = MacKayAdam(ard_param_groups(model), num_data=1024, batch_size=batch_size)
        pruner = MacKayPruner(model, optimizer, num_data=1024)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        pruner = MacKayPruner(model, optimizer, num_data=1024, batch_size=batch_size)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            optimizer.zero_grad()
            for _ in range(passes):
                x, y = torch.randn(MICRO, 10), torch.randint(0, 3, (MICRO,))
                loss = sum(F.cross_entropy(model(input_ids=x + 0.1 * view * torch.randn_like(x)) if keyword else
                                           model(x + 0.1 * view * torch.randn_like(x)), y) for view in range(views))
                (loss / passes).backward()
            optimizer.step()
        pruner.update(prune=False)
        pruner.update(prune=False)   # said once
    return [w for w in caught if "batch_size" in str(w.message)]


@pytest.mark.parametrize("keyword", [False, True], ids=["positional", "keyword"])
@pytest.mark.parametrize("fused", [False, True], ids=["torch-optimizer", "MacKayAdam"])
def test_a_micro_batch_given_as_batch_size_is_said(fused, keyword):
    """Also for a model called with its input as a keyword (input_ids=), as Hugging Face's are:
    its examples were not counted, and nothing was said."""
    said = _said(MICRO, fused=fused, keyword=keyword)
    assert len(said) == 1
    message = str(said[0].message)
    assert "batch_size=16 is one micro-batch" in message and "4 backward passes of 16 examples" in message
    assert "pass batch_size=64" in message
    assert said[0].filename == __file__


@pytest.mark.parametrize("batch_size, passes, views", [(4 * MICRO, 4, 1), (MICRO, 1, 1), (MICRO, 1, 2)],
                         ids=["the-step's-batch", "no-accumulation", "two-views-one-backward"])
def test_steps_of_one_batch_say_nothing(batch_size, passes, views):
    assert _said(batch_size, passes=passes, views=views) == []


def test_the_watch_leaves_with_the_pruner():
    model = nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = MacKayPruner(model, optimizer, num_data=100, batch_size=10)
    assert model._forward_pre_hooks and model._forward_hooks
    pruner.detach()
    assert not model._forward_pre_hooks and not model._forward_hooks


def test_a_step_that_raised_and_its_redone_batch_are_not_accumulation():
    """Ctrl-C in optimizer.step, the batch run again: two backward passes before one completed
    step, no accumulation; batch_size is right and nothing is said."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    pruner = MacKayPruner(model, optimizer, num_data=1024, batch_size=MICRO)
    interrupted = []

    def ctrl_c_once(*_):
        if not interrupted:
            interrupted.append(True)
            raise KeyboardInterrupt
    optimizer.register_step_pre_hook(ctrl_c_once)
    x, y = torch.randn(MICRO, 10), torch.randint(0, 3, (MICRO,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            try:
                optimizer.step()
            except KeyboardInterrupt:
                continue
        pruner.update(prune=False)
    assert interrupted


def test_the_watch_goes_once_its_verdict_is_in():
    """Its hooks cost every step (~4% of a small MLP's): removed at the first update after a step."""
    model = nn.Sequential(nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    pruner = MacKayPruner(model, optimizer, num_data=1024, batch_size=MICRO)
    hooks = len(model._forward_pre_hooks) + len(model._forward_hooks)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner.update(prune=False)   # before any step: nothing seen yet, still watching
        assert len(model._forward_pre_hooks) + len(model._forward_hooks) == hooks
        optimizer.zero_grad()
        F.cross_entropy(model(torch.randn(MICRO, 10)), torch.randint(0, 3, (MICRO,))).backward()
        optimizer.step()
        pruner.update(prune=False)
    assert len(model._forward_pre_hooks) + len(model._forward_hooks) == hooks - 2


def _steps_of_one_batch_said(step_of, steps=5):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    pruner = MacKayPruner(model, optimizer, num_data=1024, batch_size=MICRO)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(steps):
            x, y = torch.randn(MICRO, 10), torch.randint(0, 3, (MICRO,))
            step_of(step, model, optimizer, x, y)
        pruner.update(prune=False)
    return [w for w in caught if "micro-batch" in str(w.message)]


def test_sam_s_two_passes_over_one_batch_are_one_batch():
    """Sharpness-aware minimisation: the same batch forward and backward twice, one step."""
    def step(_, model, optimizer, x, y):
        for _ in range(2):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
        optimizer.step()
    assert _steps_of_one_batch_said(step) == []


def test_a_step_gradscaler_skipped_is_no_accumulation():
    """An overflow step (fp16 AMP's first steps): the scaler never calls optimizer.step, and that
    step's pass merged with the next one's read as two micro-batches ('pass batch_size=32')."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)

    def step(index, model, optimizer, x, y):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y) * (1e35 if index == 0 else 1.0)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    assert _steps_of_one_batch_said(step) == []


def test_fresh_micro_batches_in_reused_memory_are_counted():
    """A loader's next batch often takes the memory of the one freed before it: the same address
    is no same batch (accumulation went unsaid when it was read so)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    pruner = MacKayPruner(model, optimizer, num_data=1024, batch_size=MICRO)
    batches = iter([(torch.randn(MICRO, 10), torch.randint(0, 3, (MICRO,))) for _ in range(12)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            optimizer.zero_grad()
            for _ in range(4):
                x, y = next(batches)
                fresh = x.clone()
                (F.cross_entropy(model(fresh), y) / 4).backward()
                del fresh
            optimizer.step()
        pruner.update(prune=False)
    assert len([w for w in caught if "is one micro-batch" in str(w.message)]) == 1


def test_an_actor_update_through_the_frozen_critic_is_no_micro_batch():
    """DDPG/TD3/SAC: after the critic's step, the actor's loss goes through the critic, frozen for it
    as usual. That forward and backward train nothing of the critic, and were read as a second
    micro-batch of the critic's next step ("pass batch_size=128", which would double its curvature)."""
    torch.manual_seed(0)
    critic, actor = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 1)), nn.Linear(4, 1)
    critic_optimizer = torch.optim.Adam(critic.parameters(), lr=1e-3)
    actor_optimizer = torch.optim.Adam(actor.parameters(), lr=1e-3)
    pruner = MacKayPruner(critic, critic_optimizer, num_data=1024, batch_size=MICRO)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(4):
            state, action, target = torch.randn(MICRO, 4), torch.randn(MICRO, 1), torch.randn(MICRO, 1)
            critic_optimizer.zero_grad()
            F.mse_loss(critic(torch.cat([state, action], 1)), target).backward()
            critic_optimizer.step()
            critic.requires_grad_(False)
            actor_optimizer.zero_grad()
            (-critic(torch.cat([state, actor(state)], 1)).mean()).backward()
            actor_optimizer.step()
            critic.requires_grad_(True)
        pruner.update(prune=False)
    assert [w for w in caught if "batch_size" in str(w.message)] == []


@pytest.mark.parametrize("units", ["sequences", "tokens"])
def test_a_language_models_batch_counted_in_sequences_is_said_at_the_first_update(units):
    """A GPT-2 whose loss averages over label tokens, trained in a loop of one's own with N and B
    counting sequences: nothing was said until the first pruning update had removed 99.95% of
    its weights. Said at the first update (the warm-up's), not where B counts tokens."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    tokens = 7 if units == "tokens" else 1   # label tokens a sequence of 8 (its first has none)
    optimizer = MacKayAdam(ard_param_groups(model), num_data=800 * tokens, batch_size=8 * tokens)
    pruner = MacKayPruner(model, optimizer, num_data=800 * tokens)
    ids = torch.randint(0, 32, (8, 8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            optimizer.zero_grad()
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
        pruner.update(prune=False)
    said = [str(w.message) for w in caught if "averages its loss over label tokens" in str(w.message)]
    if units == "tokens":
        assert said == []
    else:
        assert len(said) == 1 and "batch_size=8 is the 8 rows (sequences) of an optimizer step" in said[0]
