"""Loads the compiled kernels (mackay_ext._C) and says which backends they provide."""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import warnings

import torch

from ._build_checks import cpu_flags


def _build_mismatch() -> str | None:
    """Why the compiled _C must not be loaded here, from what setup.py recorded when it built it
    (_build_info.py): built against another torch (torch promises no C++ ABI between builds, so
    any other version string is refused, a +cu suffix included: one built for 2.13 ran under 2.14
    with no word), or for AVX2 on a CPU without it (importing it killed Python with an illegal
    instruction)."""
    try:
        from . import _build_info
    except ImportError:   # a build from before the record existed
        return None
    built_for = getattr(_build_info, "TORCH_VERSION", torch.__version__)
    if built_for != torch.__version__:
        return (f"it was built against torch {built_for}, and this is torch {torch.__version__}: "
                "rebuild it against this torch, in its source: `pip install --no-build-isolation -e .` for a "
                "checkout installed in place, else `pip install --no-build-isolation --no-deps --force-reinstall .`")
    flags, needed = cpu_flags(), set(getattr(_build_info, "CPU_FEATURES", ()))
    if flags is not None and not needed <= flags:
        return (f"it was built for a CPU with {', '.join(sorted(needed))}, and this one lacks "
                f"{', '.join(sorted(needed - flags))}: rebuild it here, or with MACKAY_EXT_CPU_ARCH=generic "
                "to run on any CPU")
    return None


class _NotBuilt(ImportError):
    """No _C beside this package (a source tree never built, or installed without kernels)."""


def _load() -> Exception | None:
    """Import _C (it registers torch.ops.mackay_ext.*); the reason it is not loaded, or None.
    A build that cannot run here is said now, not at the first kernel it would have run."""
    if importlib.util.find_spec(f"{__package__}._C") is None:   # a source tree never built
        return _NotBuilt("it is not built here")
    mismatch = _build_mismatch()
    if mismatch is None:
        try:
            importlib.import_module(f"{__package__}._C")
            return None
        except ImportError as error:   # a broken or truncated library
            problem = error
    else:
        problem = ImportError(mismatch)
    warnings.warn(f"mackay_ext: the compiled kernels (mackay_ext._C) are not loaded ({problem}). Only "
                  "backend='torch', the pure-PyTorch fallback, runs", RuntimeWarning, stacklevel=2)
    return problem


_LOAD_ERROR: Exception | None = _load()


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
        # (a _C that is here but cannot run is no shadowing: the hint would send the user astray)
        shadowed = _shadowed_install() if isinstance(_LOAD_ERROR, _NotBuilt) else None
        hint = (f" This mackay_ext was imported from the source tree {os.path.dirname(__file__)}, which "
                f"shadows the built install in {shadowed}: run Python from another directory, or "
                "install the checkout in place with `pip install --no-build-isolation -e .`."
                if shadowed else
                " Build it with `pip install --no-build-isolation .` against the installed torch, or "
                "pass backend='torch' (`--backend torch` on the command line) to use the pure-PyTorch fallback.")
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
