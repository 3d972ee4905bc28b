"""setup.py refuses an extension with a statically linked C++ runtime (mackay_ext/_build_checks.py):
checked on the library the suite runs with and on tiny libraries built here both ways."""
import glob
import os
import shutil
import subprocess
import sys

import pytest

import mackay_ext
from mackay_ext._build_checks import elf_needed, static_cxx_runtime_problem

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF shared libraries")
SOURCE = """
#include <stdexcept>
#include <string>
extern "C" int checked(int x) {
  if (x < 0) throw std::invalid_argument("x must be >= 0, got " + std::to_string(x));
  return x;
}
"""


def build_tiny(tmp_path, *flags):
    compiler = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler here")
    source = tmp_path / "tiny.cpp"
    source.write_text(SOURCE)
    target = tmp_path / f"tiny{'_'.join(flags)}.so"
    subprocess.run([compiler, "-shared", "-fPIC", str(source), "-o", str(target), *flags], check=True)
    return str(target), compiler


@linux_only
def test_the_built_extension_loads_the_shared_cxx_runtime():
    (library,) = glob.glob(os.path.join(os.path.dirname(mackay_ext.__file__), "_C*.so"))
    needed = elf_needed(library)
    assert any(name.startswith("libstdc++.so") for name in needed), needed
    assert any(name.startswith("libc10") for name in needed), needed
    assert static_cxx_runtime_problem(library, "c++") is None


@linux_only
def test_a_dynamically_linked_library_passes(tmp_path):
    library, compiler = build_tiny(tmp_path)
    assert "libstdc++.so.6" in elf_needed(library)
    assert static_cxx_runtime_problem(library, compiler) is None


@linux_only
def test_a_statically_linked_runtime_is_refused_and_the_message_says_what_to_do(tmp_path):
    library, compiler = build_tiny(tmp_path, "-static-libstdc++")
    needed = elf_needed(library)
    assert not any(name.startswith("libstdc++") for name in needed) and "libc.so.6" in needed
    problem = static_cxx_runtime_problem(library, compiler)
    assert problem is not None
    for words in (library, compiler, "statically", "CXX=g++"):
        assert words in problem


def test_files_that_are_not_64_bit_elf_say_nothing(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a library")
    empty = tmp_path / "empty.so"
    empty.write_bytes(b"")
    elf32 = tmp_path / "elf32.so"
    elf32.write_bytes(b"\x7fELF\x01\x01" + bytes(64))
    for path in (text, empty, elf32):
        assert elf_needed(str(path)) is None
        assert static_cxx_runtime_problem(str(path), "c++") is None
