"""The command line's flags: parser, number types, defaults per model, which flags were typed."""
from __future__ import annotations

import argparse
import math

from .. import data as datasets
from .. import models, recipes
from ..pruner import GRANULARITIES

GRANULARITY_CHOICES = GRANULARITIES + ("channel",)  # channel: coupled groups, traced


# Defaults per model: (pretrain_epochs, pruning rounds after the warm-up round, epochs per
# round, batch size, lr)
RECIPES = {
    "digits-mlp": dict(pretrain_epochs=30, rounds=4, epochs=20, batch_size=32, lr=1e-3),
    "lenet-300-100": dict(pretrain_epochs=20, rounds=3, epochs=10, batch_size=128, lr=1e-3),
    "lenet-5-caffe": dict(pretrain_epochs=15, rounds=3, epochs=8, batch_size=128, lr=1e-3),
}


GENERIC_RECIPE = dict(pretrain_epochs=30, rounds=3, epochs=15, batch_size=128, lr=1e-3)


# One input of each dataset (data.load(...).input_shape), known without reading the data: a model
# that cannot take the dataset is refused before minutes of loading and pretraining.
INPUT_SHAPES = {"digits": (64,), "mnist": (1, 28, 28), "mnist32": (1, 32, 32), "cifar10": (3, 32, 32),
                "cifar100": (3, 32, 32)}


# The run's settings as saved in a checkpoint ("cli_settings"), each with the dest of its flag.
SETTING_DESTS = {key: key for key in (
    "model", "dataset", "data_dir", "granularity", "rule", "threshold", "curvature", "schedule",
    "update_every", "patience", "seed", "augment_shift", "device", "backend", "pretrain_epochs",
    "rounds", "epochs", "batch_size", "lr", "recipe", "finetune_epochs", "mac_price", "mac_price_ramp",
    "curvature_every", "max_prune_fraction", "channel_prior")}


SETTING_DESTS["prune"] = "criterion"


# What a resumed run may change: how long it trains, its step size and where the data lies; none
# of them changes what the checkpoint's weights, precisions or optimizer moments mean.
CHANGEABLE_ON_RESUME = ("pretrain_epochs", "rounds", "epochs", "patience", "lr", "data_dir")


# Settings older checkpoints lack, at the value those versions used.
SETTINGS_BEFORE_THEY_EXISTED = {"curvature": "ef-batch", "augment_shift": 0, "recipe": None,
                                "finetune_epochs": 0, "mac_price": 0.0, "mac_price_ramp": 1,
                                "curvature_every": 1, "max_prune_fraction": None,
                                "channel_prior": "members"}


# What a --recipe fixes (the flags that would contradict it)
RECIPE_FIXES = ("model", "dataset", "granularity", "rule", "criterion", "curvature", "schedule",
                "update_every", "rounds")   # rounds: the recipes' in-run schedule has none


_UNSET = object()


def _number(kind: type, minimum: float, *, strict: bool = False):
    """An argparse type: an int, or a finite float, >= minimum (> minimum when strict). argparse
    turns its message into `argument --lr: expected ...`, which names the flag."""
    expected = (f"{'a whole number' if kind is int else 'a finite number'} "
                f"{'>' if strict else '>='} {minimum:g}")

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not math.isfinite(value) or value < minimum or (strict and value == minimum):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value
    return parse


COUNT, NONNEGATIVE_INT = _number(int, 1), _number(int, 0)
POSITIVE, NONNEGATIVE = _number(float, 0, strict=True), _number(float, 0)


def SHARE(text: str) -> float:
    """An argparse type: a number in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text}")
    return value


def PATH(text: str) -> str:
    """An argparse type: a non-empty path (an empty --out was read as "not given": the default)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"expected a path, got {text!r}")
    return text


def _recipe_help(what: str, key: str) -> str:
    per_model = ", ".join(f"{name} {recipe[key]:g}" for name, recipe in RECIPES.items())
    return f"{what} (default: {per_model}; other models {GENERIC_RECIPE[key]:g})"


# what `mackay-ext --help` tells a user (the module docstring above is for developers)
DESCRIPTION = """\
Prune a network with MacKay's automatic relevance determination: train under a Gaussian prior
with one precision per weight (or per input, filter or channel group), re-estimate the
precisions with MacKay's evidence update, remove the weights the data does not determine, and
retrain.

commands:
  prune     train, re-estimate precisions, prune and retrain; writes a checkpoint, report.json
            and the compressed model into --out
  evaluate  accuracy and size of a compressed model written by `prune`

`mackay-ext prune --help` and `mackay-ext evaluate --help` list each command's flags."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mackay-ext", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    prune = sub.add_parser(
        "prune", help="train, re-estimate precisions, prune; write a report",
        description="Pretrain, then rounds of: re-estimate every prior precision (MacKay), prune, "
                    "retrain. Writes checkpoint.pt after every epoch, then report.json, model.pt "
                    "and plots into --out.")
    add = prune.add_argument
    add("--recipe", choices=sorted(recipes.RECIPES),
        help="a measured row of the README's MNIST table, with every setting of it (model, "
             "dataset, shifts, schedule, precision updates every 430 steps, fine-tuning): "
             + "; ".join(f"{name}: {recipe.summary}".replace("%", "%%")  # argparse formats help
                         for name, recipe in recipes.RECIPES.items())
             + ". --pretrain-epochs, --epochs, --finetune-epochs, --lr, --batch-size, --threshold, "
               "--seed may change it, and --augment-shift caps its shifts")
    add("--model", default="digits-mlp", choices=sorted(models.MODELS),
        help="network to build and compress (default: %(default)s)")
    own = "; ".join(f"{d} for " + ", ".join(m for m in models.MODELS if models.DEFAULT_DATASET[m] == d)
                    for d in dict.fromkeys(models.DEFAULT_DATASET.values()))
    add("--dataset", choices=datasets.DATASETS, help=f"default: the model's own ({own})")
    add("--data-dir", type=PATH, help="directory of the dataset files: MNIST IDX files (default data/mnist) or "
                           "the CIFAR-10 / CIFAR-100 python batches (default data/cifar-10-batches-py, "
                           "data/cifar-100-python); digits "
                           "comes with scikit-learn and needs none")
    add("--download", action="store_true", help="fetch MNIST into --data-dir first (MNIST only)")
    add("--granularity", default="weight", choices=GRANULARITY_CHOICES,
        help="what one prior precision covers: a weight (unstructured), an input neuron or input "
             "channel, an output neuron or filter, 'filter': conv filters and Linear inputs, "
             "the source paper's grouping, or 'channel': a channel with everything coupled to it "
             "(its BatchNorm entries, every reader, across residual additions), found by tracing "
             "the model (default: %(default)s)")
    add("--rule", default="mackay", choices=("mackay", "em", "paper"),
        help="precision update: mackay (alpha = gamma / w^2), em (alpha = 1 / (w^2 + Sigma)) or "
             "paper (group ARD with gamma = 1, the source paper's code) (default: %(default)s)")
    add("--prune", dest="criterion", choices=("snr", "alpha"),
        help="pruning criterion: snr prunes weights the posterior cannot tell from 0 "
             "(w^2 / Sigma < threshold), alpha prunes where alpha >= threshold (default: snr; alpha "
             "under --rule paper, whose gamma = 1 leaves every snr near 1)")
    add("--threshold", type=NONNEGATIVE,
        help="pruning threshold, a finite number >= 0 (default: 0.05 for --prune snr, 1e13 for "
             "--prune alpha)")
    add("--mac-price", type=NONNEGATIVE, default=0.0,
        help="nats of evidence per multiply-accumulate: an update also prunes every group whose "
             "evidence gain is below this price times its MACs per example, to trade accuracy for "
             "compute (0: off; e.g. 3e-4 with --granularity channel) (default: %(default)s)")
    add("--mac-price-ramp", type=COUNT, default=1, metavar="UPDATES",
        help="raise the price linearly to --mac-price over this many pruning updates (at the full "
             "price at once, the first update removes most groups before the network can adapt) "
             "(default: %(default)s)")
    add("--max-prune-fraction", type=SHARE, metavar="SHARE",
        help="prune at most this share of a layer's live groups per update (the rest of those the "
             "criterion picks are judged again at the next update, after the others re-fit); e.g. "
             "0.5 where a layer's groups can stand in for each other and would all go at once "
             "(default: no limit)")
    add("--channel-prior", default=None, choices=("members", "norm-scale"),
        help="with --granularity channel, where a channel group's prior sits: on every member "
             "(members), or, for a channel that passes through a BatchNorm, on the BatchNorm's "
             "scale alone (norm-scale; the filter before it is scale-free, so its norm says "
             "nothing about the channel) (default: members, with a warning on a network with "
             "BatchNorm unless --max-prune-fraction is set)")
    add("--curvature", default="ef-batch", choices=("ef-batch", "ef-exact", "fisher-mc"),
        help="diagonal curvature estimate for MacKay's gamma: ef-batch (from the optimizer's "
             "minibatch gradients, cheapest), ef-exact (exact per-example squared gradients) or "
             "fisher-mc (sampled-label Fisher) (default: %(default)s)")
    add("--curvature-every", type=COUNT, default=1, metavar="STEPS",
        help="ef-exact and fisher-mc: estimate the curvature from one training batch in this many "
             "(their extra cost per step divided by it; each update still averages over many "
             "batches) (default: %(default)s)")
    add("--schedule", default="paper", choices=("paper", "in-run"),
        help="paper: pretrain, then --rounds rounds of update, prune, retrain; in-run: one run of "
             "--epochs epochs with an update every --update-every epochs (default: %(default)s)")
    add("--pretrain-epochs", type=COUNT,
        help=_recipe_help("epochs of training without the prior before the first update",
                          "pretrain_epochs"))
    add("--rounds", type=COUNT,
        help=_recipe_help("outer MacKay iterations of the paper schedule: update, prune, retrain",
                          "rounds"))
    add("--epochs", type=COUNT,
        help=_recipe_help("most retraining epochs per round (paper schedule) or in total after "
                          "pretraining (in-run)", "epochs"))
    add("--finetune-epochs", type=NONNEGATIVE_INT,
        help="after the last pruning: the prior switched off, the kept weights fine-tuned for this "
             "many epochs (best validation weights kept), the pruned ones held at 0 (default: 0; "
             "a --recipe's own)")
    add("--update-every", type=COUNT, default=2,
        help="in-run schedule only: epochs between precision updates (default: %(default)s)")
    add("--batch-size", type=COUNT, help=_recipe_help("training minibatch size", "batch_size"))
    add("--lr", type=POSITIVE,
        help=_recipe_help("Adam learning rate, also where every round restarts it (with --recipe: the "
                          "pretraining's, and the recipe's pruning and fine-tuning rates scale with it)", "lr"))
    add("--patience", type=COUNT, default=5,
        help="epochs without a better validation accuracy before a phase stops early "
             "(default: %(default)s)")
    add("--augment-shift", type=NONNEGATIVE_INT, default=0, metavar="PIXELS",
        help="move each training image by a random offset of up to PIXELS pixels (image datasets; "
             "2 suits MNIST; default: %(default)s)")
    add("--seed", type=NONNEGATIVE_INT, default=0,
        help="seed of the initial weights, the validation split and the batch order "
             "(default: %(default)s)")
    add("--device", default="cpu", choices=("cpu", "cuda"), help="where to train (default: %(default)s)")
    add("--backend", default="ext", choices=("ext", "torch"),
        help="ext: the compiled kernels; torch: the pure-PyTorch fallback, the same math "
             "(default: %(default)s)")
    add("--out", type=PATH, help="output directory, created if missing (default: ./mackay-run; with --resume, "
                      "the checkpoint's directory)")
    add("--overwrite", action="store_true",
        help="replace the run --out already holds (its checkpoint, report and model); without it, "
             "such an --out is refused, since a new run there would silently discard it")
    add("--resume", type=PATH, metavar="CHECKPOINT",
        help="continue from a checkpoint.pt of mackay-ext prune, with the run's own settings: "
             f"{', '.join('--' + k.replace('_', '-') for k in CHANGEABLE_ON_RESUME)} may change, "
             "other flags must match the checkpoint")
    add("--quiet", action="store_true", help="no progress output (bars on a terminal, lines otherwise)")
    ev = sub.add_parser("evaluate", help="accuracy and size of a saved compressed model")
    ev.add_argument("path", help="a model.pt written by mackay-ext prune")
    ev.add_argument("--dataset", choices=datasets.DATASETS,
                    help="default: the dataset named in the model file, else the one its architecture "
                         "was made for")
    ev.add_argument("--data-dir", type=PATH, help="directory of the dataset files (as for prune)")
    ev.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                    help="where to evaluate (default: %(default)s)")
    parser.subcommands = {"prune": prune, "evaluate": ev}
    return parser


def _given_flags(argv: list[str], args) -> set[str]:
    """The dests of the prune flags typed on the command line: a second parse in which every
    default is a sentinel tells `--rounds 4` from the recipe's 4."""
    parser = _parser()
    parser.subcommands["prune"].set_defaults(**{dest: _UNSET for dest in vars(args)})
    typed = parser.parse_args(argv)
    return {dest for dest, value in vars(typed).items() if value is not _UNSET} - {"command"}


def _flag(dest: str) -> str:
    return "--" + {"criterion": "prune"}.get(dest, dest).replace("_", "-")
