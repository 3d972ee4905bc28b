"""The source distribution builds a working package elsewhere: it holds every tracked source
file the build, the tests and the benchmarks read (a packager's sdist lacked every C++ header, and installing it
failed with `mackay/adam_driver.h: No such file or directory`), and not this build's record."""
import os
import shutil
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tracked_files() -> list[str]:
    if shutil.which("git") is None or not os.path.isdir(os.path.join(ROOT, ".git")):
        pytest.skip("not a git checkout: the tracked files are unknown")
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True)
    return [path for path in listed.stdout.splitlines() if os.path.isfile(os.path.join(ROOT, path))]


# setup.py run with torch unimportable, as in the isolated environment of `python -m build --sdist`
WITHOUT_TORCH = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = ['setup.py', *sys.argv[1:]]; "
                 "runpy.run_path('setup.py', run_name='__main__')")


def _copy_of_tracked_files(tmp_path) -> tuple[list[str], object]:
    tracked = _tracked_files()
    tree = tmp_path / "tree"
    for path in tracked:   # (a copy: setup.py writes its build record into the tree it runs in)
        (tree / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.join(ROOT, path), tree / path)
    return tracked, tree


@pytest.mark.parametrize("torch_there", [True, False])
def test_the_sdist_holds_every_source_the_build_and_tests_read(tmp_path, torch_there):
    """With torch or without it (a packager's isolated sdist build: setup.py imported torch for
    every command, and refused)."""
    tracked, tree = _copy_of_tracked_files(tmp_path)
    start = [sys.executable, "setup.py"] if torch_there else [sys.executable, "-c", WITHOUT_TORCH]
    result = subprocess.run([*start, "-q", "sdist", "--dist-dir", str(tmp_path / "dist")],
                            cwd=tree, capture_output=True, text=True, timeout=300, env={**os.environ, "FORCE_CPU": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    (archive,) = (tmp_path / "dist").glob("*.tar.gz")
    with tarfile.open(archive) as handle:
        inside = {name.split("/", 1)[1] for name in handle.getnames() if "/" in name}
    wanted = [path for path in tracked
              if path.startswith(("csrc/", "mackay_ext/", "docs/", "python_tests/", "bench/"))
              or path in ("setup.py", "pyproject.toml", "CMakeLists.txt", "README.md", "requirements-test.txt",
                          "MANIFEST.in")]
    missing = [path for path in wanted if path not in inside]
    assert not missing, f"the sdist lacks {missing}"
    assert "mackay_ext/_build_info.py" not in inside and not any(name.endswith(".so") for name in inside)


def test_a_build_without_torch_still_says_how_to_install(tmp_path):
    _, tree = _copy_of_tracked_files(tmp_path)
    result = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, "-q", "build_ext"], cwd=tree,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "pip install --no-build-isolation ." in result.stderr
