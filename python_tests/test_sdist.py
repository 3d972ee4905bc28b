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


def test_the_sdist_holds_every_source_the_build_and_tests_read(tmp_path):
    tracked = _tracked_files()
    tree = tmp_path / "tree"
    for path in tracked:   # (a copy: setup.py writes its build record into the tree it runs in)
        (tree / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.join(ROOT, path), tree / path)
    result = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(tmp_path / "dist")],
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
