"""Loads the compiled kernels (mackay_ext._C) and says which backends they provide."""
from __future__ import annotations

import os
import sys

import torch

_LOAD_ERROR: Exception | None = None
try:
    from . import _C  # noqa: F401  (registers torch.ops.mackay_ext.*)
except ImportError as error:  # a source checkout that was never built, or an ABI mismatch
    _LOAD_ERROR = error


def is_loaded() -> bool:
    return _LOAD_ERROR is None


def _shadowed_install() -> str | None:
    """Where an installed mackay_ext with its compiled _C lies when this import came from a source
    tree without one (Python run from the repository root after a non-editable install)."""
    here = os.path.dirname(os.path.abspath(__file__))
    for entry in sys.path:
        folder = os.path.join(os.path.abspath(entry or "."), "mackay_ext")
        if folder == here or not os.path.isdir(folder):
            continue
        if any(name.startswith("_C.") and name.endswith((".so", ".pyd")) for name in os.listdir(folder)):
            return folder
    return None


def require() -> None:
    """Raise a clear error when the compiled kernels are unavailable."""
    if _LOAD_ERROR is not None:
        shadowed = _shadowed_install()
        hint = (f" This mackay_ext was imported from the source tree {os.path.dirname(__file__)}, which "
                f"shadows the built install in {shadowed}: run Python from another directory, or "
                "install the checkout in place with `pip install --no-build-isolation -e .`."
                if shadowed else
                " Build it with `pip install --no-build-isolation .` against the installed torch, or "
                "pass backend='torch' to use the pure-PyTorch fallback.")
        raise RuntimeError(
            f"mackay_ext: the compiled extension mackay_ext._C could not be loaded ({_LOAD_ERROR}).{hint}")


def compiled_backends() -> tuple[str, ...]:
    """Device backends with compiled kernels, e.g. ("cpu", "cuda"); () if the build is missing."""
    if _LOAD_ERROR is not None:
        return ()
    has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key
    return tuple(
        name
        for name, key in (("cpu", "CPU"), ("cuda", "CUDA"))
        if has_kernel("mackay_ext::mackay_update_", key)
    )
