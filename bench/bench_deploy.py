"""From pruned weights to a model to ship: size, MACs and latency of each deployment form.

Run:  python bench/bench_deploy.py [--threads 1]   (one process, one run; a few minutes on one core)

Issue 12's benchmark. For each pruned network, five forms of the same function:
  dense       the network before pruning (random init), the reference of every ratio
  pruned      the pruned weights, zeros kept in full-size tensors
  sparsified  mackay_ext.sparsify(pruned): CSR layers (each layer's path fixed when built)
  densified   mackay_ext.densify(sparsified): plain nn.Linear / nn.Conv2d again
  shrunk      mackay_ext.shrink(pruned): all-zero coupled groups removed physically
Parameters are those stored (a CSR layer's nonzeros and biases); MACs are per example as executed
(a CSR layer counts its nonzeros once per output position, every other layer its full weight);
file bytes are mackay_ext.save_compressed for the sparsified form and torch.save of the
state_dict otherwise; latency is the median over rounds in eval mode under torch.no_grad, the
five forms called in turn within every round so that a shared machine's drift hits them alike.

The pruned weights are made quickly, not trained: each network keeps, layer by layer, as many
weights as the MNIST table's MacKay rows (bench/results/mnist.md, first seed), chosen by magnitude
from a random init; ResNet-20 loses a random third of its removable coupled channel groups
(mackay_ext.coupling.channel_groups, ChannelGroup.zero_). Latency and size depend on where the
zeros are, not on what the network learned, so this is enough for these measurements.

Targets (issue 12): sparsified never slower than dense at any batch; shrunk latency at batch 256
within 1.3x of dense latency times the MACs ratio; LeNet-300-100 at ~1.25% kept stored in at most
1/40 of the dense file.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import statistics
import tempfile
import time
import warnings

import torch
from _hardware import cpu_name
from torch import nn

import mackay_ext
from mackay_ext import (
    channel_groups,
    count_macs,
    densify,
    models,
    save_compressed,
    shrink,
    sparsify,
)
from mackay_ext.sparse import SparseConv2d, SparseLinear

FORMS = ("dense", "pruned", "sparsified", "densified", "shrunk")
BATCHES = (1, 256)
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# Weights kept per Linear/Conv2d layer by the MNIST table's MacKay rows (bench/results/mnist.md).
LENET300_KEPT = (1873, 1087, 357)        # lenet-300-100, mackay-weight: 1.25% kept
LENET5_KEPT = (199, 492, 853, 417)       # lenet-5-caffe, mackay-weight: 0.45% kept
LENET5_GROUP_UNITS = {"2": 9, "5": 103}  # lenet-5-caffe, mackay-group: conv2 9/50 filters, fc1 103/500 units
LENET5_GROUP_FC1_KEPT = 6901             # ... and 6,901 of fc1's weights: 3.0% kept overall


# -- pruned weights, made quickly ----------------------------------------------------------------
def layers(model):
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


@torch.no_grad()
def keep_largest_(weight: torch.Tensor, kept: int) -> None:
    """Zero all but the `kept` largest-magnitude nonzero entries of `weight`."""
    order = weight.abs().flatten().argsort(descending=True)
    weight.view(-1)[order[kept:]] = 0


def unstructured(name, kept_per_layer, shape):
    dense = models.create(name).eval()
    pruned = copy.deepcopy(dense)
    for layer, kept in zip(layers(pruned), kept_per_layer, strict=True):
        keep_largest_(layer.weight, kept)
    return dense, pruned, shape


def lenet5_group():
    """Whole conv2 filters and fc1 units (coupled groups: their bias and the next layer's inputs
    go too), largest norms kept, then fc1's weights by magnitude, as the mackay-group row."""
    dense = models.create("lenet-5-caffe").eval()
    pruned = copy.deepcopy(dense)
    shape = (1, 28, 28)
    groups = channel_groups(pruned, (torch.randn(2, *shape),))
    for layer, units in LENET5_GROUP_UNITS.items():
        own = [g for g in groups if any(m.name == f"{layer}.weight" and m.dim == 0 for m in g.members)]
        for group in sorted(own, key=lambda g: float(g.squared_norm(pruned)), reverse=True)[units:]:
            group.zero_(pruned)
    keep_largest_(pruned[5].weight, LENET5_GROUP_FC1_KEPT)
    return dense, pruned, shape


def resnet20_channels(seed=0):
    """A random third of the coupled channel groups that shrink can remove, zeroed."""
    dense = models.create("resnet-20").eval()
    pruned = copy.deepcopy(dense)
    shape = (3, 32, 32)
    removable = [g for g in channel_groups(pruned, (torch.randn(2, *shape),)) if g.fixed is None]
    for group in random.Random(seed).sample(removable, len(removable) // 3):
        group.zero_(pruned)
    return dense, pruned, shape


CASES = {
    "lenet-300-100 (1.25% kept)": lambda: unstructured("lenet-300-100", LENET300_KEPT, (1, 28, 28)),
    "lenet-5-caffe (0.45% kept)": lambda: unstructured("lenet-5-caffe", LENET5_KEPT, (1, 28, 28)),
    "lenet-5-caffe (groups, 3.0% kept)": lenet5_group,
    "resnet-20 (1/3 of channel groups)": resnet20_channels,
}


# -- the forms and what they cost ------------------------------------------------------------------
def forms(dense, pruned, shape):
    example = (torch.randn(2, *shape),)
    with warnings.catch_warnings():   # sparsify names the layers it leaves dense: expected here
        warnings.simplefilter("ignore")
        sparse = sparsify(copy.deepcopy(pruned)).eval()
        densified = densify(sparsify(copy.deepcopy(pruned))).eval()
    return {"dense": dense, "pruned": pruned, "sparsified": sparse, "densified": densified,
            "shrunk": shrink(pruned, example).eval()}


def executed_macs(model, shape) -> int:
    """MACs of one example as run: torch's counter sees GEMMs and convolutions; a CSR layer on the
    "csr" path does nnz multiply-adds per output position, which the counter cannot see."""
    csr = []

    def hook(module, args, output):
        positions = output.numel() // output.shape[0] // module.out_features
        csr.append(module.nnz * positions)

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (SparseLinear, SparseConv2d)) and m.path == "csr"]
    try:
        counted = count_macs(model, (torch.randn(1, *shape),))
    finally:
        for handle in handles:
            handle.remove()
    return counted + sum(csr)


def file_bytes(form, model, directory) -> int:
    path = os.path.join(directory, f"{form}.pt")
    if form == "sparsified":
        return save_compressed(model, path)["bytes"]
    torch.save(model.state_dict(), path)
    return os.path.getsize(path)


@torch.no_grad()
def latency_ms(models_by_form, x, budget_s):
    """Median milliseconds per form; the forms interleaved within each round."""
    for model in models_by_form.values():   # warm-up (the sparse layers cache their dense weight)
        for _ in range(3):
            model(x)
    start = time.perf_counter()
    models_by_form["dense"](x)
    one = time.perf_counter() - start
    rounds = max(7, min(300, int(budget_s / (len(models_by_form) * max(one, 1e-6)))))
    times = {form: [] for form in models_by_form}
    for _ in range(rounds):
        for form, model in models_by_form.items():
            start = time.perf_counter()
            model(x)
            times[form].append(time.perf_counter() - start)
    return {form: 1e3 * statistics.median(t) for form, t in times.items()}, rounds


def measure(case, build, budget_s):
    torch.manual_seed(0)
    dense, pruned, shape = build()
    by_form = forms(dense, pruned, shape)
    check = torch.randn(4, *shape)
    with torch.no_grad():   # every form computes the pruned network (float32 sums in any order)
        reference = pruned(check)
        for form in FORMS[2:]:
            torch.testing.assert_close(by_form[form](check), reference, rtol=1e-4, atol=1e-4)
    rows = {form: {"model": case, "form": form, "params": sum(p.numel() for p in m.parameters()),
                   "nonzero_params": sum(int(p.count_nonzero()) for p in m.parameters()),
                   "macs": executed_macs(m, shape)} for form, m in by_form.items()}
    with tempfile.TemporaryDirectory() as directory:
        for form, model in by_form.items():
            rows[form]["bytes"] = file_bytes(form, model, directory)
    for batch in BATCHES:
        ms, rounds = latency_ms(by_form, torch.randn(batch, *shape), budget_s)
        for form in FORMS:
            rows[form][f"ms_batch{batch}"] = ms[form]
            rows[form][f"rounds_batch{batch}"] = rounds
    paths = {type(m).__name__ + ":" + m.path for m in by_form["sparsified"].modules()
             if isinstance(m, (SparseLinear, SparseConv2d))}
    rows["sparsified"]["paths"] = sorted(paths)
    base = rows["dense"]
    for row in rows.values():
        for key in ("params", "macs", "bytes", "ms_batch1", "ms_batch256"):
            row[f"{key}_ratio"] = row[key] / base[key]
    return list(rows.values())


# -- targets and report ----------------------------------------------------------------------------
def verdict(ratio: float, limit: float) -> str:
    if ratio <= limit:
        return "met"
    return "missed (within 5% timing noise)" if ratio <= 1.05 * limit else "missed"


def targets(rows):
    out = []
    by = {(r["model"], r["form"]): r for r in rows}
    for case in dict.fromkeys(r["model"] for r in rows):
        sparse, shrunk = by[case, "sparsified"], by[case, "shrunk"]
        for batch in BATCHES:
            ratio = sparse[f"ms_batch{batch}_ratio"]
            out.append({"target": f"sparsified never slower than dense, batch {batch}", "model": case,
                        "value": f"{ratio:.2f}x dense", "limit": "1.00x", "verdict": verdict(ratio, 1.0)})
        limit = 1.3 * shrunk["macs_ratio"]
        out.append({"target": "shrunk latency at batch 256 within 1.3x dense x MACs ratio", "model": case,
                    "value": f"{shrunk['ms_batch256_ratio']:.2f}x dense",
                    "limit": f"{limit:.2f}x (MACs ratio {shrunk['macs_ratio']:.3f})",
                    "verdict": verdict(shrunk["ms_batch256_ratio"], limit)})
    lenet = by[next(c for c in dict.fromkeys(r["model"] for r in rows) if c.startswith("lenet-300-100")),
               "sparsified"]
    out.append({"target": "LeNet-300-100 at ~1.25% kept stored in at most 1/40 of the dense file",
                "model": lenet["model"], "value": f"1/{1 / lenet['bytes_ratio']:.1f}", "limit": "1/40",
                "verdict": "met" if lenet["bytes_ratio"] <= 1 / 40 else "missed"})
    return out


def hardware():
    cpu = cpu_name()
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average_at_start": [round(v, 2) for v in os.getloadavg()], "torch": torch.__version__,
            "mackay_ext": mackay_ext.__version__, "compiled_backends": list(mackay_ext.compiled_backends()),
            "python": platform.python_version()}


def markdown(rows, checks, machine, note):
    def ratio(r, key):
        return "" if r["form"] == "dense" else f" ({r[key + '_ratio']:.2f}x)"

    lines = ["| model | form | parameters | MACs / example | file bytes | batch 1 ms | batch 256 ms |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['form']} | {r['params']:,}{ratio(r, 'params')} "
                     f"| {r['macs']:,}{ratio(r, 'macs')} | {r['bytes']:,}{ratio(r, 'bytes')} "
                     f"| {r['ms_batch1']:.3f}{ratio(r, 'ms_batch1')} "
                     f"| {r['ms_batch256']:.2f}{ratio(r, 'ms_batch256')} |")
    lines += ["", "| target | model | measured | limit | verdict |", "|---|---|---|---|---|"]
    lines += [f"| {c['target']} | {c['model']} | {c['value']} | {c['limit']} | {c['verdict']} |" for c in checks]
    paths = "; ".join(f"{r['model']}: {', '.join(r['paths']) or 'no layer converted'}"
                      for r in rows if r["form"] == "sparsified")
    hardware_line = (f"Hardware: {machine['cpu']}, {machine['torch_threads']} torch thread(s) of "
                     f"{machine['logical_cpus']} logical CPUs (load average {machine['load_average_at_start']} "
                     f"at start), torch {machine['torch']}, mackay_ext {machine['mackay_ext']} (compiled: "
                     f"{', '.join(machine['compiled_backends'])}), device cpu.")
    if machine.get("threads_set"):
        hardware_line += (" Threads set with torch.set_num_threads (--threads): the machine is shared "
                          "by other jobs, where a descheduled worker thread costs milliseconds.")
    lines += ["", f"Ratios in brackets: against dense, measured in the same run. Sparse layer paths: {paths}.",
              "", note, "", hardware_line]
    return "\n".join(lines)


NOTE = ("Pruned weights: not trained. Each network keeps, layer by layer, as many weights as the MNIST "
        "table's MacKay rows (bench/results/mnist.md, first seed), chosen by magnitude from a random "
        "init; ResNet-20 loses a random third of the coupled channel groups shrink can remove (the "
        "channels made by the zero-padding shortcuts are kept by design). For latency and size only "
        "where the zeros are matters, so this stands in for trained weights here.")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's); 1 on a busy machine, where a "
                             "descheduled worker thread costs milliseconds")
    parser.add_argument("--budget", type=float, default=6.0,
                        help="seconds of timed calls per model and batch size (default 6)")
    parser.add_argument("--results-dir", default=RESULTS_DIR, help="where deploy.md and deploy.json go")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = dict(hardware(), threads_set=bool(args.threads))
    started = time.time()
    rows = []
    for case, build in CASES.items():
        print(f"measuring {case} ...", flush=True)
        rows += measure(case, build, args.budget)
    checks = targets(rows)
    text = markdown(rows, checks, machine, NOTE)
    print("\n" + text)
    os.makedirs(args.results_dir, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    with open(os.path.join(args.results_dir, "deploy.md"), "w") as handle:
        handle.write(f"# Deployment forms of pruned networks (bench/bench_deploy.py, {stamp})\n\n"
                     f"Regenerate: `python bench/bench_deploy.py"
                     f"{f' --threads {args.threads}' if args.threads else ''}`\n\n{text}\n")
    with open(os.path.join(args.results_dir, "deploy.json"), "w") as handle:
        json.dump({"when": stamp, "wall_s": round(time.time() - started, 1), "device": "cpu",
                   "hardware": machine, "note": NOTE, "rows": rows, "targets": checks}, handle, indent=2)


if __name__ == "__main__":
    main()
