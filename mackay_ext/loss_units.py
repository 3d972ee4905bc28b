"""What a model's loss is a mean over, as far as its forward says: the Hugging Face Trainer's
rule for who divides the loss over accumulated micro-batches, and whether the model's own loss
averages over label tokens (a causal or masked LM's: then N and B must count label tokens, not
sequences). Read from the forward's signature and source; no transformers import needed."""
from __future__ import annotations

import inspect

# losses a forward computes itself, as a mean over its own micro-batch
_OWN_LOSSES = ("CrossEntropyLoss(", "MSELoss(", "BCEWithLogitsLoss(", "cross_entropy(", "mse_loss(")


def accepts_loss_kwargs(model) -> bool:
    """The Trainer's rule: a model with `accepts_loss_kwargs`, or whose forward takes **kwargs,
    gets num_items_in_batch and is trusted to normalise its loss over the accumulated batch."""
    model = getattr(model, "module", model)
    if hasattr(model, "accepts_loss_kwargs"):
        return bool(model.accepts_loss_kwargs)
    try:
        parameters = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters)


def loss_normalisation(model) -> str:
    """Who divides the loss over accumulated micro-batches: "trainer" (the model takes no loss
    kwargs, the Trainer divides), "model" (it reads num_items_in_batch, e.g. through
    self.loss_function: a causal LM), "ignored" (it takes **kwargs but computes its own mean
    loss without them, as transformers' sequence- and token-classification heads do: nobody
    divides, and the optimizer's gradient is A times the batch mean) or "unknown" (its forward's
    source says neither, e.g. a wrapper passing **kwargs on)."""
    inner = getattr(model, "module", model)
    if not accepts_loss_kwargs(inner):
        return "trainer"
    if getattr(inner, "accepts_loss_kwargs", None) is True:   # the model says it normalises
        return "model"
    try:
        source = inspect.getsource(type(inner).forward)
    except (OSError, TypeError):
        return "unknown"
    if "num_items_in_batch" in source or "loss_function(" in source:
        return "model"
    if any(loss in source for loss in _OWN_LOSSES):
        return "ignored"
    return "unknown"


def averages_over_tokens(model) -> bool:
    """The model's own loss is a mean over label tokens (it divides by num_items_in_batch)."""
    return loss_normalisation(model) == "model"
