"""A compressed model loads, runs and trains where the compiled extension is missing (a machine
that installed the wheel for another torch, or a source checkout): the pure-PyTorch fallback."""
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import mackay_ext


def test_compressed_model_without_the_extension(tmp_path):
    package = os.path.dirname(mackay_ext.__file__)
    copy = tmp_path / "mackay_ext"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("_C*.so", "_C*.pyd", "__pycache__"))
    torch.manual_seed(0)
    model = mackay_ext.models.create("lenet-300-100")
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_((torch.rand_like(p) < 0.02).to(p.dtype))
    x = torch.randn(5, 784)
    torch.save({"x": x, "y": model(x).detach()}, tmp_path / "io.pt")
    mackay_ext.save_compressed(mackay_ext.sparsify(model), str(tmp_path / "m.pt"), model_name="lenet-300-100")
    script = textwrap.dedent(f"""
        import sys
        # only the copy without _C: drop an editable install's finder, put the copy first
        sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
        sys.path.insert(0, {str(tmp_path)!r})
        import torch, mackay_ext
        assert mackay_ext.__file__.startswith({str(tmp_path)!r}), mackay_ext.__file__
        assert mackay_ext.compiled_backends() == ()
        model = mackay_ext.load_compressed({str(tmp_path / "m.pt")!r})
        io = torch.load({str(tmp_path / "io.pt")!r})
        torch.testing.assert_close(model(io["x"]), io["y"], rtol=1e-5, atol=1e-6)
        model.train()
        model(io["x"]).sum().backward()
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_a_source_tree_shadowing_a_built_install_is_named(tmp_path):
    """Python run from a repository root after a non-editable install imports the source tree,
    which has no _C: the error names both folders and how to get out of it, not 'build it'."""
    package = os.path.dirname(mackay_ext.__file__)
    source, installed = tmp_path / "checkout", tmp_path / "site"
    shutil.copytree(package, source / "mackay_ext", ignore=shutil.ignore_patterns("_C*.so", "_C*.pyd", "__pycache__"))
    shutil.copytree(package, installed / "mackay_ext", ignore=shutil.ignore_patterns("__pycache__"))
    script = textwrap.dedent(f"""
        import sys
        sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
        sys.path[:0] = [{str(source)!r}, {str(installed)!r}]
        import mackay_ext
        try:
            mackay_ext._extension.require()
        except RuntimeError as error:
            print(error)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    message = " ".join(result.stdout.split())
    assert f"imported from the source tree {source / 'mackay_ext'}" in message
    assert f"shadows the built install in {installed / 'mackay_ext'}" in message
    assert "run Python from another directory" in message


def _import_copy(tmp_path, build_info: str | None, truncate: bool = False, keep_library: bool = True):
    """Import a copy of the package (with what setup.py would have recorded, `build_info`) in a
    fresh interpreter: its import warnings, compiled_backends(), require()'s error, and whether
    the pure-PyTorch fallback runs."""
    package = os.path.dirname(mackay_ext.__file__)
    ignore = ["__pycache__", "_build_info.py"] + ([] if keep_library else ["_C*.so", "_C*.pyd"])
    copy = tmp_path / "mackay_ext"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns(*ignore))
    if build_info is not None:
        (copy / "_build_info.py").write_text(build_info)
    if truncate:
        for library in copy.glob("_C*.so"):
            library.write_bytes(library.read_bytes()[:100])
    script = textwrap.dedent(f"""
        import sys, warnings
        sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
        sys.path.insert(0, {str(tmp_path)!r})
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import torch, mackay_ext
        assert mackay_ext.__file__.startswith({str(tmp_path)!r}), mackay_ext.__file__
        for warning in caught:
            print("WARNING", warning.message)
        print("BACKENDS", mackay_ext.compiled_backends())
        try:
            mackay_ext._extension.require()
        except RuntimeError as error:
            print("REQUIRE", error)
        weight, alpha = torch.ones(2, 3), torch.zeros(2, 3)
        mackay_ext.ops.mackay_update_(weight, torch.ones(2, 3), alpha, num_data=10.0, backend="torch")
        print("FALLBACK", bool((alpha > 0).all()))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return " ".join(result.stdout.split())


def test_a_build_for_another_torch_is_not_loaded_and_says_so(tmp_path):
    """An extension built against one torch ran under another with no word (torch promises no ABI
    between releases): the version setup.py recorded is checked before loading it."""
    out = _import_copy(tmp_path, "TORCH_VERSION = '0.0.1'\nCPU_FEATURES = ()\n")
    assert "WARNING mackay_ext: the compiled kernels (mackay_ext._C) are not loaded (it was built against " \
           f"torch 0.0.1, and this is torch {torch.__version__}: rebuild it" in out
    assert "BACKENDS ()" in out and "FALLBACK True" in out
    assert "REQUIRE mackay_ext: the compiled extension mackay_ext._C could not be loaded (it was built " in out
    assert "shadows" not in out and "backend='torch' (`--backend torch` on the command line)" in out


def test_a_build_for_cpu_features_this_cpu_lacks_is_not_loaded(tmp_path):
    """A build for AVX2 killed Python with an illegal instruction on a CPU without it: the
    features setup.py compiled for are checked against the CPU's before loading."""
    if mackay_ext._build_checks.cpu_flags() is None:
        pytest.skip("this system does not say its CPU's features (/proc/cpuinfo's flags)")
    out = _import_copy(tmp_path, f"TORCH_VERSION = {torch.__version__!r}\nCPU_FEATURES = ('avx2', 'no_such_flag')\n")
    assert "this one lacks no_such_flag: rebuild it here, or with MACKAY_EXT_CPU_ARCH=generic" in out
    assert "BACKENDS ()" in out and "FALLBACK True" in out


def test_a_broken_library_is_said_at_import_and_a_matching_build_loads(tmp_path):
    """A truncated _C: said at import (compiled_backends() was () with no word until the first
    kernel), without the source-tree hint; a build record that matches loads as before, and a
    tree never built says nothing until a kernel is needed."""
    out = _import_copy(tmp_path / "broken", None, truncate=True)
    assert "WARNING mackay_ext: the compiled kernels (mackay_ext._C) are not loaded" in out
    assert "BACKENDS ()" in out and "shadows" not in out and "FALLBACK True" in out
    if mackay_ext.compiled_backends():   # (an install without kernels has no build to load)
        matching = f"TORCH_VERSION = {torch.__version__!r}\nCPU_FEATURES = ()\n"
        out = _import_copy(tmp_path / "matching", matching)
        assert "WARNING" not in out and "BACKENDS ('cpu'" in out and "REQUIRE" not in out
    out = _import_copy(tmp_path / "unbuilt", None, keep_library=False)
    assert "WARNING" not in out and "BACKENDS ()" in out and "(it is not built here)" in out
