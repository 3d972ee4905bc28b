"""MacKayPruner: re-estimates every ARD layer's prior precisions and prunes (DESIGN.md section 1).

Two ways to train under the ARD prior:
- with MacKayAdam, alpha and the ef-batch curvature live in the optimizer's state and its fused
  step applies the prior; the pruner reads and writes that state;
- with any other torch optimizer, the pruner keeps alpha and curvature itself, estimates the
  curvature from gradient hooks, and the training loss adds `pruner.penalty()`; pruned weights
  are re-zeroed after every optimizer step (a step post-hook).
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import nn

from . import ops
from .dead_units import prune_unused_units
from .optim import MacKayAdam

GRANULARITIES = ("weight", "input", "output", "filter")
CURVATURES = ("ef-batch", "ef-exact", "fisher-mc")
DEFAULTS = dict(granularity="weight", rule="mackay", prune="snr", threshold=None)


def alpha_shape(module: nn.Module, granularity: str) -> tuple[int, ...]:
    """Shape of alpha for one layer's weight. "input": one per input neuron (Linear) / input
    channel (Conv2d); "output": one per output neuron / filter; "filter": one per conv filter,
    and for a Linear one per input neuron (the grouping of the source paper's experiments)."""
    weight = module.weight
    if granularity == "weight":
        return tuple(weight.shape)
    conv = isinstance(module, nn.Conv2d)
    if granularity == "input" or (granularity == "filter" and not conv):
        return (1, weight.shape[1]) + (1,) * (weight.dim() - 2)
    if granularity in ("output", "filter"):
        return (weight.shape[0],) + (1,) * (weight.dim() - 1)
    raise ValueError(f"MacKayPruner: granularity must be one of {GRANULARITIES}, got {granularity!r}")


def _quantiles(alpha: torch.Tensor) -> dict[str, float]:
    finite = alpha[torch.isfinite(alpha)].double().flatten()
    if finite.numel() == 0:
        return {}
    q = torch.quantile(finite.cpu(), torch.tensor([0.0, 0.05, 0.5, 0.95, 1.0], dtype=torch.float64))
    return dict(zip(("min", "p5", "p50", "p95", "max"), (float(v) for v in q)))


class MacKayPruner:
    """Runs MacKay's precision update on a model's Linear/Conv2d weights and prunes.

    Args:
        model: the network; `layers` (module names) restricts the ARD layers (default: every
            nn.Linear and nn.Conv2d).
        optimizer: a MacKayAdam (uses its ARD state and fused step) or any torch optimizer
            (the pruner keeps its own alpha; add penalty() to the loss).
        num_data: N, the number of training examples.
        granularity: "weight" | "input" | "output" | "filter", or {layer name: granularity}.
        rule: "mackay" | "em" | "paper"; prune: "snr" (default, threshold 0.05) | "alpha"
            (threshold 1e13, the paper's). Per-weight MacKay with the alpha criterion barely
            prunes a network trained with Adam; snr at 0.05 pruned ~85% of the digits MLP with no
            accuracy lost, hence the default.
        curvature: "ef-batch" (h <- rho h + (1 - rho) B g^2, accumulated during training by the
            optimizer step), "ef-exact" (exact per-example squared gradients of every training
            backward, mackay_ext.curvature.FisherAccumulator) or "fisher-mc" (sampled-label Fisher;
            feed batches with `accumulate_mc(x)`). The exact estimates are averaged over everything
            seen since the previous update().
        batch_size, curvature_decay: B and rho for the ef-batch estimate when the optimizer is
            not a MacKayAdam (MacKayAdam uses its own).
        alpha_max: cap on alpha. Adam-type optimizers need none; plain SGD diverges once
            lr * alpha / N > 2 (the prior's curvature), so bound alpha_max below 2 N / lr there.

    DistributedDataParallel: every rank builds the pruner and calls update() at the same step.
    The exact curvatures are summed over ranks (with their example counts) before the update;
    ef-batch is computed from DDP's already averaged gradients (pass the global batch size as
    MacKayAdam's batch_size), so every rank computes identical alpha and identical pruning.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                 num_data: float, granularity: str | dict[str, str] = "weight", rule: str = "mackay",
                 prune: str = "snr", threshold: float | None = None, curvature: str = "ef-batch",
                 layers: Iterable[str] | None = None, batch_size: float | None = None,
                 curvature_decay: float = 0.99, eps: float = 1e-16, alpha_max: float | None = None,
                 backend: str = "ext"):
        if not (isinstance(num_data, (int, float)) and math.isfinite(num_data) and num_data > 0):
            raise ValueError(f"MacKayPruner: num_data must be a positive number, got {num_data}")
        if curvature not in CURVATURES:
            raise ValueError(f"MacKayPruner: curvature must be one of {CURVATURES} in this version, "
                             f"got {curvature!r}")
        if rule not in ("mackay", "em", "paper") or prune not in ("alpha", "snr"):
            raise ValueError(f"MacKayPruner: rule must be mackay/em/paper and prune alpha/snr, got "
                             f"{rule!r}, {prune!r}")
        self.model, self.optimizer = model, optimizer
        self.num_data, self.rule, self.prune, self.threshold = float(num_data), rule, prune, threshold
        self.curvature_kind, self.eps, self.alpha_max, self.backend = curvature, eps, alpha_max, backend
        self.fused = isinstance(optimizer, MacKayAdam)
        self.layers = self._select_layers(layers)
        self.accumulator = None
        if curvature != "ef-batch":
            from .curvature import FisherAccumulator
            self.accumulator = FisherAccumulator(model, mode=curvature, modules=list(self.layers),
                                                 backend=backend)
        self.granularity = {name: granularity.get(name, "weight") if isinstance(granularity, dict)
                            else granularity for name in self.layers}
        self.history: list[dict[str, Any]] = []
        self._own: dict[str, dict[str, torch.Tensor]] = {}
        self._hooks = []
        if self.fused:
            self._attach_to_optimizer()
        else:
            if batch_size is None and curvature == "ef-batch":
                raise ValueError("MacKayPruner: batch_size is needed for the ef-batch curvature "
                                 "when the optimizer is not a MacKayAdam")
            self.batch_size = float(batch_size or 1)
            self.curvature_decay = float(curvature_decay)
            self._attach_hooks()

    # ------------------------------------------------------------------ set-up
    def _select_layers(self, layers) -> dict[str, nn.Module]:
        modules = dict(self.model.named_modules())
        if layers is None:
            chosen = {n: m for n, m in modules.items() if isinstance(m, (nn.Linear, nn.Conv2d))}
        else:
            chosen = {}
            for name in layers:
                if name not in modules or not isinstance(modules[name], (nn.Linear, nn.Conv2d)):
                    raise ValueError(f"MacKayPruner: layer {name!r} is not an nn.Linear/nn.Conv2d of "
                                     "the model")
                chosen[name] = modules[name]
        if not chosen:
            raise ValueError("MacKayPruner: the model has no nn.Linear or nn.Conv2d layer to prune")
        return chosen

    def _attach_to_optimizer(self) -> None:
        for name, module in self.layers.items():
            group = self.optimizer._group_of(module.weight)
            if not group["ard"]:
                raise ValueError(f"MacKayPruner: {name}.weight is in a MacKayAdam group with ard=False")
            if group["batch_size"] is None and self.curvature_kind == "ef-batch":
                raise ValueError("MacKayPruner: the ef-batch curvature needs MacKayAdam(batch_size=...)")
            state = self.optimizer.ard_state(module.weight)
            shape = alpha_shape(module, self.granularity[name])
            if tuple(state["alpha"].shape) != shape:
                state["alpha"] = torch.zeros(shape, dtype=torch.float32, device=module.weight.device)

    def _attach_hooks(self) -> None:
        for name, module in self.layers.items():
            weight = module.weight
            self._own[name] = {
                "alpha": torch.zeros(alpha_shape(module, self.granularity[name]), dtype=torch.float32,
                                     device=weight.device),
                "curvature": torch.zeros_like(weight)}
            if self.curvature_kind == "ef-batch":
                self._hooks.append(weight.register_hook(self._curvature_hook(name, weight)))
            else:  # the exact estimates only need pruned gradients held at 0
                self._hooks.append(weight.register_hook(
                    lambda grad, name=name: grad.masked_fill((self._own[name]["alpha"] == math.inf).expand_as(grad), 0)))
        if self.optimizer is not None:
            self._hooks.append(self.optimizer.register_step_post_hook(lambda *_: self.apply_masks()))

    def _curvature_hook(self, name: str, weight: torch.Tensor):
        def hook(grad):
            state = self._own[name]
            alpha = state["alpha"]
            pruned = alpha == math.inf
            # the data term's gradient: the hook sees penalty() too, whose gradient is alpha/N w
            finite = torch.where(pruned, torch.zeros_like(alpha), alpha)
            data_grad = grad - finite / self.num_data * weight.detach()
            rho = self.curvature_decay
            state["curvature"].mul_(rho).addcmul_(data_grad, data_grad, value=(1 - rho) * self.batch_size)
            return grad.masked_fill(pruned.expand_as(grad), 0)  # no host sync to test for any
        return hook

    def detach(self) -> None:
        """Remove the gradient, optimizer and curvature hooks."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        if self.accumulator is not None:
            self.accumulator.detach()

    def accumulate_mc(self, x: torch.Tensor, num_samples: int = 1) -> None:
        """fisher-mc: add the sampled-label Fisher of a batch of inputs (its own backward)."""
        if self.curvature_kind != "fisher-mc":
            raise RuntimeError("MacKayPruner.accumulate_mc needs curvature='fisher-mc'")
        self.accumulator.accumulate_mc(x, num_samples)

    @torch.no_grad()
    def _refresh_curvature(self) -> None:
        """Move the exact estimate into the curvature the update reads, and start afresh."""
        if self.accumulator is None:
            return
        self.accumulator.all_reduce()  # under torch.distributed: the global batch's estimate
        if self.accumulator.num_examples == 0:
            raise RuntimeError(f"MacKayPruner.update: no {self.curvature_kind} curvature accumulated yet "
                               + ("(call accumulate_mc(x) on training batches)"
                                  if self.curvature_kind == "fisher-mc" else "(run a training backward first)"))
        for name, module in self.layers.items():
            self.curvature(name).copy_(self.accumulator.curvature(module.weight))
        self.accumulator.reset()

    # ------------------------------------------------------------------ state
    def alpha(self, name: str) -> torch.Tensor:
        return (self.optimizer.ard_state(self.layers[name].weight)["alpha"] if self.fused
                else self._own[name]["alpha"])

    def curvature(self, name: str) -> torch.Tensor:
        return (self.optimizer.ard_state(self.layers[name].weight)["curvature"] if self.fused
                else self._own[name]["curvature"])

    def penalty(self) -> torch.Tensor:
        """The ARD term (1 / 2N) sum alpha w^2 to add to a mean loss (non-MacKayAdam optimizers;
        MacKayAdam applies the prior in its step, so adding this would count it twice)."""
        if self.fused:
            raise RuntimeError("MacKayPruner.penalty: MacKayAdam already applies the ARD prior in "
                               "its step; do not add it to the loss")
        total = None
        for name, module in self.layers.items():
            alpha = self._own[name]["alpha"]
            finite = torch.where(alpha == math.inf, torch.zeros_like(alpha), alpha)  # no inf * 0
            term = (finite * module.weight.square()).sum() * (0.5 / self.num_data)
            total = term if total is None else total + term
        return total

    def _set_alpha(self, name: str, alpha: torch.Tensor) -> None:
        if self.fused:
            self.optimizer.ard_state(self.layers[name].weight)["alpha"] = alpha
        else:
            self._own[name]["alpha"] = alpha

    @torch.no_grad()
    def prune_unused_units(self) -> int:
        """Prune the weights feeding units whose every outgoing weight is pruned (in an
        nn.Sequential chain, see mackay_ext.dead_units): they cannot change the output. A layer
        that loses part of an alpha group gets one alpha per weight from then on (the group's
        value repeated, +inf on the removed weights). Returns the number of weights removed."""
        kept = {name: (self.alpha(name) != math.inf).expand_as(module.weight)
                for name, module in self.layers.items()}
        still_kept = prune_unused_units(self.model, kept)
        removed = 0
        for name, module in self.layers.items():
            drop = kept[name] & ~still_kept[name]
            count = int(drop.sum())
            if count:
                alpha = self.alpha(name).expand_as(module.weight).clone().masked_fill_(drop, math.inf)
                self._set_alpha(name, alpha)
                self.granularity[name] = "weight"
                module.weight.masked_fill_(drop, 0)
                removed += count
        return removed

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Hold pruned weights at exactly 0 (after a step of a non-fused optimizer)."""
        for name, module in self.layers.items():
            module.weight.masked_fill_((self.alpha(name) == math.inf).expand_as(module.weight), 0)

    # ------------------------------------------------------------------ update
    @torch.no_grad()
    def update(self) -> dict[str, Any]:
        """One MacKay re-estimation of every layer's alpha, then pruning. Returns a report:
        per layer the total and kept weights, total and kept groups, sum of gamma and alpha
        quantiles; overall totals and the sparsity."""
        self._refresh_curvature()
        layers = []
        for name, module in self.layers.items():
            alpha = self.alpha(name)
            stats = ops.mackay_update_(module.weight, self.curvature(name), alpha,
                                       num_data=self.num_data, rule=self.rule, prune=self.prune,
                                       threshold=self.threshold, eps=self.eps,
                                       alpha_max=self.alpha_max, backend=self.backend)
            layers.append(dict(self._layer_entry(name, module), gamma=float(stats.gamma_sum)))
        report = self._summarise(layers)
        self.history.append(report)
        return report

    def _kept(self, name: str, module: nn.Module) -> tuple[int, int]:
        """(weights kept, groups kept) of one layer."""
        kept_groups = self.alpha(name) != math.inf
        return int(kept_groups.expand_as(module.weight).sum()), int(kept_groups.sum())

    def _layer_entry(self, name: str, module: nn.Module) -> dict[str, Any]:
        alpha = self.alpha(name)
        kept, groups_kept = self._kept(name, module)
        return {"name": name, "total": module.weight.numel(), "kept": kept, "groups": alpha.numel(),
                "groups_kept": groups_kept, "granularity": self.granularity[name],
                "alpha": _quantiles(alpha)}

    def report(self) -> dict[str, Any]:
        """The current per-layer counts, without updating."""
        return self._summarise([self._layer_entry(n, m) for n, m in self.layers.items()])

    def kept_weights(self) -> int:
        """Weights of the ARD layers not pruned (cheap: no alpha statistics)."""
        return sum(self._kept(n, m)[0] for n, m in self.layers.items())

    @staticmethod
    def _summarise(layers) -> dict[str, Any]:
        total = sum(layer["total"] for layer in layers)
        kept = sum(layer["kept"] for layer in layers)
        report = {"layers": layers, "total": total, "kept": kept, "sparsity": 1 - kept / max(total, 1)}
        if all("gamma" in layer for layer in layers):
            report["gamma_sum"] = sum(layer["gamma"] for layer in layers)
        return report

    def sparsity(self) -> float:
        """Fraction of the ARD layers' weights that are pruned."""
        total = sum(m.weight.numel() for m in self.layers.values())
        return 1 - self.kept_weights() / max(total, 1)

    # ------------------------------------------------------------- persistence
    def state_dict(self) -> dict[str, Any]:
        return {"alpha": {n: self.alpha(n).detach().clone() for n in self.layers},
                "curvature": {n: self.curvature(n).detach().clone() for n in self.layers},
                "granularity": dict(self.granularity), "history": list(self.history),
                "settings": {"num_data": self.num_data, "rule": self.rule, "prune": self.prune,
                             "threshold": self.threshold, "curvature": self.curvature_kind}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = set(self.layers) - set(state["alpha"])
        if missing:
            raise KeyError(f"MacKayPruner.load_state_dict: no alpha for layers {sorted(missing)}")
        for name, module in self.layers.items():
            device = module.weight.device
            alpha = state["alpha"][name].to(device=device, dtype=torch.float32)
            curvature = state["curvature"][name].to(device=device, dtype=module.weight.dtype)
            if self.fused:
                ard = self.optimizer.ard_state(module.weight)
                ard["alpha"] = alpha.clone()
                ard["curvature"].copy_(curvature)
            else:
                self._own[name]["alpha"] = alpha.clone()
                self._own[name]["curvature"] = curvature.clone()
        self.granularity = dict(state.get("granularity", self.granularity))
        self.history = list(state.get("history", []))
