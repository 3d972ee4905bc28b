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
