"""One `mackay-ext prune` at a time per --out folder. Two runs there wrote the same
checkpoint.pt.tmp: one died with a raw FileNotFoundError, and the other's results mixed with it.
The lock is a file holding the owner's process id; one left by a run that no longer exists (a
kill -9) is taken over."""
from __future__ import annotations

import contextlib
import os

LOCK_NAME = ".mackay-ext.lock"


class OutInUse(RuntimeError):
    pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # someone else's process: alive
        return True
    return True


@contextlib.contextmanager
def out_lock(out: str):
    """Hold `out` for this process while the block runs; OutInUse names the run that holds it."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, LOCK_NAME)
    for _ in range(2):   # a second try after clearing a stale lock
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            try:
                with open(path) as handle:
                    owner = int(handle.read().strip() or 0)
            except (OSError, ValueError):
                owner = 0
            if owner and owner != os.getpid() and _alive(owner):
                raise OutInUse(f"another mackay-ext prune (process {owner}) is writing into {out}; give this "
                               f"run another --out, or wait for that one (remove {path} if it is not running)")
            with contextlib.suppress(OSError):
                os.remove(path)
    else:
        raise OutInUse(f"cannot take the lock {path} of --out {out}")
    with os.fdopen(fd, "w") as handle:
        handle.write(str(os.getpid()))
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.remove(path)
