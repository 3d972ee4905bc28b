"""mackay-ext: compress a network with MacKay's evidence framework from the command line.

  mackay-ext prune                      # the digits MLP on scikit-learn's digits, < 1 minute
  mackay-ext prune --model lenet-300-100 --data-dir ../shared/data/mnist --out runs/lenet
  mackay-ext prune --recipe lenet-300-100-weight --data-dir ../shared/data/mnist  # a table row
  mackay-ext prune --resume runs/lenet/checkpoint.pt     # continue a run (after Ctrl-C, a kill)
  mackay-ext evaluate runs/lenet/model.pt --data-dir ../shared/data/mnist
  torchrun --standalone --nproc_per_node 2 -m mackay_ext.cli prune ...   # DistributedDataParallel
"""
from __future__ import annotations

import sys
import warnings

from .. import data as datasets  # noqa: F401  (tests patch its loader through here)
from .. import models  # noqa: F401
from .args import GENERIC_RECIPE, INPUT_SHAPES, RECIPES, _given_flags, _parser
from .evaluate import run_evaluate
from .progress import _Progress  # noqa: F401  (tests drive it)
from .prune import run_prune, save_model


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser()
    args = parser.parse_args(argv)
    command = parser.subcommands[args.command]  # its errors print its own usage line
    default_format, warnings.formatwarning = warnings.formatwarning, _one_line_warning
    try:
        if args.command == "prune":
            return run_prune(args, command, _given_flags(argv, args))
        return run_evaluate(args, command)
    except KeyboardInterrupt:  # before training started, or while writing the results
        print("mackay-ext: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = default_format


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """The library's warnings as the command's own lines: Python's format named a file and line
    of the library and printed its source line under each (`state = load_sealed(...)`), which
    says nothing to someone at a shell. (-W error and the other filters still apply.)"""
    return f"mackay-ext: warning: {message}\n"


__all__ = ["main", "save_model", "run_prune", "run_evaluate", "RECIPES", "GENERIC_RECIPE",
           "INPUT_SHAPES"]
