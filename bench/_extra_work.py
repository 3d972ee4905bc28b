"""The arithmetic an exact curvature adds to a training step, as a share of the step's own: the
lower bound of its cost where the step is all matrix products and convolutions (bench_training).

The step's own: torch.utils.flop_counter over one forward and backward (attention's products
included). ef-exact adds, for each ARD Linear layer, one product as large as its forward (the
squared operands' GEMM); an ARD convolution adds nothing, since the per-example products it forms
give the training backward its weight gradient (conv_weight_grad.py). fisher-mc adds the
sampled-label backward to the ARD layers' outputs (counted the same way) and, for every ARD layer,
per-example products as large as its forward. A variant that samples one batch in k adds 1/k.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def _flops(run) -> int:
    with FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops()


def extra_work(model: nn.Module, x: torch.Tensor, y: torch.Tensor, ard_layers: list[str]) -> dict[str, float]:
    """curvature ("ef-exact", "fisher-mc") -> its added flops over one training step's; and
    "ef-exact, sparse-able": the part of ef-exact's from Linear layers on 2-D inputs, which a
    pruned layer sums at its kept weights only (sq_sddmm_accumulate_)."""
    modules = dict(model.named_modules())
    forward_flops, outputs, handles, flat_inputs = {}, [], [], set()
    for name in ard_layers:
        def record(module, inputs, output, name=name):
            per_output = module.weight[0].numel()   # in_features, or in_channels / groups x kernel
            forward_flops[name] = 2 * output.numel() * per_output
            outputs.append(output)
            if isinstance(module, nn.Linear) and inputs[0].dim() == 2:
                flat_inputs.add(name)   # the sparse kernel's layers (kept_pattern.py)
        handles.append(modules[name].register_forward_hook(record))
    try:
        step = _flops(lambda: F.cross_entropy(model(x), y).backward())
        outputs.clear()   # the sampled-label backward differentiates to this forward's outputs
        logits = model(x)
        labels = torch.multinomial(torch.softmax(logits.detach(), 1), 1).squeeze(1)
        sampled = _flops(lambda: torch.autograd.grad(F.cross_entropy(logits, labels), outputs))
    finally:
        for handle in handles:
            handle.remove()
        model.zero_grad(set_to_none=True)
    linear = sum(f for name, f in forward_flops.items() if isinstance(modules[name], nn.Linear))
    flat = sum(f for name, f in forward_flops.items() if name in flat_inputs)
    return {"ef-exact": linear / step, "fisher-mc": (sampled + sum(forward_flops.values())) / step,
            "ef-exact, sparse-able": flat / step}
