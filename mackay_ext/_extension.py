"""Loads the compiled kernels (mackay_ext._C) and says which backends they provide."""
from __future__ import annotations

import torch

_LOAD_ERROR: Exception | None = None
try:
    from . import _C  # noqa: F401  (registers torch.ops.mackay_ext.*)
except ImportError as error:  # a source checkout that was never built, or an ABI mismatch
    _LOAD_ERROR = error


def is_loaded() -> bool:
    return _LOAD_ERROR is None


def require() -> None:
    """Raise a clear error when the compiled kernels are unavailable."""
    if _LOAD_ERROR is not None:
        raise RuntimeError(
            "mackay_ext: the compiled extension mackay_ext._C could not be loaded "
            f"({_LOAD_ERROR}). Build it with `pip install --no-build-isolation .` against the "
            "installed torch, or pass backend='torch' to use the pure-PyTorch fallback."
        )


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
