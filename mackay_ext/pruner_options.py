"""The MacKayPruner options that need no model, checked wherever they are given: by the pruner
itself, and by fit and the training-loop callbacks when they are built. Those build their pruner
only when training starts, where a bad value would surface after the data is set up, naming
neither them nor the option."""
from __future__ import annotations

import difflib
import inspect
import math
import numbers
import warnings
from typing import Any

from ._validate import (BACKENDS, check_choice, check_max_prune_fraction, check_names, check_threshold,
                        user_stacklevel, warn_threshold_scale)
from .ard_targets import GRANULARITIES

CURVATURES = ("ef-batch", "ef-exact", "fisher-mc")
PRIORS = ("proximal", "penalty")
CHANNEL_PRIORS = ("members", "norm-scale")
RULES = ("mackay", "em", "paper")
CRITERIA = ("alpha", "snr")


def check_pruner_options(where: str, *, granularity: Any = "weight", rule: Any = "mackay", prune: Any = None,
                         threshold: Any = None, curvature: Any = "ef-batch", layers: Any = None,
                         curvature_decay: Any = 0.99, eps: Any = 1e-16, alpha_max: Any = None,
                         prior: Any = "proximal", allow_empty_layers: Any = False, on_nonfinite: Any = "raise",
                         backend: Any = "ext", mac_price: Any = 0.0, mac_price_ramp: Any = 1,
                         curvature_every: Any = 1, max_prune_fraction: Any = None, channel_prior: Any = None,
                         example_inputs: Any = None, batch_size: Any = None) -> dict[str, Any]:
    """Raise on the first bad value, naming `where` and the option. Returns the values the pruner
    keeps in another form: threshold and max_prune_fraction as floats or None, mac_price as a
    float, channel_prior with None read as its default "members" (channel_prior_chosen: whether
    it was given). example_inputs and batch_size are checked with the model, by the pruner."""
    threshold = check_threshold(threshold, where)
    check_names(layers, "layers", where)
    check_choice("curvature", curvature, CURVATURES, where)
    check_choice("rule", rule, RULES, where)
    if snr_threshold_under_paper_default(rule, prune, threshold):
        raise ValueError(f"{where}: threshold={threshold:g} is on the scale of prune='snr', but under rule='paper' "
                         "the criterion defaults to prune='alpha' (threshold 1e13, the paper's code): that rule "
                         "leaves every group's snr near 1. Pass prune='alpha' with an alpha threshold, or "
                         "prune='snr' explicitly")
    prune = default_criterion(rule) if prune is None else prune
    check_choice("prune", prune, CRITERIA, where)
    warn_threshold_scale(prune, threshold, where)
    if rule == "paper" and prune == "snr" and granularity != "channel":   # (a channel's members carry
        _warn_paper_snr(threshold, eps, where)   # priors of their own scale: the bound below is not theirs)
    check_choice("prior", prior, PRIORS, where)
    check_choice("on_nonfinite", on_nonfinite, ("raise", "skip"), where)
    chosen = channel_prior is not None   # None: "members", chosen by default (channel_ard warns where that is ill-posed)
    channel_prior = "members" if channel_prior is None else channel_prior
    check_choice("channel_prior", channel_prior, CHANNEL_PRIORS, where)
    check_choice("backend", backend, BACKENDS, where)
    _check_granularity(granularity, where)
    if channel_prior != "members" and granularity != "channel":
        raise ValueError(f"{where}: channel_prior={channel_prior!r} places the prior of a coupled "
                         f"channel group: it needs granularity='channel', got {granularity!r}")
    if isinstance(eps, bool) or not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"{where}: eps must be a finite number >= 0, got {eps!r}")
    if alpha_max is not None and not (isinstance(alpha_max, (int, float)) and alpha_max > 0):
        raise ValueError(f"{where}: alpha_max must be None or a number > 0 (a cap on alpha), got {alpha_max!r}")
    if not (isinstance(curvature_decay, (int, float)) and 0.0 <= curvature_decay < 1.0):
        # at 1 the moving average never moves from 0: no curvature, and every weight pruned
        raise ValueError(f"{where}: curvature_decay must be in [0, 1), got {curvature_decay!r}")
    if not isinstance(allow_empty_layers, bool):
        raise TypeError(f"{where}: allow_empty_layers must be True or False, got {allow_empty_layers!r}")
    max_prune_fraction = check_max_prune_fraction(max_prune_fraction, where)
    if isinstance(mac_price, bool) or not isinstance(mac_price, numbers.Real):
        raise TypeError(f"{where}: mac_price must be a finite number >= 0 (nats of evidence per "
                        f"multiply-accumulate), got {type(mac_price).__name__} {mac_price!r}")
    if not (math.isfinite(mac_price) and mac_price >= 0):
        raise ValueError(f"{where}: mac_price must be a finite number >= 0 (nats of evidence "
                         f"per multiply-accumulate), got {mac_price!r}")
    if isinstance(mac_price_ramp, bool) or not isinstance(mac_price_ramp, int):
        raise TypeError(f"{where}: mac_price_ramp must be an int >= 1 (pruning updates), got "
                        f"{type(mac_price_ramp).__name__} {mac_price_ramp!r}")
    if mac_price_ramp < 1:
        raise ValueError(f"{where}: mac_price_ramp must be an int >= 1 (pruning updates), got {mac_price_ramp!r}")
    if isinstance(curvature_every, bool) or not isinstance(curvature_every, int) or curvature_every < 1:
        raise ValueError(f"{where}: curvature_every must be an int >= 1 (training steps), got {curvature_every!r}")
    if curvature_every > 1 and curvature == "ef-batch":
        raise ValueError(f"{where}: curvature_every samples the ef-exact or fisher-mc curvature; "
                         "ef-batch rides in every optimizer step at no extra cost (leave it at 1)")
    return {"prune": prune, "threshold": threshold, "channel_prior": channel_prior, "channel_prior_chosen": chosen,
            "max_prune_fraction": max_prune_fraction, "mac_price": float(mac_price)}


def default_criterion(rule: str) -> str:
    """prune's default: "alpha" under the paper's rule (its code prunes at alpha >= 1e13), "snr"
    under the others (_warn_paper_snr says why the paper's rule cannot use it)."""
    return "alpha" if rule == "paper" else "snr"


def snr_threshold_under_paper_default(rule: str, prune: str | None, threshold: float | None) -> bool:
    """An snr-scale threshold (<= 1) under rule='paper' with no criterion given: before the default
    became alpha it meant snr < t; read as alpha >= t it would prune nearly every group. Refused
    by the pruner and by the command line."""
    return prune is None and rule == "paper" and threshold is not None and threshold <= 1.0


def _warn_paper_snr(threshold: float | None, eps: Any, where: str) -> None:
    """The paper's rule sets alpha_g = n_g / (|w_g|^2 + eps), which makes sum_{i in g} Sigma_ii =
    sum 1 / (N h_i + alpha_g) <= |w_g|^2 + eps: every group's snr is at least |w_g|^2 / (|w_g|^2
    + eps), about 1, and falls below a threshold t < 1 only once |w_g|^2 < t eps / (1 - t), i.e.
    alpha_g > n_g (1 - t) / eps (a statistician's check: per weight, the pruned sets were identical
    to prune='alpha' at (1 - t) / eps for t from 0.001 to 0.9). An alpha threshold set by eps, not
    a test of the posterior; the MNIST paper recipes ran it so until this was found. A run started
    so (a checkpoint resumed) goes on so, said each time it is built."""
    t = 0.05 if threshold is None else float(threshold)
    where_it_falls = (f"falls below {t:g} only where alpha_g > n_g x {(1 - t) / float(eps):.3g} (n_g the weights of "
                      "the group; set by eps, not by the data)" if eps and t < 1 else
                      f"a threshold of {t:g} prunes on that bound, not on the data")
    warnings.warn(f"{where}: prune='snr' with rule='paper' is no test of the posterior: that rule sets alpha_g = "
                  "n_g / (|w_g|^2 + eps), so every group's snr is at least |w_g|^2 / (|w_g|^2 + eps), about 1, and "
                  f"{where_it_falls}. Use prune='alpha' (the default under rule='paper'; threshold 1e13, the "
                  "paper's code); a run started with snr, resumed, goes on with it", UserWarning,
                  stacklevel=user_stacklevel())


def _check_granularity(granularity: Any, where: str) -> None:
    """A granularity for every layer, or {layer name: granularity} (the names are checked against
    the model by the pruner); "channel" couples the whole model, so it is not given per layer."""
    if isinstance(granularity, dict):
        if "channel" in granularity.values():
            raise ValueError(f"{where}: granularity='channel' couples layers across the whole "
                             "model: pass granularity='channel', not per layer")
        bad = [value for name, value in granularity.items() if value not in GRANULARITIES]
        names = [name for name in granularity if not isinstance(name, str)]
        if names:
            raise TypeError(f"{where}: granularity per layer maps layer names (str) to granularities, "
                            f"got the key {names[0]!r}")
    else:
        bad = [] if isinstance(granularity, str) and granularity in (*GRANULARITIES, "channel") else [granularity]
    if bad:
        raise ValueError(f"{where}: granularity must be one of {GRANULARITIES} (per layer, or for every "
                         f"layer) or 'channel' (for every layer), got {bad[0]!r}")


def check_option_names(who: str, options: dict[str, Any], set_here: set[str]) -> None:
    """Every name in `options` a MacKayPruner option that `who` passes on (`set_here`: those it
    sets itself, such as num_data); a typo is named with the closest option."""
    from .pruner import MacKayPruner   # (the pruner imports this module)
    accepted = set(inspect.signature(MacKayPruner.__init__).parameters) - {"self", "model", "optimizer"}
    for name in sorted(set(options) & set_here):
        raise TypeError(f"{who}: {name} is set by {who} itself; do not pass it among the pruner options")
    accepted -= set_here
    for name in sorted(set(options) - accepted):
        close = difflib.get_close_matches(name, sorted(accepted | set_here), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise TypeError(f"{who}: unknown option {name!r}{hint}; the MacKayPruner options it passes on are "
                        f"{', '.join(sorted(accepted))}")
