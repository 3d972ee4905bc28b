"""From pruned weights to a model to ship: size, MACs and latency of each deployment form.

Run:  python bench/bench_deploy.py [--threads 1]   (one process, one run; a few minutes on one core)
      python bench/bench_deploy.py --device cuda  (deploy_cuda.{md,json}; each call synchronised)

Issue 12's benchmark. For each pruned network, five forms of the same function:
  dense       the network before pruning (random init), the reference of every ratio
  pruned      the pruned weights, zeros kept in full-size tensors
  sparsified  mackay_ext.sparsify(pruned): CSR layers (each layer's path fixed when built)
  densified   mackay_ext.densify(sparsified): plain nn.Linear / nn.Conv2d again
  shrunk      mackay_ext.shrink(pruned): all-zero coupled groups, unread units and constant
              units (folded into their consumers' biases) removed physically
and, for networks with convolutions, dense and shrunk again in channels-last memory format
(shrink(memory_format=torch.channels_last)): on CPU max_pool2d and small convolutions run several
times faster in it, so the like-for-like ratio is channels-last against channels-last.
Parameters are those stored (a CSR layer's nonzeros and biases); MACs are per example as executed
(a CSR layer counts its nonzeros once per output position, every other layer its full weight);
file bytes are mackay_ext.save_compressed for the sparsified form and torch.save of the
state_dict otherwise; latency is the median over rounds in eval mode under torch.no_grad, the
five forms called in turn within every round so that a shared machine's drift hits them alike.

The pruned weights are made quickly, not trained: each network keeps, layer by layer, as many
weights and as many units with a weight left as the MNIST table's MacKay rows
(bench/results/mnist.md, first seed), the weights chosen by magnitude from a random init among
the kept units' rows and the previous layer's kept units' columns (a trained per-weight result
has such silent units: the Trainer drops the weights feeding a unit nobody reads);
the priced LeNet-5 keeps whole coupled channels, as many per layer as the MAC-priced row of
bench/results/pareto_mnist.md; ResNet-20 loses a random third of its removable coupled channel groups
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
from mackay_ext._float32 import full_float32
from mackay_ext.sparse import SparseConv2d, SparseLinear

LAYER_FORMS = ("dense", "shrunk", "dense, channels_last", "shrunk, channels_last")
BATCHES = (1, 256)
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# Weights kept per Linear/Conv2d layer by the MNIST table's MacKay rows (bench/results/mnist.md).
LENET300_KEPT = (1873, 1087, 357)        # lenet-300-100, mackay-weight: 1.25% kept
LENET300_UNITS = (187, 85, 10)           # ... units with a weight left (of 300, 100, 10)
LENET300_INPUTS = 491                    # ... input pixels read (of 784)
LENET5_KEPT = (199, 492, 853, 417)       # lenet-5-caffe, mackay-weight: 0.45% kept
LENET5_UNITS = (20, 35, 162, 10)         # ... units with a weight left (of 20, 50, 500, 10)
LENET5_GROUP_UNITS = {"2": 9, "5": 103}  # lenet-5-caffe, mackay-group: conv2 9/50 filters, fc1 103/500 units
LENET5_GROUP_FC1_KEPT = 6901             # ... and 6,901 of fc1's weights: 3.0% kept overall
# lenet-5-caffe, mackay-priced 0.03 (bench/results/pareto_mnist.md, seed 0): conv1 7/20 filters,
# conv2 4/50, fc1 64/500 units, whole channels only: 1.3% kept, 150K MACs
LENET5_PRICED_UNITS = {"0": 7, "2": 4, "5": 64}
LENET5_PRICED_NAME = "7-4-64, 1.3% kept"


# -- pruned weights, made quickly ----------------------------------------------------------------
def layers(model):
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


@torch.no_grad()
def keep_largest_(weight: torch.Tensor, kept: int) -> None:
    """Zero all but the `kept` largest-magnitude nonzero entries of `weight`."""
    order = weight.abs().flatten().argsort(descending=True)
    weight.view(-1)[order[kept:]] = 0


def unstructured(name, kept_per_layer, units_per_layer, shape, inputs=None):
    """Per layer: `units` random rows keep weights, reading only the previous layer's kept units
    (the first layer: `inputs` random inputs); among those entries the `kept` largest stay."""
    dense = models.create(name).eval()
    pruned = copy.deepcopy(dense)
    generator = torch.Generator().manual_seed(0)
    previous = None
    for layer, kept, units in zip(layers(pruned), kept_per_layer, units_per_layer, strict=True):
        rows = torch.randperm(layer.weight.shape[0], generator=generator)[:units]
        columns = _read_columns(layer, previous, inputs, generator)
        allowed = torch.zeros_like(layer.weight, dtype=torch.bool)
        allowed[rows.unsqueeze(1), columns.unsqueeze(0)] = True
        with torch.no_grad():
            layer.weight.masked_fill_(~allowed, 0)
        keep_largest_(layer.weight, kept)
        previous = (layer, rows)
    return dense, pruned, shape


def _read_columns(layer, previous, inputs, generator):
    """Input columns a layer may read: the previous layer's kept units (a conv channel spans
    several columns of a Linear after Flatten), or `inputs` random ones for the first layer."""
    width = layer.weight.shape[1]
    if previous is None:
        return torch.randperm(width, generator=generator)[:inputs] if inputs else torch.arange(width)
    before, rows = previous
    per_unit = width // before.weight.shape[0]
    return (rows.unsqueeze(1) * per_unit + torch.arange(per_unit)).reshape(-1).sort().values


def lenet5_channels(units: dict[str, int], fc1_kept: int | None = None):
    """Whole coupled channel groups (a filter or unit with its bias and the next layer's inputs),
    largest norms kept, `units` per layer; then fc1's weights by magnitude if `fc1_kept`."""
    dense = models.create("lenet-5-caffe").eval()
    pruned = copy.deepcopy(dense)
    shape = (1, 28, 28)
    groups = channel_groups(pruned, (torch.randn(2, *shape),))
    for layer, count in units.items():
        own = [g for g in groups if any(m.name == f"{layer}.weight" and m.dim == 0 for m in g.members)]
        for group in sorted(own, key=lambda g: float(g.squared_norm(pruned)), reverse=True)[count:]:
            group.zero_(pruned)
    if fc1_kept is not None:
        keep_largest_(pruned[5].weight, fc1_kept)
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
    "lenet-300-100 (1.25% kept)": lambda: unstructured("lenet-300-100", LENET300_KEPT, LENET300_UNITS,
                                                       (1, 28, 28), LENET300_INPUTS),
    "lenet-5-caffe (0.45% kept)": lambda: unstructured("lenet-5-caffe", LENET5_KEPT, LENET5_UNITS, (1, 28, 28)),
    "lenet-5-caffe (groups, 3.0% kept)": lambda: lenet5_channels(LENET5_GROUP_UNITS, LENET5_GROUP_FC1_KEPT),
    f"lenet-5-caffe (priced channels, {LENET5_PRICED_NAME})": lambda: lenet5_channels(LENET5_PRICED_UNITS),
    "resnet-20 (1/3 of channel groups)": resnet20_channels,
}


# -- the forms and what they cost ------------------------------------------------------------------
def forms(dense, pruned, shape):
    example = (torch.randn(2, *shape),)
    with warnings.catch_warnings():   # sparsify names the layers it leaves dense: expected here
        warnings.simplefilter("ignore")
        sparse = sparsify(copy.deepcopy(pruned)).eval()
        densified = densify(sparsify(copy.deepcopy(pruned))).eval()
    by_form = {"dense": dense, "pruned": pruned, "sparsified": sparse, "densified": densified,
               "shrunk": shrink(pruned, example).eval()}
    if any(isinstance(m, nn.Conv2d) for m in dense.modules()):
        by_form["dense, channels_last"] = copy.deepcopy(dense).to(memory_format=torch.channels_last)
        by_form["shrunk, channels_last"] = shrink(pruned, example, memory_format=torch.channels_last).eval()
    return by_form


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


def _synchronize(x):
    if x.is_cuda:   # a GPU call returns before its kernels finish: time them to the end
        torch.cuda.synchronize(x.device)


@torch.no_grad()
def latency_ms(models_by_form, x, budget_s):
    """Median milliseconds per form; the forms interleaved within each round, in an order
    shuffled from round to round."""
    for model in models_by_form.values():   # warm-up (the sparse layers cache their dense weight)
        for _ in range(3):
            model(x)
    _synchronize(x)
    start = time.perf_counter()
    models_by_form["dense"](x)
    _synchronize(x)
    one = time.perf_counter() - start
    rounds = max(7, min(300, int(budget_s / (len(models_by_form) * max(one, 1e-6)))))
    times = {form: [] for form in models_by_form}
    order, shuffle = list(models_by_form), random.Random(0).shuffle
    for _ in range(rounds):
        # a new order every round: what runs just before a form changes its time (ResNet-20 at
        # batch 1: 10% faster after a channels-last model, in a fixed cyclic order), so no form
        # may always follow the same one
        shuffle(order)
        for form in order:
            start = time.perf_counter()
            models_by_form[form](x)
            _synchronize(x)
            times[form].append(time.perf_counter() - start)
    return {form: 1e3 * statistics.median(t) for form, t in times.items()}, rounds


@torch.no_grad()
def layer_ms(models_by_form, x, rounds=15):
    """Median ms of each child of a Sequential network, per form (where the time goes); each
    child runs on the input it gets in the full forward, the forms interleaved per round."""
    inputs = {}
    for form, model in models_by_form.items():
        inputs[form], h = [], x
        for child in model:
            inputs[form].append(h)
            h = child(h)
    times = {form: [[] for _ in model] for form, model in models_by_form.items()}
    for _ in range(rounds):
        for form, model in models_by_form.items():
            for i, child in enumerate(model):
                start = time.perf_counter()
                child(inputs[form][i])
                _synchronize(x)
                times[form][i].append(time.perf_counter() - start)
    names = [f"{i}: {type(c).__name__}" for i, c in enumerate(models_by_form["dense"])]
    shapes = {form: [list(t.shape[1:]) for t in inputs[form]] for form in models_by_form}
    return {"layers": names, "input_shapes": shapes,
            "ms": {form: [1e3 * statistics.median(t) for t in ts] for form, ts in times.items()}}


def measure(case, build, budget_s, device="cpu"):
    device = torch.device(device)
    torch.manual_seed(0)
    dense, pruned, shape = build()
    by_form = forms(dense, pruned, shape)
    check = torch.randn(4, *shape)
    with torch.no_grad():   # every form computes the pruned network (float32 sums in any order)
        reference, dense_reference = pruned(check), dense(check)
        expected = {form: dense_reference if form.startswith("dense") else reference for form in by_form}
        for form in list(by_form)[2:]:
            torch.testing.assert_close(by_form[form](check), expected[form], rtol=1e-4, atol=1e-4)
    rows = {form: {"model": case, "form": form, "params": sum(p.numel() for p in m.parameters()),
                   "nonzero_params": sum(int(p.count_nonzero()) for p in m.parameters()),
                   "macs": executed_macs(m, shape)} for form, m in by_form.items()}
    with tempfile.TemporaryDirectory() as directory:
        for form, model in by_form.items():
            rows[form]["bytes"] = file_bytes(form, model, directory)
    if device.type != "cpu":   # built, checked and counted on the CPU; timed where they will run
        by_form = {form: model.to(device) for form, model in by_form.items()}
        with torch.no_grad(), full_float32():
            on_device = {form: model(check.to(device)).cpu() for form, model in by_form.items()}
        for form, output in on_device.items():
            torch.testing.assert_close(output, expected[form], rtol=1e-4, atol=1e-4,
                                       msg=lambda message, form=form: f"{form} on {device}: {message}")
    for batch in BATCHES:
        ms, rounds = latency_ms(by_form, torch.randn(batch, *shape, device=device), budget_s)
        for form in by_form:
            rows[form][f"ms_batch{batch}"] = ms[form]
            rows[form][f"rounds_batch{batch}"] = rounds
    paths = {type(m).__name__ + ":" + m.path for m in by_form["sparsified"].modules()
             if isinstance(m, (SparseLinear, SparseConv2d))}
    rows["sparsified"]["paths"] = sorted(paths)
    base = rows["dense"]
    for row in rows.values():
        for key in ("params", "macs", "bytes", "ms_batch1", "ms_batch256"):
            row[f"{key}_ratio"] = row[key] / base[key]
    breakdown = None
    if isinstance(dense, nn.Sequential) and "shrunk, channels_last" in by_form:
        breakdown = dict(model=case, batch=BATCHES[-1], **layer_ms(
            {form: by_form[form] for form in LAYER_FORMS}, torch.randn(BATCHES[-1], *shape, device=device)))
    return list(rows.values()), breakdown


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
        pairs = [("shrunk", "dense", "")]
        if (case, "shrunk, channels_last") in by:
            pairs += [("shrunk, channels_last", "dense", " (shrunk in channels_last)"),
                      ("shrunk, channels_last", "dense, channels_last", " (both in channels_last)")]
        for form, base, how in pairs:
            ratio = by[case, form]["ms_batch256"] / by[case, base]["ms_batch256"]
            out.append({"target": f"shrunk latency at batch 256 within 1.3x dense x MACs ratio{how}",
                        "model": case, "value": f"{ratio:.2f}x {base}",
                        "limit": f"{limit:.2f}x (MACs ratio {shrunk['macs_ratio']:.3f})",
                        "verdict": verdict(ratio, limit)})
    lenet = by[next(c for c in dict.fromkeys(r["model"] for r in rows) if c.startswith("lenet-300-100")),
               "sparsified"]
    out.append({"target": "LeNet-300-100 at ~1.25% kept stored in at most 1/40 of the dense file",
                "model": lenet["model"], "value": f"1/{1 / lenet['bytes_ratio']:.1f}", "limit": "1/40",
                "verdict": "met" if lenet["bytes_ratio"] <= 1 / 40 else "missed"})
    return out


def hardware(device="cpu"):
    cpu = cpu_name()
    gpu = {"gpu": torch.cuda.get_device_name(device)} if device.startswith("cuda") else {}
    return {**gpu, "device": device, "cpu": cpu, "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average_at_start": [round(v, 2) for v in os.getloadavg()], "torch": torch.__version__,
            "mackay_ext": mackay_ext.__version__, "compiled_backends": list(mackay_ext.compiled_backends()),
            "python": platform.python_version()}


def breakdown_table(b):
    forms = list(b["ms"])
    lines = [(f"Where the time goes, {b['model']}, batch {b['batch']} (median ms per layer, each layer on "
             "the input it gets in the full forward):"), "",
             "| layer | " + " | ".join(f"{f} (input)" for f in forms) + " |", "|---" * (len(forms) + 1) + "|"]
    for i, name in enumerate(b["layers"]):
        cells = [f"{b['ms'][f][i]:.2f} ({'x'.join(map(str, b['input_shapes'][f][i]))})" for f in forms]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("| total | " + " | ".join(f"{sum(b['ms'][f]):.2f}" for f in forms) + " |")
    shapes = b["input_shapes"]
    for small, big in (("shrunk", "dense"), ("shrunk, channels_last", "dense, channels_last")):
        # a layer shrink left as it was: the same input and the same output as in the dense form
        same = [i for i in range(len(b["layers"])) if shapes[small][i] == shapes[big][i]
                and shapes[small][i + 1:i + 2] == shapes[big][i + 1:i + 2]]
        ms = sum(b["ms"][small][i] for i in same)
        lines += ["", (f"{small}: layers shrink leaves as they are ({', '.join(b['layers'][i] for i in same)}) take "
                  f"{ms:.2f} of {sum(b['ms'][small]):.2f} ms ({100 * ms / sum(b['ms'][small]):.0f}%).")]
    return lines


def markdown(rows, checks, machine, note, breakdowns=()):
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
                     f"{', '.join(machine['compiled_backends'])}), device {machine['device']}"
                     f"{' (' + machine['gpu'] + ')' if 'gpu' in machine else ''}.")
    if machine.get("threads_set"):
        hardware_line += (" Threads set with torch.set_num_threads (--threads): the machine is shared "
                          "by other jobs, where a descheduled worker thread costs milliseconds.")
    lines += ["", f"Ratios in brackets: against dense, measured in the same run. Sparse layer paths: {paths}.",
              "", note]
    for b in breakdowns:
        lines += [""] + breakdown_table(b)
    lines += ["", hardware_line]
    return "\n".join(lines)


NOTE = ("Pruned weights: not trained. Each network keeps, layer by layer, as many weights and as many "
        "units with a weight left as the MNIST table's MacKay rows (bench/results/mnist.md, first seed; "
        "LeNet-300-100 187/300 and 85/100 units reading 491 of 784 pixels, LeNet-5 per weight 35/50 "
        "filters and 162/500 units, LeNet-5 groups 9/50 and 103/500; LeNet-5 priced channels as "
        "bench/results/pareto_mnist.md's mackay-priced 0.03 on seed 0, 7/20, 4/50 and 64/500 whole "
        "channels), the weights chosen by magnitude "
        "from a random init among the kept units' rows and the kept inputs' columns; ResNet-20 loses a random third of the coupled channel groups shrink can remove (the "
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
    parser.add_argument("--device", default="cpu",
                        help="where the forms are timed: cpu or cuda[:N] (cuda writes deploy_cuda.*)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device: expected cpu or cuda[:N], got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch sees no CUDA GPU here")
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = dict(hardware(str(device)), threads_set=bool(args.threads))
    started = time.time()
    rows, breakdowns = [], []
    for case, build in CASES.items():
        print(f"measuring {case} ...", flush=True)
        measured, breakdown = measure(case, build, args.budget, device)
        rows += measured
        breakdowns += [breakdown] if breakdown else []
    checks = targets(rows)
    text = markdown(rows, checks, machine, NOTE, breakdowns)
    print("\n" + text)
    os.makedirs(args.results_dir, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    busy = (f"Run with {args.threads} torch thread(s) on a machine shared with other jobs (load average "
            f"{machine['load_average_at_start']} at start, on {machine['logical_cpus']} logical CPUs): "
            "absolute times are inflated and noisy, ratios within this run are what to read.\n\n"
            if args.threads else "")
    name = "deploy" if device.type == "cpu" else "deploy_cuda"
    with open(os.path.join(args.results_dir, name + ".md"), "w") as handle:
        handle.write(f"# Deployment forms of pruned networks (bench/bench_deploy.py, {stamp})\n\n"
                     f"Regenerate: `python bench/bench_deploy.py"
                     f"{f' --threads {args.threads}' if args.threads else ''}"
                     f"{f' --budget {args.budget:g}' if args.budget != 6.0 else ''}"
                     f"{f' --device {args.device}' if device.type != 'cpu' else ''}`\n\n{busy}{text}\n")
    with open(os.path.join(args.results_dir, name + ".json"), "w") as handle:
        json.dump({"when": stamp, "wall_s": round(time.time() - started, 1), "device": str(device),
                   "hardware": machine, "note": NOTE, "rows": rows, "targets": checks,
                   "layer_breakdown": breakdowns}, handle, indent=2)


if __name__ == "__main__":
    main()
