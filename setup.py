"""Build of mackay_ext: CPU kernels always, CUDA kernels when a toolkit and a CUDA torch are here.

Environment switches:
  FORCE_CUDA=1        build the CUDA kernels even without a visible GPU (CI does this)
  FORCE_CPU=1         skip the CUDA kernels
  TORCH_CUDA_ARCH_LIST  defaults to "8.0;9.0" (A100, H100) when no GPU is visible
  MACKAY_EXT_CPU_ARCH   "native" (default: AVX2+FMA when this machine has them) or "generic"
  MACKAY_EXT_DEBUG=1  -O0 -g
  MACKAY_EXT_NO_KERNELS=1  no compiled kernels: the pure-PyTorch fallback alone (no compiler needed)
"""
import glob
import os
import platform
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _has_cuda_runtime(home):
    return any(
        glob.glob(os.path.join(home, pattern))
        for pattern in ("lib64/libcudart.so*", "lib/libcudart.so*", "targets/*/lib/libcudart.so*")
    )


def _wrapper_target(nvcc):
    """The real nvcc a wrapper script execs (`exec /path/to/nvcc "$@"`), if it is one."""
    try:
        with open(nvcc, "rb") as handle:
            head = handle.read(4096)
    except OSError:
        return None
    if not head.startswith(b"#!"):
        return None
    for line in head.decode("utf-8", "replace").splitlines():
        words = line.strip().split()
        if len(words) >= 2 and words[0] == "exec" and words[1].endswith("nvcc"):
            return words[1].strip("'\"")
    return None


def resolve_cuda_home():
    """Find the CUDA toolkit root. torch guesses dirname(dirname(which nvcc)); on machines where
    `nvcc` is a wrapper script (as here: /usr/local/bin/nvcc) that directory has no lib64 and
    linking fails with -lcudart. Prefer a root that really holds the runtime library."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        for path in (nvcc, _wrapper_target(nvcc)):
            if path:
                real = os.path.realpath(path)
                candidates.append(os.path.dirname(os.path.dirname(real)))
        candidates.append(os.path.join(os.path.dirname(os.path.dirname(nvcc)), "cuda"))
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")) and _has_cuda_runtime(home):
            return os.path.realpath(home)
    return None


def _env_flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


CUDA_HOME = None if _env_flag("FORCE_CPU") else resolve_cuda_home()
if CUDA_HOME:
    # Must be set before torch.utils.cpp_extension is imported: it reads CUDA_HOME once.
    os.environ["CUDA_HOME"] = CUDA_HOME

# commands that write the source archive or read the metadata build no kernels and need no torch
# (a packager's `python -m build --sdist` runs in an isolated environment without it)
_COMMANDS = set(sys.argv[1:])
SOURCE_ONLY = bool({"sdist", "egg_info", "dist_info"} & _COMMANDS) and not (
    {"build", "build_ext", "bdist_wheel", "install", "develop", "editable_wheel"} & _COMMANDS)

try:
    import torch  # noqa: E402
except ModuleNotFoundError as missing:   # pip's default build isolation: a fresh environment without it
    if missing.name != "torch":   # (a torch that is there but broken says so itself)
        raise
    if not SOURCE_ONLY:
        raise SystemExit("mackay_ext builds its kernels against the torch it will run with, which this build "
                         "environment lacks: install torch first, then `pip install --no-build-isolation .` "
                         "(pip's isolated build cannot see it)") from None
    torch = None
if torch is not None:
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402
else:   # (a source-only command: nothing below builds)
    from setuptools.command.build_ext import build_ext as BuildExtension  # noqa: E402


def want_cuda():
    if _env_flag("FORCE_CPU"):
        return False
    torch_has_cuda = torch.version.cuda is not None
    if _env_flag("FORCE_CUDA"):
        if not (CUDA_HOME and torch_has_cuda):
            raise RuntimeError(
                "FORCE_CUDA=1 but "
                + ("no CUDA toolkit was found (set CUDA_HOME)" if not CUDA_HOME
                   else f"torch {torch.__version__} is a CPU-only build")
            )
        return True
    return bool(CUDA_HOME) and torch_has_cuda


def cpu_arch_flags():
    """AVX2+FMA for at::vec when the build machine has them (the package builds where it runs)."""
    choice = os.environ.get("MACKAY_EXT_CPU_ARCH", "native")
    if choice == "generic" or platform.machine() not in ("x86_64", "AMD64"):
        return []
    flags = _load_build_checks().cpu_flags() or set()
    if set(AVX2_FEATURES) <= flags:
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return []


AVX2_FEATURES = ("avx2", "fma", "f16c")


def write_build_info(library, cpu_features):
    """_build_info.py beside the library just built (in the wheel, or in the source package of an
    editable install): the torch and CPU features it is built for, which mackay_ext/_extension.py
    checks before loading it (under another torch, or on a CPU without AVX2, it would crash or
    misbehave rather than fail). Written by the build that made the library, and only then."""
    with open(os.path.join(os.path.dirname(library), "_build_info.py"), "w") as handle:
        handle.write('"""Written by setup.py when it built mackay_ext._C: what that build needs."""\n'
                     f"TORCH_VERSION = {torch.__version__!r}\n"
                     f"CPU_FEATURES = {tuple(cpu_features)!r}\n")


def openmp_flags():
    """at::parallel_for is inline: without -fopenmp our kernels would silently run on one
    thread. Use OpenMP when torch does; libgomp.so.1 then resolves to the copy torch loaded."""
    if platform.system() != "Linux" or "OpenMP" not in torch.__config__.parallel_info():
        return []
    return ["-fopenmp"]


def make_extension():
    with_cuda = want_cuda()
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp")) + ["csrc/python/module.cpp"]
    debug = _env_flag("MACKAY_EXT_DEBUG")
    opt = ["-O0", "-g"] if debug else ["-O3"]
    arch = cpu_arch_flags()
    cxx = opt + ["-fvisibility=hidden", "-Wno-unknown-pragmas"] + arch + openmp_flags()
    # (Python's own CFLAGS carry -g: the CPU-only library was 21.6 MB with its debug info, 0.6 MB without)
    link = openmp_flags() + ([] if debug or platform.system() != "Linux" else ["-Wl,--strip-debug"])
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    if not with_cuda:
        print("mackay_ext: building backends: cpu")
        ext = CppExtension("mackay_ext._C", sources, include_dirs=include_dirs,
                           extra_compile_args={"cxx": cxx}, extra_link_args=link)
        ext.cpu_features = AVX2_FEATURES if arch else ()
        return ext
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    sources += sorted(glob.glob("csrc/cuda/*.cpp") + glob.glob("csrc/cuda/*.cu"))
    nvcc = opt + ["-lineinfo", "--expt-relaxed-constexpr", "-DWITH_CUDA"]
    print(f"mackay_ext: building backends: cpu, cuda (CUDA_HOME={CUDA_HOME}, "
          f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', 'torch default')})")
    ext = CUDAExtension("mackay_ext._C", sources, include_dirs=include_dirs,
                        extra_compile_args={"cxx": cxx + ["-DWITH_CUDA"], "nvcc": nvcc},
                        extra_link_args=link)
    ext.cpu_features = AVX2_FEATURES if arch else ()
    return ext


def _load_build_checks():
    """mackay_ext/_build_checks.py by path: importing the package would need the built _C."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "mackay_ext_build_checks", os.path.join(ROOT, "mackay_ext", "_build_checks.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildAndCheck(BuildExtension):
    """torch's BuildExtension, then a refusal of a library that would crash on its first error
    (a statically linked C++ runtime: mackay_ext/_build_checks.py says why)."""

    def run(self):
        # a library left from a build for another torch would pass distutils' up-to-date test
        # without ninja (torch forces a rebuild only with it) and get this build's record
        self.force = True
        super().run()

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as error:   # torch's traceback alone names no way out
            cuda = " (for the CUDA kernels: FORCE_CPU=1 builds the CPU ones alone)" if "nvcc" in str(
                ext.extra_compile_args) else ""
            raise RuntimeError(
                f"mackay_ext: building its C++ kernels failed ({type(error).__name__}: {error}). They need a "
                f"C++20 compiler (g++ 10+ or clang++ on the PATH, or CXX=...){cuda}; MACKAY_EXT_NO_KERNELS=1 "
                "installs the package without them, the pure-PyTorch fallback alone (backend='torch', "
                "slower)") from error
        path = self.get_ext_fullpath(ext.name)
        if platform.system() == "Linux":
            problem = _load_build_checks().static_cxx_runtime_problem(path, os.environ.get("CXX", "c++"))
            if problem:
                os.remove(path)
                raise RuntimeError(problem)
        write_build_info(path, getattr(ext, "cpu_features", ()))

    def copy_extensions_to_source(self):
        """An editable install: the library is built in build/ and copied into the source
        package, and its record goes with it."""
        super().copy_extensions_to_source()
        for ext in self.extensions:
            write_build_info(os.path.join(ROOT, "mackay_ext", "_C"), getattr(ext, "cpu_features", ()))


setup(
    name="mackay_ext",
    version="0.1.0",
    description="MacKay evidence-framework (ARD) compression for PyTorch, with fused C++/CUDA kernels",
    packages=find_packages(include=["mackay_ext", "mackay_ext.*"]),
    ext_modules=[] if _env_flag("MACKAY_EXT_NO_KERNELS") or torch is None else [make_extension()],
    cmdclass={"build_ext": BuildAndCheck},
    python_requires=">=3.10",
    # tqdm: progress bars on a terminal; matplotlib: the plots every run writes
    install_requires=["torch>=2.4", "numpy", "scikit-learn", "tqdm", "matplotlib"],
    entry_points={"console_scripts": ["mackay-ext=mackay_ext.cli:main"]},
    zip_safe=False,
)
