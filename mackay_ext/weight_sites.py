"""Layers whose weight the forward also reads outside the layer's own call.

ef-exact and fisher-mc square each example's gradient of a layer from the input and output
gradient their hooks capture at the layer's call. A forward that also reads the weight itself
(`F.linear(h, self.mid.weight)`: hand-written weight sharing) adds that read's share to the
weight's gradient where no hook sees it: a new user's curvature came out 2.4-2.7x too small and
the pruner pruned more, with no word. Over the first captured forward after the accumulator is
built and after each update, a TorchFunctionMode notes every torch function that takes a layer's
weight while that layer is not running its own forward; such layers are warned about once.
"""
from __future__ import annotations

import functools
import threading
import warnings
from collections import Counter
from collections.abc import Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from ._validate import user_stacklevel
from .copy_inert import CopyInert


class _OutsideReads(TorchFunctionMode):
    """Notes {layer: the first function that took its weight while the layer was not running}."""

    def __init__(self, weights: dict[int, str], running: Counter):
        super().__init__()
        self.weights, self.running = weights, running
        self.found: dict[str, str] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        # a read that adds to the weight's gradient: with autograd on, into a result in the graph
        # (its size, a detached copy, new_zeros, a max-norm clamp_ under no_grad add nothing)
        if torch.is_grad_enabled() and any(isinstance(out, torch.Tensor) and out.grad_fn is not None
                                           for out in tree_leaves(result)):
            for leaf in tree_leaves((args, kwargs)):
                name = self.weights.get(id(leaf)) if isinstance(leaf, torch.Tensor) else None
                if name is not None and not self.running[name] and name not in self.found:
                    self.found[name] = getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))
        return result


def _function_reads(output, weights: dict[int, str], layers: dict[str, nn.Module]) -> dict[str, str]:
    """{layer: the custom torch.autograd.Function that took its weight}, from the graph of the
    forward's output. A Function's forward runs with gradients off, where the mode above does not
    look, and its apply() reaches no TorchFunctionMode: a parent's LinFn.apply(h, self.mid.weight)
    left the curvature 4x too small with no word. A layer whose forward is its own (a subclass)
    may call such a Function itself (plain_product.py checks those), and a served conv's is the
    library's own (ConvFromExamples): neither is an outside read."""
    from .conv_weight_grad import ConvFromExamples
    from .plain_product import has_own_forward
    found: dict[str, str] = {}
    seen, stack = set(), [out.grad_fn for out in tree_leaves(output)
                          if isinstance(out, torch.Tensor) and out.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        custom = isinstance(node, torch.autograd.function.BackwardCFunction) \
            and getattr(node, "_forward_cls", None) is not ConvFromExamples
        for child, _ in node.next_functions:
            name = weights.get(id(getattr(child, "variable", None))) if custom and child is not None else None
            if name is not None and not has_own_forward(layers[name]):
                found.setdefault(name, f"{node._forward_cls.__name__}.apply")
            stack.append(child)
    return found


class WeightSites:
    """Watches one forward of `model` in each window (`due`: set again by the accumulator's reset)
    for reads of the `layers`' weights outside their own calls. `wanted()`: whether this forward
    is one the accumulator captures."""

    def __init__(self, model: nn.Module, layers: dict[str, nn.Module], wanted: Callable[[], bool], estimator: str):
        self.model, self.layers, self.wanted, self.estimator = model, layers, wanted, estimator
        self.due = True
        self.said: set[str] = set()
        self._running: Counter = Counter()
        self._mode: _OutsideReads | None = None
        self._thread: int | None = None
        self._layer_handles: list = []
        self.handles = [model.register_forward_pre_hook(CopyInert(self._start), prepend=True),
                        model.register_forward_hook(CopyInert(self._stop), always_call=True)]

    def _start(self, module, args) -> None:
        if self._mode is not None:
            if self._thread != threading.get_ident():   # nn.DataParallel's replicas: another thread's watch
                return
            # a watched forward that never reached _stop: torch runs always_call hooks for an
            # Exception only, so a KeyboardInterrupt left the mode on. What it noted since (the
            # user's own code between the two forwards) is not this model's forward: dropped, and
            # this forward watched instead
            self._discard()
            self.due = True
        if not self.due or torch.compiler.is_compiling() or not self.wanted():
            return
        self.due = False
        weights = {}
        for name, layer in self.layers.items():
            weight = layer._parameters.get("weight_orig", layer._parameters.get("weight"))
            if weight is not None:
                weights[id(weight)] = name
            # prepended: before torch.nn.utils.prune's pre-hook, which reads weight_orig for the layer
            self._layer_handles += [
                layer.register_forward_pre_hook(CopyInert(functools.partial(self._enter, name)), prepend=True),
                layer.register_forward_hook(CopyInert(functools.partial(self._leave, name)), always_call=True)]
            if layer is module:   # the model is the layer: its own hooks above come too late for this call
                self._running[name] += 1
        self._mode = _OutsideReads(weights, self._running)
        self._mode.__enter__()
        self._thread = threading.get_ident()   # (the mode stack is the thread's own)

    # (a layer's hooks may still run once after _stop removed them: torch took the list of a
    # call's hooks before; the model's own call, whose forward hooks end with _stop's)
    def _enter(self, name: str, *_) -> None:
        if self._mode is not None:
            self._running[name] += 1

    def _leave(self, name: str, *_) -> None:
        if self._mode is not None:
            self._running[name] -= 1

    def _stop(self, module, args, output=None) -> None:
        if self._mode is None or self._thread != threading.get_ident():   # (another thread's watch)
            return
        mode = self._discard()
        for name, func in _function_reads(output, mode.weights, self.layers).items():
            mode.found.setdefault(name, func)
        new = {name: func for name, func in mode.found.items() if name not in self.said}
        if not new:
            return
        self.said.update(new)
        shown = "; ".join(f"{name} (by {func})" for name, func in sorted(new.items()))
        warnings.warn(
            f"FisherAccumulator ({self.estimator}): the curvature squares each example's gradient of a layer at "
            f"the layer's own calls, but this forward also reads the weight outside them: {shown}. That read's "
            "share of the gradient is missing from the curvature (a new user's came out 2.4x too small, and more "
            "was pruned). Call the layer instead of reading its weight, or use curvature='ef-batch', which reads "
            "the whole gradient", RuntimeWarning,
            stacklevel=user_stacklevel())

    def _discard(self) -> _OutsideReads:
        """Leave the mode and the layers' hooks; the mode, with what it noted, is returned."""
        mode, self._mode = self._mode, None
        mode.__exit__(None, None, None)
        for handle in self._layer_handles:
            handle.remove()
        self._layer_handles.clear()
        self._running.clear()
        return mode

    def remove(self) -> None:
        if self._mode is not None:
            self._stop(self.model, ())
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
