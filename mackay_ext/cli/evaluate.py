"""`mackay-ext evaluate`: accuracy and size of a saved compressed model."""
from __future__ import annotations

import json
import os
import shlex
from typing import Any

import torch

from .. import data as datasets
from .. import models
from .._files import CorruptFileError, UnsafeFileError, load_plain
from ..compressed import read_metadata
from ..compressed import is_compressed_payload
from ..sparse import (
    SparseConv2d,
    SparseLinear,
    load_compressed,
)
from ..train import evaluate
from .prune import _fail
from .settings import _check_dataset_flags, _input_problem


def _compressed_model_name(payload: Any, path: str) -> str:
    """The architecture named in a model.pt; ValueError saying what the file is otherwise."""
    if isinstance(payload, dict) and ("cli_settings" in payload or "optimizer" in payload):
        raise ValueError(f"{path} is a training checkpoint, not a compressed model: evaluate the "
                         "model.pt that mackay-ext prune writes beside it when the run ends (finish "
                         f"the run with mackay-ext prune --resume {shlex.quote(path)})")
    if not is_compressed_payload(payload):
        raise ValueError(f"{path} is not a compressed model written by mackay-ext prune")
    name = payload.get("model_name")
    if name not in models.MODELS:
        raise ValueError(f"{path} holds a model named {name!r}, not one of mackay-ext's "
                         f"{tuple(models.MODELS)}: rebuild it in Python with "
                         "load_compressed(path, model=your_network)")
    return name


def _as_trained(data, saved: Any) -> torch.Tensor:
    """The test inputs standardised as the model's training inputs were: load() standardises with
    the statistics of its own training split (seed 0's), and a run with another --seed held out
    other validation images, so its mean and std differ slightly; model.pt records them."""
    if data.standardisation is None or not isinstance(saved, dict):
        return data.x_test
    try:
        mean, std = float(saved["mean"]), float(saved["std"])
    except (KeyError, TypeError, ValueError):
        return data.x_test
    loaded_mean, loaded_std = data.standardisation
    return (data.x_test * loaded_std + loaded_mean - mean) / std


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
    saved = read_metadata(args.path)   # checked against the file's digest, as load_compressed did
    dataset = args.dataset or saved.get("dataset") or models.DEFAULT_DATASET[model_name]
    _check_dataset_flags(dataset, args.data_dir, parser)
    problem = _input_problem(model, model_name, dataset)
    if problem:
        parser.error(f"--dataset {dataset}: the model in {args.path} does not fit it: {problem}")
    try:
        data = datasets.load(dataset, args.data_dir)
    except datasets.DatasetError as error:
        return _fail(error)
    model.to(args.device)
    x_test = _as_trained(data, saved.get("input_standardisation"))
    accuracy = evaluate(model, x_test, data.y_test, device=args.device)[0]
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
