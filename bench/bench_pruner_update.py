"""What a precision update costs on a large model: pruner.update() against the precision-update
kernels it runs (ops.mackay_update_ on every layer, the floor), against the same update through
the pure-PyTorch fallback (MacKayPruner(backend="torch")), and against the training steps it is
amortised over; and the memory MacKay training holds beside the model, against torch's fused
Adam. Scale: a 29.4M-weight MLP (2048-4096-4096-1024), as a transformer block's matrices are.

Timing: one process; every round one untimed training step for each pruner (so each update has
new curvature and a step since the last one), then each variant once, in a new random order
every round; medians over rounds, ratios per round against the kernels' time. update(prune=False)
throughout, so every round sees the same network (alpha re-estimated, nothing pruned).
Memory: a fresh process for each optimizer (resident memory after three steps and an update,
less before the optimizer was built), in bytes per model weight.

Run:  python bench/bench_pruner_update.py           (about 3 minutes; writes bench/results/pruner_update.*)
      python bench/bench_pruner_update.py --quick   (smoke on a small MLP; prints, writes nothing)
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from _hardware import cpu_name
from _tables import write_tables
from mackay_ext import ops
from mackay_ext.optim import MacKayAdam, ard_param_groups
from mackay_ext.pruner import MacKayPruner

WIDTHS = (2048, 4096, 4096, 1024)
QUICK_WIDTHS = (256, 512, 512, 128)
BATCH, NUM_DATA, UPDATE_EVERY = 16, 50_000, 430
MEMORY_VARIANTS = ("adam", "ef-batch", "ef-exact", "adam + pruner")


def mlp(widths) -> nn.Module:
    layers = []
    for fan_in, fan_out in zip(widths, widths[1:]):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def build(kind: str, model: nn.Module, backend: str = "ext"):
    """(optimizer, pruner or None) as a user builds them for `kind`."""
    if kind == "adam":
        return torch.optim.Adam(model.parameters(), fused=True), None
    if kind == "adam + pruner":
        optimizer = torch.optim.Adam(model.parameters(), fused=True)
        return optimizer, MacKayPruner(model, optimizer, num_data=NUM_DATA, batch_size=BATCH, backend=backend)
    optimizer = MacKayAdam(ard_param_groups(model), num_data=NUM_DATA, batch_size=BATCH)
    return optimizer, MacKayPruner(model, optimizer, num_data=NUM_DATA, curvature=kind, backend=backend)


def train_step(model, optimizer, x, y) -> None:
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    optimizer.step()


class Subject:
    """A model with its optimizer and pruner; `update()` is timed."""

    def __init__(self, kind: str, widths, backend: str = "ext"):
        torch.manual_seed(0)
        self.model = mlp(widths)
        self.x, self.y = torch.randn(BATCH, widths[0]), torch.randint(0, widths[-1], (BATCH,))
        self.optimizer, self.pruner = build(kind, self.model, backend)
        self.step()
        self.update()   # alpha set: every timed update is a re-estimation, as most of a run's are

    def step(self) -> None:
        train_step(self.model, self.optimizer, self.x, self.y)

    def update(self) -> float:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            start = time.perf_counter()
            self.pruner.update(prune=False)
            return time.perf_counter() - start

    def kernels(self) -> float:
        """The precision-update kernels of this update alone, on copies of its tensors."""
        inputs = [(t.param.detach().clone(), self.pruner.curvature_estimate(n), self.pruner.alpha(n).clone())
                  for n, t in self.pruner.targets.items()]
        start = time.perf_counter()
        for weight, curvature, alpha in inputs:
            ops.mackay_update_(weight, curvature, alpha, num_data=NUM_DATA, prune="snr", threshold=0.0)
        return time.perf_counter() - start


def timing(widths, rounds: int) -> dict:
    subjects = {"update (ef-batch)": Subject("ef-batch", widths), "update (ef-exact)": Subject("ef-exact", widths),
                "update (ef-batch, backend='torch')": Subject("ef-batch", widths, backend="torch")}
    torch.manual_seed(0)
    adam_model = mlp(widths)
    adam, _ = build("adam", adam_model)
    x, y = subjects["update (ef-batch)"].x, subjects["update (ef-batch)"].y
    samples: dict[str, list[float]] = {"kernels": [], "adam step": [], **{name: [] for name in subjects}}
    order = list(samples)
    shuffle = random.Random(0).shuffle
    for _ in range(rounds):
        for subject in subjects.values():
            subject.step()
        shuffle(order)
        for name in order:
            if name == "kernels":
                samples[name].append(subjects["update (ef-batch)"].kernels())
            elif name == "adam step":
                start = time.perf_counter()
                for _ in range(4):
                    train_step(adam_model, adam, x, y)
                samples[name].append((time.perf_counter() - start) / 4)
            else:
                samples[name].append(subjects[name].update())
    rows = {}
    for name, values in samples.items():
        rows[name] = {"ms": statistics.median(values) * 1e3,
                      "x_kernels": statistics.median(v / k for v, k in zip(values, samples["kernels"]))}
    for name in subjects:   # the update's share of the steps it is amortised over
        rows[name]["share_of_epoch"] = statistics.median(
            u / (u + UPDATE_EVERY * s) for u, s in zip(samples[name], samples["adam step"]))
    return rows


def resident_mb() -> float:
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith("VmRSS")) / 1024


def memory_child(kind: str, widths) -> None:
    """Prints the bytes per model weight `kind` holds after three steps and an update."""
    torch.manual_seed(0)
    model = mlp(widths)
    x, y = torch.randn(BATCH, widths[0]), torch.randint(0, widths[-1], (BATCH,))
    before = resident_mb()
    optimizer, pruner = build(kind, model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(3):
            train_step(model, optimizer, x, y)
            if pruner is not None and step == 1:
                pruner.update(prune=False)
    weights = sum(p.numel() for p in model.parameters())
    print(json.dumps({"bytes_per_weight": (resident_mb() - before) * 2 ** 20 / weights}))


def memory(widths) -> dict:
    rows = {}
    for kind in MEMORY_VARIANTS:
        done = subprocess.run([sys.executable, __file__, "--memory-child", kind, "--widths", *map(str, widths)],
                              capture_output=True, text=True, check=True)
        rows[kind] = json.loads(done.stdout.strip().splitlines()[-1])["bytes_per_weight"]
    return rows


def markdown(report: dict) -> str:
    t, m = report["timing"], report["memory"]
    lines = ["### pruner.update() on a large model, and what MacKay training holds", "",
             f"CPU: {report['cpu']}; torch {report['torch']}, {report['threads']} threads; measured "
             f"{report['date']}; MLP {'-'.join(map(str, report['widths']))} ({report['weights'] / 1e6:.1f}M "
             f"weights), batch {BATCH}; {report['rounds']} interleaved rounds.", "",
             "Time: medians over rounds; \"x kernels\": the median over rounds of the row's time over the "
             "precision-update kernels' (ops.mackay_update_ on every layer) in the same round. \"share of an "
             f"epoch\": the update over itself plus {UPDATE_EVERY} fused-Adam steps of this model (the recipes' "
             "update frequency).", "",
             "| what | ms | x kernels | share of an epoch |", "|---|---|---|---|"]
    for name, row in t.items():
        share = f"{row['share_of_epoch']:.1%}" if "share_of_epoch" in row else ""
        lines.append(f"| {name} | {row['ms']:.1f} | {row['x_kernels']:.1f}x | {share} |")
    lines += ["", "Memory: resident memory a fresh process gained from building the optimizer (and pruner) "
              "to after three steps and an update, in bytes per model weight (the model's own 4 not "
              "included; the gradients are).", "", "| optimizer | bytes / weight | against fused Adam |",
              "|---|---|---|"]
    for kind, value in m.items():
        lines.append(f"| {kind} | {value:.1f} | {value / m['adam']:.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke on a small MLP: prints, writes nothing")
    parser.add_argument("--memory-child", choices=MEMORY_VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--widths", type=int, nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    widths = tuple(args.widths or (QUICK_WIDTHS if args.quick else WIDTHS))
    if args.memory_child:
        memory_child(args.memory_child, widths)
        return
    start = time.perf_counter()
    rounds = 3 if args.quick else 15
    report = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "widths": list(widths), "rounds": rounds,
              "weights": sum(p.numel() for p in mlp(widths).parameters()),
              "timing": timing(widths, rounds), "memory": memory(widths)}
    report["seconds"] = time.perf_counter() - start
    text = markdown(report)
    print(text)
    if not args.quick:
        write_tables("pruner_update", report, text)


if __name__ == "__main__":
    main()
