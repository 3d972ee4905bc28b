"""A run's settings from the flags, a --recipe or a checkpoint, every one checked before any data is read."""
from __future__ import annotations

import contextlib
import inspect
import os
import warnings
from typing import Any

import torch

from .. import data as datasets
from .. import models, recipes
from ..compressed import is_compressed_payload
from ..pruner_options import default_criterion, snr_threshold_under_paper_default
from ..train import FitConfig, Trainer, late_length_changes
from .args import (
    CHANGEABLE_ON_RESUME,
    GENERIC_RECIPE,
    INPUT_SHAPES,
    RECIPE_FIXES,
    RECIPES,
    SETTING_DESTS,
    SETTINGS_BEFORE_THEY_EXISTED,
    _flag,
)


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
                    lr=config.lr, recipe=args.recipe, finetune_epochs=config.finetune_epochs,
                    mac_price=recipe.pruner.get("mac_price", 0.0),
                    mac_price_ramp=recipe.pruner.get("mac_price_ramp", 1), curvature_every=1,
                    max_prune_fraction=recipe.pruner.get("max_prune_fraction"),
                    channel_prior=recipe.pruner.get("channel_prior"))
    for key, dest in SETTING_DESTS.items():
        if dest in given and key not in RECIPE_FIXES:
            settings[key] = getattr(args, dest)
    return settings


def _settings(args, given: set[str] = frozenset(), parser=None) -> dict[str, Any]:
    if getattr(args, "recipe", None):
        return _recipe_settings(args, given, parser)
    if args.schedule == "in-run" and "rounds" in given and parser is not None:   # else silently unused
        parser.error("--rounds counts the rounds of --schedule paper; --schedule in-run has none (its "
                     "pruning phase lasts --epochs)")
    if parser is not None and snr_threshold_under_paper_default(args.rule, args.criterion, args.threshold):
        parser.error(f"--threshold {args.threshold:g} is on the scale of --prune snr, but under --rule paper the "
                     "criterion defaults to --prune alpha (threshold 1e13, the paper's code): pass --prune alpha "
                     "with an alpha threshold, or --prune snr")
    recipe = dict(RECIPES.get(args.model, GENERIC_RECIPE))
    for key in ("pretrain_epochs", "rounds", "epochs", "batch_size", "lr"):
        if getattr(args, key) is not None:
            recipe[key] = getattr(args, key)
    return dict(model=args.model, dataset=args.dataset or models.DEFAULT_DATASET[args.model],
                data_dir=args.data_dir, granularity=args.granularity, rule=args.rule,
                prune=args.criterion or default_criterion(args.rule), threshold=args.threshold,
                curvature=args.curvature,
                mac_price=args.mac_price, mac_price_ramp=args.mac_price_ramp,
                curvature_every=args.curvature_every, max_prune_fraction=args.max_prune_fraction,
                channel_prior=args.channel_prior, schedule=args.schedule,
                update_every=args.update_every, patience=args.patience, seed=args.seed,
                augment_shift=args.augment_shift,
                device=args.device, backend=args.backend, recipe=None,
                finetune_epochs=args.finetune_epochs or 0, **recipe)


def _checkpoint_settings(state: Any, path: str, parser) -> dict[str, Any]:
    """The run settings saved in a checkpoint of mackay-ext prune; any other file is refused."""
    if isinstance(state, dict) and isinstance(state.get("cli_settings"), dict):
        settings = {**SETTINGS_BEFORE_THEY_EXISTED, **state["cli_settings"]}
        if settings.get("model") not in models.MODELS:
            parser.error(f"--resume {path} names the model {settings.get('model')!r}, which this version "
                         f"of mackay_ext does not have (models: {', '.join(sorted(models.MODELS))})")
        return settings
    if is_compressed_payload(state):
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


def _length_changes_too_late(saved: dict[str, Any], settings: dict[str, Any], position: Any) -> str | None:
    """Why a changed --pretrain-epochs, --rounds or --epochs cannot reach the phases a
    checkpoint has left to run (None if it can): refused, since it would be silently ignored."""
    late, why = late_length_changes(saved, settings, position, name=_flag)
    if not late:
        return None
    return (f"--resume: {', '.join(map(_flag, late))} cannot change this run any more: {why}. "
            "Start a new run with them")


def _check_out(out: str, parser) -> None:
    """--out must be a directory we can create or write, checked before any data is read."""
    path = os.path.abspath(out)
    if os.path.exists(path) and not os.path.isdir(path):
        parser.error(f"--out {out} is a file; expected a directory (created if missing)")
    existing, missing = path, []
    while not os.path.exists(existing):
        missing.append(existing)   # deepest first
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        parser.error(f"--out {out}: {existing} is a file, so the directory cannot be created there")
    if not os.access(existing, os.W_OK | os.X_OK):
        parser.error(f"--out {out}: {existing} is not writable")
    try:   # access() says yes to root everywhere, and some file systems refuse anyway (/proc)
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        parser.error(f"--out {out}: the directory cannot be created ({error.strerror or error})")
    for directory in missing:   # made by the run itself, once every flag has passed
        with contextlib.suppress(OSError):   # under torchrun another rank may remove it first
            os.rmdir(directory)


def build_model(name: str, dataset: str, num_classes: int = 10) -> torch.nn.Module:
    """models.create for `dataset`: a network that takes any number of image channels (the CIFAR
    ones) gets the dataset's, e.g. one for mnist32."""
    shape = INPUT_SHAPES[dataset]
    if len(shape) == 3 and "in_channels" in inspect.signature(models.MODELS[name]).parameters:
        return models.create(name, num_classes=num_classes, in_channels=shape[0])
    return models.create(name, num_classes=num_classes)


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
    if download and dataset not in ("mnist", "mnist32"):
        parser.error(f"--download fetches MNIST only; {dataset} "
                     + ("comes with scikit-learn" if dataset == "digits"
                        else "must be unpacked into --data-dir (the cifar-10-batches-py or cifar-100-python folder)"))


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
    if settings.get("curvature_every", 1) != 1 and settings["curvature"] == "ef-batch":
        parser.error("--curvature-every samples the ef-exact or fisher-mc curvature (--curvature); "
                     "ef-batch rides in every optimizer step at no extra cost")
    if settings.get("channel_prior") not in (None, "members") and settings["granularity"] != "channel":
        parser.error(f"--channel-prior {settings['channel_prior']} places a channel group's prior: "
                     f"it needs --granularity channel, got {settings['granularity']}")
    if settings["device"] == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    model = build_model(settings["model"], dataset)
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
        recipe = recipes.get(settings["recipe"])
        finetune_shift = recipe.config.finetune_augment_shift
        if finetune_shift is not None:   # --augment-shift caps it: 0 means no shifts anywhere
            finetune_shift = min(finetune_shift, settings["augment_shift"])
        # --lr scales the rates of every phase alike (it moved the pretraining's alone, so the
        # "try a smaller --lr" of a diverged run reran its pruning phase at the same rate)
        scale = settings["lr"] / recipe.config.lr
        finetune_lr = recipe.config.finetune_lr
        return recipe.fit_config(
            pretrain_epochs=settings["pretrain_epochs"], epochs=settings["epochs"],
            batch_size=settings["batch_size"], lr=settings["lr"], patience=settings["patience"],
            retrain_lr=recipe.config.retrain_lr * scale,
            finetune_lr=None if finetune_lr is None else finetune_lr * scale,
            seed=settings["seed"], backend=settings["backend"],
            augment_shift=settings["augment_shift"], finetune_epochs=settings["finetune_epochs"],
            finetune_augment_shift=finetune_shift)
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
    if settings.get("max_prune_fraction") is not None:
        options["max_prune_fraction"] = settings["max_prune_fraction"]
    if settings.get("channel_prior") is not None:   # None: the pruner's default (and its warning)
        options["channel_prior"] = settings["channel_prior"]
    if settings.get("curvature_every", 1) != 1:
        options["curvature_every"] = settings["curvature_every"]
    if settings.get("mac_price"):
        options["mac_price"] = settings["mac_price"]
        options["mac_price_ramp"] = settings.get("mac_price_ramp", 1)
    if settings["granularity"] == "channel" or settings.get("mac_price"):
        options["example_inputs"] = (inputs,)
    return options
