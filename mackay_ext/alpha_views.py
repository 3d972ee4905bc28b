"""What every training step reads of a layer's alpha, kept until alpha changes: which entries are
pruned (alpha = +inf), alpha with those read as 0, and whether any entry is pruned or has a prior
at all. alpha changes at an update or a load, not at a step; recomputing these at every step
under a foreign optimizer (three passes over the weight per layer: the gradient hook, the
proximal prior, the masks) took a third of its step (bench/bench_training.py, "adam + pruner")."""
from __future__ import annotations

import functools
import math
from typing import Callable

import torch

from ._alpha import finite_alpha


class AlphaView:
    """What the steps read of one alpha. `pruned` and `any_pruned` are read when the view is
    built (every pruner holds its pruned entries' state at 0 then); `keep`, `finite` and
    `any_prior` only when first asked for: the steps of a foreign optimizer read them, while
    under MacKayAdam, whose fused step reads alpha itself, they were 8 bytes a weight held for
    nothing (a 29M-weight MLP: 235 MB)."""

    def __init__(self, source: torch.Tensor, like: tuple, pruned: torch.Tensor):
        self.source = source            # the alpha it was read from (held: its id cannot be reused)
        self.version = source._version  # an in-place write to alpha changes it
        self.like = like                # (dtype, device) of the weight it was formed for
        self.pruned = pruned            # alpha == +inf, alpha's shape
        self.any_pruned = bool(pruned.any())

    @functools.cached_property
    def keep(self) -> torch.Tensor:
        """1 where live, 0 where pruned, alpha's shape, the weight's dtype: w.mul_(keep) zeroes
        the pruned entries of a (finite) tensor 10x faster than masked_fill_ on a CPU (36
        against 368 us for 300x784)."""
        dtype, device = self.like
        with torch.no_grad():
            return (~self.pruned).to(device=device, dtype=dtype)

    @functools.cached_property
    def finite(self) -> torch.Tensor:
        """alpha with +inf as 0, in the wider dtype of alpha and the weight."""
        with torch.no_grad():
            return finite_alpha(self.source.to(torch.promote_types(self.source.dtype, self.like[0])))

    @functools.cached_property
    def any_prior(self) -> bool:
        """Some entry has 0 < alpha < inf: the prior pulls somewhere."""
        return bool((self.finite > 0).any())


class AlphaViews:
    """AlphaView by layer name, rebuilt when that layer's alpha is replaced or written in place;
    `on_new(name, view)` is called with each view built (alpha changed: e.g. to hold the newly
    pruned entries' optimizer state at 0)."""

    def __init__(self, on_new: Callable[[str, AlphaView], None] | None = None):
        self._views: dict[str, AlphaView] = {}
        self._on_new = on_new

    def __call__(self, name: str, alpha: torch.Tensor, weight: torch.Tensor) -> AlphaView:
        view = self._views.get(name)
        like = (weight.dtype, weight.device)
        if view is not None and view.source is alpha and view.version == alpha._version and view.like == like:
            return view
        with torch.no_grad():   # (not around the lookup: a no_grad context costs a read its time)
            return self._build(name, alpha, like)

    def _build(self, name: str, alpha: torch.Tensor, like: tuple) -> AlphaView:
        view = AlphaView(alpha, like, alpha == math.inf)
        self._views[name] = view
        if self._on_new is not None:
            self._on_new(name, view)
        return view
