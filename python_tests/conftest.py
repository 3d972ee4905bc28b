import pytest
import torch

import mackay_ext

CUDA_AVAILABLE = torch.cuda.is_available() and "cuda" in mackay_ext.compiled_backends()

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not CUDA_AVAILABLE, reason="needs a CUDA GPU")),
]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=[1, 2] if torch.get_num_threads() >= 2 else [1], ids=lambda t: f"{t}thr")
def threads(request):
    """Runs a test with 1 thread and, where torch has them, 2 (the kernels split work by thread)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(previous)


def pruner_step(pruner, model, optimizer, x, y) -> None:
    """One training step as a user writes it for the pruner's curvature: under fisher-mc the
    forward inside capture_mc() and accumulate_mc_from(logits) before the backward (model may be
    a compiled wrapper of the pruner's model)."""
    optimizer.zero_grad()
    if pruner.curvature_kind == "fisher-mc":
        with pruner.capture_mc():
            logits = model(x)
        pruner.accumulate_mc_from(logits)
    else:
        logits = model(x)
    torch.nn.functional.cross_entropy(logits, y).backward()
    optimizer.step()


def train_steps(model, optimizer, x, y, count: int, batch: int) -> None:
    """`count` cross-entropy steps over x, y in consecutive batches of `batch`, cycling."""
    batches = max(1, x.shape[0] // batch)
    for index in range(count):
        start = batch * (index % batches)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x[start:start + batch]), y[start:start + batch]).backward()
        optimizer.step()
