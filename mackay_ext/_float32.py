"""Full float32 arithmetic for the checks that compare two computations of the same function."""
from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def full_float32():
    """TF32 off inside: cuDNN's convolutions use it by default on Ampere and later GPUs, which
    moves a deep network's float32 outputs by ~1e-3 (a ResNet-20's, a ResNet-56's), far above
    what an equality check of float32 computations may allow (1e-4)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
