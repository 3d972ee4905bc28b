"""Progress output: a line per epoch and per update when not on a terminal, tqdm bars on one."""
from __future__ import annotations

import sys
import time


class _Progress:
    """Training progress on stderr. A terminal gets a tqdm bar over the batches of each epoch,
    with a line per epoch above it. Anywhere else (a log file, a pipe, CI, nohup) a redrawn bar is
    noise, so one flushed line per epoch and per precision update, with the time since the start.
    Without tqdm a terminal gets the lines too. --quiet (and every rank but 0) prints nothing."""

    def __init__(self, quiet: bool, stream=None):
        self.stream = stream or sys.stderr
        self.mode, self.bar, self.tqdm = "off", None, None
        self.started = time.perf_counter()
        if quiet:
            return
        self.mode = "lines"
        if self.stream.isatty():
            try:
                from tqdm import tqdm
            except ImportError:
                return
            self.mode, self.tqdm = "bars", tqdm

    def line(self, message: str) -> None:
        if self.mode == "off":
            return
        self.close()
        if self.mode == "lines":
            message = f"[{time.perf_counter() - self.started:8.1f} s] {message}"
        print(message, file=self.stream, flush=True)

    def batch(self, done: int, total: int) -> None:
        if self.mode != "bars":
            return
        if self.bar is None or done == 0:
            self.close()
            self.bar = self.tqdm(total=total, file=self.stream, leave=False, unit="batch",
                                 dynamic_ncols=True)
        self.bar.update(done - self.bar.n)  # called as batch `done` starts: `done` are finished

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
