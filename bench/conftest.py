"""Shared benchmark plumbing: every case records its median under (table, row, column) and the
session ends by printing the tables with ratios against a baseline column and writing them to
bench/results/<table>.{json,md}. All numbers of one table come from one process and one run."""
from __future__ import annotations

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


def median_seconds(benchmark):
    return benchmark.stats.stats.median


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
             "".join(f" | {baseline}/{c}" for c in columns if baseline and c != baseline) + " |"]
    lines.append("|" + "---|" * (1 + len(columns) + (len(columns) - 1 if baseline else 0)))
    for row, values in sorted(table["rows"].items()):
        cells = [f"{values[c] * 1e3:.3f}" if c in values else "" for c in columns]
        ratios = []
        if baseline:
            for c in columns:
                if c == baseline:
                    continue
                ok = c in values and baseline in values
                ratios.append(f"{values[baseline] / values[c]:.2f}x" if ok else "")
        lines.append(f"| {row} | " + " | ".join(cells + ratios) + " |")
    return "\n".join(lines)


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
        suffix = "_cuda" if any("cuda" in row for row in table["rows"]) else ""
        base = os.path.join(RESULTS_DIR, name + suffix)
        with open(base + ".json", "w") as handle:
            json.dump({"table": name, "when": stamp, "machine": machine,
                       "baseline": table["baseline"], "median_seconds": table["rows"],
                       "extra": table["extra"]}, handle, indent=2, sort_keys=True)
        with open(base + ".md", "w") as handle:
            handle.write(f"{text}\n\nMeasured {stamp} on {machine} (median of the rounds; "
                         "ratios are baseline time / column time, so >1 means faster than the "
                         "baseline).\n")
