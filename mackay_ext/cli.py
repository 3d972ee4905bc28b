"""mackay-ext: compress a network with MacKay's evidence framework from the command line.

  mackay-ext prune                      # the digits MLP on scikit-learn's digits, < 1 minute
  mackay-ext prune --model lenet-300-100 --data-dir ../shared/data/mnist --out runs/lenet
  mackay-ext evaluate runs/lenet/model.pt --data-dir ../shared/data/mnist
  torchrun --standalone --nproc_per_node 2 -m mackay_ext.cli prune ...   # DistributedDataParallel
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from typing import Any

import torch

from . import data as datasets
from ._files import CorruptFileError, UnsafeFileError, load_plain
from . import models
from .pruner import GRANULARITIES
from .sparse import SparseConv2d, SparseLinear, load_compressed, save_compressed, sparsify
from .train import FitConfig, Trainer, evaluate, set_seed

# Defaults per model: (pretrain_epochs, rounds, epochs per round, batch size, lr)
RECIPES = {
    "digits-mlp": dict(pretrain_epochs=30, rounds=5, epochs=20, batch_size=32, lr=1e-3),
    "lenet-300-100": dict(pretrain_epochs=20, rounds=4, epochs=10, batch_size=128, lr=1e-3),
    "lenet-5-caffe": dict(pretrain_epochs=15, rounds=4, epochs=8, batch_size=128, lr=1e-3),
}
GENERIC_RECIPE = dict(pretrain_epochs=30, rounds=4, epochs=15, batch_size=128, lr=1e-3)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mackay-ext", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    prune = sub.add_parser("prune", help="train, re-estimate precisions, prune; write a report")
    prune.add_argument("--model", default="digits-mlp", choices=sorted(models.MODELS))
    prune.add_argument("--dataset", choices=datasets.DATASETS,
                       help="default: the model's own (digits for digits-mlp, mnist for LeNets)")
    prune.add_argument("--data-dir", help="directory of the dataset files (MNIST IDX, CIFAR pickles)")
    prune.add_argument("--download", action="store_true", help="fetch MNIST into --data-dir first")
    prune.add_argument("--granularity", default="weight", choices=GRANULARITIES)
    prune.add_argument("--rule", default="mackay", choices=("mackay", "em", "paper"))
    prune.add_argument("--prune", dest="criterion", default="snr", choices=("snr", "alpha"))
    prune.add_argument("--threshold", type=float, help="pruning threshold (snr: 0.05, alpha: 1e13)")
    prune.add_argument("--curvature", default="ef-batch", choices=("ef-batch", "ef-exact", "fisher-mc"),
                       help="diagonal curvature estimate for MacKay's gamma")
    prune.add_argument("--schedule", default="paper", choices=("paper", "in-run"))
    prune.add_argument("--pretrain-epochs", type=int)
    prune.add_argument("--rounds", type=int, help="outer MacKay iterations (paper schedule)")
    prune.add_argument("--epochs", type=int, help="retraining epochs per round (or in-run total)")
    prune.add_argument("--update-every", type=int, default=2, help="in-run: epochs between updates")
    prune.add_argument("--batch-size", type=int)
    prune.add_argument("--lr", type=float)
    prune.add_argument("--patience", type=int, default=5)
    prune.add_argument("--augment-shift", type=int, default=0, metavar="PIXELS",
                       help="move each training image by a random offset of up to PIXELS pixels "
                            "(image datasets; 2 suits MNIST)")
    prune.add_argument("--seed", type=int, default=0)
    prune.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    prune.add_argument("--backend", default="ext", choices=("ext", "torch"))
    prune.add_argument("--out", default="mackay-run", help="output directory (default: ./mackay-run)")
    prune.add_argument("--resume", metavar="CHECKPOINT", help="continue from a checkpoint.pt")
    prune.add_argument("--quiet", action="store_true", help="no progress output")
    ev = sub.add_parser("evaluate", help="accuracy and size of a saved compressed model")
    ev.add_argument("path")
    ev.add_argument("--dataset", choices=datasets.DATASETS)
    ev.add_argument("--data-dir")
    ev.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    return parser


def _positive(parser, name, value):
    if value is not None and value <= 0:
        parser.error(f"--{name.replace('_', '-')} must be positive, got {value}")


class _Progress:
    """Epoch lines and an in-place batch bar on a terminal; silent otherwise or with --quiet."""

    def __init__(self, quiet: bool):
        self.enabled = not quiet and sys.stderr.isatty()

    def line(self, message: str) -> None:
        if self.enabled:
            sys.stderr.write("\r\033[K" + message + "\n")

    def bar(self, done: int, total: int) -> None:
        if self.enabled and (done % 8 == 0 or done == total - 1):
            width = 30
            filled = int(width * (done + 1) / total)
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done + 1}/{total}")
            sys.stderr.flush()


def _settings(args) -> dict[str, Any]:
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
                device=args.device, backend=args.backend, **recipe)


def _layer_table(report: dict[str, Any]) -> str:
    rows = [f"{'layer':<14}{'kept':>10}{'total':>10}{'kept %':>9}{'groups kept':>16}{'alpha range':>24}"]
    for layer in report["layers"]:
        alpha = layer["alpha"]
        span = f"{alpha['min']:.2e}..{alpha['max']:.2e}" if alpha else "-"
        rows.append(f"{layer['name']:<14}{layer['kept']:>10}{layer['total']:>10}"
                    f"{100 * layer['kept'] / layer['total']:>8.2f}%"
                    f"{layer['groups_kept']:>8}/{layer['groups']:<7}{span:>24}")
    return "\n".join(rows)


def _plots(out: str, trainer: Trainer) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
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
    return written


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


def run_prune(args, parser) -> int:
    rank = _init_distributed(args.device)
    try:
        return _run_prune(args, parser, rank)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _run_prune(args, parser, rank: int) -> int:
    for name in ("pretrain_epochs", "rounds", "epochs", "batch_size", "lr", "update_every", "patience"):
        _positive(parser, name, getattr(args, name))
    if args.augment_shift < 0:
        parser.error(f"--augment-shift must be >= 0 pixels, got {args.augment_shift}")
    progress = _Progress(args.quiet or rank != 0)
    resume_state = None
    if args.resume:
        try:
            resume_state = load_plain(args.resume, "checkpoint")
        except (OSError, UnsafeFileError, CorruptFileError) as error:
            print(f"mackay-ext: {error}", file=sys.stderr)
            return 1
        settings = resume_state["cli_settings"]
    else:
        settings = _settings(args)
    if settings["device"] == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    try:
        data = datasets.load(settings["dataset"], settings["data_dir"], seed=settings["seed"],
                             download=args.download)
    except datasets.DatasetError as error:
        print(f"mackay-ext: {error}", file=sys.stderr)
        return 1
    shift = settings.get("augment_shift", 0)  # absent from checkpoints of earlier versions
    if shift and data.x_train.dim() != 4:
        parser.error(f"--augment-shift needs an image dataset; {settings['dataset']} inputs are flat "
                     f"vectors of shape {tuple(data.x_train.shape[1:])}")
    set_seed(settings["seed"])
    model = models.create(settings["model"], num_classes=data.num_classes)
    config = FitConfig(schedule=settings["schedule"], pretrain_epochs=settings["pretrain_epochs"],
                       rounds=settings["rounds"], epochs=settings["epochs"],
                       update_every=settings["update_every"], batch_size=settings["batch_size"],
                       lr=settings["lr"], retrain_lr=settings["lr"], patience=settings["patience"],
                       seed=settings["seed"], backend=settings["backend"],
                       augment_shift=shift)
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
    checkpoint = os.path.join(args.out, "checkpoint.pt")
    pruner_options = dict(granularity=settings["granularity"], rule=settings["rule"],
                          prune=settings["prune"], threshold=settings["threshold"],
                          curvature=settings.get("curvature", "ef-batch"))
    trainer = Trainer(model, data, config, pruner_options=pruner_options, device=settings["device"],
                      checkpoint=checkpoint, progress=progress.line, batch_progress=progress.bar)
    trainer.extra_state = {"cli_settings": settings}
    started = time.perf_counter()
    if resume_state is not None:
        trainer.load_checkpoint(args.resume)
        started -= resume_state.get("wall_seconds", 0.0)
    trainer.wall_clock_start = started
    trainer.run()
    wall = time.perf_counter() - started
    if rank != 0:  # rank 0 reports and writes; every rank holds the same model
        return 0

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
    sizes = save_model(os.path.join(args.out, "model.pt"), settings["model"], model)
    summary["model_file_bytes"], summary["dense_state_dict_bytes"] = sizes["bytes"], sizes["dense_bytes"]
    with open(os.path.join(args.out, "report.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    plots = _plots(args.out, trainer)
    print(_layer_table(report))
    print(f"\n{settings['model']} on {settings['dataset']}: test accuracy "
          f"{100 * trainer.dense_test_accuracy:.2f}% dense -> {100 * test_accuracy:.2f}% pruned; "
          f"weights kept {kept}/{total} ({100 * kept / total:.2f}%), compression "
          f"{total / max(kept, 1):.1f}x, {wall:.1f} s")
    print(f"wrote {args.out}/report.json, model.pt ({sizes['bytes'] / 1e3:.1f} kB against "
          f"{sizes['dense_bytes'] / 1e3:.1f} kB dense), checkpoint.pt"
          + "".join(f", {os.path.basename(p)}" for p in plots))
    return 0


def run_evaluate(args, parser) -> int:
    try:
        payload = load_plain(args.path, "compressed model")
        model_name = payload.get("model_name") if isinstance(payload, dict) else None
        if model_name not in models.MODELS:
            raise ValueError("not a model written by mackay-ext prune")
        model = load_compressed(args.path)
    except Exception as error:
        print(f"mackay-ext: cannot read {args.path}: {error}", file=sys.stderr)
        return 1
    dataset = args.dataset or models.DEFAULT_DATASET[model_name]
    try:
        data = datasets.load(dataset, args.data_dir)
    except datasets.DatasetError as error:
        print(f"mackay-ext: {error}", file=sys.stderr)
        return 1
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
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "prune":
        return run_prune(args, parser)
    return run_evaluate(args, parser)


if __name__ == "__main__":
    sys.exit(main())
