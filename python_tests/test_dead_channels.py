"""Pruned channels that still carry a constant shrink cannot fold (a BatchNorm shift read by a
zero-padded conv): cut_dead_channels zeroes them, the Trainer does it before its fine-tune, and
shrink then removes them (mackay_ext.dead_channels)."""
import warnings

import pytest
import torch
from torch import nn

import mackay_ext
from mackay_ext import shrink
from mackay_ext.data import Splits
from mackay_ext.dead_channels import cut_dead_channels, may_hold_dead_channels
from mackay_ext.train import FitConfig, Trainer


class BNNet(nn.Module):
    """A user's small BatchNorm CNN, with a residual block (never seen by the library's models)."""

    def __init__(self, width=8, classes=5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(2, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.conv1 = nn.Conv2d(width, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))
        return self.head(x.mean(dim=(2, 3)))


def trained_bn_net(seed=0):
    torch.manual_seed(seed)
    model = BNNet()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):   # trained-looking statistics and shifts
                module.bias.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2)
                module.running_mean.uniform_(-0.3, 0.3)
    return model


def test_a_pruned_filter_with_a_batchnorm_shift_is_cut_and_then_shrunk():
    model = trained_bn_net().eval()
    x = torch.randn(3, 2, 9, 7)
    with torch.no_grad():
        model.conv1.weight[[0, 2, 3]] = 0          # three pruned filters; bn1 still shifts them
        model.bn1.bias[[0, 2, 3]] = torch.tensor([0.4, -0.3, 0.7])
    assert may_hold_dead_channels(model)
    _, before = shrink(model, x, report=True)
    # shrink cannot remove 0 and 3; channel 2's negative constant is 0 after the ReLU, and goes
    assert model.conv1.weight.shape[0] == 6 and shrink(model, x).conv1.out_channels == 5
    assert any("pads with zeros" in reason for _, reason in before.kept_unused)
    optimizer = torch.optim.Adam(model.parameters())
    model(x).sum().backward()
    optimizer.step()
    with torch.no_grad():
        model.conv1.weight[[0, 2, 3]] = 0
    cut = cut_dead_channels(model, x, optimizer=optimizer)
    assert len(cut) == 3
    assert not model.bn1.bias[[0, 2, 3]].any() and not model.conv2.weight[:, [0, 2, 3]].any()
    assert model.bn1.bias[[1, 4, 5]].all()                 # the live channels are untouched
    for param in (model.bn1.bias, model.bn1.weight, model.conv2.weight):
        state = optimizer.state[param]
        dim = 1 if param is model.conv2.weight else 0
        for key in ("exp_avg", "exp_avg_sq"):
            assert not state[key].index_select(dim, torch.tensor([0, 2, 3])).any()
            assert state[key].index_select(dim, torch.tensor([1, 4, 5])).any()
    small = shrink(model, x)
    assert small.conv1.out_channels == 3 and small.conv2.in_channels == 3
    torch.testing.assert_close(small(x), model(x), atol=1e-5, rtol=1e-5)


def test_a_layer_keeps_its_strongest_channel():
    model = trained_bn_net().eval()
    x = torch.randn(2, 2, 8, 8)
    with torch.no_grad():
        model.conv1.weight.zero_()
        model.bn1.bias.copy_(torch.tensor([0.1, -0.2, 0.9, 0.3, 0.0, 0.2]))
        model.bn1.weight.fill_(0.5)
    cut = cut_dead_channels(model, x)
    assert len(cut) == 5 and model.bn1.bias[2] == 0.9 and not model.bn1.bias[[0, 1, 3, 4, 5]].any()


def test_constants_shrink_can_fold_are_left_to_it():
    """A channel read only by a Linear (or an unpadded conv): shrink folds its constant into the
    reader's bias exactly, so nothing is cut unless every_dead asks for it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 5, 3), nn.BatchNorm2d(5), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 4 * 4, 3)).eval()
    x = torch.randn(2, 1, 6, 6)
    with torch.no_grad():
        model[3].weight[1] = 0                     # read by the unpadded... Linear: foldable
        model[4].bias[1] = 0.5
    assert cut_dead_channels(model, x) == []
    assert len(cut_dead_channels(model, x, every_dead=True)) == 1 and not model[4].bias[1]


def test_models_without_zero_padding_are_not_traced():
    lenet = mackay_ext.models.create("lenet-5-caffe")
    with torch.no_grad():
        lenet[0].weight[0] = 0
    assert not may_hold_dead_channels(lenet)
    padded = trained_bn_net()
    assert not may_hold_dead_channels(padded)      # nothing pruned yet
    with torch.no_grad():
        padded.head.weight[0] = 0
    assert may_hold_dead_channels(padded)


def tiny_splits(n=48):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 2, 8, 8, generator=generator)
    y = torch.randint(0, 5, (n,), generator=generator)
    return Splits(x, y, x[:12], y[:12], x[:12], y[:12], "tiny")


def pruned_filters(trainer, layer, rows):
    """Mark filters `rows` of `layer` pruned (alpha = inf) in the trainer's pruner."""
    state = trainer.pruner.state_dict()
    state["alpha"][layer][rows] = float("inf")
    trainer.pruner.load_state_dict(state)


def test_the_trainer_cuts_them_before_its_finetune_and_shrink_removes_them():
    torch.manual_seed(0)
    model = trained_bn_net()
    data = tiny_splits()
    config = FitConfig(schedule="in-run", pretrain_epochs=1, epochs=0, finetune_epochs=2, batch_size=16,
                       update_every_steps=2)
    trainer = Trainer(model, data, config, pruner_options=dict(granularity="filter", layers=["conv1", "conv2"]),
                      progress=lambda line: None)
    trainer.pretrain()
    pruned_filters(trainer, "conv1", [1, 4])
    assert not model.conv1.weight[[1, 4]].any() and model.bn1.bias[[1, 4]].any()
    kept_before = trainer.pruner.report()["kept"]
    trainer.finetune(2, 1e-3)
    assert trainer.cut_channels == 2
    # the readers' slices are pruned in the pruner too: its counts are the weights' (it had
    # counted the zeroed slices as kept), and its masks hold them at 0 whatever the activation
    nonzero = sum(int((p != 0).sum()) for name, p in model.named_parameters()
                  if name in ("conv1.weight", "conv2.weight"))
    assert trainer.pruner.report()["kept"] == nonzero == kept_before - 2 * 8 * 9
    assert trainer.pruner.granularity["conv2"] == "weight"   # its filters lost two input slices
    assert torch.isinf(trainer.pruner.alpha("conv2")[:, [1, 4]]).all()
    assert not model.conv1.weight[[1, 4]].any() and not model.bn1.bias[[1, 4]].any()   # stayed zero
    assert not model.conv2.weight[:, [1, 4]].any()
    model.eval()
    x = data.x_test[:4]
    small = shrink(model, x)
    assert small.conv1.out_channels == 4
    torch.testing.assert_close(small(x), model(x), atol=1e-5, rtol=1e-5)


def test_an_untraceable_model_warns_and_the_finetune_goes_on():
    class Untraceable(BNNet):
        def forward(self, x):
            if float(x.sum()) > 1e9:   # data-dependent Python control flow: torch.export refuses
                return None
            return super().forward(x)

    torch.manual_seed(0)
    model = Untraceable()
    data = tiny_splits()
    trainer = Trainer(model, data, FitConfig(pretrain_epochs=0, epochs=0, finetune_epochs=1, batch_size=16),
                      pruner_options=dict(granularity="filter", layers=["conv1"]), progress=lambda line: None)
    pruned_filters(trainer, "conv1", [0])
    with pytest.warns(UserWarning, match="pruned channels that still carry a constant .* were not looked for"):
        trainer.finetune(1, 1e-3)
    assert trainer.position["phase"] == "done" and trainer.cut_channels == 0


def test_prune_entries_checks_its_mask():
    model = trained_bn_net()
    pruner = mackay_ext.MacKayPruner(model, torch.optim.Adam(model.parameters()), num_data=10, batch_size=4,
                                     granularity="filter", layers=["conv1"])
    with pytest.raises(ValueError, match=r"drop must be a bool tensor of conv1's shape \(6, 8, 3, 3\)"):
        pruner.prune_entries(model.conv1.weight, torch.ones(6, 8, 3, 3))
    assert pruner.prune_entries(model.conv2.weight, torch.ones(8, 6, 3, 3, dtype=torch.bool)) == 0   # no prior
    drop = torch.zeros(6, 8, 3, 3, dtype=torch.bool)
    drop[2] = True
    assert pruner.prune_entries(model.conv1.weight, drop) == 72 and not model.conv1.weight[2].any()
    assert pruner.prune_entries(model.conv1.weight, drop) == 0   # already pruned


def test_a_run_killed_in_its_finetune_resumes_after_the_cut(tmp_path):
    """The cut made conv2 one alpha per weight (its filters lost input slices); a fresh Trainer,
    built with granularity "filter" as the run was, loads a checkpoint from inside the fine-tune
    (it refused it: "saved with granularity 'weight'") and ends where the run would have."""
    import shutil

    def trainer(checkpoint):
        torch.manual_seed(0)
        config = FitConfig(schedule="in-run", pretrain_epochs=1, epochs=0, finetune_epochs=3, batch_size=16)
        made = Trainer(trained_bn_net(), tiny_splits(), config, checkpoint=str(checkpoint),
                       pruner_options=dict(granularity="filter", layers=["conv1", "conv2"]),
                       progress=lambda line: None)
        made.pretrain()
        pruned_filters(made, "conv1", [1, 4])
        return made

    whole = trainer(tmp_path / "whole.pt")
    save = whole.save_checkpoint

    def save_and_keep_the_first_finetune_epoch():
        save()
        if whole.position == {"phase": "finetune", "round": 0, "epoch": 1}:
            shutil.copy(tmp_path / "whole.pt", tmp_path / "killed_here.pt")
    whole.save_checkpoint = save_and_keep_the_first_finetune_epoch
    whole.finetune(3, 1e-3)
    assert whole.pruner.granularity["conv2"] == "weight" and whole.cut_channels == 2

    resumed = trainer(tmp_path / "resumed.pt")
    assert resumed.pruner.granularity["conv2"] == "filter"
    resumed.load_checkpoint(str(tmp_path / "killed_here.pt"))
    assert resumed.pruner.granularity["conv2"] == "weight"
    resumed.finetune(3, 1e-3)
    for (name, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    assert resumed.pruner.report()["kept"] == whole.pruner.report()["kept"]
