"""A compressed model loads, runs and trains where the compiled extension is missing (a machine
that installed the wheel for another torch, or a source checkout): the pure-PyTorch fallback."""
import os
import shutil
import subprocess
import sys
import textwrap

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
