"""Checks setup.py runs on the extension it has just built (plain Python: setup.py loads this
file by path, before torch or the package can be imported).

The CPU's features (cpu_flags) are read here for the build and for the import-time check of a
built library. The one check of a built library: the C++ runtime must be a shared library. A compiler that links libstdc++
statically into the extension (some toolchains do by default; seen with a CXX=/opt/gcc/bin/g++ on a
GPU machine whose torch was built with the system GCC) gives the process two copies of the C++
exception machinery. Every argument check of our ops throws a c10::Error from libc10 through our
frames, and with two runtimes that unwinding crashed the process (SIGSEGV) instead of raising a
Python exception. The build should fail with that said, not ship a library that crashes on the
first bad argument.
"""
from __future__ import annotations

import struct

_SHT_DYNAMIC = 6
_DT_NULL, _DT_NEEDED = 0, 1


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags (Linux's /proc/cpuinfo), None where they cannot be read: what the
    build compiles for (setup.py) and what a built library is checked against (_extension.py)."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def elf_needed(path: str) -> list[str] | None:
    """The DT_NEEDED entries (shared libraries a binary loads) of a 64-bit little-endian ELF
    file; None for anything else (another format or word size: nothing to say about it)."""
    with open(path, "rb") as handle:
        data = handle.read()
    if len(data) < 64 or data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return None
    (section_offset,) = struct.unpack_from("<Q", data, 0x28)
    entry_size, count = struct.unpack_from("<HH", data, 0x3A)
    # sh_name, sh_type, sh_flags, sh_addr, sh_offset, sh_size, sh_link, sh_info, ...
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, section_offset + i * entry_size)
                for i in range(count)]
    needed = []
    for section in sections:
        if section[1] != _SHT_DYNAMIC:
            continue
        strings = sections[section[6]][4]  # the section's sh_link names its string table
        for offset in range(section[4], section[4] + section[5], 16):
            tag, value = struct.unpack_from("<qQ", data, offset)
            if tag == _DT_NULL:
                break
            if tag == _DT_NEEDED:
                start = strings + value
                needed.append(data[start:data.index(b"\0", start)].decode("utf-8", "replace"))
    return needed


def static_cxx_runtime_problem(path: str, compiler: str) -> str | None:
    """Why the shared library at `path` must not be used, or None. `compiler` names the C++
    compiler in the message (the CXX the build used)."""
    needed = elf_needed(path)
    if needed is None or any(name.startswith(("libstdc++.so", "libc++.so")) for name in needed):
        return None
    return (
        f"mackay_ext: the extension just built ({path}) does not load libstdc++.so: the C++ "
        f"compiler ({compiler}) linked the C++ runtime into it statically. torch throws its "
        "errors (every argument check of our ops) from libc10 through this library, and with "
        "two copies of the C++ runtime in one process that can crash it instead of raising. "
        "Build with a compiler that links libstdc++ dynamically, such as the system's: "
        "CC=gcc CXX=g++ pip install ... (the library it loads: " + (", ".join(needed) or "none") + ")."
    )
