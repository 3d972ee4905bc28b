"""Reproduce, then beat, the published MNIST compression results: one command, one table.

    python bench/reproduce_mnist.py --data-dir ../shared/data/mnist          # full run, 76 min on 2 cores
    python bench/reproduce_mnist.py --data-dir DIR --smoke --out /tmp/smoke  # a minute, for CI

For each model and seed: a dense baseline is trained; every pruning method starts from that same
dense network; the test set is evaluated once per row, after training. Hyperparameters (RECIPES)
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
  pruned by the same snr criterion (the paper's alpha >= 1e13 never fires under Adam, whose
  steps keep |w| near the learning rate).
- magnitude: torch.nn.utils.prune global L1 on the dense network to the sparsity of this seed's
  mackay-weight row, then fine-tuned for as many epochs as that row trained after pretraining.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from mackay_ext import data as datasets
from mackay_ext import models
from mackay_ext.optim import MacKayAdam, ard_param_groups
from mackay_ext.pruner import MacKayPruner
from mackay_ext.train import evaluate

# Per model: dense pretraining, and per method the ARD phase and the fine-tuning that follows.
# epochs: ARD epochs; update_every: optimizer steps between precision updates; warmup: updates
# before the first pruning (alpha settles first); threshold: the snr (w^2 / Sigma) criterion.
RECIPES: dict[str, dict[str, Any]] = {
    "lenet-300-100": {
        "dense": dict(epochs=20, lr=1e-3),
        # validation (seed 0), with ±2-pixel shifts: 100 ARD epochs at lr 5e-4, threshold 0.05
        # -> 1.64% kept, val error 1.42%; threshold 0.1 -> 1.57%, 1.56%; lr 1e-3, threshold
        # 0.05 -> 1.19%, 1.50% (chosen). Without augmentation every schedule tried sat at val
        # error 2.0-2.2% for 1-1.6% kept (lr 5e-4 -> 1.41%, 2.16%; ef-exact curvature 1.77%,
        # 2.26%; fisher-mc 0.96%, 2.40%): the sparse net fits the training set exactly (loss
        # 1e-4) and the shifts are what it lacked, not a better mask.
        "mackay-weight": dict(granularity="weight", rule="mackay", threshold=0.05, epochs=100,
                              update_every=430, warmup=5, lr=1e-3, finetune_epochs=30,
                              finetune_lr=1e-3),
        # validation (chosen before augmentation, kept with it): 17.7% kept (137 inputs, 51 and
        # 84 neurons), val error 2.36% without shifts
        "mackay-group": dict(granularity="filter", rule="mackay", threshold=0.05, epochs=30,
                             update_every=430, warmup=5, lr=1e-3, finetune_epochs=10,
                             finetune_lr=1e-3),
        # validation without shifts: lr 1e-3 -> 6.6% kept, val error 6.14%; the paper's lr 1e-4
        # -> 5.7%, 7.52%
        "paper": dict(granularity="filter", rule="paper", threshold=0.05, epochs=30,
                      update_every=430, warmup=5, lr=1e-3, finetune_epochs=10, finetune_lr=1e-3),
    },
    "lenet-5-caffe": {
        "dense": dict(epochs=15, lr=1e-3),
        # validation (seed 0; about 10 s an epoch here, so fewer epochs than LeNet-300-100).
        # Without augmentation: threshold 0.05, 30 ARD epochs -> 0.68% kept, val error 1.10%;
        # threshold 0.1, 40 epochs -> 0.49%, 1.26%. With ±2-pixel shifts, threshold 0.1 at lr 1e-3:
        # 40 epochs -> 0.68%, 0.70%; 60 epochs -> 0.55%, 0.78%; alpha updated every half epoch,
        # 50 epochs -> 0.58%, 0.88%; lr 2e-3, 50 epochs -> 0.46%, 0.88% (chosen: the pace of
        # pruning follows Adam's step size more than the threshold)
        "mackay-weight": dict(granularity="weight", rule="mackay", threshold=0.1, epochs=50,
                              update_every=430, warmup=2, lr=2e-3, finetune_epochs=10,
                              finetune_lr=1e-3),
        # validation without shifts: 7.3% kept after 18 ARD epochs (20 conv1 and 9 conv2
        # filters, 51 of the 800 fc1 inputs) at val error 1.6% before fine-tuning and before the
        # unused fc1 rows go
        "mackay-group": dict(granularity="filter", rule="mackay", threshold=0.05, epochs=20,
                             update_every=430, warmup=2, lr=1e-3, finetune_epochs=8,
                             finetune_lr=1e-3),
        # the LeNet-300-100 validation runs showed the gamma = 1 rule over-regularising; kept short
        "paper": dict(granularity="filter", rule="paper", threshold=0.05, epochs=15,
                      update_every=430, warmup=2, lr=1e-3, finetune_epochs=5, finetune_lr=1e-3),
    },
}
METHODS = ("mackay-weight", "mackay-group", "paper")
BATCH_SIZE = 128
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
class Run:
    """One model on one split and seed: fixed batch orders, validation-selected weights."""

    def __init__(self, data: datasets.Splits, seed: int, device: str, log: Callable[[str], None],
                 channels_last: bool = False, shift: int = 0):
        self.data, self.seed, self.device, self.log, self.shift = data, seed, device, log, shift
        self.num_data = len(data.x_train)
        # convolutions run about 1.5x faster on CPU in channels-last (NHWC) layout
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def batches(self, tag: int):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + tag)
        order = torch.randperm(self.num_data, generator=generator)
        for start in range(0, self.num_data, BATCH_SIZE):
            index = order[start:start + BATCH_SIZE]
            x = self.data.x_train[index]
            if self.shift:
                x = datasets.random_shift(x, self.shift, generator=generator)
            yield (x.to(self.device, memory_format=self.memory_format),
                   self.data.y_train[index].to(self.device))

    def validate(self, model: nn.Module) -> float:
        return evaluate(model, self.data.x_val, self.data.y_val, device=self.device)[0]

    def train(self, model, optimizer, epochs: int, tag: int, *, schedule: bool = True,
              keep_best: bool = True, after_step: Callable[[], None] | None = None,
              name: str = "") -> float:
        """`epochs` epochs of Adam-type training (cosine lr when `schedule`); returns the best
        validation accuracy and, with `keep_best`, leaves the weights of that epoch in the model
        (not while pruning: an earlier epoch's weights would revive pruned ones)."""
        scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(epochs, 1))
                     if schedule else None)
        best_accuracy, best_state = -1.0, None
        for epoch in range(epochs):
            model.train()
            for xb, yb in self.batches(tag + epoch):
                optimizer.zero_grad(set_to_none=True)
                nn.functional.cross_entropy(model(xb), yb).backward()
                optimizer.step()
                if after_step is not None:
                    after_step()
            if scheduler is not None:
                scheduler.step()
            accuracy = self.validate(model)
            self.log(f"  {name} epoch {epoch + 1}/{epochs}: val {100 * accuracy:.2f}%, kept "
                     f"{structure(model)['weights_kept']:.2f}%")
            if accuracy >= best_accuracy:
                best_accuracy = accuracy
                best_state = copy.deepcopy(model.state_dict()) if keep_best else None
        if best_state is not None:
            model.load_state_dict(best_state)
        return best_accuracy


def prunable(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def train_dense(run: Run, model: nn.Module, recipe: dict[str, Any]) -> float:
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe["lr"])
    return run.train(model, optimizer, recipe["epochs"], tag=0, name="dense")


def train_mackay(run: Run, model: nn.Module, recipe: dict[str, Any]) -> dict[str, Any]:
    """ARD phase (MacKayAdam + MacKayPruner, alpha re-estimated every `update_every` steps),
    then fine-tuning of the kept weights with the prior switched off."""
    optimizer = MacKayAdam(ard_param_groups(model), lr=recipe["lr"], num_data=run.num_data,
                           batch_size=BATCH_SIZE)
    pruner = MacKayPruner(model, optimizer, num_data=run.num_data, granularity=recipe["granularity"],
                          rule=recipe["rule"], prune="snr", threshold=recipe["threshold"])
    steps = {"count": 0, "updates": 0}

    def after_step():
        steps["count"] += 1
        if steps["count"] % recipe["update_every"] == 0:
            # the first `warmup` updates only move alpha: nothing is pruned while it settles
            pruner.threshold = 0.0 if steps["updates"] < recipe["warmup"] else recipe["threshold"]
            pruner.update()
            steps["updates"] += 1

    run.train(model, optimizer, recipe["epochs"], tag=1000, schedule=False, keep_best=False,
              after_step=after_step, name="ard")
    groups = group_counts(pruner)
    unused = pruner.prune_unused_units()  # rows of units whose outputs are all pruned
    for name in pruner.layers:  # prior off, pruned weights stay pruned (alpha = +inf)
        alpha = pruner.alpha(name)
        alpha.masked_fill_(torch.isfinite(alpha), 0.0)
    for group in optimizer.param_groups:
        group["lr"] = recipe["finetune_lr"]
    run.train(model, optimizer, recipe["finetune_epochs"], tag=2000, name="fine-tune")
    return {"updates": steps["updates"], "groups": groups, "unused_unit_weights": unused}


def group_counts(pruner: MacKayPruner) -> dict[str, list[int]]:
    return {layer["name"]: [layer["groups_kept"], layer["groups"]]
            for layer in pruner.report()["layers"]}


def train_magnitude(run: Run, model: nn.Module, kept: int, epochs: int, lr: float) -> None:
    """Global L1 magnitude pruning to `kept` weights, then fine-tuning with the masks held."""
    parameters = [(m, "weight") for _, m in prunable(model)]
    total = sum(m.weight.numel() for m, _ in parameters)
    model.to(memory_format=torch.contiguous_format)  # global_unstructured views weights flat
    torch_prune.global_unstructured(parameters, pruning_method=torch_prune.L1Unstructured,
                                    amount=total - kept)
    model.to(memory_format=run.memory_format)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    run.train(model, optimizer, epochs, tag=3000, name="magnitude fine-tune")
    for module, name in parameters:
        torch_prune.remove(module, name)


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
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
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
def shrink(recipes: dict[str, Any]) -> dict[str, Any]:
    """The smoke version: every phase one or two epochs, updates every 5 steps."""
    small = copy.deepcopy(recipes)
    for model in small.values():
        for recipe in model.values():
            recipe["epochs"] = min(recipe["epochs"], 2)
            if "update_every" in recipe:
                recipe.update(update_every=5, warmup=1, finetune_epochs=1)
    return small


def subset(data: datasets.Splits, train: int, val: int, test: int) -> datasets.Splits:
    return datasets.Splits(data.x_train[:train], data.y_train[:train], data.x_val[:val],
                           data.y_val[:val], data.x_test[:test], data.y_test[:test], data.name)


def run_model(model_name: str, data: datasets.Splits, seeds: list[int], recipes: dict[str, Any],
              device: str, log: Callable[[str], None], shift: int) -> list[dict[str, Any]]:
    rows, info = [], hardware(device)
    recipe = recipes[model_name]
    for seed in seeds:
        convolutional = model_name == "lenet-5-caffe"
        run = Run(data, seed, device, log, channels_last=convolutional, shift=shift)

        def finish(method: str, model: nn.Module, seconds: float, val: float, **extra):
            test_accuracy = evaluate(model, data.x_test, data.y_test, device=device)[0]  # once
            row = dict(model=model_name, method=method, seed=seed, test_error=100 * (1 - test_accuracy),
                       val_accuracy=val, wall_seconds=seconds, hardware=info, augment_shift=shift,
                       **structure(model), **extra)
            log(f"{model_name} seed {seed} {method}: test error {row['test_error']:.2f}%, kept "
                f"{row['weights_kept']:.2f}% ({row['compression']:.0f}x), {seconds:.0f} s")
            rows.append(row)
            return row

        torch.manual_seed(seed)
        dense = models.create(model_name, num_classes=10).to(device, memory_format=run.memory_format)
        start = time.perf_counter()
        dense_val = train_dense(run, dense, recipe["dense"])
        dense_seconds = time.perf_counter() - start
        finish("dense", dense, dense_seconds, dense_val)
        by_method = {}
        for method in METHODS:
            torch.manual_seed(seed)
            model = copy.deepcopy(dense)
            start = time.perf_counter()
            extra = train_mackay(run, model, recipe[method])
            by_method[method] = finish(method, model, dense_seconds + time.perf_counter() - start,
                                       run.validate(model), **extra)
        best = by_method["mackay-weight"]
        epochs = recipe["mackay-weight"]["epochs"] + recipe["mackay-weight"]["finetune_epochs"]
        model = copy.deepcopy(dense)
        start = time.perf_counter()
        train_magnitude(run, model, best["kept"], epochs, recipe["mackay-weight"]["finetune_lr"])
        finish("magnitude (global L1)", model, dense_seconds + time.perf_counter() - start,
               run.validate(model))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.path.join("..", "shared", "data", "mnist"))
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--models", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
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
    recipes = RECIPES
    if args.smoke:
        data, recipes = subset(data, 600, 200, 200), shrink(RECIPES)
    rows: list[dict[str, Any]] = []
    for model_name in args.models:
        start = time.perf_counter()
        rows += run_model(model_name, data, args.seeds, recipes, args.device, log, args.augment_shift)
        log(f"{model_name}: all rows in {time.perf_counter() - start:.0f} s")
    stem = "mnist_smoke" if args.smoke else "mnist"
    if args.augment_shift != AUGMENT_SHIFT:
        stem += f"_shift{args.augment_shift}"
    os.makedirs(args.out, exist_ok=True)
    # measured rows of models not run this time are kept from an earlier run with the same
    # augmentation (models may run separately); published rows are added afresh
    table = [row for row in previous_rows(os.path.join(args.out, stem + ".json"))
             if row["model"] not in args.models and row["source"] == "measured"
             and row.get("augment_shift", 0) == args.augment_shift]
    table += aggregate(rows)
    measured_models = {row["model"] for row in table}
    table += [row for row in published_rows() if row["model"] in measured_models]
    table.sort(key=lambda row: (row["model"], row["source"] != "measured"))
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
