"""What the CLI costs over the library's trainer: `mackay-ext prune --recipe NAME` against
bench/reproduce_mnist.py's path for the same row (the recipe through mackay_ext.train.Trainer),
interleaved in one process, every phase shortened to a few epochs so the comparison takes
minutes. Both sides time the training run alone (the CLI's report.json wall_seconds; the data
is read once per side, outside the timing). Issue 14's limit: the CLI at most 10% slower.

    python bench/bench_cli_overhead.py --data-dir ../shared/data/mnist
Writes bench/results/cli_overhead.md and .json.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time

import torch
from _hardware import cpu_name
from reproduce_mnist import AUGMENT_SHIFT, config_for

from mackay_ext import cli, models, recipes
from mackay_ext import data as datasets
from mackay_ext.train import Trainer, set_seed

LIMIT = 1.10


def library_run(data, recipe, epochs: dict[str, int], seed: int) -> float:
    """The bench script's path: the dense network, then the recipe from a copy of it."""
    set_seed(seed)
    start = time.perf_counter()
    dense = Trainer(models.create(recipe.model, num_classes=10), data,
                    config_for(recipe, seed, AUGMENT_SHIFT, False, **epochs),
                    pruner_options=recipe.pruner)
    dense.pretrain()
    run = Trainer(copy.deepcopy(dense.model), data,
                  config_for(recipe, seed, AUGMENT_SHIFT, False, **dict(epochs, pretrain_epochs=0)),
                  pruner_options=recipe.pruner)
    run.run()
    return time.perf_counter() - start


def cli_run(data_dir: str, recipe_name: str, epochs: dict[str, int], seed: int) -> float:
    with tempfile.TemporaryDirectory() as out:
        status = cli.main(["prune", "--recipe", recipe_name, "--data-dir", data_dir, "--out", out,
                           "--quiet", "--seed", str(seed),
                           "--pretrain-epochs", str(epochs["pretrain_epochs"]),
                           "--epochs", str(epochs["epochs"]),
                           "--finetune-epochs", str(epochs["finetune_epochs"])])
        if status != 0:
            raise SystemExit(f"bench_cli_overhead: the CLI exited with {status}")
        with open(os.path.join(out, "report.json")) as handle:
            return float(json.load(handle)["wall_seconds"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.path.join("..", "shared", "data", "mnist"))
    parser.add_argument("--recipe", default="lenet-300-100-weight", choices=sorted(recipes.RECIPES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, nargs=3, default=[2, 6, 2],
                        metavar=("DENSE", "ARD", "FINETUNE"))
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)
    recipe = recipes.get(args.recipe)
    epochs = dict(zip(("pretrain_epochs", "epochs", "finetune_epochs"), args.epochs))
    data = datasets.load_mnist(args.data_dir)
    times: dict[str, list[float]] = {"library": [], "cli": []}
    for repeat in range(args.repeats):   # interleaved: a slow spell of the machine hits both
        times["library"].append(library_run(data, recipe, epochs, seed=repeat))
        times["cli"].append(cli_run(args.data_dir, args.recipe, epochs, seed=repeat))
        print(f"repeat {repeat + 1}: library {times['library'][-1]:.1f} s, cli {times['cli'][-1]:.1f} s",
              flush=True)
    ratio = statistics.median(c / lib for c, lib in zip(times["cli"], times["library"]))
    result = {"recipe": args.recipe, "epochs": epochs, "seconds": times, "cli_over_library": ratio,
                  "limit": LIMIT, "met": ratio <= LIMIT,
                  "hardware": f"{cpu_name()} ({torch.get_num_threads()} threads), torch {torch.__version__}"}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "cli_overhead.json"), "w") as handle:
        json.dump(result, handle, indent=1)
    rows = "\n".join(f"| {i + 1} | {lib:.1f} | {c:.1f} | {c / lib:.3f} |"
                     for i, (lib, c) in enumerate(zip(times["library"], times["cli"])))
    with open(os.path.join(args.out, "cli_overhead.md"), "w") as handle:
        handle.write(
            f"# The CLI's cost over the library's trainer ({args.recipe})\n\n"
            f"Regenerate: `python bench/bench_cli_overhead.py --data-dir ../shared/data/mnist`\n\n"
            f"Epochs per phase (dense, ARD, fine-tune): {args.epochs}; {result['hardware']}; "
            "the two paths interleaved in one process, training time only.\n\n"
            "| repeat (seed) | library s | CLI s | CLI / library |\n|---|---|---|---|\n" + rows +
            f"\n\nMedian CLI / library: **{ratio:.3f}** (limit {LIMIT}: "
            f"{'met' if result['met'] else 'NOT met'}).\n")
    print(f"CLI / library: {ratio:.3f} ({'met' if result['met'] else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
