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
