"""The package is built, its ops are registered, and it reports its backends honestly."""
import torch

import mackay_ext


def test_compiled_backends_include_cpu():
    backends = mackay_ext.compiled_backends()
    assert "cpu" in backends
    assert set(backends) <= {"cpu", "cuda"}


def test_cuda_backend_matches_dispatcher():
    has_cuda_kernel = torch._C._dispatch_has_kernel_for_dispatch_key(
        "mackay_ext::mackay_update_", "CUDA")
    assert ("cuda" in mackay_ext.compiled_backends()) == has_cuda_kernel


def test_op_schema_marks_mutation():
    schema = torch.ops.mackay_ext.mackay_update_.default._schema
    mutated = [arg.name for arg in schema.arguments if arg.alias_info and arg.alias_info.is_write]
    assert mutated == ["weight", "alpha"]


def test_forced_cuda_build_really_has_cuda():
    """CI builds with FORCE_CUDA=1: the CUDA kernels must then be compiled in, GPU or not."""
    import os

    if os.environ.get("FORCE_CUDA") != "1":
        import pytest
        pytest.skip("not a FORCE_CUDA=1 build")
    assert "cuda" in mackay_ext.compiled_backends()
