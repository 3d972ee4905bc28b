"""mackay-ext: compress a network with MacKay's evidence framework from the command line.

  mackay-ext prune                      # the digits MLP on scikit-learn's digits, < 1 minute
  mackay-ext prune --model lenet-300-100 --data-dir ../shared/data/mnist --out runs/lenet
  mackay-ext prune --resume runs/lenet/checkpoint.pt     # continue a run (after Ctrl-C, a kill)
  mackay-ext evaluate runs/lenet/model.pt --data-dir ../shared/data/mnist
  torchrun --standalone --nproc_per_node 2 -m mackay_ext.cli prune ...   # DistributedDataParallel
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shlex
import sys
import time
import warnings
from typing import Any

import torch

from . import data as datasets
from . import models, recipes
from ._files import CorruptFileError, UnsafeFileError, load_plain
from ._validate import NonFiniteError
from .pruner import GRANULARITIES

GRANULARITY_CHOICES = GRANULARITIES + ("channel",)  # channel: coupled groups, traced
from .sparse import FORMAT as MODEL_FORMAT
from .sparse import SparseConv2d, SparseLinear, load_compressed, save_compressed, sparsify
from .train import FitConfig, Trainer, evaluate, set_seed

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
INPUT_SHAPES = {"digits": (64,), "mnist": (1, 28, 28), "cifar10": (3, 32, 32)}
# The run's settings as saved in a checkpoint ("cli_settings"), each with the dest of its flag.
SETTING_DESTS = {key: key for key in (
    "model", "dataset", "data_dir", "granularity", "rule", "threshold", "curvature", "schedule",
    "update_every", "patience", "seed", "augment_shift", "device", "backend", "pretrain_epochs",
    "rounds", "epochs", "batch_size", "lr", "recipe", "finetune_epochs")}
SETTING_DESTS["prune"] = "criterion"
# What a resumed run may change: how long it trains, its step size and where the data lies; none
# of them changes what the checkpoint's weights, precisions or optimizer moments mean.
CHANGEABLE_ON_RESUME = ("pretrain_epochs", "rounds", "epochs", "patience", "lr", "data_dir")
# Settings older checkpoints lack, at the value those versions used.
SETTINGS_BEFORE_THEY_EXISTED = {"curvature": "ef-batch", "augment_shift": 0, "recipe": None,
                                "finetune_epochs": 0}
# What a --recipe fixes (the flags that would contradict it)
RECIPE_FIXES = ("model", "dataset", "granularity", "rule", "criterion", "curvature", "schedule",
                "update_every")
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


def _recipe_help(what: str, key: str) -> str:
    per_model = ", ".join(f"{name} {recipe[key]:g}" for name, recipe in RECIPES.items())
    return f"{what} (default: {per_model}; other models {GENERIC_RECIPE[key]:g})"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mackay-ext", description=__doc__,
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
             + ". --pretrain-epochs, --epochs, --lr, --batch-size, --threshold, --seed may change it")
    add("--model", default="digits-mlp", choices=sorted(models.MODELS),
        help="network to build and compress (default: %(default)s)")
    own = "; ".join(f"{d} for " + ", ".join(m for m in models.MODELS if models.DEFAULT_DATASET[m] == d)
                    for d in dict.fromkeys(models.DEFAULT_DATASET.values()))
    add("--dataset", choices=datasets.DATASETS, help=f"default: the model's own ({own})")
    add("--data-dir", help="directory of the dataset files: MNIST IDX files (default data/mnist) or "
                           "the CIFAR-10 python batches (default data/cifar-10-batches-py); digits "
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
    add("--prune", dest="criterion", default="snr", choices=("snr", "alpha"),
        help="pruning criterion: snr prunes weights the posterior cannot tell from 0 "
             "(w^2 / Sigma < threshold), alpha prunes where alpha >= threshold (default: %(default)s)")
    add("--threshold", type=NONNEGATIVE,
        help="pruning threshold, a finite number >= 0 (default: 0.05 for --prune snr, 1e13 for "
             "--prune alpha)")
    add("--curvature", default="ef-batch", choices=("ef-batch", "ef-exact", "fisher-mc"),
        help="diagonal curvature estimate for MacKay's gamma: ef-batch (from the optimizer's "
             "minibatch gradients, cheapest), ef-exact (exact per-example squared gradients) or "
             "fisher-mc (sampled-label Fisher) (default: %(default)s)")
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
        help=_recipe_help("Adam learning rate, also where every round restarts it", "lr"))
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
    add("--out", help="output directory, created if missing (default: ./mackay-run; with --resume, "
                      "the checkpoint's directory)")
    add("--resume", metavar="CHECKPOINT",
        help="continue from a checkpoint.pt of mackay-ext prune, with the run's own settings: "
             f"{', '.join('--' + k.replace('_', '-') for k in CHANGEABLE_ON_RESUME)} may change, "
             "other flags must match the checkpoint")
    add("--quiet", action="store_true", help="no progress output (bars on a terminal, lines otherwise)")
    ev = sub.add_parser("evaluate", help="accuracy and size of a saved compressed model")
    ev.add_argument("path", help="a model.pt written by mackay-ext prune")
    ev.add_argument("--dataset", choices=datasets.DATASETS,
                    help="default: the dataset the model's architecture was made for")
    ev.add_argument("--data-dir", help="directory of the dataset files (as for prune)")
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


class _Progress:
    """Training progress on stderr. A terminal gets a tqdm bar over the batches of each epoch,
    with a line per epoch above it. Anywhere else (a log file, a pipe, CI, nohup) a redrawn bar is
    noise, so one flushed line per epoch and per precision update, with the time since the start.
    Without tqdm a terminal gets the lines too. --quiet (and every rank but 0) prints nothing."""

    def __init__(self, quiet: bool, stream=None):
        self.stream = stream or sys.stderr
        self.mode, self.bar, self.tqdm = "off", None, None
        self.started = time.perf_counter()
        if quiet:
            return
        self.mode = "lines"
        if self.stream.isatty():
            try:
                from tqdm import tqdm
            except ImportError:
                return
            self.mode, self.tqdm = "bars", tqdm

    def line(self, message: str) -> None:
        if self.mode == "off":
            return
        self.close()
        if self.mode == "lines":
            message = f"[{time.perf_counter() - self.started:8.1f} s] {message}"
        print(message, file=self.stream, flush=True)

    def batch(self, done: int, total: int) -> None:
        if self.mode != "bars":
            return
        if self.bar is None or done == 0:
            self.close()
            self.bar = self.tqdm(total=total, file=self.stream, leave=False, unit="batch",
                                 dynamic_ncols=True)
        self.bar.update(done - self.bar.n)  # called as batch `done` starts: `done` are finished

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _recipe_settings(args, given: set[str], parser) -> dict[str, Any]:
    """The settings of --recipe NAME, with the flags that may tune it applied."""
    recipe = recipes.get(args.recipe)
    fixed = sorted(_flag(dest) for dest in given & set(RECIPE_FIXES))
    if fixed:
        parser.error(f"--recipe {args.recipe} sets {', '.join(fixed)} itself (model {recipe.model}, "
                     f"dataset {recipe.dataset}); drop them, or leave out --recipe")
    config = recipe.config
    settings = dict(model=recipe.model, dataset=recipe.dataset, data_dir=args.data_dir,
                    granularity=recipe.pruner["granularity"], rule=recipe.pruner["rule"],
                    prune=recipe.pruner["prune"], threshold=recipe.pruner["threshold"],
                    curvature="ef-batch", schedule=config.schedule, update_every=config.update_every,
                    patience=config.patience, seed=args.seed, augment_shift=config.augment_shift,
                    device=args.device, backend=args.backend, pretrain_epochs=config.pretrain_epochs,
                    rounds=config.rounds, epochs=config.epochs, batch_size=config.batch_size,
                    lr=config.lr, recipe=args.recipe, finetune_epochs=config.finetune_epochs)
    for key, dest in SETTING_DESTS.items():
        if dest in given and key not in RECIPE_FIXES:
            settings[key] = getattr(args, dest)
    return settings


def _settings(args, given: set[str] = frozenset(), parser=None) -> dict[str, Any]:
    if getattr(args, "recipe", None):
        return _recipe_settings(args, given, parser)
    recipe = dict(RECIPES.get(args.model, GENERIC_RECIPE))
    for key in ("pretrain_epochs", "rounds", "epochs", "batch_size", "lr"):
        if getattr(args, key) is not None:
            recipe[key] = getattr(args, key)
    return dict(model=args.model, dataset=args.dataset or models.DEFAULT_DATASET[args.model],
                data_dir=args.data_dir, granularity=args.granularity, rule=args.rule,
                prune=args.criterion, threshold=args.threshold, curvature=args.curvature,
                schedule=args.schedule,
                update_every=args.update_every, patience=args.patience, seed=args.seed,
                augment_shift=args.augment_shift,
                device=args.device, backend=args.backend, recipe=None,
                finetune_epochs=args.finetune_epochs or 0, **recipe)


def _checkpoint_settings(state: Any, path: str, parser) -> dict[str, Any]:
    """The run settings saved in a checkpoint of mackay-ext prune; any other file is refused."""
    if isinstance(state, dict) and isinstance(state.get("cli_settings"), dict):
        return {**SETTINGS_BEFORE_THEY_EXISTED, **state["cli_settings"]}
    if isinstance(state, dict) and state.get("format") == MODEL_FORMAT:
        parser.error(f"--resume {path} is a compressed model (what `mackay-ext evaluate` reads), not "
                     "a checkpoint; resume from the checkpoint.pt that mackay-ext prune wrote beside it")
    if isinstance(state, dict) and "optimizer" in state:
        parser.error(f"--resume {path} is a checkpoint of mackay_ext.train.Trainer without the "
                     "command line's settings; continue it in Python with Trainer.load_checkpoint")
    parser.error(f"--resume {path} is not a checkpoint written by mackay-ext prune")


def _resume_settings(saved: dict[str, Any], args, given: set[str], parser) -> tuple[dict, list[str]]:
    """The checkpoint's settings with the typed flags that may change applied (and listed, to be
    said); a typed flag that contradicts the checkpoint is refused."""
    settings, changed, conflicts = dict(saved), [], []
    for key, dest in SETTING_DESTS.items():
        value, before = getattr(args, dest), saved.get(key)
        if dest not in given or value == before:
            continue
        shown = "the default" if before is None else before
        if key in CHANGEABLE_ON_RESUME:
            settings[key] = value
            changed.append(f"{_flag(dest)} {value} (the checkpoint's run had {shown})")
        else:
            conflicts.append(f"{_flag(dest)} {value} (the checkpoint's run has {shown})")
    if conflicts:
        parser.error("--resume continues the checkpoint's run with its settings, which these flags "
                     "contradict: " + "; ".join(conflicts) + ". Drop them, or start a new run "
                     f"without --resume; only {', '.join(map(_flag, CHANGEABLE_ON_RESUME))} may change")
    return settings, changed


def _check_out(out: str, parser) -> None:
    """--out must be a directory we can create or write, checked before any data is read."""
    path = os.path.abspath(out)
    if os.path.exists(path) and not os.path.isdir(path):
        parser.error(f"--out {out} is a file; expected a directory (created if missing)")
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        parser.error(f"--out {out}: {existing} is a file, so the directory cannot be created there")
    if not os.access(existing, os.W_OK | os.X_OK):
        parser.error(f"--out {out}: {existing} is not writable")


def _input_problem(model: torch.nn.Module, model_name: str, dataset: str) -> str | None:
    """None when `model` takes the inputs of `dataset`; otherwise what it expects, in one line."""
    shape, trained_on = INPUT_SHAPES[dataset], models.DEFAULT_DATASET.get(model_name)
    expected = INPUT_SHAPES.get(trained_on)
    try:
        with torch.no_grad():
            model.eval()(torch.zeros((2, *shape)))
    except (RuntimeError, ValueError):  # torch's layers raise RuntimeError, the sparse ones ValueError
        if expected is None or shape == expected:
            raise  # not a shape mismatch: a bug worth its traceback
        return (f"{model_name} expects inputs of shape {expected} (as in {trained_on}), {dataset} "
                f"gives {shape}")
    return None


def _check_dataset_flags(dataset: str, data_dir: str | None, parser, download: bool = False) -> None:
    if dataset == "digits" and data_dir:
        parser.error("--data-dir: the digits dataset comes with scikit-learn and reads no directory; "
                     "for MNIST pass --model lenet-300-100 (or --dataset mnist)")
    if download and dataset != "mnist":
        parser.error(f"--download fetches MNIST only; {dataset} "
                     + ("comes with scikit-learn" if dataset == "digits"
                        else "must be unpacked into --data-dir (the cifar-10-batches-py folder)"))


def _check_settings(settings: dict[str, Any], args, given: set[str], parser) -> None:
    """Every flag against every other, before any data is read: a mistake costs no pretraining."""
    dataset, shape = settings["dataset"], INPUT_SHAPES[settings["dataset"]]
    _check_dataset_flags(dataset, settings["data_dir"], parser, args.download)
    if settings["augment_shift"] and len(shape) != 3:
        parser.error(f"--augment-shift needs an image dataset; {dataset} inputs are flat vectors "
                     f"of shape {shape}")
    if "update_every" in given and settings["schedule"] != "in-run":
        parser.error("--update-every applies to --schedule in-run only; the paper schedule updates "
                     "once per round (--rounds)")
    if settings["device"] == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    model = models.create(settings["model"])
    problem = _input_problem(model, settings["model"], dataset)
    if problem:
        parser.error(f"--dataset {dataset}: {problem}")
    # The Trainer checks its configuration and the pruner its options when built: build both
    # on two blank examples, so that a bad combination fails now, not after the pretraining.
    blank = torch.zeros((2, *shape))
    labels = torch.zeros(2, dtype=torch.long)
    try:
        with warnings.catch_warnings():  # said once, by the real build
            warnings.simplefilter("ignore")
            Trainer(model, datasets.Splits(blank, labels, blank, labels, blank, labels, dataset),
                    _fit_config(settings), pruner_options=_pruner_options(settings, blank))
    except (ValueError, TypeError, KeyError, NotImplementedError) as error:
        parser.error(f"{settings['model']} cannot be trained with these flags: {error}")


def _fit_config(settings: dict[str, Any]) -> FitConfig:
    if settings.get("recipe"):  # the recipe's phases, with the tunable numbers from the flags
        return recipes.get(settings["recipe"]).fit_config(
            pretrain_epochs=settings["pretrain_epochs"], epochs=settings["epochs"],
            batch_size=settings["batch_size"], lr=settings["lr"], patience=settings["patience"],
            seed=settings["seed"], backend=settings["backend"],
            augment_shift=settings["augment_shift"], finetune_epochs=settings["finetune_epochs"])
    return FitConfig(schedule=settings["schedule"], pretrain_epochs=settings["pretrain_epochs"],
                     rounds=settings["rounds"], epochs=settings["epochs"],
                     update_every=settings["update_every"], batch_size=settings["batch_size"],
                     lr=settings["lr"], retrain_lr=settings["lr"], patience=settings["patience"],
                     seed=settings["seed"], backend=settings["backend"],
                     augment_shift=settings["augment_shift"],
                     finetune_epochs=settings.get("finetune_epochs", 0))


def _pruner_options(settings: dict[str, Any], inputs: torch.Tensor) -> dict[str, Any]:
    """The pruner's options; `inputs` (two training examples) trace the coupled channel groups."""
    options = dict(granularity=settings["granularity"], rule=settings["rule"], prune=settings["prune"],
                   threshold=settings["threshold"], curvature=settings["curvature"])
    if settings["granularity"] == "channel":
        options["example_inputs"] = (inputs,)
    return options


def _layer_table(report: dict[str, Any]) -> str:
    rows = [f"{'layer':<14}{'kept':>10}{'total':>10}{'kept %':>9}{'groups kept':>16}{'alpha range':>24}"]
    for layer in report["layers"]:
        alpha = layer["alpha"]
        span = f"{alpha['min']:.2e}..{alpha['max']:.2e}" if alpha else "-"
        rows.append(f"{layer['name']:<14}{layer['kept']:>10}{layer['total']:>10}"
                    f"{100 * layer['kept'] / layer['total']:>8.2f}%"
                    f"{layer['groups_kept']:>8}/{layer['groups']:<7}{span:>24}")
    return "\n".join(rows)


def _plots(out: str, trainer: Trainer) -> tuple[list[str], str | None]:
    """The plots written, and what to do when they could not be (matplotlib missing)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        checkpoint = shlex.quote(os.path.join(out, "checkpoint.pt"))
        return [], (f"plots skipped: matplotlib is not installed; `pip install matplotlib`, then "
                    f"`mackay-ext prune --resume {checkpoint}` writes them (the run is finished: "
                    "nothing is retrained)")
    written = []
    history = trainer.pruner.history
    if history:
        fig, ax = plt.subplots(figsize=(6, 4))
        for i, layer in enumerate(history[0]["layers"]):
            ax.plot([h["layers"][i]["kept"] / h["layers"][i]["total"] for h in history], marker="o",
                    label=layer["name"])
        ax.set(xlabel="precision update", ylabel="kept fraction", yscale="log",
               title="weights kept per layer")
        ax.legend()
        path = os.path.join(out, "kept_per_layer.png")
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    alphas = torch.cat([trainer.pruner.alpha(n).flatten().cpu() for n in trainer.pruner.layers])
    finite = alphas[torch.isfinite(alphas) & (alphas > 0)]
    if finite.numel():
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.hist(finite.log10().numpy(), bins=60)
        ax.set(xlabel="log10 alpha (kept groups)", ylabel="count", title="prior precisions")
        path = os.path.join(out, "log_alpha_hist.png")
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written, None


def save_model(path: str, model_name: str, model: torch.nn.Module) -> dict[str, int]:
    """The pruned model, compressed: its pruned layers as CSR nonzeros (save_compressed)."""
    compressed = sparsify(copy.deepcopy(model).cpu(), min_sparsity=0.5)
    return save_compressed(compressed, path, model_name=model_name)


def _init_distributed(device: str) -> int:
    """Under torchrun (WORLD_SIZE > 1): join the process group; returns this rank."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0
    import torch.distributed as dist
    if not dist.is_initialized():
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return dist.get_rank()


def _fail(error: Any) -> int:
    """One line on stderr for an error the user can act on, exit status 1."""
    text = " ".join(str(error).split()) or type(error).__name__  # torch's own may span lines
    print(f"mackay-ext: {text}", file=sys.stderr)
    return 1


def _file_state(path: str) -> tuple[int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_ino, stat.st_mtime_ns


def _resume_command(checkpoint: str, out: str, world_size: int, lr: float | None = None) -> str:
    words = ["prune", "--resume", checkpoint]
    if os.path.abspath(out) != os.path.dirname(os.path.abspath(checkpoint)):
        words += ["--out", out]
    if lr is not None:
        words += ["--lr", f"{lr:g}"]
    start = (f"torchrun --nproc_per_node {world_size} -m mackay_ext.cli " if world_size > 1
             else "mackay-ext ")
    return start + shlex.join(words)


def run_prune(args, parser, given: set[str] = frozenset()) -> int:
    """`mackay-ext prune`: every flag is checked, then the data is read and the run trained."""
    settings, changed, resumed = _settings(args, given, parser), [], None
    if args.resume:
        try:
            state = load_plain(args.resume, "checkpoint")
        except (OSError, UnsafeFileError, CorruptFileError) as error:
            return _fail(error)
        saved = _checkpoint_settings(state, args.resume, parser)
        settings, changed = _resume_settings(saved, args, given, parser)
        resumed = {"wall_seconds": float(state.get("wall_seconds", 0.0)), "lr": saved["lr"]}
        del state
    out = args.out or (os.path.dirname(args.resume) or "." if args.resume else "mackay-run")
    _check_out(out, parser)
    _check_settings(settings, args, given, parser)
    rank = _init_distributed(settings["device"])
    try:
        return _run_prune(args, settings, changed, resumed, out, rank)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _run_prune(args, settings: dict[str, Any], changed: list[str], resumed: dict[str, float] | None,
               out: str, rank: int) -> int:
    progress = _Progress(args.quiet or rank != 0)
    if rank == 0:
        for change in changed:
            print(f"mackay-ext: resuming with {change}", file=sys.stderr)
    try:
        data = datasets.load(settings["dataset"], settings["data_dir"], seed=settings["seed"],
                             download=args.download)
    except datasets.DatasetError as error:
        return _fail(error)
    set_seed(settings["seed"])
    model = models.create(settings["model"], num_classes=data.num_classes)
    if rank == 0:
        os.makedirs(out, exist_ok=True)
    checkpoint = os.path.join(out, "checkpoint.pt")
    example = data.x_train[:2].to(settings["device"])
    trainer = Trainer(model, data, _fit_config(settings), pruner_options=_pruner_options(settings, example),
                      device=settings["device"], checkpoint=checkpoint, progress=progress.line,
                      batch_progress=progress.batch)
    trainer.extra_state = {"cli_settings": settings}
    started = time.perf_counter()
    if resumed:
        try:
            trainer.load_checkpoint(args.resume)
        except (KeyError, RuntimeError, ValueError) as error:  # e.g. edited, or another version's
            return _fail(f"checkpoint {args.resume} does not fit the {settings['model']} it names: "
                         f"{error}")
        started -= resumed["wall_seconds"]
        if settings["lr"] != resumed["lr"]:  # keep the plateau decays so far, from the new lr
            for group in trainer.optimizer.param_groups:
                group["lr"] *= settings["lr"] / resumed["lr"]
    trainer.wall_clock_start = started
    before = _file_state(checkpoint)
    progress.line(f"{settings['model']} on {settings['dataset']}: {trainer.num_data} training "
                  f"examples; checkpoints to {checkpoint}")

    def last_checkpoint() -> str | None:
        if _file_state(checkpoint) not in (None, before):
            return checkpoint  # written by this run
        return args.resume     # none yet: the one this run started from, if any

    try:
        trainer.run()
    except KeyboardInterrupt:
        progress.close()
        if rank == 0:
            last = last_checkpoint()
            print("mackay-ext: interrupted; " + (
                f"the last checkpoint is {last}; resume with: "
                f"{_resume_command(last, out, trainer.world_size)}" if last
                else "no checkpoint was written yet, so there is nothing to resume"), file=sys.stderr)
        return 130
    except NonFiniteError as error:
        progress.close()
        if rank == 0:
            last, smaller = last_checkpoint(), settings["lr"] / 10
            reason = " ".join(str(error).split()) or "a NaN or inf"
            print(f"mackay-ext: training diverged: {reason}; " + (
                f"the last good checkpoint is {last}; try a smaller --lr (this run: "
                f"{settings['lr']:g}): {_resume_command(last, out, trainer.world_size, smaller)}"
                if last else f"no checkpoint was written before it; try a smaller --lr than "
                             f"{settings['lr']:g}"), file=sys.stderr)
        return 1
    wall = time.perf_counter() - started
    if rank != 0:  # rank 0 reports and writes; every rank holds the same model
        return 0
    return _report(out, settings, trainer, data, wall)


def _report(out: str, settings: dict[str, Any], trainer: Trainer, data, wall: float) -> int:
    """report.json, model.pt and the plots; the layer table and a summary on stdout."""
    model = trainer.model
    test_accuracy = evaluate(model, data.x_test, data.y_test, device=settings["device"])[0]
    report = trainer.pruner.report()
    kept, total = report["kept"], report["total"]
    summary = {
        "model": settings["model"], "dataset": settings["dataset"],
        "test_accuracy_dense": trainer.dense_test_accuracy, "test_accuracy": test_accuracy,
        "test_error": 100 * (1 - test_accuracy), "weights_total": total, "weights_kept": kept,
        "weights_kept_percent": 100 * kept / total, "compression": total / max(kept, 1),
        "layers": [{k: layer[k] for k in ("name", "total", "kept", "groups", "groups_kept")}
                   for layer in report["layers"]],
        "updates": [{"kept": h["kept"], "gamma_sum": h.get("gamma_sum")} for h in trainer.pruner.history],
        "wall_seconds": wall, "settings": settings,
        "hardware": {"device": settings["device"], "threads": torch.get_num_threads(),
                     "processes": trainer.world_size, "torch": torch.__version__},
    }
    sizes = save_model(os.path.join(out, "model.pt"), settings["model"], model)
    summary["model_file_bytes"], summary["dense_state_dict_bytes"] = sizes["bytes"], sizes["dense_bytes"]
    with open(os.path.join(out, "report.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    plots, plots_note = _plots(out, trainer)
    print(_layer_table(report))
    print(f"\n{settings['model']} on {settings['dataset']}: test accuracy "
          f"{100 * trainer.dense_test_accuracy:.2f}% dense -> {100 * test_accuracy:.2f}% pruned; "
          f"weights kept {kept}/{total} ({100 * kept / total:.2f}%), compression "
          f"{total / max(kept, 1):.1f}x, {wall:.1f} s")
    print(f"wrote {out}/report.json, model.pt ({sizes['bytes'] / 1e3:.1f} kB against "
          f"{sizes['dense_bytes'] / 1e3:.1f} kB dense), checkpoint.pt"
          + "".join(f", {os.path.basename(p)}" for p in plots))
    if plots_note:
        print(plots_note)
    return 0


def _compressed_model_name(payload: Any, path: str) -> str:
    """The architecture named in a model.pt; ValueError saying what the file is otherwise."""
    if isinstance(payload, dict) and ("cli_settings" in payload or "optimizer" in payload):
        raise ValueError(f"{path} is a training checkpoint, not a compressed model: evaluate the "
                         "model.pt that mackay-ext prune writes beside it when the run ends (finish "
                         f"the run with mackay-ext prune --resume {shlex.quote(path)})")
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise ValueError(f"{path} is not a compressed model written by mackay-ext prune")
    name = payload.get("model_name")
    if name not in models.MODELS:
        raise ValueError(f"{path} holds a model named {name!r}, not one of mackay-ext's "
                         f"{tuple(models.MODELS)}: rebuild it in Python with "
                         "load_compressed(path, model=your_network)")
    return name


def run_evaluate(args, parser) -> int:
    """`mackay-ext evaluate`: test accuracy and size of a model.pt, as JSON on stdout."""
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    try:
        model_name = _compressed_model_name(load_plain(args.path, "compressed model"), args.path)
        model = load_compressed(args.path)
    except (OSError, UnsafeFileError, CorruptFileError, ValueError) as error:
        return _fail(error)
    except (RuntimeError, KeyError, TypeError) as error:  # a model.pt whose entries do not fit
        return _fail(f"{args.path} cannot be rebuilt as {model_name}: {error}")
    dataset = args.dataset or models.DEFAULT_DATASET[model_name]
    _check_dataset_flags(dataset, args.data_dir, parser)
    problem = _input_problem(model, model_name, dataset)
    if problem:
        parser.error(f"--dataset {dataset}: the model in {args.path} does not fit it: {problem}")
    try:
        data = datasets.load(dataset, args.data_dir)
    except datasets.DatasetError as error:
        return _fail(error)
    model.to(args.device)
    accuracy = evaluate(model, data.x_test, data.y_test, device=args.device)[0]
    total = nonzero = 0
    for module in model.modules():
        if isinstance(module, (SparseLinear, SparseConv2d)):
            total += module.in_features * module.out_features
            nonzero += int((module.values != 0).sum())
        elif isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            total += module.weight.numel()
            nonzero += int((module.weight != 0).sum())
    print(json.dumps({"model": model_name, "dataset": dataset, "test_accuracy": accuracy,
                      "weights_total": total, "weights_kept": nonzero,
                      "compression": total / max(nonzero, 1),
                      "file_bytes": os.path.getsize(args.path)}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser()
    args = parser.parse_args(argv)
    command = parser.subcommands[args.command]  # its errors print its own usage line
    try:
        if args.command == "prune":
            return run_prune(args, command, _given_flags(argv, args))
        return run_evaluate(args, command)
    except KeyboardInterrupt:  # before training started, or while writing the results
        print("mackay-ext: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
