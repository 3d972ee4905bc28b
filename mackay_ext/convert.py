"""sparsify / densify: swap pruned nn.Linear / nn.Conv2d layers for their CSR twins and back,
in place, with an optimizer rebound to the kept values (its state gathered or scattered), and
every layer left dense named, with the reason, in one warning."""
from __future__ import annotations

import functools
import inspect
import math
import re
import warnings

import torch
from torch import nn
from torch.nn.utils.parametrize import ParametrizationList

from ._validate import alpha_fits, check_module, check_optimizer, quantized_modules, user_stacklevel
from .model_loads import describe
from .sparse import SparseConv2d, SparseLinear, _csr_from_dense, _CSRWeight, _set_module


def _pruning_mask(module: nn.Module, optimizer) -> tuple[torch.Tensor, int]:
    """The weights the sparse layer keeps, and how many of them are nonzero where the optimizer's
    alpha is +inf. Kept: every weight alpha keeps (0 or not: trained from there on) and every
    nonzero one (the conversion changes no output: a model restored from before the last
    pruning update had 131 such weights, and dropping them moved its logits by 0.61)."""
    weight = module.weight
    nonzero = weight.detach() != 0
    state = getattr(optimizer, "state", {}).get(weight) if optimizer is not None else None
    if state is not None and "alpha" in state:
        pruned = (state["alpha"] == math.inf).expand_as(weight)
        live_at_pruned = int((pruned & nonzero).sum())
        return ~pruned | nonzero, live_at_pruned
    return nonzero, 0


@functools.cache
def _weight_reads(cls: type) -> frozenset:
    """Names n for which code of `cls` (and of its bases other than nn.Module) reads `n.weight`
    itself instead of calling module n: nn.MultiheadAttention reads out_proj.weight, and
    TransformerEncoder(Layer)'s fast path linear1.weight. Constructors and initialisers are left
    out: they ran before sparsify."""
    names = set()
    for klass in cls.__mro__:
        if klass in (nn.Module, object):
            continue
        for attr, function in vars(klass).items():
            function = getattr(function, "__func__", function)
            if not inspect.isfunction(function) or "init" in attr or "reset" in attr:
                continue
            try:
                source = inspect.getsource(function)
            except (OSError, TypeError):  # defined where no source is kept
                continue
            names.update(re.findall(r"(\w+)\.weight\b", source))
    return frozenset(names)


def _user_hooks(module: nn.Module) -> list:
    """The module's hooks, except this package's own curvature hooks (bound to the dense layer,
    dropped with it: a model copied mid-pruning still converts)."""
    hooks = [hook for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                               "_backward_pre_hooks") for hook in getattr(module, attr, {}).values()]
    return [hook for hook in hooks if not getattr(hook, "__module__", "").startswith("mackay_ext.")]


def _why_not_convertible(model, names, module, holders) -> str | None:
    """Why the layer `module` (reached as every name in `names`) must stay dense, or None."""
    if isinstance(module, nn.Conv2d) and (module.groups != 1 or module.padding_mode != "zeros"
                                          or isinstance(module.padding, str)):
        return "a grouped, string-padded or non-zero-padded Conv2d has no sparse twin"
    if type(module).forward not in (nn.Linear.forward, nn.Conv2d.forward):
        return f"{type(module).__name__} has its own forward, which the sparse twin would drop"
    if not isinstance(module.weight, nn.Parameter) or isinstance(module.weight, nn.UninitializedParameter):
        return ("its weight is not a plain Parameter (uninitialised, parametrized or under "
                "torch.nn.utils.prune: remove that first)")
    if _user_hooks(module):
        return "it has hooks, which would be lost"
    others = holders.get(id(module.weight), set()) - {id(module)}
    if others:
        return "its weight is tied to another module (it would be untied)"
    if "" in names:
        return "it is the model itself (sparsify replaces submodules in place)"
    for name in names:
        parts = name.split(".")
        for depth in range(len(parts) - 1, -1, -1):  # nearest ancestor first
            ancestor_name = ".".join(parts[:depth])
            ancestor = model.get_submodule(ancestor_name)
            if parts[-1] in _weight_reads(type(ancestor)):
                return (f"{type(ancestor).__name__} ({ancestor_name or 'the model'}) reads "
                        f"{parts[-1]}.weight directly")
    return None


def _exclusion(model: nn.Module, exclude):
    """A predicate (name, module) -> bool from module names and/or predicates."""
    items = [exclude] if isinstance(exclude, str) or callable(exclude) else list(exclude or ())
    names = [item for item in items if isinstance(item, str)]
    predicates = [item for item in items if callable(item)]
    bad = [item for item in items if not isinstance(item, str) and not callable(item)]
    if bad:
        raise TypeError(f"sparsify: exclude must hold module names (str) or predicates "
                        f"(name, module) -> bool, got {bad!r}")
    known = {name for name, _ in model.named_modules(remove_duplicate=False)}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"sparsify: exclude names modules the model does not have: {unknown} "
                         f"(its modules: {sorted(known - {''})[:20]})")

    def excluded(name, module):
        return (any(name == n or name.startswith(n + ".") or n == "" for n in names)
                or any(p(name, module) for p in predicates))
    return excluded


def _find_layers(model: nn.Module, types):
    """[(names, module)] of the modules of `types`, every name a module is registered under
    (a module used twice is converted once and stays shared), and {id(param): ids of the
    modules holding it} to spot tied weights."""
    names_of, holders = {}, {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, types):
            names_of.setdefault(id(module), (module, []))[1].append(name)
        for param in module._parameters.values():
            if param is not None:
                holders.setdefault(id(param), set()).add(id(module))
    return [(names, module) for module, names in names_of.values()], holders


# Optimizers whose state is not one number per weight (factored second moments, a history of
# flat vectors): it cannot be carried to the kept values.
_UNCARRIABLE = tuple(getattr(torch.optim, name) for name in ("LBFGS", "Adafactor", "SparseAdam")
                     if hasattr(torch.optim, name))


def _check_optimizer(optimizer, where: str) -> None:
    check_optimizer(optimizer, "optimizer", where)
    if isinstance(optimizer, _UNCARRIABLE):
        raise ValueError(f"{where}: the state of {type(optimizer).__name__} is not one number per weight "
                         "and cannot be carried over; call it without the optimizer and build a new one")


def _check_optimizer_holds_model(optimizer, model: nn.Module, where: str) -> None:
    """An optimizer holding none of the model's trainable parameters (another model's, or a
    copy's) would be rebound nowhere: the layers would be converted and the real optimizer would go on stepping
    the weights the model no longer uses."""
    if optimizer is None:
        return
    trained = [p for p in model.parameters() if p.requires_grad]
    if not trained:   # a frozen part of a model the optimizer trains elsewhere: nothing to rebind
        return
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if not any(id(p) in held for p in trained):
        raise ValueError(f"{where}: the optimizer holds none of this model's parameters: was it built for "
                         "another model, or for a copy of this one (copy.deepcopy makes new parameters)? "
                         "Pass the optimizer that trains this model, or none")


def _tell_pruners(replaced: list[tuple[list[str], nn.Parameter]], where: str) -> None:
    """Converted without the optimizer: a live pruner whose optimizer still holds an old weight
    says so at that optimizer's next step (a new user fine-tuning after sparsify(model) trained
    the biases only, the sparse layers' values not at all, with no word)."""
    from .pruner_claims import holder_of
    for names, weight in replaced:
        pruner = holder_of(weight)
        if pruner is not None and getattr(pruner, "optimizer", None) is not None:
            pruner.note_replaced_untrained(names[0], where)


def _carry_state(state: dict, shape, take, where: str) -> dict:
    """Per-parameter optimizer state moved to a reshaped parameter: tensors of the old
    parameter's shape, or broadcastable to it (MacKayAdam's per-group alpha), go through
    `take` (expanded first); scalars (step) and None are copied."""
    carried = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            if not alpha_fits(value.shape, shape):
                raise ValueError(f"{where}: optimizer state {key!r} has shape {tuple(value.shape)}, "
                                 f"neither the weight's {tuple(shape)} nor broadcastable to it")
            carried[key] = take(key, value.expand(shape))
        else:
            carried[key] = value.clone() if isinstance(value, torch.Tensor) else value
    return carried


def _rebind(optimizer, old: nn.Parameter, new: nn.Parameter, state: dict | None) -> None:
    """In place: `new` takes `old`'s slot in its param group, and the carried state."""
    for group in optimizer.param_groups:
        for i, param in enumerate(group["params"]):
            if param is old:
                group["params"][i] = new
    optimizer.state.pop(old, None)
    if state:
        optimizer.state[new] = state


# layers with weights but no sparse twin: named when sparse enough, never passed over in silence
_FORMLESS = (nn.RNNBase, nn.Conv1d, nn.Conv3d, nn.modules.conv._ConvTransposeNd, nn.Bilinear, nn.Embedding,
             nn.EmbeddingBag, nn.MultiheadAttention)


def _sparse_but_formless(model: nn.Module, min_sparsity: float, excluded) -> list[str]:
    """'name (why)' of each layer sparsify has no sparse form for whose own matrices (exact
    zeros) reach min_sparsity, and of each such matrix a module's forward uses itself."""
    found = []
    for name, module in model.named_modules():
        if excluded(name, module) or isinstance(module, (nn.Linear, nn.Conv2d, _CSRWeight, ParametrizationList)):
            continue
        if isinstance(module, _FORMLESS):
            matrices = [p for p in module.parameters(recurse=False) if p.dim() >= 2 and p.numel()]
            total = sum(p.numel() for p in matrices)
            zeros = sum(int((p == 0).sum()) for p in matrices)
            if total and zeros / total >= min_sparsity:
                found.append(f"{name} ({type(module).__name__}: no sparse form; {zeros:,} of {total:,} weights zero)")
            continue
        # a module's own matrices that its forward uses itself (F.linear on a Parameter, a
        # hand-written LoRA adapter): a pruner covers them, and no layer here can hold them sparse
        for attr, param in module.named_parameters(recurse=False):
            if param.dim() >= 2 and param.numel() and float((param == 0).float().mean()) >= min_sparsity:
                zeros = int((param == 0).sum())
                found.append(f"{name + '.' if name else ''}{attr} (a parameter {type(module).__name__}'s forward "
                             f"uses itself: no sparse form; {zeros:,} of {param.numel():,} weights zero)")
    return found


MIN_SPARSITY = 0.5   # sparsify's default: a layer at least this sparse is converted


def unconvertible(model: nn.Module) -> set[nn.Module]:
    """The nn.Linear / nn.Conv2d layers sparsify leaves dense however sparse (tied, read by an
    enclosing module, grouped, ...: _why_not_convertible)."""
    layers, holders = _find_layers(model, (nn.Linear, nn.Conv2d))
    return {module for names, module in layers if _why_not_convertible(model, names, module, holders)}


@torch.no_grad()
def sparsify(model: nn.Module, optimizer=None, min_sparsity: float = MIN_SPARSITY, *, exclude=()) -> nn.Module:
    """Replace every nn.Linear / nn.Conv2d (groups=1) whose sparsity reaches `min_sparsity` by
    its sparse twin, in place; returns the model. Sparsity comes from the optimizer's alpha
    (+inf = pruned) when given, else from exact zeros; a nonzero weight where alpha is +inf is
    kept (the conversion changes no output) and said: a pruning update leaves none.

    optimizer: rebound in place, so it trains the sparse layers: each converted weight Parameter
        is replaced in its param group by the layer's `values`, and its state carried over
        (tensors of the weight's shape or broadcastable to it, such as exp_avg, momentum_buffer
        or MacKayAdam's alpha, gathered at the kept weights; step and other scalars copied).
        The bias Parameter is kept as it is.
    exclude: module names (a name excludes everything inside it) and/or predicates
        (name, module) -> bool; layers left dense on request.
    A layer sparse enough but left dense for another reason is named in one warning, with the
    reason: its weight tied to another module, read directly by an enclosing module (as
    nn.MultiheadAttention reads out_proj.weight), hooks, a subclass with its own forward, a
    grouped or non-zero-padded Conv2d.
    """
    check_module(model, "model", "sparsify")
    if isinstance(min_sparsity, bool) or not isinstance(min_sparsity, (int, float)):
        raise TypeError(f"sparsify: min_sparsity must be a number in [0, 1], got "
                        f"{type(min_sparsity).__name__} {min_sparsity!r}")
    if not 0.0 <= min_sparsity <= 1.0:
        raise ValueError(f"sparsify: min_sparsity must be in [0, 1], got {min_sparsity}")
    _check_optimizer(optimizer, "sparsify")
    excluded = _exclusion(model, exclude)
    layers, holders = _find_layers(model, (nn.Linear, nn.Conv2d))
    plan, skipped = [], []
    live: dict[str, int] = {}   # nonzero weights where alpha = +inf, by layer
    sparsest = (-1.0, "")       # (sparsity, name) of the sparsest layer seen
    for names, module in layers:
        if any(excluded(name, module) for name in names):
            continue
        weight = module.weight
        if isinstance(weight, nn.UninitializedParameter) or weight.numel() == 0:
            continue
        if weight.is_meta:
            raise ValueError(f"sparsify: layer {names[0]!r} is on the meta device, whose tensors hold "
                             "no values to find the pruned weights in; load the weights first "
                             "(model.to_empty(device=...) then load_state_dict)")
        mask, live_at_pruned = _pruning_mask(module, optimizer)
        if live_at_pruned:
            live[names[0]] = live_at_pruned
        sparsity = 1.0 - mask.float().mean().item()
        sparsest = max(sparsest, (sparsity, names[0]))
        if sparsity < min_sparsity:
            continue
        reason = _why_not_convertible(model, names, module, holders)
        if reason:
            skipped.append(f"{names[0]} ({reason})")
            continue
        plan.append((names, module, mask))
    skipped += _sparse_but_formless(model, min_sparsity, excluded)
    if plan:
        _check_optimizer_holds_model(optimizer, model, "sparsify")
    # build everything (and check the optimizer state carries) before changing anything
    built = []
    for names, module, mask in plan:
        weight = module.weight
        sparse_cls = SparseLinear if isinstance(module, nn.Linear) else SparseConv2d
        sparse = sparse_cls.from_dense(module, mask)
        sparse.values.requires_grad_(weight.requires_grad)
        sparse.bias = module.bias  # the same Parameter: its optimizer slot and state stay valid
        state = None
        if optimizer is not None and optimizer.state.get(weight):
            weight2d = weight.reshape(weight.shape[0], -1)
            _, cols, _, rows = _csr_from_dense(weight2d, mask.reshape(weight2d.shape))

            def gather(key, t, shape2d=weight2d.shape, rows=rows, cols=cols):
                return t.reshape(shape2d)[rows, cols].contiguous()
            state = _carry_state(optimizer.state[weight], weight.shape, gather, f"sparsify ({names[0]})")
        built.append((names, weight, sparse, state))
    for names, weight, sparse, state in built:
        for name in names:
            _set_module(model, name, sparse)
        if optimizer is not None:
            _rebind(optimizer, weight, sparse.values, state)
    if optimizer is None:
        _tell_pruners([(names, weight) for names, weight, _, _ in built], "sparsify")
    if skipped:
        warnings.warn("sparsify: left dense, though sparse enough: " + "; ".join(skipped) +
                      ". They compute with their zeros; save_compressed still stores their nonzeros only. "
                      "Pass exclude= to leave layers dense on purpose.", stacklevel=2)
    if live:
        warnings.warn(f"sparsify: {sum(live.values())} nonzero weights sit where the optimizer's alpha is +inf "
                      f"({describe(live)}): kept, so that no output changes; the model's weights come from "
                      "before the pruner's last updates (a restored state_dict?), and the next optimizer step "
                      "sets them to 0. pruner.apply_masks() before sparsify prunes them", stacklevel=2)
    quantized = quantized_modules(model)
    if quantized:
        warnings.warn(f"sparsify: {len(quantized)} layer(s) are quantized by torch.ao ({', '.join(quantized[:4])}"
                      f"{', ...' if len(quantized) > 4 else ''}): left as they are, since their packed int8 weights "
                      "have no sparse form here. Quantize the pruned float model (its zeros stay zeros in int8) "
                      "and ship that, or sparsify the float model and do not quantize: torch.ao's "
                      "quantize_dynamic does not convert the sparse layers either", stacklevel=user_stacklevel())
    elif not built and not skipped and sparsest[0] >= 0:
        warnings.warn(f"sparsify: no layer reached min_sparsity={min_sparsity:g} (the sparsest, {sparsest[1]!r}, has "
                      f"{sparsest[0]:.1%} of its weights pruned{'' if optimizer is not None else ' (exact zeros)'}): "
                      "the model is unchanged. A copy of the model that the pruner does not hold (an EMA or SWA "
                      "average) keeps nonzero values at the pruned weights: pruner.apply_masks(copy) zeroes "
                      "them", stacklevel=user_stacklevel())
    return model


@torch.no_grad()
def densify(model: nn.Module, optimizer=None) -> nn.Module:
    """Replace every SparseLinear / SparseConv2d by the equal nn.Linear / nn.Conv2d, in place
    (the inverse of sparsify; a plain PyTorch model); returns the model.

    optimizer: rebound in place, as sparsify does: each `values` Parameter is replaced by the
        new dense weight, its state scattered to the weight's shape (zeros at the weights not
        stored; MacKayAdam's alpha +inf there, so they stay pruned); the bias is kept.
    """
    check_module(model, "model", "densify")
    _check_optimizer(optimizer, "densify")
    layers, _ = _find_layers(model, _CSRWeight)
    if any("" in names for names, _ in layers):
        raise ValueError("densify: the model itself is a sparse layer; call its to_dense()")
    if layers:
        _check_optimizer_holds_model(optimizer, model, "densify")
    for names, sparse in layers:
        dense = sparse.to_dense()
        dense.weight.requires_grad_(sparse.values.requires_grad)
        dense.bias = sparse.bias
        state = None
        if optimizer is not None and optimizer.state.get(sparse.values):
            size = dense.weight.numel()

            def scatter(key, t, sparse=sparse, size=size, shape=dense.weight.shape):
                fill = math.inf if key == "alpha" else 0.0  # MacKayAdam: +inf = pruned
                return t.new_full((size,), fill).index_copy_(0, sparse.flat_index, t).view(shape)
            state = _carry_state(optimizer.state[sparse.values], sparse.values.shape, scatter,
                                 f"densify ({names[0]})")
        for name in names:
            _set_module(model, name, dense)
        if optimizer is not None:
            _rebind(optimizer, sparse.values, dense.weight, state)
    return model
