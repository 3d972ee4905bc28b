"""Exact diagonal curvature: per-example empirical Fisher ("ef-exact") and the sampled-label
Fisher ("fisher-mc"), accumulated with module hooks (docs/mathematics.md section 1, "Curvature").

For a Linear layer on 2-D inputs the per-example squared gradients sum to one GEMM on squared
operands, h += s^2 (delta*delta)^T (x*x), done by a fused kernel (sq_gemm_accumulate_). A
Conv1d/Conv2d's per-example gradient is delta_n unfold(x_n)^T per group of channels, summed over
positions (conv_curvature.py: a fused CPU kernel squares each into a running sum, or the
convolution library forms a chunk of them). Inputs with extra leading dimensions and a module
used several times in one forward pass form per-example gradients a chunk of the batch at a
time, square them and add them up. While ef-exact captures, a conv layer's training backward
takes its weight gradient from those same per-example products (conv_weight_grad.py) instead of
forming it a second time.

The ef-batch estimate's helpers (its bias correction ema_debiased, its reading from each optimizer
step's gradient StepCurvature) live in batch_curvature.py and are importable from here too.
"""
from __future__ import annotations

import contextlib
import functools
import math
import warnings
import weakref
from collections import defaultdict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

from . import _extension, conv_curvature, kept_pattern, loss_scale
from .mc_likelihood import SoftmaxLossCheck
from .plain_product import Unchecked, base_layer, has_own_forward, weight_use_problem
from ._validate import BACKENDS, check_choice, check_dense_tensors, check_one_device, user_stacklevel
from .ard_targets import layer_detail, weight_reader
from .batch_curvature import StepCurvature, ema_bias, ema_debiased  # noqa: F401 (their old home)
from .conv_weight_grad import ConvFromExamples, can_serve, serves_call
from .copy_inert import CopyInert, ServedForward
from .grad_writes import gradient_node, writes_grad
from .row_examples import GroupedRows, RowExamples
from .weight_sites import WeightSites
from .csr import row_indices as expand_pointers
from .conv_curvature import (
    conv_per_example_grads,
    conv_sq_grad_accumulate_,
    numeric_padding,
    takes_fused,
)

MODES = ("ef-exact", "fisher-mc")
HISTORY = 8   # backward passes whose spent and dropped uses are remembered (a few ints each)
# Why hooks that are in place may still see no forward: torch.compile reuses code compiled before
# they were added, since dynamo does not guard on module hooks by default.
COMPILED_HINT = ("Under torch.compile, code compiled before the hooks were added (for this model, or another "
                 "of the same structure) runs without them: call torch._dynamo.reset() after building the "
                 "accumulator or pruner, or set torch._dynamo.config.skip_nnmodule_hook_guards = False")
REDUCTIONS = ("mean", "sum")


def sq_gemm_accumulate_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float = 1.0,
                        backend: str = "ext", bias_out: torch.Tensor | None = None) -> None:
    """out += scale * (a * a)^T (b * b) in place; a: [N, out], b: [N, in], out: [out, in].
    bias_out, when given: bias_out[o] += scale * sum_n a[n, o]^2 (a bias's share, from the same
    squares of a)."""
    if backend == "ext" and _extension.is_loaded():
        torch.ops.mackay_ext.sq_gemm_accumulate_(out, a, b, float(scale), bias_out)
        return
    check_choice("backend", backend, BACKENDS, "sq_gemm_accumulate_")
    if backend == "torch":
        _check_sq_gemm(out, a, b, bias_out)
        a_sq = a * a
        out.addmm_(a_sq.t(), b * b, alpha=scale)
        if bias_out is not None:
            bias_out.add_(a_sq.sum(0), alpha=scale)
        return
    _extension.require()
    torch.ops.mackay_ext.sq_gemm_accumulate_(out, a, b, float(scale), bias_out)


def _check_sq_gemm(out, a, b, bias_out) -> None:
    """The compiled op's checks (csrc/include/mackay/sq_gemm.h), for the torch backend: the two
    backends accept the same calls and name the same argument."""
    where = "sq_gemm_accumulate_"
    check_dense_tensors(where, out=out, a=a, b=b, **({"bias_out": bias_out} if bias_out is not None else {}))
    if out.dim() != 2 or a.dim() != 2 or b.dim() != 2:
        raise RuntimeError(f"{where}: out, a and b must be 2-D, got {out.dim()}, {a.dim()} and {b.dim()} dimensions")
    if a.shape[0] != b.shape[0] or out.shape != (a.shape[1], b.shape[1]):
        raise RuntimeError(f"{where}: shapes out {tuple(out.shape)}, a {tuple(a.shape)}, "
                           f"b {tuple(b.shape)} do not fit out += (a*a)^T (b*b)")
    if out.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{where}: out must be float32 or float64 (it accumulates), got {out.dtype}")
    if a.dtype != out.dtype or b.dtype != out.dtype:
        raise TypeError(f"{where}: a and b must have out's dtype {out.dtype}, got {a.dtype} and {b.dtype}")
    check_one_device(where, out=out, a=a, b=b, bias_out=bias_out)
    if not out.is_contiguous():
        raise RuntimeError(f"{where}: out must be contiguous (it is accumulated in place)")
    if bias_out is not None and (bias_out.shape != (out.shape[0],) or not bias_out.is_contiguous()
                                 or bias_out.dtype != out.dtype):
        raise RuntimeError(f"{where}: bias_out must be a contiguous {out.dtype} vector of shape "
                           f"({out.shape[0]},), got {bias_out.dtype} {tuple(bias_out.shape)}")


def sq_sddmm_accumulate_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, col_splits: torch.Tensor,
                         block_crow: torch.Tensor, col_indices: torch.Tensor, scale: float = 1.0,
                         backend: str = "ext", bias_out: torch.Tensor | None = None) -> None:
    """out[o, c] += scale * sum_n a[n, o]^2 b[n, c]^2 in place at the nonzeros (o, c) of a pattern
    over out; out's other entries are left as they are. The pattern comes in column blocks
    (kept_pattern.blocked_csr makes it from a mask): col_splits [B + 1] cut out's columns into B
    blocks, block_crow [B * out + 1] is a CSR over the virtual rows j * out + o (row o's nonzeros
    within block j), col_indices [nnz] their columns; B = 1 is a plain CSR. Each CPU thread then
    squares the columns of b it reads. bias_out, when given: bias_out[o] += scale * sum_n a[n, o]^2
    (a bias's share; it is kept when every weight of its row is pruned). The extension's kernel
    takes CPU tensors; backend="torch" (any device) forms the dense product and adds it at the
    pattern."""
    check_choice("backend", backend, BACKENDS, "sq_sddmm_accumulate_")
    if backend == "ext":
        _extension.require()
        if out.device.type != "cpu":
            raise RuntimeError(f"sq_sddmm_accumulate_: the extension's kernel runs on the CPU, got out on "
                               f"{out.device}; use sq_gemm_accumulate_ (dense) or backend='torch'")
        torch.ops.mackay_ext.sq_sddmm_accumulate_(out, a, b, col_splits, block_crow, col_indices, float(scale),
                                                  bias_out)
        return
    blocks = col_splits.numel() - 1
    if a.shape[0] != b.shape[0] or out.shape != (a.shape[1], b.shape[1]) or col_splits.dim() != 1 or blocks < 1 \
            or block_crow.shape != (blocks * out.shape[0] + 1,) or col_indices.dim() != 1:
        raise RuntimeError(f"sq_sddmm_accumulate_: shapes out {tuple(out.shape)}, a {tuple(a.shape)}, b "
                           f"{tuple(b.shape)}, col_splits {tuple(col_splits.shape)}, block_crow "
                           f"{tuple(block_crow.shape)}, col_indices {tuple(col_indices.shape)} do not fit "
                           "out += (a*a)^T (b*b) at a pattern in column blocks over out")
    if bias_out is not None and bias_out.shape != (out.shape[0],):
        raise RuntimeError(f"sq_sddmm_accumulate_: bias_out must have shape ({out.shape[0]},), got {tuple(bias_out.shape)}")
    problem = _malformed_blocks(col_splits, block_crow, col_indices, out.shape[0], out.shape[1])
    if problem:
        raise RuntimeError(f"sq_sddmm_accumulate_: malformed pattern: {problem} (out is unchanged)")
    rows, cols = expand_pointers(block_crow) % out.shape[0], col_indices.long()
    a_sq = a * a
    full = a_sq.t() @ (b * b)
    out.index_put_((rows, cols), full[rows, cols] * scale, accumulate=True)
    if bias_out is not None:
        bias_out.add_(a_sq.sum(0), alpha=scale)


def _malformed_blocks(col_splits, block_crow, col_indices, rows: int, cols: int) -> str | None:
    """What the kernel's check says of a pattern in column blocks, for the torch fallback."""
    splits, crow = col_splits.long(), block_crow.long()
    if int(splits[0]) != 0 or int(splits[-1]) != cols:
        return "col_splits must start at 0 and end at out.size(1)"
    if bool((splits[1:] < splits[:-1]).any()):
        return "col_splits must be non-decreasing"
    if int(crow[0]) != 0 or int(crow[-1]) != col_indices.numel():
        return "block_crow must start at 0 and end at nnz"
    if bool((crow[1:] < crow[:-1]).any()):
        return "block_crow must be non-decreasing"
    block = expand_pointers(crow) // max(rows, 1)
    if col_indices.numel() and bool(((col_indices < splits[block]) | (col_indices >= splits[block + 1])).any()):
        return "a col_index lies outside its column block"
    return None


if _extension.is_loaded():
    @torch.library.register_fake("mackay_ext::sq_gemm_accumulate_")
    def _sq_gemm_fake(out, a, b, scale, bias_out=None):
        check_one_device("sq_gemm_accumulate_", out=out, a=a, b=b, bias_out=bias_out)
        return None

    @torch.library.register_fake("mackay_ext::sq_sddmm_accumulate_")
    def _sq_sddmm_fake(out, a, b, col_splits, block_crow, col_indices, scale, bias_out=None):
        check_one_device("sq_sddmm_accumulate_", out=out, a=a, b=b, bias_out=bias_out)
        return None


def supported(module: nn.Module) -> bool:
    """Whether exact per-example curvature covers `module`: nn.Linear, and nn.Conv1d / nn.Conv2d
    (grouped and depthwise included) with zero padding that is the same on both sides (numeric,
    'valid', or 'same' with an odd dilated kernel)."""
    if isinstance(module, nn.Linear):
        return True
    return (isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.padding_mode == "zeros"
            and numeric_padding(module) is not None)


def _stored(module: nn.Module, name: str):
    """The Parameter behind module.<name>: itself, or <name>_orig where torch.nn.utils.prune
    recomputes <name> = <name>_orig * mask on every forward (keyed by that step's tensor, the
    sums would start afresh each step)."""
    parameters = module._parameters   # read directly: nn.Module.__getattr__ costs microseconds a layer a step
    if name in parameters:
        return parameters[name]
    original = parameters.get(name + "_orig")
    return original if original is not None else getattr(module, name)


def _tied_layers(model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, str]:
    """name -> "name = other" for each of `layers` holding a parameter another module holds too
    (one module registered under two names is one module, used twice: that the hooks pair)."""
    holders: dict[int, list[str]] = defaultdict(list)
    seen = set()
    for name, module in model.named_modules(remove_duplicate=False):
        if id(module) in seen:
            continue
        seen.add(id(module))
        for param in module._parameters.values():
            if param is not None:
                holders[id(param)].append(name)
    tied = {}
    for name, module in layers.items():
        for param in module._parameters.values():
            if param is not None and len(holders[id(param)]) > 1:
                tied[name] = " = ".join(holders[id(param)])
    return tied


def _named_reasons(model: nn.Module, names: list[str], tied: dict[str, str]) -> str:
    """The unsupported layers, each with what keeps it out, in a few words."""
    def reason(name: str) -> str:
        if name in tied:
            return f"tied: {tied[name]}"
        reader = weight_reader(model, name)
        if reader is not None:
            return f"{reader} reads its weight itself"
        return layer_detail(model.get_submodule(name))
    return ", ".join(f"{name or 'the model itself'} ({reason(name)})" for name in names)


@dataclass
class _Stage:
    """A GradScaler-scaled step's squares, examples and backward passes, held until the step is
    known to have run (FisherAccumulator.settle_step)."""
    sums: dict = field(default_factory=dict)
    counts: dict = field(default_factory=lambda: defaultdict(int))
    passes: int = 0


class FisherAccumulator:
    """Accumulates, for every supported layer's weight and bias, the sum over examples of the
    squared per-example gradient, and counts the examples.

    Args:
        model: the network; `modules` (names) restricts the layers (default: all nn.Linear and
            nn.Conv1d / nn.Conv2d, grouped and depthwise included).
        mode: "ef-exact" (squared per-example gradients of the training loss, captured around
            your own forward/backward) or "fisher-mc" (labels sampled from the model's softmax:
            your training forward inside `capture_mc()`, then `accumulate_mc_from(logits)`
            before its backward; or `accumulate_mc(x)`, a forward of its own; needs a
            classifier returning logits).
        loss_reduction: how your loss reduces over the batch ("mean": the hooks see gradients
            divided by the batch size B, so they are rescaled by B; "sum": used as they are).
            The batch size is the first dimension of each layer's input. Each backward is read
            as its own batch: a loss divided by A under gradient accumulation reads 1/A^2 of its
            squares (MacKayPruner counts a step's backward passes and corrects that:
            mackay_ext.micro_batches; on its own, multiply curvature() by A^2). A loss that
            torch.amp.GradScaler scaled is read unscaled (mackay_ext.loss_scale), and the squares
            of such a step are held apart until it is known to have run: a step the scaler skips
            (inf or NaN gradients) adds nothing and counts as no backward pass.
        strict: raise when a layer with parameters is not supported (else it is listed in
            `unsupported` and a warning names it once, at construction). A layer holding a
            parameter another module holds (tied weights) is not supported; a layer whose weight
            is also read outside its own calls (a parent module reading module.weight itself,
            other than nn.MultiheadAttention's out_proj, which is found) gets the curvature of its
            calls only. A subclass with a forward of its own is checked at its first captured
            forward (plain_product.py) and refused there when it does not use its weight as
            the layer's plain product (a transformed weight or input).
        alpha_of: for a weight, the prior precisions a pruner holds for it (broadcastable to it),
            or None. Weights at alpha = +inf are pruned for good: their squares are not added
            (a Linear layer pruned below kept_pattern.MAX_SPARSE_DENSITY sums at its kept
            weights only, on the CPU), and curvature() reads 0 there. MacKayPruner passes its own.
    Usage: `with FisherAccumulator(model) as acc: loss.backward()`; then `acc.curvature(p)`. It
    captures from construction until detach() (or while `paused`), with or without a
    with-block, whose end drops the inputs no backward used: a reference computed after the
    block, with gradients, is added to the sums unless the accumulator is detached or paused
    first (a new user's curvature read 259x).
    Each captured use of a layer pairs with its own output gradient: two forwards and then
    their two backward passes (l1 = f(x1); l2 = f(x2); l1.backward(); l2.backward()) read both
    batches; a forward that gets no backward reads nothing; a second backward through one forward
    is refused (its examples' gradients are the sums of both passes').
    """

    def __init__(self, model: nn.Module, mode: str = "ef-exact", modules: Iterable[str] | None = None,
                 *, loss_reduction: str = "mean", strict: bool = False, backend: str = "ext",
                 alpha_of: Callable[[nn.Parameter], torch.Tensor | None] | None = None):
        check_choice("mode", mode, MODES, "FisherAccumulator")
        check_choice("loss_reduction", loss_reduction, REDUCTIONS, "FisherAccumulator")
        check_choice("backend", backend, BACKENDS, "FisherAccumulator")
        self.model, self.mode, self.loss_reduction, self.backend = model, mode, loss_reduction, backend
        self.alpha_of = alpha_of
        self._kept: dict[nn.Parameter, kept_pattern.KeptPattern] = {}   # alpha_of's, cached
        named = dict(model.named_modules())
        if modules is None:
            candidates = {n: m for n, m in named.items() if any(True for _ in m.parameters(recurse=False))}
        else:
            missing = [n for n in modules if n not in named]
            if missing:
                raise ValueError(f"FisherAccumulator: no modules named {missing} in the model")
            candidates = {n: named[n] for n in modules}
        # a layer whose parent reads its weight itself (MultiheadAttention's out_proj) is never called;
        # a parameter two modules hold (tied weights) has a per-example gradient summed over both
        # modules' uses, which their separate hooks cannot square (a new user's tied embedding and
        # output layer read half its curvature, with no word)
        tied = _tied_layers(model, candidates)
        self.layers = {n: m for n, m in candidates.items()
                       if supported(m) and weight_reader(model, n) is None and n not in tied}
        self.unsupported = sorted(n for n in candidates if n not in self.layers)
        if self.unsupported and strict:
            raise ValueError(f"FisherAccumulator: unsupported layers {self.unsupported} (supported: "
                             "nn.Linear, nn.Conv1d and nn.Conv2d with zero padding equal on both sides, called "
                             "by their parent: nn.MultiheadAttention reads out_proj.weight itself; a parameter "
                             f"held by two modules is not: {tied or 'none here'})")
        if not self.layers:
            raise ValueError("FisherAccumulator: the model has no supported layer (nn.Linear, nn.Conv1d, nn.Conv2d)")
        if self.unsupported:
            warnings.warn(f"FisherAccumulator: no exact curvature for {len(self.unsupported)} layer(s) with "
                          f"parameters: {_named_reasons(model, self.unsupported, tied)}; curvature() raises "
                          "KeyError for their parameters (strict=True refuses them instead)", UserWarning,
                          stacklevel=2)
        # the feed-forward layers of torch's Transformer layers, each with its layer, whose
        # call notes how its input is laid out: [T, N, d] under batch_first=False (torch's
        # default), [T, d] unbatched (SequenceInput)
        self._in_transformer_layers = _in_transformer_layers(model, self.layers)
        self._sequence_layouts: dict[nn.Module, str] = {}
        # subclasses with a forward of their own, until their first captured forward shows that
        # it uses the weight as the layer's plain product (plain_product.py)
        # (a parametrized weight is computed, and no pruner's: nothing to check it for)
        self._unchecked = {m: n for n, m in self.layers.items()
                           if has_own_forward(m) and not parametrize.is_parametrized(m, "weight")}
        self._said_unchecked: set[nn.Module] = set()
        self.sums: dict[nn.Parameter, torch.Tensor] = {}
        self.counts: dict[nn.Parameter, int] = defaultdict(int)  # examples behind each sum
        # each captured use of a layer: its input under a token of its own; its output's gradient
        # comes back with the same token, so a forward that gets no backward (a Double DQN's greedy action
        # on the next states, a TD target taken with gradients on and detached) pairs with nothing
        self._pending: dict[nn.Module, dict[int, torch.Tensor]] = defaultdict(dict)   # by token, in call order
        self._grads: dict[nn.Module, list[tuple[int, torch.Tensor]]] = defaultdict(list)
        # the tokens of the uses whose gradient was squared (a second backward through them is
        # refused: _refuse_second_backward) and of those whose input went unused (a backward that
        # reaches them reads nothing, and says so), over the last HISTORY backward passes
        self._spent: set[int] = set()
        self._spent_history: deque[set[int]] = deque(maxlen=HISTORY)
        self._dropped_history: deque[set[int]] = deque(maxlen=HISTORY)
        self._recomputed: set[int] = set()   # uses captured while a backward ran (a checkpoint's recompute)
        self._segments: dict[nn.Module, set[int]] = {}   # the recomputing tasks of each layer (_note_segment)
        self._said_segments = False
        self._said_dropped_input = False
        # examples_of_rows: the batch's examples where one spans several rows of a layer's input
        self._rows: RowExamples | None = None
        self._rows_wanted = False   # given once: each batch's forward needs its own
        self._rows_used = False     # a captured forward read it: spent at its backward's end
        # MacKayPruner: the layers each captured backward reached, and the gradient each left in
        # its parameter, until its optimizer steps; layers whose gradient was dropped before a step
        self.watch_dropped = False
        # the layers the backward under way reached, with the rows of each one's input (_say_rows_differ)
        self._pass_rows: dict[nn.Module, int] = {}
        self._said_rows = False
        self._said_transformed = False   # see _say_transformed
        self._left: dict[nn.Parameter, tuple[weakref.ref, int]] = {}
        # each layer's parameters that trained at its last captured forward
        self._trained: dict[nn.Module, _TrainedParameters] = {}
        self.dropped: set[str] = set()
        self._took = False      # a gradient was taken in the backward under way
        self._next_token = 0    # each captured use's token, in call order
        self._token_floor = 0   # records older than this go at the next backward's end
        self.sampled_calls: set[nn.Module] = set()   # fisher-mc: layers called inside capture_mc() since the reset
        self._scale_override: float | None = None
        self._sampling = False   # inside accumulate_mc_from's sampled-label backward
        self._mc_outputs: list[tuple[torch.Tensor, int]] | None = None  # accumulate_mc's targets
        self._softmax_check = SoftmaxLossCheck()   # fisher-mc: the training loss's likelihood
        self._active = mode == "ef-exact"
        self._capturing = False   # fisher-mc: inside capture_mc(), the forward is recorded
        # the backward graph tasks in flight, outermost first, each with GradScaler's scale of its
        # loss: reentrant activation checkpointing runs a recomputed segment's backward as a task
        # of its own inside the training one, which is still one backward pass
        self._tasks: list[tuple[int, float | None]] = []
        self._loss_scale: float | None = None    # the innermost task's
        self._stage: _Stage | None = None        # a scaled step's squares, until the step has run
        loss_scale.install()
        loss_scale.watch(self)
        self.backward_passes = 0   # backward passes that reached a hooked layer (the pruner reads them per step)
        # ef-exact: while True the hooks capture nothing (MacKayPruner(curvature_every=k) samples
        # one training batch in k this way; the estimate stays the mean over what was captured)
        self.paused = False
        self.copied = False   # see __setstate__
        self._handles = []
        for parent in set(self._in_transformer_layers.values()):
            self._handles += [parent.register_forward_pre_hook(CopyInert(self._enter_sequence_layer), with_kwargs=True),
                              parent.register_forward_hook(CopyInert(self._leave_sequence_layer), always_call=True)]
        for module in self.layers.values():
            # prepended: the layer's own output, before any forward hook of the user's replaces it
            self._handles.append(module.register_forward_hook(CopyInert(self._forward_hook), prepend=True,
                                                              with_kwargs=True))
        # ef-exact: conv layers whose training backward takes the weight's gradient from the
        # per-example products added up here (conv_weight_grad.py), and those gradients, each
        # with the input and output gradient (and its version) it came from, until that
        # backward takes it
        self.whole_at: int | None = None   # num_examples after reduce_to_first_rank (curvature_shares)
        # a weight the forward also reads outside its layer's calls (weight_sites.py)
        self._sites: WeightSites | None = WeightSites(model, self.layers, self._captures_forward, mode)
        self._served = [m for m in self.layers.values() if mode == "ef-exact" and can_serve(m)]
        self._weight_grads: dict[nn.Module, tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]] = {}
        for module in self._served:
            module.forward = ServedForward(self, module)

    # ---------------------------------------------------------------- hooks
    def _served_forward(self, module, x, *args, **kwargs):
        if not args and not kwargs and self._active and not self.paused and serves_call(module, x):
            return ConvFromExamples.apply(x, module.weight, module.bias, module, self)
        return type(module).forward(module, x, *args, **kwargs)

    def take_weight_grad(self, module: nn.Module, x: torch.Tensor, grad_output: torch.Tensor
                         ) -> torch.Tensor | None:
        """The batch's weight gradient of `module`'s call on `x`, added up with the squares in
        this backward pass from the output gradient `grad_output` (ConvFromExamples takes it), or
        None when it was made from other tensors (then the caller asks the library)."""
        entry = self._weight_grads.pop(module, None)
        if entry is None:
            return None
        source, delta, version, grad = entry
        same = (source.data_ptr() == x.data_ptr() and source.shape == x.shape and source.stride() == x.stride()
                and delta.data_ptr() == grad_output.data_ptr() and delta.shape == grad_output.shape
                and delta.stride() == grad_output.stride() and grad_output._version == version)
        return grad if same else None

    def _captures_forward(self) -> bool:
        """Whether a forward starting now is one whose layer calls the hooks capture."""
        return (self._active or self._capturing) and not self.paused and torch.is_grad_enabled() \
            and not torch._C._are_functorch_transforms_active() and not torch.compiler.is_exporting()

    def _forward_hook(self, module, inputs, kwargs, output):
        # not under torch.func's transforms (grad, vmap, jvp), nor while torch.export traces
        # the model (shrink's coupling trace): their tensors are not a batch's
        if self._tasks and torch._C._current_graph_task_id() == -1:
            # a forward outside any backward while one is on record: that backward raised before
            # its end (a reentrant checkpoint's recomputing forward runs inside the training one)
            self._tasks.clear()
            self._loss_scale = None
        if torch._C._are_functorch_transforms_active():
            self._say_transformed(module)
            return
        trained = _trained_parameters(module) if (self._active or self._capturing) and not self.paused \
            and torch.is_grad_enabled() and output.requires_grad and not torch.compiler.is_exporting() else None
        if trained is not None:
            # (read once a forward: the backward's checks use this forward's parameters, which its graph holds)
            known = self._trained.get(module)
            if known is None or not known.same(trained):
                self._trained[module] = _TrainedParameters(trained)
            # the layer's input: its first positional argument, or the keyword its forward names
            # it by (nn.Linear's and the convs' `input`: layer(input=x))
            x = inputs[0] if inputs else next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
            if not isinstance(x, torch.Tensor):
                raise RuntimeError(f"FisherAccumulator: {self._name_of(module)} ({type(module).__name__}) was called "
                                   f"with a {type(x).__name__} first, not its input tensor: the exact curvature "
                                   "needs the layer's input (pass it first or as its one tensor keyword), or use "
                                   "curvature='ef-batch'")
            if module in self._unchecked and x.numel() and not torch.compiler.is_compiling():   # (an empty
                self._check_weight_use(module, x, inputs, kwargs)   # batch tells nothing: the next one checks)
            layout = self._sequence_layout(module, x)
            if layout is not None and not (layout == "unbatched" and self._rows_wanted):
                record = SequenceInput(x.detach(), layout)
            else:   # (also a graph batch run as one unbatched sequence: its rows grouped)
                record = self._grouped(module, x.detach()) if self._rows_wanted else x.detach()
            token, self._next_token = self._next_token, self._next_token + 1
            task = torch._C._current_graph_task_id()
            if task != -1:   # a forward recomputed inside a backward (checkpointing)
                self._recomputed.add(token)
                # that backward is the outer one: a reentrant checkpoint's gradients come in tasks
                # of their own, which read as two backward passes where every layer is checkpointed
                self._enter_task(task)
            self._pending[module][token] = record
            if self._capturing:
                self.sampled_calls.add(module)
            if self._mc_outputs is not None:
                self._mc_outputs.append((output, output._version))
            # ef-exact: a pre-hook on the node that made the output hands us delta =
            # dloss/doutput during backward. It runs after every hook on the output tensor (the
            # user's too, which may scale or reverse that gradient), so delta is what the layer's
            # backward receives. fisher-mc differentiates to the outputs themselves, which never
            # runs their nodes: a hook on the output tensor.
            node, index = output.grad_fn, output.output_nr
            if node is None or self._capturing:
                output.register_hook(lambda grad, module=module, token=token: self._on_output_grad(module, grad, token))
            else:
                node.register_prehook(lambda grads, module=module, index=index, token=token:
                                      self._on_output_grad(module, grads[index], token))

    def _grouped(self, module, x: torch.Tensor) -> torch.Tensor | GroupedRows:
        """The record of an input under examples_of_rows: its rows grouped into the batch's examples."""
        name = f"{self._name_of(module)} ({type(module).__name__})"
        if self._rows is None:
            raise RuntimeError(f"FisherAccumulator: {name} ran a forward after the batch that examples_of_rows "
                               "was given for had its backward: give each batch's index before its forward "
                               "(examples_of_rows(batch_index)), or examples_of_rows(None) to read rows as examples")
        try:
            layout = self._rows.layout(x.shape[0] if x.dim() else 1)
        except KeyError:
            raise RuntimeError(f"FisherAccumulator: {name} got an input of {x.shape[0] if x.dim() else 1} rows, and "
                               f"examples_of_rows gave indices of {self._rows.sizes()} rows over "
                               f"{self._rows.examples} examples: each input must have an index's rows or one "
                               "row an example (a pooled head). Give the index of every kind of input (nodes, "
                               "edges) in one call, or leave the layer out (layers=)") from None
        self._rows_used = True
        if layout is None:
            return x
        if not isinstance(module, nn.Linear):
            raise RuntimeError(f"FisherAccumulator: {name} got an input of rows grouped into examples by "
                               "examples_of_rows, which covers nn.Linear layers: use curvature='ef-batch', or "
                               "leave the layer out (layers=)")
        return GroupedRows(x, layout)

    def examples_of_rows(self, *indices: torch.Tensor | None, num_examples: int | None = None) -> None:
        """The example of each row of this batch's layer inputs, where an example spans several
        rows: a graph batch's nodes (PyG's `batch` vector, node -> graph; also edge -> graph for
        layers on edge features), a set of points. Given before each batch's forward; a layer's
        input with as many rows as an index has each example's gradient summed over its rows
        before squaring, one with `num_examples` rows (default: the largest index + 1) is read a
        row an example (a pooled head), and any other size is refused. The next forward after
        this batch's backward needs the next batch's index; None: rows are examples again.
        Covers nn.Linear layers (row_examples.py)."""
        self.use_rows(None if indices == (None,) else RowExamples(indices, num_examples, "examples_of_rows"))

    def use_rows(self, rows: RowExamples | None) -> None:
        """examples_of_rows with its indices read already (MacKayPruner's, read once)."""
        self._rows, self._rows_wanted, self._rows_used = rows, rows is not None, False

    def _sequence_layout(self, module, x: torch.Tensor) -> str | None:
        """How a Transformer layer's feed-forward Linear's input is laid out: as its layer's call
        noted, or, in a forward recomputed inside a backward (a reentrant checkpoint around the
        feed-forward block, which runs outside the layer's call), as the layer is built; None
        for any other Linear, or one called outside its layer."""
        parent = self._in_transformer_layers.get(module)
        layout = self._sequence_layouts.get(parent)
        if layout is None and parent is not None and torch._C._current_graph_task_id() != -1:
            layout = _layout_of(parent, x)
        return layout

    def _enter_sequence_layer(self, layer, args, kwargs) -> None:
        sequence = args[0] if args else kwargs.get("src", kwargs.get("tgt"))
        if isinstance(sequence, torch.Tensor):
            self._sequence_layouts[layer] = _layout_of(layer, sequence)

    def _leave_sequence_layer(self, layer, *_) -> None:
        self._sequence_layouts.pop(layer, None)

    def _say_transformed(self, module) -> None:
        """Once: a captured layer ran under torch.func's transforms (vmap, grad, jacrev, jvp),
        whose tensors are no batch's and which the hooks leave alone. Where that forward feeds
        the training loss (a physics-informed network's residual, its derivatives taken by
        vmap(jacrev(...))), the loss's share of the curvature is missing: a new user's PINN read
        0.25-0.70 of it, no word. (The library's own check of a subclass runs without gradients.)"""
        if self._said_transformed or not (self._active or self._capturing) or self.paused \
                or not torch.is_grad_enabled() or _trained_parameters(module) is None:
            return
        self._said_transformed = True
        warnings.warn(f"FisherAccumulator ({self.mode}): {self._name_of(module)} ({type(module).__name__}) ran under "
                      "torch.func's transforms (vmap, grad, jacrev) with gradients on, which the exact curvature "
                      "does not see: where that forward feeds the training loss (a physics-informed residual's "
                      "derivatives), its share of the curvature is missing; use curvature='ef-batch' there",
                      RuntimeWarning, stacklevel=user_stacklevel())

    def _name_of(self, module) -> str:
        return next((name for name, layer in self.layers.items() if layer is module), type(module).__name__)

    def _check_weight_use(self, module, x, inputs, kwargs) -> None:
        """Refuse a subclass layer whose forward does not use its weight as the plain product,
        whose exact curvature the hooks would get wrong (plain_product.py); said once and let
        through where the forward cannot be checked."""
        name = self._unchecked[module]
        try:
            problem = weight_use_problem(module, x, inputs, kwargs)
        except Unchecked as err:
            del self._unchecked[module]
            warnings.warn(f"FisherAccumulator: the forward of {name} ({type(module).__name__}), a subclass with "
                          f"a forward of its own, could not be checked ({err}): its curvature assumes it "
                          "computes the layer's plain product of its input with its weight", UserWarning,
                          stacklevel=user_stacklevel())
            return
        if problem is not None:   # kept unchecked: every forward refuses until the layer is left out
            raise RuntimeError(f"FisherAccumulator: {name} ({type(module).__name__}) is a subclass whose forward "
                               f"does not use its weight as nn.{base_layer(module).__name__} does: {problem}. "
                               f"The exact curvature ({self.mode}) squares the gradient of that plain product "
                               "and would be wrong for it: use curvature='ef-batch' (the gradient itself), or "
                               "leave the layer out (MacKayPruner's layers=, FisherAccumulator's modules=)")
        del self._unchecked[module]

    def _on_output_grad(self, module, grad, token: int):
        if grad is None or not self._active:
            return
        records = self._pending.get(module)
        if not records or token not in records:
            if not self._sampling and self._backward_trains(module):
                if token in self._spent or any(token in spent for spent in self._spent_history):
                    self._refuse_second_backward(module)
                if any(token in dropped for dropped in self._dropped_history):
                    self._say_dropped_input(module)
            return
        if not self._sampling:   # (fisher-mc's sampled backward goes to the outputs alone, by design)
            if torch.is_grad_enabled():   # the engine runs hooks in grad mode only under create_graph
                raise RuntimeError(
                    f"FisherAccumulator: a backward with create_graph=True reached {self._name_of(module)} "
                    f"({type(module).__name__}): a loss built on gradients (a gradient penalty such as WGAN-GP's "
                    "or R1, a meta-learning inner step) has per-example gradients that are not the layer's "
                    f"input times its output gradient, which {self.mode} squares. Use curvature='ef-batch', "
                    "or leave the layer out (MacKayPruner's layers=, FisherAccumulator's modules=)")
            if not self._backward_trains(module):
                return   # (its input, paired with no gradient, goes at the end of the next training backward)
        self._take(module, grad, token)

    def _backward_trains(self, module) -> bool:
        """Whether the backward under way writes the .grad of the layer's parameters that train
        (_TrainedParameters.written); a layer no captured forward reached is read as trained."""
        trained = self._trained.get(module)
        return trained is None or trained.written()

    def _enter_task(self, task: int) -> None:
        """A backward graph task seen for the first time (its first gradient, or a forward a
        reentrant checkpoint recomputes inside it): on record until its end, with its loss scale."""
        if any(known == task for known, _ in self._tasks):
            return
        scale = loss_scale.of_task(task)
        if scale is None and self._tasks:   # nested in a scaled backward: its loss's scale
            scale = self._tasks[-1][1]
        self._tasks.append((task, scale))
        self._loss_scale = scale
        if scale is not None and self._stage is None:
            self._stage = _Stage()
        torch.autograd.Variable._execution_engine.queue_callback(lambda: self._end_of_backward(task))

    def _take(self, module, grad: torch.Tensor, token: int) -> None:
        """A gradient of the layer's training loss at the output of its use `token`."""
        task = torch._C._current_graph_task_id()
        if not self._tasks or self._tasks[-1][0] != task:   # the first gradient of this backward task
            self._enter_task(task)
        self._took = True
        if module not in self._pass_rows:
            self._pass_rows[module] = _rows(module, self._pending[module][token])
            self._check_kept(module)
        self._grads[module].append((token, grad.detach()))
        if len(self._grads[module]) == len(self._pending[module]):
            # every use of the module in the forward pass has its gradient. Added up now, not at
            # the end of the backward, so each layer's output gradient is freed as the backward goes.
            if token in self._recomputed:
                self._note_segment(module, task)
            self._spent.update(token for token, _ in self._grads[module])
            self._accumulate(module, *_paired(self._pending.pop(module), self._grads.pop(module)), weight_grad=True)

    def _note_segment(self, module, task: int) -> None:
        """A reentrant checkpoint recomputes each segment in a backward task of its own, whose
        uses of a layer are added up then: a layer used in two segments has each use's squares
        added apart, not its examples' summed gradients (0.89x to 0.29x in the runs met). Said
        once; use_reentrant=False reads it exactly."""
        tasks = self._segments.setdefault(module, set())
        tasks.add(task)
        if len(tasks) > 1 and not self._said_segments:
            self._said_segments = True
            warnings.warn(f"FisherAccumulator ({self.mode}): {self._name_of(module)} ({type(module).__name__}) is used "
                          "in two segments of a reentrant checkpoint (torch.utils.checkpoint with use_reentrant=True), "
                          "which recomputes each apart: its curvature adds each use's squares, not the square of "
                          "each example's summed gradient. Pass use_reentrant=False to checkpoint, which reads it "
                          "exactly", RuntimeWarning, stacklevel=user_stacklevel())

    def _check_kept(self, module) -> None:
        """Whether the gradient an earlier captured backward left in the layer's parameter was
        dropped (zero_grad) before an optimizer step used it: then that pass's squares belong to
        a loss nothing trained on (a GAN's generator loss through a discriminator left trainable
        for the generator's step: its curvature read 2.2x the discriminator's own, and the pass
        counted as a micro-batch). MacKayPruner clears the record at each step of its optimizer
        and says which layers it found (_say_dropped)."""
        if not self._left:
            return
        trained = self._trained.get(module)
        param = trained.params[0] if trained is not None and trained.params else None
        left = self._left.pop(param, None) if param is not None else None
        if left is None:
            return
        ref, version = left
        grad = ref()
        if grad is None or grad is not param.grad or (grad._version != version and not bool(grad.any())):
            self.dropped.add(self._name_of(module))

    def _say_rows_differ(self) -> None:
        """Once: the layers of one backward had inputs of different numbers of rows, which the
        exact curvature reads each as the batch's examples. A routed expert's tokens (part of the
        rows) read its curvature at their share of the batch (0.125x for one of 8 tokens in a new
        user's mixture of experts, and its weights pruned twice as hard); a graph's nodes, a
        DeepONet trunk's query points, a hypernetwork's embedding (rows that are no examples)
        read no per-example gradient at all (0.05x)."""
        rows = self._pass_rows
        counts = {count for count in rows.values() if count}
        if self._said_rows or len(counts) < 2:
            return
        self._said_rows = True
        shown = ", ".join(f"{self._name_of(module)}: {count}" for module, count in
                          sorted(rows.items(), key=lambda item: -item[1])[:6])
        warnings.warn(
            f"FisherAccumulator ({self.mode}): in one backward the layers' inputs had different numbers of rows "
            f"({shown}{', ...' if len(rows) > 6 else ''}), and the exact curvature reads the rows of each layer's "
            "input as the batch's examples. A layer run on part of the rows (a routed expert, a branch under a "
            "mask) reads its curvature at its share of the batch; one run on several rows per example (a graph's "
            "nodes, a trunk's query points, tokens flattened from sequences, a seq-first [T, N, d] input: its rows "
            "are positions) or on rows that are no examples (a hypernetwork's embedding) reads no per-example "
            "gradient. Graph batches: examples_of_rows(); seq-first inputs: batch_first, or transpose them; "
            "otherwise curvature='ef-batch'", RuntimeWarning, stacklevel=user_stacklevel())

    def _note_left(self) -> None:
        """At a captured backward's end: the gradient it left in each layer it reached."""
        for module in self._pass_rows:
            trained = self._trained.get(module)
            param = trained.params[0] if trained is not None and trained.params else None
            if param is not None and param.grad is not None:
                self._left[param] = (weakref.ref(param.grad), param.grad._version)

    def _say_dropped_input(self, module) -> None:
        """Once: a backward reached a use whose input was dropped, its forward two or more
        backward passes old (three forwards, then their three backward passes): read nothing."""
        if self._said_dropped_input:
            return
        self._said_dropped_input = True
        warnings.warn(f"FisherAccumulator ({self.mode}): a backward reached {self._name_of(module)} "
                      f"({type(module).__name__}) through a forward two or more backward passes old, whose input "
                      "was dropped: that pass's curvature is missing (inputs of forwards no backward used are "
                      "kept one backward pass). Backpropagate each forward before the one after next",
                      RuntimeWarning, stacklevel=user_stacklevel())

    def _refuse_second_backward(self, module) -> None:
        """A second backward through a forward whose gradients this layer has squared already
        (loss_a.backward(retain_graph=True); loss_b.backward()): each example's gradient is the sum
        of both, whose square is not the sum of the two squares (a new user's distillation loss,
        split into two backward passes, read the cross-entropy's curvature alone and pruned 1,780
        of 1,792 weights). A pass that trains none of the layer's parameters is none of its
        curvature's, and is not refused."""
        raise RuntimeError(
            f"FisherAccumulator: a second backward reached {self._name_of(module)} ({type(module).__name__}) "
            f"through a forward whose gradients it has squared already (loss_a.backward(retain_graph=True); "
            f"loss_b.backward()): {self.mode} squares each example's gradient, which is the sum of both "
            "passes' and whose square is not the sum of theirs. Backpropagate the sum of the losses once; "
            "where the passes train different models (a GAN's discriminator loss reaching the generator), "
            "detach the input the other model should not train (D(G(z).detach())), or freeze that model's "
            "parameters for the pass (requires_grad_(False)), which the curvature then leaves out")

    def _end_of_backward(self, task: int | None = None) -> None:
        """After each backward pass: a module whose recorded uses outnumber the gradients that
        came pairs each gradient with its own use. The records no gradient came for stay while
        they are of forwards since the last backward's end, for a backward of their own (two
        forwards, then their two backward passes: the second batch's were dropped at the first's
        end, and its curvature lost, no word); older ones go (forwards that get no backward: one
        that raised, an out-of-memory batch a loop retries smaller, a loss computed with
        gradients on and never backpropagated, a Double DQN's greedy action on the next states)."""
        if self._tasks and self._tasks[-1][0] == task:
            self._tasks.pop()
        if self._tasks:   # a nested task ended (a recomputed segment's); the training backward goes on
            self._loss_scale = self._tasks[-1][1]
            return
        for trained in self._trained.values():   # (held past the graph, a node keeps its parameter
            trained.nodes = None                 # alive: a cycle through it was never collected)
        took, self._took = self._took, False
        if not took:   # a backward that trained none of the layers, on record for the forward it
            # recomputed (an FGSM step through a checkpoint): its recomputed inputs go, and it is
            # no backward pass (counted, the pruner read it as a micro-batch: x4)
            for module in list(self._pending):
                kept = {token: x for token, x in self._pending.pop(module).items() if token not in self._recomputed}
                if kept:
                    self._pending[module] = kept
            self._recomputed.clear()
            self._loss_scale = None
            return
        self._weight_grads.clear()   # any left were not this backward's to take
        self._say_rows_differ()
        if self.watch_dropped:
            self._note_left()
        self._pass_rows.clear()
        grads_by_module, self._grads = self._grads, defaultdict(list)
        for module, grads in grads_by_module.items():
            records = self._pending.get(module, {})
            paired = {token for token, _ in grads if token in records}
            self._spent.update(paired)
            self._accumulate(module, *_paired(records, grads))
            for token in paired:
                del records[token]
        # (a forward recomputed inside this backward, as checkpointing does, is none of a later one's)
        floor, self._token_floor = self._token_floor, self._next_token
        dropped = set()
        for module in list(self._pending):
            records = self._pending.pop(module)
            kept = {token: x for token, x in records.items() if token >= floor and token not in self._recomputed}
            dropped.update(token for token in records if token not in kept)
            if kept:
                self._pending[module] = kept
        self._recomputed.clear()
        self._segments.clear()
        self._dropped_history.append(dropped)
        self._spent_history.append(self._spent)
        self._spent = set()
        if self._rows_used:   # this batch's index is spent: the next forward needs the next batch's
            self._rows, self._rows_used = None, False
        if self._loss_scale is not None and self._stage is not None:
            self._stage.passes += 1
        else:
            self.backward_passes += 1
        self._loss_scale = None

    # ----------------------------------------------------------- arithmetic
    def _scale(self, batch: int) -> float:
        """What the output gradients are multiplied by to be each example's own: the batch size
        under a mean loss, divided by GradScaler's scale where it scaled the loss."""
        if self._scale_override is not None:
            return self._scale_override
        scale = float(batch) if self.loss_reduction == "mean" else 1.0
        return scale / self._loss_scale if self._loss_scale is not None else scale

    def _add_to(self, param: nn.Parameter) -> torch.Tensor:
        """Where this backward's squares of `param` go: its sum, or a scaled step's stage."""
        total = self._sum_for(param)
        if self._loss_scale is None or self._stage is None:
            return total
        held = self._stage.sums.get(param)
        if held is None or held.shape != total.shape or held.dtype != total.dtype or held.device != total.device:
            held = self._stage.sums[param] = torch.zeros_like(total)
        return held

    def _count(self, param: nn.Parameter, examples: int) -> None:
        counts = self._stage.counts if self._loss_scale is not None and self._stage is not None else self.counts
        counts[param] += examples

    def holds_a_scaled_step(self) -> bool:
        return self._stage is not None and not self._tasks

    def settle_step(self, ran: bool) -> None:
        """GradScaler's verdict on the step whose squares are held (mackay_ext.loss_scale): added
        to the sums if it ran, dropped if the scaler skipped it."""
        stage, self._stage = self._stage, None
        self._left.clear()   # (a skipped step calls no optimizer step, whose hook clears it too)
        if stage is None or not ran:
            return
        for param, held in stage.sums.items():
            self._sum_for(param).add_(held)
        for param, examples in stage.counts.items():
            self.counts[param] += examples
        self.backward_passes += stage.passes

    def _sum_for(self, param: nn.Parameter) -> torch.Tensor:
        total = self.sums.get(param)
        if total is None:
            total = self.sums[param] = torch.zeros_like(param, memory_format=torch.contiguous_format)
        elif total.dtype != param.dtype or total.device != param.device:   # the model moved
            total = self.sums[param] = total.to(device=param.device, dtype=param.dtype)
        return total

    def _accumulate(self, module, inputs: list[torch.Tensor], grads: list[torch.Tensor],
                    weight_grad: bool = False) -> None:
        # weight_orig first: a plain layer then skips getattr's failed lookup (microseconds a step)
        mask = getattr(module, "weight_mask", None) if "weight_orig" in module._parameters else None
        if mask is None:
            self._accumulate_unmasked(module, inputs, grads, weight_grad)
            return
        # torch.nn.utils.prune: the squares above are those of the masked weight's gradients;
        # weight_orig's are those times mask^2 (= mask), so this step's share is masked
        total = self._add_to(module._parameters["weight_orig"])
        before = total.clone()
        self._accumulate_unmasked(module, inputs, grads, weight_grad)
        total.copy_(torch.addcmul(before, total - before, mask.to(total.dtype)))

    def _accumulate_unmasked(self, module, inputs: list[torch.Tensor], grads: list[torch.Tensor],
                             weight_grad: bool = False) -> None:
        """Add the squared per-example gradients of the module's uses (inputs and output
        gradients paired); weight_grad: also keep the batch's weight gradient of a served conv
        used once, for its backward to take (take_weight_grad)."""
        if any(isinstance(x, GroupedRows) for x in inputs):
            self._accumulate_grouped(module, inputs, grads)
            return
        if (isinstance(module, (nn.Conv1d, nn.Conv2d)) and inputs[0].dim() == len(module.stride) + 1) or (
                isinstance(module, nn.Linear) and inputs[0].dim() == 1):
            # an unbatched input (C, H, W) or (C, L), or a Linear's (in,), is one example
            inputs, grads = [x.unsqueeze(0) for x in inputs], [g.unsqueeze(0) for g in grads]
        batch = inputs[0].shape[0]
        if len(inputs) > 1 and any(x.shape[0] != batch for x in inputs):
            raise RuntimeError(f"FisherAccumulator: the uses of {self._name_of(module)} ({type(module).__name__}) "
                               f"in one backward had inputs of {sorted({x.shape[0] for x in inputs})} rows: a layer "
                               "used on different batches (node rows and pooled graph rows: examples_of_rows "
                               "says which rows are whose), or leave the layer out (layers=), or use "
                               "curvature='ef-batch'")
        weight, bias = _stored(module, "weight"), _stored(module, "bias")
        grad_sum = None
        if weight_grad and len(inputs) == 1 and weight.requires_grad and module in self._served:
            grad_sum = torch.zeros(weight.shape[0], weight[0].numel(), dtype=weight.dtype, device=weight.device)
            self._weight_grads[module] = (inputs[0], grads[0], grads[0]._version, grad_sum)
        if batch == 0:   # nothing to add (and an empty batch's reshapes are ambiguous)
            return
        dtypes = {t.dtype for t in inputs + grads}
        if len(dtypes) > 1:   # autocast: e.g. a float32 input beside a bfloat16 output gradient
            common = functools.reduce(torch.promote_types, dtypes)
            inputs, grads = [x.to(common) for x in inputs], [g.to(common) for g in grads]
        self._count(weight, batch)
        if bias is not None:
            self._count(bias, batch)
        scale = self._scale(batch)
        if len(inputs) == 1 and inputs[0].dim() == 2 and isinstance(module, nn.Linear):
            x, delta = inputs[0], grads[0]
            s2 = scale * scale
            bias_added = False
            if weight.dtype in (torch.float32, torch.float64) and x.dtype == delta.dtype == weight.dtype:
                # the kernels add the bias's squares from delta's too (one call a layer, not four)
                bias_sum = self._add_to(bias) if bias is not None and bias.dtype == weight.dtype else None
                bias_added = bias_sum is not None
                kept = self._kept_pattern(weight, batch)
                if kept is not None and kept.sparse:
                    sq_sddmm_accumulate_(self._add_to(weight), delta, x, *kept.blocks, s2, self.backend,
                                         bias_out=bias_sum)
                else:
                    sq_gemm_accumulate_(self._add_to(weight), delta, x, s2, self.backend, bias_out=bias_sum)
            else:
                self._add_to(weight).add_((delta.float() ** 2).t() @ (x.float() ** 2) * s2)
            if bias is not None and not bias_added:
                self._add_to(bias).add_(delta.square().sum(0), alpha=s2)
            return
        if len(inputs) == 1 and isinstance(module, (nn.Conv1d, nn.Conv2d)) and self.backend == "ext" \
                and takes_fused(weight, inputs[0], grads[0], module.groups):
            self._accumulate_conv_fused(module, inputs[0], grads[0], scale, grad_sum)
            return
        if len(inputs) == 1 and isinstance(module, nn.Linear) and self.backend == "ext" \
                and takes_fused(weight, inputs[0], grads[0], groups=1, sequence=True):
            self._accumulate_sequence_fused(module, inputs[0], grads[0], scale)
            return
        self._accumulate_per_example(module, inputs, grads, scale, grad_sum)

    def _accumulate_grouped(self, module, inputs: list, grads: list[torch.Tensor]) -> None:
        """A Linear layer's uses on rows grouped into examples (examples_of_rows): each group of
        examples laid out [examples, most rows of one, ...] (row_examples.py), its rows read as
        positions whose gradients add up, and its squares added; a use a row an example (a
        pooled head) gives each group its examples' rows."""
        layout = next(x.layout for x in inputs if isinstance(x, GroupedRows))
        if any(isinstance(x, GroupedRows) and x.layout.batch is not layout.batch for x in inputs):
            raise RuntimeError(f"FisherAccumulator: {self._name_of(module)} ({type(module).__name__}) was used in one "
                               "backward on the rows of two batches, each given its own examples_of_rows (two "
                               "forwards, then one backward of their summed losses): which examples are one cannot "
                               "be told. Backpropagate each batch before giving the next one's index, or run them as "
                               "one batch with one index")
        batch = layout.examples
        if batch == 0:
            return
        weight, bias = _stored(module, "weight"), _stored(module, "bias")
        self._count(weight, batch)
        if bias is not None:
            self._count(bias, batch)
        scale = self._scale(batch)
        for number, group in enumerate(layout.groups):
            members = None if group.members is None else group.members.to(grads[0].device)
            xs = [x.layout.spread(x.rows, number) if isinstance(x, GroupedRows) else
                  x if members is None else x[members] for x in inputs]
            deltas = [x.layout.spread(g, number) if isinstance(x, GroupedRows) else
                      g if members is None else g[members] for x, g in zip(inputs, grads)]
            dtypes = {t.dtype for t in xs + deltas}
            if len(dtypes) > 1:   # autocast: e.g. a float32 input beside a bfloat16 output gradient
                common = functools.reduce(torch.promote_types, dtypes)
                xs, deltas = [x.to(common) for x in xs], [g.to(common) for g in deltas]
            if len(xs) == 1 and self.backend == "ext" and takes_fused(weight, xs[0], deltas[0], groups=1,
                                                                      sequence=True):
                self._accumulate_sequence_fused(module, xs[0], deltas[0], scale)
            else:
                self._accumulate_per_example(module, xs, deltas, scale)

    def _kept_pattern(self, weight: torch.Tensor, batch: int) -> kept_pattern.KeptPattern | None:
        """Where a Linear weight is still kept (alpha_of), or None: no alphas for it, or no sparse
        kernel for it (CUDA; backend "torch", whose fallback forms the dense product anyway).
        `batch`: the examples of this call, already counted."""
        if self.alpha_of is None or weight.device.type != "cpu" or self.backend != "ext" \
                or not _extension.is_loaded():
            return None
        alpha = self.alpha_of(weight)
        if alpha is None:
            return None
        old = self._kept.get(weight)
        if kept_pattern.is_current(old, alpha):
            return old
        pattern = self._kept[weight] = kept_pattern.build(weight, alpha)
        if old is not None and old.sparse and self.counts[weight] > batch and bool((pattern.kept & ~old.kept).any()):
            # weights kept again (alphas rolled back, e.g. an optimizer state loaded alone): their
            # sums lack the batches since the last reset, which the count holds. Start afresh.
            warnings.warn("FisherAccumulator: pruned weights of a layer are kept again since the last reset; "
                          "that layer's curvature restarts from this batch", RuntimeWarning, stacklevel=2)
            self.sums[weight].zero_()
            self.counts[weight] = 0 if self._loss_scale is not None else batch   # (a scaled step's: held)
        return pattern

    def _accumulate_conv_fused(self, module, x, delta, scale, grad_sum=None) -> None:
        x, delta, geometry = self._as_conv2d(module, x, delta)
        weight, bias = _stored(module, "weight"), _stored(module, "bias")
        conv_sq_grad_accumulate_(self._add_to(weight).view(weight.shape[0], -1), x, delta, *geometry,
                                 groups=module.groups, scale=scale * scale, grad_sum=grad_sum)
        if bias is not None:
            bias_grads = delta.reshape(delta.shape[0], delta.shape[1], -1).sum(2)
            self._add_to(bias).add_(bias_grads.square_().sum(0), alpha=scale * scale)

    @staticmethod
    def _as_conv2d(module, x, delta):
        """(x, delta, (kernel_size, stride, padding, dilation)) of a Conv2d, or of a Conv1d seen
        as a Conv2d of height 1."""
        padding = numeric_padding(module)
        if isinstance(module, nn.Conv1d):
            return x.unsqueeze(2), delta.unsqueeze(2), (
                (1, module.kernel_size[0]), (1, module.stride[0]), (0, padding[0]), (1, module.dilation[0]))
        return x, delta, (module.kernel_size, module.stride, padding, module.dilation)

    def _accumulate_sequence_fused(self, module, x, delta, scale) -> None:
        """A Linear layer on [N, ..., in] inputs: each example's gradient sums its positions'
        (no squared-operand product), which is a kernel-1 convolution over the positions: the
        fused conv kernel squares each example's product in cache, where bmm wrote every
        example's gradient out and read it back (a transformer encoder's feed-forward layers,
        32 sequences of 32 tokens: 0.77 ms against 1.7 ms a layer, 2 threads)."""
        weight, bias = _stored(module, "weight"), _stored(module, "bias")
        delta = delta.reshape(delta.shape[0], -1, delta.shape[-1])                 # [N, T, out]
        cols = x.reshape(x.shape[0], -1, x.shape[-1]).transpose(1, 2).unsqueeze(2)  # [N, in, 1, T]
        conv_sq_grad_accumulate_(self._add_to(weight), cols, delta.transpose(1, 2).unsqueeze(2), (1, 1),
                                 scale=scale * scale)
        if bias is not None:
            self._add_to(bias).add_(delta.sum(1).square_().sum(0), alpha=scale * scale)

    @staticmethod
    def _per_example_grads(module, x, delta) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-example weight gradients [C, out, in'], per-example bias gradients [C, out]) of a
        chunk of C examples; in' = in_features, or in_channels / groups * kernel size."""
        if isinstance(module, nn.Linear):
            d = delta.reshape(delta.shape[0], -1, delta.shape[-1])          # [C, T, out]
            cols = x.reshape(x.shape[0], -1, x.shape[-1])                   # [C, T, in]
            return torch.bmm(d.transpose(1, 2), cols), d.sum(1)
        x, delta, (kernel_size, stride, padding, dilation) = FisherAccumulator._as_conv2d(module, x, delta)
        bias_grads = delta.reshape(x.shape[0], delta.shape[1], -1).sum(2)
        return conv_per_example_grads(x, delta, module.groups, kernel_size, dilation, padding,
                                      stride), bias_grads

    def _accumulate_per_example(self, module, inputs, grads, scale, grad_sum=None):
        weight, bias = _stored(module, "weight"), _stored(module, "bias")
        weight_sum = self._add_to(weight).view(weight.shape[0], -1)
        bias_sum = self._add_to(bias) if bias is not None else None
        batch = inputs[0].shape[0]
        per_example = weight.numel() * weight.element_size()
        chunk = max(1, min(batch, conv_curvature.CHUNK_BYTES // max(per_example, 1)))
        for start in range(0, batch, chunk):
            g_weight = g_bias = None
            for x, delta in zip(inputs, grads):  # uses of the module add up before squaring
                part, bias_part = self._per_example_grads(module, x[start:start + chunk],
                                                          delta[start:start + chunk])
                g_weight = part if g_weight is None else g_weight + part
                g_bias = bias_part if g_bias is None else g_bias + bias_part
            if grad_sum is not None:
                grad_sum.add_(g_weight.sum(0))
            # squared in place: g_weight is this chunk's own buffer (a fresh square of it was a
            # further allocation of the chunk's size, and as slow as the sum)
            weight_sum.add_(g_weight.square_().sum(0), alpha=scale * scale)
            if bias_sum is not None:
                bias_sum.add_(g_bias.square().sum(0), alpha=scale * scale)

    # ------------------------------------------------------------------ API
    @property
    def num_examples(self) -> int:
        """Examples accumulated so far (per backward pass, each example counts once)."""
        return max(self.counts.values(), default=0)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_left"] = {}   # (weak references, which pickle refuses; a copy steps no optimizer)
        state["_trained"] = {}   # (read again at each forward)
        return state

    def __setstate__(self, state: dict) -> None:
        # A copy (copy.deepcopy, pickle) holds none of the hooks: they sit on the original's model,
        # and the model's copy gets inert ones (copy_inert.py). Its sums stay readable; capturing
        # with it is refused (_require_capture).
        self.__dict__.update(state)
        self._handles, self._served, self.copied = [], [], True
        self._sites = None   # (its hooks on the original's model are inert in the model's copy)
        # (absent from a copy made before loss_scale)
        self._tasks, self._loss_scale, self._stage = [], None, None
        self.__dict__.setdefault("_unchecked", {})   # (and before plain_product)
        self.__dict__.setdefault("_said_unchecked", set())
        self.__dict__.setdefault("_sampling", False)
        self.__dict__.update(_spent=set(), _spent_history=deque(maxlen=HISTORY), _recomputed=set(),
                             _dropped_history=deque(maxlen=HISTORY), _segments={})
        self.__dict__.setdefault("_said_segments", False)
        self.__dict__.setdefault("_said_dropped_input", False)
        self.__dict__.setdefault("_in_transformer_layers", {})
        self.__dict__.setdefault("_sequence_layouts", {})
        self.__dict__.setdefault("_next_token", 0)
        self.__dict__["_took"] = False
        self.__dict__.setdefault("_token_floor", 0)
        self.__dict__.update(watch_dropped=False, _left={}, dropped=set(), _pass_rows={})
        self.__dict__.setdefault("_said_rows", False)
        self.__dict__.setdefault("_said_transformed", False)
        self.__dict__.setdefault("_rows", None)
        self.__dict__.setdefault("_trained", {})
        self.__dict__.setdefault("_rows_wanted", False)
        self.__dict__.setdefault("_rows_used", False)

    @property
    def sampling(self) -> bool:
        """Inside accumulate_mc_from's sampled-label backward (fisher-mc), which trains nothing."""
        return self._sampling

    def _require_capture(self, where: str) -> None:
        if self.copied:
            raise RuntimeError(f"FisherAccumulator.{where}: this accumulator is a copy (copy.deepcopy or pickle), "
                               "and its hooks stayed with the original's model; build a new FisherAccumulator "
                               "on the copied model (load_state_dict carries the sums over)")

    def __enter__(self):
        self._require_capture("__enter__")
        return self

    def __exit__(self, *exc):
        self.new_batch()
        return False

    def new_batch(self) -> None:
        """Drop inputs captured by a forward pass that will have no backward."""
        self._pending.clear()
        self._grads.clear()

    def accumulate_mc(self, x: torch.Tensor, num_samples: int = 1) -> None:
        """fisher-mc: labels y ~ softmax(model(x)) and the squared per-example gradients of
        -log p(y | x), with a forward and backward of their own: the model's .grad is left
        untouched. In a training loop, capture_mc() and accumulate_mc_from() reuse the training
        forward instead."""
        self._require_mc("accumulate_mc")
        with self.capture_mc(), torch.enable_grad():
            logits = self.model(x)
        self.accumulate_mc_from(logits, num_samples)

    @contextlib.contextmanager
    def capture_mc(self):
        """fisher-mc: the forward pass run inside is recorded (each layer's input, a hook on its
        output) for accumulate_mc_from(logits), so the sampled-label Fisher needs no forward of
        its own: `with acc.capture_mc(): logits = model(x)`."""
        self._require_mc("capture_mc")
        self.new_batch()
        self._mc_outputs, self._capturing = [], True
        try:
            yield self
        except BaseException:   # a forward that failed leaves nothing to accumulate from
            self.new_batch()
            self._mc_outputs = None
            raise
        finally:
            self._capturing = False

    def accumulate_mc_from(self, logits: torch.Tensor, num_samples: int = 1) -> None:
        """fisher-mc: labels y ~ softmax(logits) and the squared per-example gradients of
        -log p(y | x), `logits` (N, classes) from a forward run inside capture_mc(). A backward of
        its own to the layers' outputs, with the graph retained: call it before the training
        loss's backward, which then runs as usual (the model's .grad is left untouched)."""
        self._require_mc("accumulate_mc_from")
        if isinstance(logits, torch.Tensor) and logits.dim() == 2 and logits.shape[1] < 2:
            # softmax over one column is 1: every sampled label alike, every gradient 0, and
            # MacKay's rule would prune the network for want of curvature
            raise ValueError(f"accumulate_mc_from: fisher-mc samples labels from softmax(logits), a categorical "
                             f"likelihood over the columns, and these logits have {logits.shape[1]} (shape "
                             f"{tuple(logits.shape)}): the Fisher would be 0. A regression output needs "
                             "curvature='ef-batch' or 'ef-exact'; a binary classifier with one logit z can pass "
                             "torch.cat([torch.zeros_like(z), z], 1), whose softmax is (1 - sigmoid(z), sigmoid(z))")
        outputs, self._mc_outputs = self._mc_outputs, None
        captured = {module: dict(inputs) for module, inputs in self._pending.items()}
        if outputs is None or not captured:
            raise RuntimeError("FisherAccumulator.accumulate_mc_from: no forward was captured since the last "
                               "accumulate_mc_from; run the model's forward inside `with accumulator.capture_mc():` "
                               "(with gradients enabled), then pass its logits, once: a captured forward serves one "
                               "call (the labels of one categorical a row; a second head's logits are another "
                               "likelihood: cover that head with ef-exact or ef-batch in a pruner of its own, "
                               f"layers=). {COMPILED_HINT}")
        if logits.dim() != 2:
            raise ValueError(f"accumulate_mc: the model must return logits (N, classes), got {tuple(logits.shape)}"
                             + ("; a dense prediction's [N, C, ...] logits (a class per pixel or position): pass "
                                "logits.movedim(1, -1).reshape(-1, C), one row a position (a sequence's [N, T, V]: "
                                "logits.reshape(-1, V)), with num_data and batch_size counting positions"
                                if logits.dim() >= 3 else ""))
        if not logits.requires_grad:
            raise ValueError("accumulate_mc_from: logits must come from the captured forward, with "
                             "gradients enabled (they do not require grad)")
        # The hooks need delta = dloss/doutput of each layer, not the parameters' gradients:
        # differentiating to the layers' outputs skips the weight-gradient GEMMs and convolutions
        # that a backward to the parameters would compute and throw away. An output changed in
        # place after its layer (an in-place activation) is no longer the tensor the hook sits
        # on: then the parameters.
        if all(out._version == version for out, version in outputs):
            targets = [out for out, _ in outputs]
        else:
            targets = [p for m in self.layers.values() for p in m.parameters(recurse=False) if p.requires_grad]
        self._active, self._scale_override, self._sampling = True, 1.0, True
        try:
            for _ in range(num_samples):
                self._pending = defaultdict(dict, {m: dict(inputs) for m, inputs in captured.items()})
                self._grads.clear()
                with torch.no_grad():
                    labels = torch.multinomial(torch.softmax(logits.detach().float(), 1), 1).squeeze(1)
                with torch.enable_grad():
                    loss = F.cross_entropy(logits, labels, reduction="sum")
                    try:
                        torch.autograd.grad(loss, targets, allow_unused=True, retain_graph=True)
                    except RuntimeError as err:
                        if "use_reentrant" not in str(err):
                            raise
                        # torch's own words name .grad(), which the user never called
                        raise RuntimeError(
                            "fisher-mc cannot run through torch.utils.checkpoint with use_reentrant=True: its "
                            "sampled-label backward goes to the layers' outputs (torch.autograd.grad), which a "
                            "reentrant checkpoint refuses. Pass use_reentrant=False to checkpoint, or use "
                            "curvature='ef-exact' or 'ef-batch'") from err
        finally:
            self._active, self._scale_override, self._sampling = False, None, False
            self.new_batch()
            if self._rows_used:   # (as at a training backward's end)
                self._rows, self._rows_used = None, False
        self._softmax_check.watch(logits)   # the training backward's gradient through them (after these)

    def _require_mc(self, where: str) -> None:
        if self.mode != "fisher-mc":
            raise RuntimeError(f"FisherAccumulator.{where} needs mode='fisher-mc'")
        self._require_capture(where)

    def saw(self, param: nn.Parameter) -> bool:
        """Whether any example's gradient of `param` was added since the last reset."""
        return param in self.sums

    def curvature(self, param: nn.Parameter) -> torch.Tensor:
        """The per-example mean of the squared per-example gradient (param's shape); 0 at the
        weights alpha_of marks pruned."""
        if param not in self.sums:
            raise KeyError("FisherAccumulator.curvature: no curvature for this parameter (not in a "
                           "supported layer, or no batch accumulated yet)")
        self._say_unchecked(param)
        mean = self.sums[param] / max(self.counts[param], 1)
        alpha = self.alpha_of(param) if self.alpha_of is not None else None
        if alpha is not None:   # pruned weights: nothing (or, above the sparse line, unused sums) added
            mean.masked_fill_((alpha == math.inf).expand_as(mean), 0.0)
        return mean

    def _say_unchecked(self, param: nn.Parameter) -> None:
        """A subclass layer whose forward no check has seen (each captured forward ran compiled:
        torch.compile, where the check cannot run) is said once, when its curvature is read."""
        for module, name in self._unchecked.items():
            if _stored(module, "weight") is param and module not in self._said_unchecked:
                self._said_unchecked.add(module)
                warnings.warn(f"FisherAccumulator: {name} ({type(module).__name__}) is a subclass with a forward "
                              "of its own whose captured forwards all ran under torch.compile, where it cannot be "
                              "checked: its curvature assumes that forward computes the layer's plain product of "
                              "its input with its weight (one eager forward checks it)", UserWarning,
                              stacklevel=user_stacklevel())

    @torch.no_grad()
    def all_reduce(self, group=None) -> None:
        """Sum the accumulated squares and example counts over the ranks of a torch.distributed
        process group, so every rank holds the estimate of the global batch (call it on every
        rank before reading curvature(); under DDP each rank's hooks see only its own shard)."""
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
            return
        for param, count in self._sum_over_ranks(lambda t: dist.all_reduce(t, group=group)):
            self.counts[param] = int(count)

    @torch.no_grad()
    def reduce_to_first_rank(self, group=None) -> bool:
        """Sum every rank's squares and example counts onto the first rank of a torch.distributed
        process group and set the other ranks' to 0 (a collective: every rank calls it). The first
        rank's state_dict() then holds the estimate of every example so far, and the all_reduce of
        the next update still counts each example once. False, and nothing done, outside a process
        group of more than one rank."""
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
            return False
        first = dist.get_global_rank(group, 0) if group is not None else 0
        keeps = dist.get_rank() == first
        for param, count in self._sum_over_ranks(lambda t: dist.reduce(t, dst=first, group=group)):
            self.counts[param] = int(count) if keeps else 0
            if not keeps:
                self._sum_for(param).zero_()
        self.whole_at = self.num_examples   # (the sums are the whole estimate until more are added)
        return True

    def _sum_over_ranks(self, collective) -> list[tuple[torch.Tensor, float]]:
        """Run `collective` (a sum over the ranks into the tensor it is given: on every rank for
        all_reduce, on the first for reduce) on every parameter's running sum and on the example
        counts; returns (parameter, count after the collective) pairs. Every rank must hand the
        collective the same tensors in the same order, so the order is the layers' own."""
        params = [p for m in self.layers.values() for p in m.parameters(recurse=False)]
        for param in params:
            collective(self._sum_for(param))
        device = params[0].device if params else "cpu"
        counts = torch.tensor([self.counts[p] for p in params], dtype=torch.float64, device=device)
        collective(counts)
        return list(zip(params, counts.tolist()))

    def _named_parameters(self):
        for layer, module in self.layers.items():
            for name, param in module.named_parameters(recurse=False):
                yield (f"{layer}.{name}" if layer else name), param

    def state_dict(self) -> dict[str, dict]:
        """The running sums and example counts by parameter name: a checkpoint taken between
        two precision updates resumes the estimate where it stood."""
        return {name: {"sum": self.sums[param].detach().clone(), "count": int(self.counts[param])}
                for name, param in self._named_parameters() if param in self.sums}

    def load_state_dict(self, state: dict[str, dict]) -> None:
        """Restore what state_dict() saved (an empty dict: nothing accumulated yet)."""
        params = dict(self._named_parameters())
        unknown = sorted(set(state) - set(params))
        if unknown:
            raise KeyError(f"FisherAccumulator.load_state_dict: no supported layer holds the parameters "
                           f"{unknown} (this accumulator covers {sorted(params)})")
        for name, entry in state.items():   # all checked before the running sums are reset
            total = self._sum_for(params[name])
            value, count = (entry.get("sum"), entry.get("count")) if isinstance(entry, dict) else (None, None)
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(total.shape):
                raise ValueError(f"FisherAccumulator.load_state_dict: {name}'s sum must be a tensor of the "
                                 f"parameter's shape {tuple(total.shape)}, got "
                                 f"{tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__}")
            if not value.is_floating_point() or not bool(torch.isfinite(value).all()) or bool((value < 0).any()):
                raise ValueError(f"FisherAccumulator.load_state_dict: {name}'s sum of squared gradients must "
                                 "hold finite non-negative numbers")
            if not isinstance(count, int) or isinstance(count, bool) or count < 0:
                raise ValueError(f"FisherAccumulator.load_state_dict: {name}'s example count must be an "
                                 f"integer >= 0, got {count!r}")
        self.reset()
        for name, entry in state.items():
            param = params[name]
            self._sum_for(param).copy_(entry["sum"])
            self.counts[param] = entry["count"]

    def reset(self) -> None:
        for total in self.sums.values():
            total.zero_()
        self.counts.clear()
        self.backward_passes = 0
        self.sampled_calls.clear()
        self.new_batch()
        if self._sites is not None:   # the next window's first forward is watched too
            self._sites.due = True
        self.whole_at = None

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._sites is not None:
            self._sites.remove()
            self._sites = None
        for module in self._served:   # the modules' own forward again
            forward = vars(module).get("forward")
            if isinstance(forward, ServedForward) and forward.accumulator is self:
                del module.forward
        self._served.clear()
        self._weight_grads.clear()
        self._trained.clear()

    @torch.no_grad()
    def write_to(self, optimizer) -> int:
        """Copy the accumulated h into MacKayAdam's state[p]["curvature"] for every ARD parameter
        it covers; returns how many tensors were written."""
        written = 0
        for param in self.sums:
            group = next((g for g in optimizer.param_groups if any(p is param for p in g["params"])), None)
            if group is not None and group.get("ard", False):
                optimizer.ard_state(param)["curvature"].copy_(self.curvature(param))
                written += 1
        return written


def _paired(records: dict[int, torch.Tensor], grads: list[tuple[int, torch.Tensor]]
            ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(inputs, output gradients) of the uses of one layer that got a gradient, in forward order:
    each gradient with the input of the use whose token it carries."""
    by_token = dict(grads)
    pairs = [(x, by_token[token]) for token, x in records.items() if token in by_token]
    # a Transformer layer's sequences: examples first (rows grouped into examples by
    # examples_of_rows are laid out by _accumulate_grouped)
    pairs = [x.examples_first(grad) if isinstance(x, SequenceInput) else (x, grad) for x, grad in pairs]
    return [x for x, _ in pairs], [grad for _, grad in pairs]


@dataclass(frozen=True)
class SequenceInput:
    """A captured input of a Transformer layer's feed-forward Linear, laid out as the layer's
    call was: "batch_first" [N, T, d], "seq_first" [T, N, d], "unbatched" [T, d] (one sequence)."""
    rows: torch.Tensor
    layout: str

    def examples(self) -> int:
        return {"batch_first": self.rows.shape[0], "seq_first": self.rows.shape[1], "unbatched": 1}[self.layout]

    def examples_first(self, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.layout == "unbatched":
            return self.rows.unsqueeze(0), grad.unsqueeze(0)
        if self.layout == "seq_first":
            return self.rows.transpose(0, 1), grad.transpose(0, 1)
        return self.rows, grad


def _in_transformer_layers(model: nn.Module, layers: dict[str, nn.Module]) -> dict[nn.Module, nn.Module]:
    """{feed-forward Linear: its nn.TransformerEncoderLayer / nn.TransformerDecoderLayer}: under
    batch_first=False (torch's default, nn.Transformer's too) they are fed [T, N, d], and an
    unbatched sequence gives them [T, d], whose rows are positions. Read as examples, a new
    user's seq-first encoder layer's linear2 bias read 0.04x its curvature, linear1's weight
    1.36x, no word. (Called outside its layer, such a Linear is read as any other.)"""
    captured = set(layers.values())
    return {layer: parent for parent in model.modules()
            if isinstance(parent, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer))
            for layer in (parent.linear1, parent.linear2) if layer in captured}


def _layout_of(layer: nn.Module, sequence: torch.Tensor) -> str:
    """How a Transformer layer lays out a sequence it is called on (or its feed-forward block's
    input): a 2-D one is unbatched, else as the layer is built."""
    return "unbatched" if sequence.dim() == 2 else "batch_first" if layer.self_attn.batch_first else "seq_first"


def _rows(module: nn.Module, record) -> int:
    """The examples a captured input holds: its rows (its examples under examples_of_rows; one
    for a conv's unbatched input; a Transformer layer's sequences)."""
    if isinstance(record, GroupedRows):
        return record.layout.examples
    if isinstance(record, SequenceInput):
        return record.examples()
    if (isinstance(module, (nn.Conv1d, nn.Conv2d)) and record.dim() == len(module.stride) + 1) or record.dim() <= 1:
        return 1
    return record.shape[0]


def _stored_parameters(module: nn.Module) -> list[torch.Tensor]:
    """The layer's weight and bias as stored: module.weight is not read, which a parametrization
    would compute (its originals are the parameters)."""
    stored = [module._parameters.get(name) for name in ("weight", "weight_orig", "bias")]
    # (parametrize.is_parametrized's lookup through nn.Module.__getattr__ cost a microsecond a call)
    parametrizations = module._modules.get("parametrizations")
    if isinstance(parametrizations, nn.ModuleDict) and "weight" in parametrizations:
        stored += list(parametrizations["weight"]._parameters.values())   # original, or original0, ...
    return [param for param in stored if isinstance(param, torch.Tensor)]


def _trained_parameters(module: nn.Module) -> list[torch.Tensor] | None:
    """The layer's stored parameters that train now; None where they are all frozen: a backward
    through it (a DDPG/SAC actor's loss through its critic, the critic frozen for it as usual) is
    none of its curvature's. [] for a layer whose parameters are not stored as its own (a flat
    parameter's views), which is read as trained."""
    stored = _stored_parameters(module)
    trained = [param for param in stored if param.requires_grad]
    return trained if trained or not stored else None


class _TrainedParameters:
    """A layer's parameters that train (read at its forward) and, during a backward, their
    gradient accumulators."""
    __slots__ = ("params", "nodes")

    def __init__(self, params: list[torch.Tensor]):
        self.params, self.nodes = params, None

    def same(self, params: list[torch.Tensor]) -> bool:
        return len(params) == len(self.params) and all(a is b for a, b in zip(params, self.params))

    def written(self) -> bool:
        """Whether the backward under way adds to their .grad (grad_writes.py). A layer whose
        parameters are not stored as its own (a flat parameter's views) is read as trained."""
        if not self.params:
            return True
        if self.nodes is not None and writes_grad(self.nodes):
            return True
        # found once a backward (the graph holds them meanwhile; the accumulator drops them at its
        # end) and asked again where the answer is no: a parameter moved by .data (to another
        # device or dtype) between a forward and its backward gets a new accumulator
        self.nodes = [gradient_node(param) for param in self.params]
        return writes_grad(self.nodes)
