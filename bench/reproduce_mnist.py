"""Reproduce, then beat, the published MNIST compression results: one command, one table.

    python bench/reproduce_mnist.py --data-dir ../shared/data/mnist          # full run, 76 min on 2 cores
    python bench/reproduce_mnist.py --data-dir DIR --smoke --out /tmp/smoke  # a minute, for CI

For each model and seed: a dense baseline is trained; every pruning method starts from that same
dense network; the test set is evaluated once per row, after training. Hyperparameters (mackay_ext.recipes)
were chosen on the validation split (5,000 images held out of the 60,000 training images).
Every training phase of every row sees randomly shifted images (up to ±2 pixels,
--augment-shift); `--augment-shift 0` trains on the plain images and writes mnist_shift0.*.
Writes <out>/mnist.json (a list of rows) and <out>/mnist.md (mnist_shiftN.* with another
--augment-shift, mnist_smoke*.* with --smoke).

Methods
- mackay-weight: per-weight ARD, MacKay's rule, ef-batch curvature from MacKayAdam's fused step,
  alpha re-estimated every `update_every` steps, snr pruning; then the weights feeding units
  whose every outgoing weight is pruned are dropped (the output is unchanged), the prior is
  switched off and the kept weights are fine-tuned (the pruned ones stay exactly 0).
- mackay-group: the same with one alpha per conv filter and per input neuron of a Linear layer.
- paper: the grouping above with the source paper's rule (gamma = 1: alpha_g = n_g / |w_g|^2),
  pruned at alpha >= 1e13 as the paper's code (under gamma = 1 every group's snr is near 1: the snr
  criterion these rows used before pruned only at alpha_g > n_g x 9.5e15, set by eps; the recipes'
  cosine lr lets the weights shrink that far).
- magnitude: torch.nn.utils.prune global L1 on the dense network to the sparsity of this seed's
  mackay-weight row, then fine-tuned for as many epochs as that row trained after pretraining.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
from typing import Any, Callable

import torch
from _hardware import cpu_name
from torch import nn
from torch.nn.utils import prune as torch_prune

from mackay_ext import data as datasets
from mackay_ext import models, recipes
from mackay_ext.train import FitConfig, Trainer, evaluate, set_seed

# The recipes live in the library (mackay_ext.recipes, `mackay-ext prune --recipe NAME`); this
# script only drives the library's Trainer over them, seeds and baselines.
METHOD_RECIPES = {
    "lenet-300-100": {"mackay-weight": "lenet-300-100-weight", "mackay-group": "lenet-300-100-group",
                      "paper": "lenet-300-100-paper"},
    "lenet-5-caffe": {"mackay-weight": "lenet-5-caffe-weight", "mackay-group": "lenet-5-caffe-channel",
                      "paper": "lenet-5-caffe-paper"},
}
METHODS = ("mackay-weight", "mackay-group", "paper")
# every training phase of every measured row (dense, MacKay, magnitude) sees each image moved by
# a random whole-pixel offset of up to this many pixels (mackay_ext.data.random_shift)
AUGMENT_SHIFT = 2

PUBLISHED = [
    dict(model="lenet-300-100", method="Sparse VD", test_error=1.92, compression=68,
         source="Molchanov, Ashukha, Vetrov 2017, Variational Dropout Sparsifies DNNs"),
    dict(model="lenet-300-100", method="pruning + retraining", test_error=1.59, compression=12,
         source="Han, Pool, Tran, Dally 2015, Learning both Weights and Connections"),
    dict(model="lenet-5-caffe", method="Sparse VD", test_error=0.75, compression=280,
         source="Molchanov, Ashukha, Vetrov 2017, Variational Dropout Sparsifies DNNs"),
    dict(model="lenet-5-caffe", method="pruning + retraining", test_error=0.77, compression=12,
         source="Han, Pool, Tran, Dally 2015, Learning both Weights and Connections"),
    dict(model="lenet-5-caffe", method="group ARD (MacKay)", test_error=0.67, weights_kept=20.1,
         source="Li, Mao, Zhang, Huai 2020, A revisit to MacKay algorithm (Front. Comput. Sci.)"),
    dict(model="lenet-5-caffe", method="group ARD (MacKay)", test_error=1.25, weights_kept=4.17,
         source="Li, Mao, Zhang, Huai 2020, A revisit to MacKay algorithm (Front. Comput. Sci.)"),
]
TARGETS = {  # (max test error %, max weights kept %) of the issue, for the table's verdicts
    ("lenet-300-100", "mackay-weight"): (1.8, 1.5),
    ("lenet-5-caffe", "mackay-weight"): (0.9, 0.5),
    ("lenet-5-caffe", "mackay-group"): (1.0, 5.0),
}


# ---------------------------------------------------------------------------------- training
def prunable(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def config_for(recipe: recipes.Recipe, seed: int, shift: int, smoke: bool, **overrides) -> FitConfig:
    """The recipe's FitConfig for one seed (smoke: every phase one or two epochs, an update every
    5 steps, so CI runs every path in a minute)."""
    if smoke:
        config = recipe.config
        overrides = dict(dict(pretrain_epochs=min(config.pretrain_epochs, 2),
                              epochs=min(config.epochs, 2), update_every_steps=5, warmup_updates=1,
                              finetune_epochs=1), **overrides)
    return recipe.fit_config(seed=seed, augment_shift=shift, **overrides)


def train_magnitude(trainer: Trainer, kept: int, epochs: int, lr: float) -> None:
    """Global L1 magnitude pruning of the trainer's dense model to `kept` weights, then the
    trainer's fine-tuning (the prior off, the pruned weights held at 0 as alpha = +inf)."""
    model = trainer.model
    parameters = [(m, "weight") for _, m in prunable(model)]
    total = sum(m.weight.numel() for m, _ in parameters)
    memory_format = trainer.memory_format
    model.to(memory_format=torch.contiguous_format)  # global_unstructured views weights flat
    torch_prune.global_unstructured(parameters, pruning_method=torch_prune.L1Unstructured,
                                    amount=total - kept)
    for module, name in parameters:
        torch_prune.remove(module, name)   # the zeros are now the weights themselves
    model.to(memory_format=memory_format)
    with torch.no_grad():
        for name, target in trainer.pruner.targets.items():
            trainer.pruner.alpha(name).copy_(torch.where(target.param != 0, 0.0, math.inf))
    trainer.finetune(epochs, lr, drop_unused=False)  # exactly the MacKay row's number of weights


# --------------------------------------------------------------------------------- reporting
def structure(model: nn.Module) -> dict[str, Any]:
    """Per layer: weights kept / total and output units (neurons, filters) that keep a weight."""
    layers = []
    for name, module in prunable(model):
        nonzero = module.weight.detach() != 0
        layers.append({"name": name, "kept": int(nonzero.sum()), "total": module.weight.numel(),
                       "units_kept": int(nonzero.flatten(1).any(1).sum()),
                       "units": module.weight.shape[0]})
    first = prunable(model)[0][1].weight.detach() != 0
    kept = sum(layer["kept"] for layer in layers)
    total = sum(layer["total"] for layer in layers)
    return {"layers": layers, "weights_kept": 100 * kept / total, "compression": total / max(kept, 1),
            "kept": kept, "total": total,
            "inputs_kept": int(first.transpose(0, 1).flatten(1).any(1).sum())}


def hardware(device: str) -> str:
    cpu = cpu_name()
    if torch.device(device).type == "cuda":
        cpu = torch.cuda.get_device_name()
    return f"{cpu} ({torch.get_num_threads()} threads), torch {torch.__version__}"


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (model, method): mean over seeds, with the spread (min, max)."""
    grouped: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        grouped.setdefault((row["model"], row["method"]), []).append(row)
    out = []
    for (model, method), runs in grouped.items():
        errors = [r["test_error"] for r in runs]
        kept = [r["weights_kept"] for r in runs]
        first = runs[0]
        out.append({
            "model": model, "method": method, "source": "measured",
            "test_error": statistics.fmean(errors), "test_error_range": [min(errors), max(errors)],
            "weights_kept": statistics.fmean(kept), "weights_kept_range": [min(kept), max(kept)],
            "compression": statistics.fmean(r["compression"] for r in runs),
            "seeds": [r["seed"] for r in runs],
            "wall_seconds": statistics.fmean(r["wall_seconds"] for r in runs),
            "layers_kept": [[layer["kept"] for layer in r["layers"]] for r in runs],
            "layers_total": [layer["total"] for layer in first["layers"]],
            "units_kept": [[layer["units_kept"] for layer in r["layers"]] for r in runs],
            "units_total": [layer["units"] for layer in first["layers"]],
            "inputs_kept": [r["inputs_kept"] for r in runs],
            "val_accuracy": [r["val_accuracy"] for r in runs],
            "hardware": first["hardware"], "augment_shift": first.get("augment_shift", 0),
            "per_seed": runs,
        })
    return out


def verdict(row: dict[str, Any]) -> str:
    target = TARGETS.get((row["model"], row["method"]))
    if target is None:
        return ""
    met = row["test_error"] <= target[0] and row["weights_kept"] <= target[1]
    return f"{'met' if met else 'NOT met'} (≤{target[0]}% error at ≤{target[1]}% kept)"


def markdown(rows: list[dict[str, Any]], command: str, smoke: bool) -> str:
    lines = ["# MNIST compression: MacKay's evidence framework against the published results", "",
             f"Regenerate: `{command}`", ""]
    if smoke:
        lines += ["**Smoke run on a subset: these figures mean nothing.**", ""]
    lines += ["Measured rows: mean over the seeds, [min, max] in brackets; the test set is used "
              "once per row. Hyperparameters were chosen on a 5,000-image validation split. "
              "Per-layer kept and units (neurons / filters with a weight left) are for the first seed.",
              "", "| model | method | test error % | weights kept % | compression × | per-layer kept | "
              "units kept | seeds | wall s | hardware | source | target |", "|" + "---|" * 12]
    for row in rows:
        if row["source"] == "measured":
            error = (f"{row['test_error']:.2f} [{row['test_error_range'][0]:.2f}, "
                     f"{row['test_error_range'][1]:.2f}]")
            kept = (f"{row['weights_kept']:.2f} [{row['weights_kept_range'][0]:.2f}, "
                    f"{row['weights_kept_range'][1]:.2f}]")
            layers = " · ".join(f"{k}/{t}" for k, t in zip(row["layers_kept"][0], row["layers_total"]))
            units = " · ".join(f"{k}/{t}" for k, t in zip(row["units_kept"][0], row["units_total"]))
            units += f" (inputs {row['inputs_kept'][0]})"
            seeds = ",".join(str(s) for s in row["seeds"])
            wall = f"{row['wall_seconds']:.0f}"
            machine = row["hardware"].split(", torch")[0]
            source = "measured"
        else:
            error = f"{row['test_error']:.2f}"
            kept = f"{row['weights_kept']:.2f}"
            layers = units = seeds = wall = machine = ""
            source = row["source"]
        lines.append(f"| {row['model']} | {row['method']} | {error} | {kept} | "
                     f"{row['compression']:.1f} | {layers} | {units} | {seeds} | {wall} | {machine} | {source} | "
                     f"{verdict(row)} |")
    measured = [row for row in rows if row["source"] == "measured"]
    if measured:
        lines += ["", f"Hardware: {measured[0]['hardware']}. Wall time of a pruned row includes "
                  "the dense pretraining it starts from."]
        shifts = {row["model"]: row.get("augment_shift", 0) for row in measured}
        lines += ["", "Training data of the measured rows (dense, MacKay and magnitude alike): " + "; ".join(
            f"{model}: " + (f"each image moved by a random offset of up to ±{shift} pixels along "
                            "each axis" if shift else "no augmentation")
            for model, shift in shifts.items()) + ". The cited papers report no augmentation."]
    return "\n".join(lines) + "\n"


def published_rows() -> list[dict[str, Any]]:
    rows = []
    for row in PUBLISHED:
        row = dict(row)
        if "compression" in row:
            row["weights_kept"] = 100 / row["compression"]
        else:
            row["compression"] = 100 / row["weights_kept"]
        rows.append(dict(row, seeds=None, wall_seconds=None))
    return rows


def previous_rows(path: str) -> list[dict[str, Any]]:
    try:
        with open(path) as handle:
            rows = json.load(handle)
    except (OSError, ValueError):
        return []
    return rows if isinstance(rows, list) else []


# ---------------------------------------------------------------------------------- the run
def subset(data: datasets.Splits, train: int, val: int, test: int) -> datasets.Splits:
    return datasets.Splits(data.x_train[:train], data.y_train[:train], data.x_val[:val],
                           data.y_val[:val], data.x_test[:test], data.y_test[:test], data.name)


def run_model(model_name: str, data: datasets.Splits, seeds: list[int], device: str,
              log: Callable[[str], None], shift: int, smoke: bool,
              methods: tuple[str, ...] = METHODS) -> list[dict[str, Any]]:
    """The dense row and `methods`' rows of one model, each seed from one dense network; the
    magnitude row with mackay-weight (it prunes to that row's sparsity)."""
    rows, info = [], hardware(device)
    method_recipes = {method: recipes.get(name) for method, name in METHOD_RECIPES[model_name].items()
                      if method in methods}
    weight_recipe = recipes.get(METHOD_RECIPES[model_name]["mackay-weight"])
    for seed in seeds:
        def finish(method: str, model: nn.Module, seconds: float, **extra):
            test_accuracy = evaluate(model, data.x_test, data.y_test, device=device)[0]  # once
            val_accuracy = evaluate(model, data.x_val, data.y_val, device=device)[0]
            row = dict(model=model_name, method=method, seed=seed, test_error=100 * (1 - test_accuracy),
                       val_accuracy=val_accuracy, wall_seconds=seconds, hardware=info,
                       augment_shift=shift, **structure(model), **extra)
            log(f"{model_name} seed {seed} {method}: test error {row['test_error']:.2f}%, kept "
                f"{row['weights_kept']:.2f}% ({row['compression']:.0f}x), {seconds:.0f} s")
            rows.append(row)
            return row

        def trainer(model, recipe, **overrides):
            return Trainer(model, data, config_for(recipe, seed, shift, smoke, **overrides),
                           pruner_options=recipe.pruner, device=device,
                           progress=lambda message: log("  " + message))

        set_seed(seed)
        start = time.perf_counter()
        dense = trainer(models.create(model_name, num_classes=10), weight_recipe)
        dense.pretrain()            # every row starts from this one dense network
        dense_seconds = time.perf_counter() - start
        finish("dense", dense.model, dense_seconds)
        by_method = {}
        for method, recipe in method_recipes.items():
            set_seed(seed)
            start = time.perf_counter()
            run = trainer(copy.deepcopy(dense.model), recipe, pretrain_epochs=0)
            run.run()
            groups = {layer["name"]: [layer["groups_kept"], layer["groups"]]
                      for layer in run.pruner.history[-1]["layers"]}   # before the silent units go
            by_method[method] = finish(method, run.model, dense_seconds + time.perf_counter() - start,
                                       updates=len(run.pruner.history), groups=groups,
                                       unused_unit_weights=run.unused_unit_weights)
        if "mackay-weight" not in by_method:
            continue
        config = config_for(weight_recipe, seed, shift, smoke)
        set_seed(seed)
        start = time.perf_counter()
        magnitude = trainer(copy.deepcopy(dense.model), weight_recipe, pretrain_epochs=0)
        train_magnitude(magnitude, by_method["mackay-weight"]["kept"],
                        config.epochs + config.finetune_epochs, config.finetune_lr)
        finish("magnitude (global L1)", magnitude.model, dense_seconds + time.perf_counter() - start)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.path.join("..", "shared", "data", "mnist"))
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--models", nargs="+", default=list(METHOD_RECIPES), choices=list(METHOD_RECIPES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
                        help="the MacKay rows to run (from a dense network trained first, whose row is "
                             "tabled only where the table has none: its other rows started from the one "
                             "it has; magnitude runs with mackay-weight); the other rows are kept")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny subset and one or two epochs per phase (CI); writes mnist_smoke.*")
    parser.add_argument("--augment-shift", type=int, default=AUGMENT_SHIFT, metavar="PIXELS",
                        help="random shifts of the training images, up to PIXELS each way (0: none; "
                             "a value other than the default writes mnist_shiftPIXELS.*)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.augment_shift < 0:
        parser.error(f"--augment-shift must be >= 0, got {args.augment_shift}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    log = (lambda message: None) if args.quiet else (lambda message: print(message, flush=True))
    try:
        data = datasets.load_mnist(args.data_dir)
    except datasets.DatasetError as error:
        print(f"reproduce_mnist: {error}", file=sys.stderr)
        return 1
    if args.smoke:
        data = subset(data, 600, 200, 200)
    rows: list[dict[str, Any]] = []
    for model_name in args.models:
        start = time.perf_counter()
        rows += run_model(model_name, data, args.seeds, args.device, log, args.augment_shift, args.smoke,
                          tuple(args.methods))
        log(f"{model_name}: all rows in {time.perf_counter() - start:.0f} s")
    stem = "mnist_smoke" if args.smoke else "mnist"
    if args.augment_shift != AUGMENT_SHIFT:
        stem += f"_shift{args.augment_shift}"
    os.makedirs(args.out, exist_ok=True)
    # measured rows not run this time (other models, other --methods) are kept from an earlier run
    # with the same augmentation; published rows are added afresh
    fresh, previous = aggregate(rows), previous_rows(os.path.join(args.out, stem + ".json"))
    if set(args.methods) != set(METHODS):   # the table's dense row is the start of its other rows
        tabled_dense = {row["model"] for row in previous if row["method"] == "dense"
                        and row.get("augment_shift", 0) == args.augment_shift}
        fresh = [row for row in fresh if not (row["method"] == "dense" and row["model"] in tabled_dense)]
    ran = {(row["model"], row["method"]) for row in fresh}
    table = [row for row in previous
             if (row["model"], row["method"]) not in ran and row["source"] == "measured"
             and row.get("augment_shift", 0) == args.augment_shift]
    table += fresh
    measured_models = {row["model"] for row in table}
    table += [row for row in published_rows() if row["model"] in measured_models]
    order = ["dense", *METHODS, "magnitude (global L1)"]   # (published rows keep their own order)
    table.sort(key=lambda row: (row["model"], row["source"] != "measured",
                                order.index(row["method"]) if row["method"] in order else len(order)))
    command = "python bench/reproduce_mnist.py --data-dir ../shared/data/mnist" + (
        " --smoke" if args.smoke else "") + (
        f" --augment-shift {args.augment_shift}" if args.augment_shift != AUGMENT_SHIFT else "")
    with open(os.path.join(args.out, stem + ".json"), "w") as handle:
        json.dump(table, handle, indent=1)
    with open(os.path.join(args.out, stem + ".md"), "w") as handle:
        handle.write(markdown(table, command, args.smoke))
    log(f"wrote {os.path.join(args.out, stem)}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
