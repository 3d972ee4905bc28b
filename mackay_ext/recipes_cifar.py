"""Recipes for the source paper's CIFAR networks (VGG "D6" / "G5", ResNet-20/56/110): the paper's
protocol as a preset, and the project's three variants (bench/reproduce_cifar.py runs them).

Methods (one recipe per model and method, `{model}-{method}`; `{model}-{method}-mnist32` is the
same with the CPU budget of the MNIST-padded-to-32x32 check runs):
- paper: the source paper's code (codes-kzhan/MacKayARDNetworkCompression_PyTorch, vgg/ and
  resnet/): one alpha per conv filter and per input neuron of a Linear layer; in the ResNets only
  the first conv of every residual block carries ARD (models.paper_ard_layers: the block's inner
  channels, removable without touching the residual stream; the paper's code also wraps the stem
  conv, left out here because a pruned stem filter still feeds the stream its BatchNorm shift);
  gamma = 1 rule (alpha_g = n_g / |w_g|^2); outer rounds of update, prune, retrain with Adam
  restarted at lr 1e-3 (ResNets) or 1e-4 (VGG, as in its script), x0.9 on a validation-loss
  plateau, batch 128; 5 outer iterations for the ResNets, 20 for VGG in the paper (here the first
  is the Trainer's warm-up round, and VGG gets fewer: see below). Two departures, both forced:
  - the pruning threshold. The paper prunes a group once alpha_g >= 1e13 (rms weight 3e-7), which
    its code reaches only because each round trains until the plateau rule has cut the lr below
    1e-8 (up to 1,000 epochs a round); under a capped round Adam leaves a group the data does not
    support oscillating at about one step, rms ~ lr. Here a group is pruned once alpha_g >=
    1 / lr^2 (rms weight at most one Adam step at the round's lr: 1e6 at lr 1e-3, 1e8 at 1e-4).
    The snr criterion of the other recipes cannot serve: with gamma = 1, alpha_g = n_g / (|w_g|^2
    + eps) makes sum_g Sigma_ii <= |w_g|^2 + eps, so the snr falls below 0.05 only once |w_g|^2 <
    ~5e-18 (eps = 1e-16 decides), a far stricter bar than even the paper's.
  - a short fine-tune with the prior off ends the run (bench/reproduce_cifar.py removes the
    channels of pruned filters for real, BatchNorm shift included, before it; the paper's code
    counts them removed but keeps that shift as a constant channel).
- mackay: the same groups and layers with MacKay's rule (gamma from the ef-batch curvature) and
  the project's in-run schedule (alpha re-estimated about once an epoch inside one training run,
  the first `warmup_updates` updates only moving alpha, then a fine-tune with the prior off), as
  the MNIST recipes (mackay_ext.recipes).
- channel: MacKay's rule on coupled channel groups of the whole network (granularity="channel":
  a filter with its BatchNorm entries and every reader's input slice, and across the residual
  additions one group per residual-stream channel), which the paper never prunes; the in-run
  schedule as `mackay`.
- weight: MacKay's rule with one alpha per weight of every conv and Linear layer (unstructured:
  fewest weights, but few whole channels to cut), in-run schedule with alpha re-estimated twice as
  often as the group methods (with the cap below, the four updates of mnist32's budget that may
  prune could take a layer to no less than 1/16 of its weights; at nine, 1/512). Chosen on seed
  0's validation split of VGG-D6/4 on mnist32: 99.18% validation accuracy at 4.89% of the weights
  kept, against 99.04% at 5.95% with one update an epoch and no cap.
The MacKay methods prune at most half of a layer's live groups per update
(max_prune_fraction=0.5, mackay_ext.prune_cap). Without it, the first update that could prune
took the five deepest convs of VGG-D6 on mnist32 to one filter each (30% test error), and the
inner convs of ResNet-56's third stage likewise (0.69% error against 0.47% dense, on an H200):
there each filter's curvature is tiny because the others can stand in for it, so the diagonal
evidence finds every one of them prunable at once. (These filters sit before BatchNorm, which
divides their scale out; channel_prior="norm-scale" puts the prior on the BatchNorm scale
instead, and on VGG-D6/4 its evidence kept 99% of the weights: it finds every channel's scale
well determined.)

Every recipe trains on images moved by random whole-pixel shifts (4 pixels for CIFAR, about the
paper's 32x32 random crop of the 4-padded image; 2 for mnist32). The paper also flips CIFAR
images horizontally: the Trainer has no hook for that yet, so these recipes do not.
The dense network every row starts from is trained by the `mackay` recipe's dense phase (Adam,
cosine lr); the paper starts from SGD-trained checkpoints instead.

Epoch budgets are NOT validated yet on CIFAR (no CIFAR run has been made with them); the mnist32
budgets were sized from measured epoch times (bench/reproduce_cifar.py's docstring), not tuned
(but for the deep ResNets' longer fine-tune, MNIST32_DEEP).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from .models import paper_ard_layers
from .recipes import Recipe
from .train import FitConfig

MODELS = ("vgg-d6", "vgg-g5", "resnet-20", "resnet-56", "resnet-110")
METHODS = ("paper", "mackay", "channel", "weight")
DATASETS = ("cifar10", "mnist32")   # cifar100 runs the cifar10 recipes (same protocol in the paper)
# which layers carry ARD: every conv and Linear ("all", MacKayPruner's default) or the first conv
# of every residual block ("block-inner", the paper's ResNet rule); resolved by pruner_options()
ARD_LAYERS = ("all", "block-inner")


@dataclass(frozen=True)
class Budget:
    """Epochs of one dataset's runs. dense: the dense phase (cosine lr); ard: the in-run pruning
    phase; finetune: prior off at the end; rounds x round_epochs: the paper's outer loop after its
    warm-up round (which trains round_epochs too); update_every_steps: ~ one epoch of steps (the
    weight method's updates come twice as often)."""
    dense: int
    ard: int
    finetune: int
    rounds: int
    round_epochs: int
    patience: int
    update_every_steps: int
    warmup_updates: int
    augment_shift: int


# CIFAR (45,000 training images, 352 steps of 128 an epoch): a GPU budget. Not validated.
CIFAR_RESNET = Budget(dense=160, ard=60, finetune=20, rounds=4, round_epochs=40, patience=5,
                      update_every_steps=352, warmup_updates=5, augment_shift=4)
# the paper's VGG script runs 20 outer iterations at lr 1e-4; half of them, capped, fit a day on a GPU
CIFAR_VGG = Budget(dense=160, ard=60, finetune=20, rounds=9, round_epochs=20, patience=5,
                   update_every_steps=352, warmup_updates=5, augment_shift=4)
# mnist32 (55,000 training images, 430 steps an epoch): sized so that a ResNet-20 row (its dense
# phase included) stays under an hour of CPU (about 170 s an epoch on one thread, measured)
MNIST32 = Budget(dense=5, ard=5, finetune=2, rounds=2, round_epochs=3, patience=2,
                 update_every_steps=430, warmup_updates=1, augment_shift=2)
# ResNet-56 and -110 on mnist32 (GPU rows): a 6-epoch fine-tune. After the 2 of MNIST32, ResNet-56's
# pruned network was still improving (H200, seeds 0/1: training loss 0.0167 against its dense
# network's 0.0118, validation accuracy 99.12/99.26% against 99.42/99.34%); the fine-tune keeps its
# best validation epoch, so a longer one can only be chosen on validation.
MNIST32_DEEP = replace(MNIST32, finetune=6)

# the share of a layer's live groups one update of the MacKay methods may prune (see above)
MAX_PRUNE_FRACTION = 0.5

SUMMARIES = {
    "paper": "the source paper's protocol: filter / Linear-input groups, gamma = 1, outer rounds",
    "mackay": "MacKay's rule with curvature on the paper's groups and layers, in-run schedule",
    "channel": "MacKay's rule on coupled channel groups (residual stream included), in-run schedule",
    "weight": "MacKay's rule with one alpha per weight of every conv and Linear layer, in-run schedule",
}
GRANULARITY = {"paper": "filter", "mackay": "filter", "channel": "channel", "weight": "weight"}


def _budget(model: str, dataset: str) -> Budget:
    if dataset == "mnist32":
        return MNIST32_DEEP if model in ("resnet-56", "resnet-110") else MNIST32
    return CIFAR_VGG if model.startswith("vgg") else CIFAR_RESNET


def _recipe(model: str, method: str, dataset: str) -> Recipe:
    budget = _budget(model, dataset)
    resnet = model.startswith("resnet")
    name = f"{model}-{method}" + ("" if dataset == "cifar10" else f"-{dataset}")
    common = {"batch_size": 128, "pretrain_epochs": budget.dense, "lr": 1e-3,
              "augment_shift": budget.augment_shift, "finetune_epochs": budget.finetune, "finetune_lr": 1e-3,
              "channels_last": True}
    round_lr = 1e-3 if resnet or dataset == "mnist32" else 1e-4   # the paper's scripts' Adam lr
    if method == "paper":
        config = FitConfig(schedule="paper", rounds=budget.rounds, epochs=budget.round_epochs,
                           retrain_lr=round_lr, lr_decay=0.9, lr_schedule="plateau",
                           patience=budget.patience, **common)
    else:
        every = budget.update_every_steps // (2 if method == "weight" else 1)
        config = FitConfig(schedule="in-run", epochs=budget.ard, retrain_lr=1e-3, update_every_steps=every,
                           warmup_updates=budget.warmup_updates, lr_schedule="cosine",
                           patience=10 ** 6, **common)
    pruner: dict[str, Any] = {
        "granularity": GRANULARITY[method],
        "rule": "paper" if method == "paper" else "mackay",
        "prune": "alpha" if method == "paper" else "snr",
        "threshold": 1 / round_lr ** 2 if method == "paper" else 0.05,
        "ard_layers": "block-inner" if resnet and method in ("paper", "mackay") else "all"}
    if method != "paper":
        pruner["max_prune_fraction"] = MAX_PRUNE_FRACTION
    return Recipe(name, model, dataset, config, pruner, SUMMARIES[method])


RECIPES: dict[str, Recipe] = {r.name: r for r in (
    _recipe(model, method, dataset) for dataset in DATASETS for model in MODELS for method in METHODS)}


def get(name: str) -> Recipe:
    """The CIFAR recipe called `name`; a clear error listing the others."""
    if name not in RECIPES:
        raise ValueError(f"unknown CIFAR recipe {name!r}; recipes: {', '.join(sorted(RECIPES))}")
    return RECIPES[name]


def for_run(model: str, method: str, dataset: str) -> Recipe:
    """The recipe of `method` on `model` for a dataset ("cifar10", "cifar100": the cifar10 recipe,
    "mnist32")."""
    if model not in MODELS:
        raise ValueError(f"for_run: model must be one of {MODELS}, got {model!r}")
    if method not in METHODS:
        raise ValueError(f"for_run: method must be one of {METHODS}, got {method!r}")
    if dataset not in ("cifar10", "cifar100", "mnist32"):
        raise ValueError(f"for_run: dataset must be cifar10, cifar100 or mnist32, got {dataset!r}")
    return get(f"{model}-{method}" + ("-mnist32" if dataset == "mnist32" else ""))


def pruner_options(recipe: Recipe, model: nn.Module, example_inputs: torch.Tensor | None = None
                   ) -> dict[str, Any]:
    """MacKayPruner keyword arguments of `recipe` for this model instance (pass as the Trainer's
    pruner_options): the ARD layers by name, and example_inputs (a batch of the model's inputs,
    e.g. two training images) for the channel groups, which are traced from one forward."""
    options = dict(recipe.pruner)
    ard_layers = options.pop("ard_layers", "all")
    if ard_layers not in ARD_LAYERS:
        raise ValueError(f"pruner_options: {recipe.name}: ard_layers must be one of {ARD_LAYERS}, "
                         f"got {ard_layers!r}")
    if ard_layers == "block-inner":
        options["layers"] = paper_ard_layers(model)
    if options["granularity"] == "channel":
        if example_inputs is None:
            raise ValueError(f"pruner_options: {recipe.name} prunes coupled channel groups, traced from "
                             "one forward: pass example_inputs (e.g. two training images)")
        options["example_inputs"] = example_inputs
    return options
