"""`mackay-ext prune`: train, prune, report; Ctrl-C and divergence end in one line that says how to go on."""
from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import os
import shlex
import sys
import time
import warnings
from typing import Any

import torch

from .. import data as datasets
from .. import models
from .._checksum import load_sealed
from .._files import CorruptFileError, UnsafeFileError, write_atomic
from .._validate import NonFiniteError
from ..sparse import (
    save_compressed,
    sparsify,
)
from ..train import Trainer, evaluate, set_seed
from .args import INPUT_SHAPES
from .out_lock import OutInUse, out_lock
from .progress import _Progress
from .settings import (
    _check_out,
    _check_settings,
    _checkpoint_settings,
    _fit_config,
    _length_changes_too_late,
    _pruner_options,
    _resume_settings,
    _settings,
    build_model,
)


def _layer_table(report: dict[str, Any]) -> str:
    rows = [f"{'layer':<14}{'kept':>10}{'total':>10}{'kept %':>9}{'groups kept':>16}{'alpha range':>25}"]
    switched_off = False
    for layer in report["layers"]:
        alpha, mark = layer["alpha"], " "
        if "alpha_before_switch_off" in layer:   # fine-tuned with the prior off: alpha is 0 now
            alpha, mark, switched_off = layer["alpha_before_switch_off"], "*", True
        span = f"{alpha['min']:.2e}..{alpha['max']:.2e}{mark}" if alpha else "- "
        rows.append(f"{layer['name']:<14}{layer['kept']:>10}{layer['total']:>10}"
                    f"{100 * layer['kept'] / layer['total']:>8.2f}%"
                    f"{layer['groups_kept']:>8}/{layer['groups']:<7}{span:>25}")
    if switched_off:
        rows.append("* before the fine-tuning, which ran with the prior off (alpha = 0 on the kept weights)")
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
    # after a fine-tuning with the prior off, the alphas it switched off
    before = trainer.pruner.alpha_before_switch_off or {}
    alphas = torch.cat([before.get(n, trainer.pruner.alpha(n)).flatten().cpu() for n in trainer.pruner.layers])
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


def save_model(path: str, model_name: str, model: torch.nn.Module, dataset: str | None = None,
               num_classes: int = 10, standardisation: tuple[float, float] | None = None) -> dict[str, int]:
    """The pruned model, compressed: its pruned layers as CSR nonzeros (save_compressed), with
    what rebuilds it (the dataset's channels for the CIFAR networks), the dataset it knows and the
    standardisation its inputs had (input_standardisation, see _input_standardisation)."""
    compressed = sparsify(copy.deepcopy(model).cpu(), min_sparsity=0.5)
    kwargs = {"num_classes": num_classes}
    if dataset is not None and "in_channels" in inspect.signature(models.MODELS[model_name]).parameters:
        kwargs["in_channels"] = INPUT_SHAPES[dataset][0]
    metadata = {"dataset": dataset} if dataset else {}
    if standardisation is not None:
        metadata["input_standardisation"] = _input_standardisation(standardisation)
    return save_compressed(compressed, path, model_name=model_name, model_kwargs=kwargs,
                           metadata=metadata or None)


def _input_standardisation(standardisation: tuple[float, float]) -> dict[str, Any]:
    """What a deployed model's inputs need: it trained on (pixels in [0, 1] - mean) / std (fed raw
    pixels, a short MNIST LeNet-300-100 run fell from 97.7% to 79.8% test accuracy, without an error)."""
    mean, std = standardisation
    return {"mean": mean, "std": std, "formula": "(x - mean) / std, x the pixels scaled to [0, 1]"}


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
            with warnings.catch_warnings():   # (the Trainer reads the file again, and says it then)
                warnings.filterwarnings("ignore", message=".*carries no checksum")
                state = load_sealed(args.resume, "checkpoint")
        except (OSError, UnsafeFileError, CorruptFileError) as error:
            return _fail(error)
        saved = _checkpoint_settings(state, args.resume, parser)
        settings, changed = _resume_settings(saved, args, given, parser)
        too_late = _length_changes_too_late(saved, settings, state.get("position"))
        if too_late:
            parser.error(too_late)
        resumed = {"wall_seconds": float(state.get("wall_seconds", 0.0))}
        del state
    out = args.out or (os.path.dirname(args.resume) or "." if args.resume else "mackay-run")
    _check_out(out, parser)
    previous = _previous_run(out, args.resume)
    if previous and not args.overwrite:
        checkpoint = shlex.quote(os.path.join(out, "checkpoint.pt"))
        parser.error(f"--out {out} holds another run ({', '.join(previous)}), which this one would replace "
                     + (f"(continue it with: mackay-ext prune --resume {checkpoint}); " if "checkpoint.pt" in previous
                        else "; ")
                     + "pass --overwrite to replace it, or choose another --out")
    _check_settings(settings, args, given, parser)
    rank = _init_distributed(settings["device"])
    try:
        if rank != 0:   # rank 0 holds --out for the whole run
            return _run_prune(args, settings, changed, resumed, out, rank)
        try:
            with out_lock(out):
                return _run_prune(args, settings, changed, resumed, out, rank)
        except OutInUse as error:
            return _fail(error)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


# What a run writes into --out (the lock aside): another run's files there are replaced only with
# --overwrite, and removed before this run starts, so that a kill cannot leave the two mixed.
RUN_FILES = ("checkpoint.pt", "report.json", "model.pt", "kept_per_layer.png", "log_alpha_hist.png")


def _previous_run(out: str, resume: str | None) -> list[str]:
    """The files of a run in `out` other than the one `resume` continues."""
    if resume and os.path.abspath(os.path.dirname(resume) or ".") == os.path.abspath(out):
        return []   # the resumed run's own folder: its files are this run's
    return [name for name in RUN_FILES if os.path.exists(os.path.join(out, name))]


def _run_prune(args, settings: dict[str, Any], changed: list[str], resumed: dict[str, float] | None,
               out: str, rank: int) -> int:
    progress = _Progress(args.quiet or rank != 0)
    if rank == 0:
        for change in changed:
            print(f"mackay-ext: resuming with {change}", file=sys.stderr)
        if args.overwrite:   # under the lock: no other run writes there now
            for name in _previous_run(out, args.resume):
                os.remove(os.path.join(out, name))
    try:
        data = datasets.load(settings["dataset"], settings["data_dir"], seed=settings["seed"],
                             download=args.download)
    except datasets.DatasetError as error:
        return _fail(error)
    set_seed(settings["seed"])
    model = build_model(settings["model"], settings["dataset"], data.num_classes)
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
        started -= resumed["wall_seconds"]   # a changed --lr: load_checkpoint scales the saved one
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
        # what ran: a recipe's own schedule and rates are here, not in the flags' settings
        "fit_config": dataclasses.asdict(trainer.config),
        "hardware": {"device": settings["device"], "threads": torch.get_num_threads(),
                     "processes": trainer.world_size, "torch": torch.__version__},
    }
    warnings_ = [w for w in (_accuracy_loss_warning(trainer, test_accuracy),
                             _nothing_pruned_warning(trainer, kept, total)) if w]
    if warnings_:
        summary["warnings"] = warnings_
    if data.standardisation is not None:
        summary["input_standardisation"] = _input_standardisation(data.standardisation)
    sizes = save_model(os.path.join(out, "model.pt"), settings["model"], model, settings["dataset"],
                       data.num_classes, data.standardisation)
    summary["model_file_bytes"], summary["dense_state_dict_bytes"] = sizes["bytes"], sizes["dense_bytes"]
    # atomic, as the checkpoint: a kill mid-write leaves the last report whole, never half of one
    text = json.dumps(summary, indent=2).encode()
    write_atomic(os.path.join(out, "report.json"), lambda handle: handle.write(text))
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
    for warning in warnings_:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def _nothing_pruned_warning(trainer: Trainer, kept: int, total: int) -> str | None:
    """Said when the run pruned nothing, with how many precision updates ran: a short budget
    (a recipe updates alpha every 430 optimizer steps, its first updates only move it) reads
    otherwise like a method that found nothing to prune."""
    if kept < total:
        return None
    config = trainer.config
    updates = len(trainer.pruner.history)
    cadence = (f"every {config.update_every_steps} optimizer steps" if config.schedule == "in-run"
               and config.update_every_steps else "as the schedule sets")
    return (f"nothing was pruned: {updates} precision update(s) ran ({cadence}; the first "
            f"{config.warmup_updates} only move alpha); train longer (--epochs) or "
            f"{_turn_threshold(trainer.pruner.prune, to_prune_more=True)} --threshold")


def _turn_threshold(criterion: str, to_prune_more: bool) -> str:
    """Which way to turn --threshold: snr prunes where w^2 < threshold x its variance (a larger
    threshold prunes more), alpha where alpha >= threshold (a smaller one does)."""
    return "raise" if (criterion == "snr") == to_prune_more else "lower"


# Test accuracy a run may lose before the summary says so (absolute, 5 points).
ACCURACY_LOSS_WARNING = 0.05


def _accuracy_loss_warning(trainer: Trainer, test_accuracy: float) -> str | None:
    """What to say when pruning cost much of the dense network's accuracy, with where the
    precision updates wanted to remove a whole layer (the pruner kept its strongest group)."""
    dense = trainer.dense_test_accuracy
    if dense is None or dense - test_accuracy <= ACCURACY_LOSS_WARNING:
        return None
    history = trainer.pruner.history
    emptied = {layer["name"] for update in history
               for layer in update.get("layers", []) if layer.get("kept_strongest")}
    # granularity="channel": entries "name (dim d): kept <group>", one per emptied dimension
    emptied |= {entry.split(": kept")[0] for update in history
                for entry in (update.get("channel") or {}).get("kept_strongest", [])}
    where = (f"; updates would have pruned every group of layer(s) {', '.join(sorted(emptied))} (their "
             "strongest group was kept): the data did not determine those groups" if emptied else "")
    return (f"the pruned network lost {100 * (dense - test_accuracy):.1f} points of test accuracy "
            f"({100 * dense:.2f}% dense -> {100 * test_accuracy:.2f}%){where}. Prune less per update "
            f"({_turn_threshold(trainer.pruner.prune, to_prune_more=False)} --threshold), or use "
            "a finer --granularity, more epochs between updates or more training data")
