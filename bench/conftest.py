"""Shared benchmark plumbing: every case records its median under (table, row, column) and the
session ends by printing the tables, with each column's time relative to a baseline column
(column / baseline: 4.00x = four times the baseline's time), and writing them to
bench/results/<table>.{json,md}. All numbers of one table come from one process and one run."""
from __future__ import annotations

import contextlib
import json
import os
import platform
import time
from collections import defaultdict

import pytest
import torch

RESULTS_DIR = os.path.join(os.path.dirname(__file__), "results")
_TABLES: dict[str, dict] = defaultdict(lambda: {"rows": defaultdict(dict), "baseline": None,
                                                 "extra": defaultdict(dict)})


def cuda_ready():
    import mackay_ext
    return torch.cuda.is_available() and "cuda" in mackay_ext.compiled_backends()


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not cuda_ready(), reason="no GPU"))]


def synchronize(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


@pytest.fixture
def record():
    """record(table, row, column, seconds, baseline=column_name, **extra)."""
    def _record(table, row, column, seconds, baseline=None, **extra):
        entry = _TABLES[table]
        entry["rows"][row][column] = seconds
        if baseline:
            entry["baseline"] = baseline
        for key, value in extra.items():
            entry["extra"][row][f"{column}:{key}"] = value
    return _record


def interleaved(benchmark, functions, rounds, device="cpu"):
    """Time several implementations round-robin (one call of each per round, in a new random
    order every round) so that drift in a shared machine's speed hits them all alike; returns
    {name: fastest seconds}. The pytest-benchmark statistics are those of a whole round."""
    import random
    import time
    times = {name: [] for name in functions}
    order, shuffle = list(functions), random.Random(0).shuffle

    def one_round():
        # a new order every round: what runs just before a call changes its time (caches, the
        # BLAS library's state), so no implementation may always follow the same one
        shuffle(order)
        for name in order:
            function = functions[name]
            synchronize(device)
            start = time.perf_counter()
            function()
            synchronize(device)
            times[name].append(time.perf_counter() - start)

    benchmark.pedantic(one_round, rounds=rounds, iterations=1, warmup_rounds=2)
    return {name: min(values) for name, values in times.items()}


@contextlib.contextmanager
def torch_threads(threads: int):
    """torch's CPU thread count set to `threads` inside, restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def rounds_for(function, implementations, seconds, device="cpu", low=3, high=50):
    """How many rounds of `implementations` calls like `function` fit `seconds`, from one timed
    call (between low and high; high on a GPU, where a call is short and a round costs little)."""
    if device != "cpu":
        return high
    start = time.perf_counter()
    function()
    once = time.perf_counter() - start
    return max(low, min(high, int(seconds / (once * implementations))))


def best_seconds(benchmark):
    """Fastest round: on a shared, noisy machine the least-disturbed measurement."""
    return benchmark.stats.stats.min


def _machine():
    info = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _format_table(name, table):
    columns = sorted({c for row in table["rows"].values() for c in row})
    baseline = table["baseline"]
    lines = [f"### {name}", "", "| case | " + " | ".join(f"{c} (ms)" for c in columns) +
             "".join(f" | {c} / {baseline}" for c in columns if baseline and c != baseline) + " |"]
    if not baseline:  # a plain table of values (not times)
        lines = [f"### {name}", "", "| case | " + " | ".join(columns) + " |",
                 "|" + "---|" * (1 + len(columns))]
        for row, values in sorted(table["rows"].items()):
            lines.append(f"| {row} | " + " | ".join(str(values.get(c, "")) for c in columns) + " |")
        return "\n".join(lines)
    lines.append("|" + "---|" * (1 + len(columns) + (len(columns) - 1 if baseline else 0)))
    for row, values in sorted(table["rows"].items()):
        cells = [f"{values[c] * 1e3:.3f}" if c in values else "" for c in columns]
        ratios = []
        if baseline:
            for c in columns:
                if c == baseline:
                    continue
                ok = c in values and baseline in values
                ratios.append(f"{values[c] / values[baseline]:.2f}x" if ok else "")
        lines.append(f"| {row} | " + " | ".join(cells + ratios) + " |")
    return "\n".join(lines)


def _format_extra(table):
    rows = {row: values for row, values in table["extra"].items() if values}
    if not rows:
        return ""
    keys = sorted({k for values in rows.values() for k in values})
    lines = ["", "| case | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 1)]
    for row, values in sorted(rows.items()):
        cells = [f"{values[k]:.3g}" if isinstance(values.get(k), float) else str(values.get(k, ""))
                 for k in keys]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def pytest_terminal_summary(terminalreporter):
    if not _TABLES:
        return
    os.makedirs(RESULTS_DIR, exist_ok=True)
    machine = _machine()
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    for name, table in _TABLES.items():
        text = _format_table(name, table)
        terminalreporter.write_line("")
        terminalreporter.write_line(text)
        terminalreporter.write_line(_format_extra(table))
        suffix = "_cuda" if any("cuda" in row for row in table["rows"]) else ""
        base = os.path.join(RESULTS_DIR, name + suffix)
        with open(base + ".json", "w") as handle:
            json.dump({"table": name, "when": stamp, "machine": machine,
                       "baseline": table["baseline"], "best_seconds": table["rows"],
                       "extra": table["extra"]}, handle, indent=2, sort_keys=True)
        with open(base + ".md", "w") as handle:
            extra = _format_extra(table)
            note = (f"fastest of the rounds; ratios are column time / {table['baseline']} time, so "
                    f"4.00x means four times as long as {table['baseline']}" if table["baseline"]
                    else "derived from the timings of the same run")
            handle.write(f"{text}\n{extra}\nMeasured {stamp} on {machine} ({note}).\n")
