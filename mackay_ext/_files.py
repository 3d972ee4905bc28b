"""Files: atomic writes and safe reads, for every file this package writes or reads.

Every read goes through torch.load(weights_only=True): a file can hold tensors, numbers,
strings, None, lists, tuples and dicts, and nothing else, so a crafted file cannot run code when
it is loaded (a pickle's __reduce__ is never called). The package writes only those types.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import signal
import threading
import warnings
from collections.abc import Callable
from typing import Any, BinaryIO

import torch


class UnsafeFileError(RuntimeError):
    """A file that holds Python objects other than tensors and plain containers: refused
    unread (nothing in it was run)."""


class CorruptFileError(RuntimeError):
    """A file that is truncated, corrupt or not a torch file at all."""


@contextlib.contextmanager
def _ctrl_c_held():
    """Ctrl-C inside is held and raised as KeyboardInterrupt when the block ends: torch.save
    turns a KeyboardInterrupt raised inside its writer into "RuntimeError: [enforce fail at
    inline_container.cc] unexpected pos" (13 of 60 timed interrupts here), which a caller that
    handles Ctrl-C would report as a crash. Only Python's own SIGINT handler, in the main thread,
    is replaced."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    held = []
    signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if held:
        raise KeyboardInterrupt


def save_atomic(obj: Any, path: str) -> None:
    """torch.save to a temporary file, fsync, then rename: a crash never leaves half a file,
    and an interruption (a full disk) removes the temporary file. Ctrl-C waits for the write
    to end (_ctrl_c_held), then interrupts as usual."""
    write_atomic(path, lambda handle: torch.save(obj, handle))


def write_atomic(path: str, write: Callable[[BinaryIO], None]) -> None:
    """`write(handle)` into a temporary file, fsync, then rename onto `path` (see save_atomic)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a directory: give the name of a file to write")
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = path + ".tmp"
    if os.path.islink(tmp):   # not a file of ours: writing through it would overwrite its target
        os.unlink(tmp)
    try:
        with _ctrl_c_held():
            descriptor = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o666)
            with os.fdopen(descriptor, "wb") as handle:
                write(handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
    except BaseException as error:  # a full disk mid-write (or Ctrl-C before the rename): no .tmp left behind
        with contextlib.suppress(OSError):
            os.remove(tmp)
        # torch's zip writer reports a full disk as a RuntimeError of its own; other RuntimeErrors
        # (a tensor that cannot be saved) are not about the disk
        writer = isinstance(error, RuntimeError) and any(
            mark in str(error) for mark in ("inline_container", "PytorchStreamWriter", "file write failed"))
        if isinstance(error, OSError) or writer:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise OSError(f"could not write {path} ({reason}): is the disk full, or the folder not "
                          "writable? A file already there is unchanged") from error
        raise
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_map_location(map_location: Any, what: str) -> Any:
    """A device the tensors can be loaded onto here (a bad or unavailable one failed inside
    torch.load and read as a damaged file), or what torch.load takes besides (None, a dict or a
    function)."""
    if map_location is None or isinstance(map_location, dict) or callable(map_location):
        return map_location
    if not isinstance(map_location, (str, torch.device)):
        raise TypeError(f"{what}: map_location must be a device (a str or torch.device), a dict or a "
                        f"function, got {type(map_location).__name__} {map_location!r}")
    try:
        device = torch.device(map_location)
    except RuntimeError as error:
        raise ValueError(f"{what}: map_location {map_location!r} is not a device ({error})") from None
    if device.type == "meta":
        raise ValueError(f"{what}: map_location='meta' would drop the file's values; load onto 'cpu' "
                         "(a model built on the meta device takes them with load_state_dict(assign=True))")
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0 or (device.index is not None and device.index >= count):
            raise RuntimeError(f"{what}: map_location {map_location!r}: this torch sees {count} CUDA "
                               "device(s); load with map_location='cpu'")
    return map_location


def load_plain(path: str, what: str, map_location: Any = "cpu") -> Any:
    """torch.load(path, weights_only=True) with errors a user can act on. `what` names the file
    in messages ("checkpoint", "compressed model")."""
    if not isinstance(path, (str, os.PathLike)):   # os.path.exists(3) would test file descriptor 3
        raise TypeError(f"{what}: path must be a file name (str or os.PathLike), got {type(path).__name__}")
    map_location = check_map_location(map_location, what)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} {path}: no such file")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{what} {path} is a directory, not a file")
    if not os.path.isfile(path):   # a named pipe or a device would block or never end
        raise CorruptFileError(f"{what} {path} is not a regular file (a pipe, socket or device)")
    try:
        with warnings.catch_warnings():
            # a plain pickle (not a torch file) makes torch warn about its protocol before the
            # refusal below; the refusal says what matters
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            loaded = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's weights-only unpickler names the Python object it refused ("GLOBAL posix.system",
        # "Unsupported global"); anything else it stumbles on is a damaged file
        refused = [line.strip() for line in str(error).splitlines() if "global" in line.lower()]
        if refused:
            raise UnsafeFileError(
                f"{what} {path} was refused: it holds Python objects other than tensors, numbers, "
                "strings, lists and dicts, so it was not written by mackay_ext, or it was damaged "
                f"after (nothing in it was run; {refused[0]})") from None
        raise CorruptFileError(f"{what} {path} cannot be read: it is corrupt or truncated, or not a torch file"
                               ) from None
    except Exception as error:  # truncated zip, wrong magic number, bad storage ...
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        if isinstance(error, KeyError):   # torch's legacy reader on a first byte it does not know: "(101)"
            reason = "its first bytes are neither a zip archive's nor a pickle's"
        if "legacy .tar format" in reason:   # torch's text goes on to advise weights_only=False
            reason = "a tar archive: mackay_ext never writes one, and loading it unchecked could run code"
        raise CorruptFileError(f"{what} {path} cannot be read: it is corrupt or truncated, or not a "
                               f"torch file ({reason})") from None
    _check_no_overlapping_views(loaded, f"{what} {path}")
    return loaded


# A file of this package holds a few thousand entries (tensors, numbers, strings); pickle lets
# one container be referenced many times, so a 13 kB file of lists each holding the previous one
# twice unfolds into 2**60 entries for anything that walks it (the checks here, the digest).
MAX_ENTRIES = 10_000_000


def _check_no_overlapping_views(obj: Any, what: str) -> None:
    """The loaded structure is one a file of this package can hold. No tensor claims more
    elements than its storage holds: torch.save keeps views as they are, so a crafted file can
    hold zeros(1).expand(10**6, 10**6) in a few bytes, and the first copy of it (a checksum, a
    .long()) would try to allocate terabytes. No container holds itself, and the whole unfolds
    into at most MAX_ENTRIES entries (each container is counted once, with its size, so a
    crafted nest of shared references is found in the time of its distinct containers)."""
    sizes: dict[int, int] = {}   # id of a container walked -> entries it unfolds into
    open_ids: set[int] = set()   # containers being walked (one met again inside itself: a cycle)

    def walk(item: Any) -> int:
        if isinstance(item, torch.Tensor):
            claimed = item.numel() * item.element_size()
            if item.layout == torch.strided and claimed > item.untyped_storage().nbytes():
                raise CorruptFileError(
                    f"{what} holds a tensor of shape {tuple(item.shape)} ({claimed:,} bytes) over "
                    f"{item.untyped_storage().nbytes():,} bytes of storage: a view that repeats its data, "
                    "which no file of this package holds (a crafted file)")
            return 1
        if not isinstance(item, (dict, list, tuple)):
            return 1
        key = id(item)
        if key in sizes:
            return sizes[key]
        if key in open_ids:
            raise CorruptFileError(f"{what} holds a {type(item).__name__} that contains itself, which no "
                                   "file of this package holds (a crafted file)")
        open_ids.add(key)
        total = 1 + sum(walk(child) for child in (item.values() if isinstance(item, dict) else item))
        open_ids.discard(key)
        if total > MAX_ENTRIES:
            raise CorruptFileError(f"{what} unfolds into more than {MAX_ENTRIES:,} entries (its lists or dicts "
                                   "repeat each other), which no file of this package holds (a crafted file)")
        sizes[key] = total
        return total

    try:
        walk(obj)
    except RecursionError:
        raise CorruptFileError(f"{what} nests its lists or dicts too deeply for a file of this package "
                               "(a crafted file)") from None


# The globals a pickle of plain data and numpy arrays names (CIFAR's python batches: a dict of
# bytes, lists of ints and bytes, one uint8 array); numpy moved its core to numpy._core in 2.0.
# None of them runs code: each builds an array, a dtype or bytes from the data that follows.
_NUMPY_GLOBALS = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                  ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                  ("numpy._core.multiarray", "scalar"), ("numpy.core.numeric", "_frombuffer"),
                  ("numpy._core.numeric", "_frombuffer"),
                  ("_codecs", "encode")}   # how Python 3 writes bytes at protocols 0-2


class _DataUnpickler(pickle.Unpickler):
    """Builds dicts, lists, tuples, numbers, strings, bytes and numpy arrays, and refuses any
    other global before anything is called (a crafted pickle's __reduce__ never runs)."""

    def find_class(self, module: str, name: str):
        if (module, name) in _NUMPY_GLOBALS:
            return super().find_class(module, name)
        raise UnsafeFileError(f"the file names the Python global {module}.{name}: a data file holds "
                              "plain containers and numpy arrays only (nothing in it was run)")


def load_data_pickle(path: str, encoding: str = "bytes") -> Any:
    """A pickle of plain data (a dataset's python-pickle files, e.g. CIFAR's batches), read with
    an unpickler that builds containers, numbers, strings and numpy arrays and nothing else."""
    with open(path, "rb") as handle:
        try:
            return _DataUnpickler(handle, encoding=encoding).load()
        except UnsafeFileError as error:
            raise UnsafeFileError(f"{path} was refused: {error}") from None
