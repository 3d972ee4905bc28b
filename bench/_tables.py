"""Where a script benchmark's tables go: bench/results/NAME.md (what a reader reads) and
NAME.json (every figure, for whoever compares runs)."""
from __future__ import annotations

import json
import os

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def write_tables(name: str, report: dict, text: str, directory: str = RESULTS_DIR) -> None:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, f"{name}.json"), "w") as handle:
        json.dump(report, handle, indent=1)
    with open(os.path.join(directory, f"{name}.md"), "w") as handle:
        handle.write(text)
