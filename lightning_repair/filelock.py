"""An exclusive lock on a file, between processes on one machine or on a shared filesystem."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def locked(path: str | Path) -> Iterator[None]:
    """Hold an exclusive POSIX record lock (``fcntl.lockf``) on ``path``, created if absent, waiting for it if another
    process holds it. POSIX locks work over NFS (through its lock manager), which ``flock`` does not everywhere; the
    kernel releases the lock when the process ends, killed or not, so a dead holder never blocks the others. One
    process must not take the same lock twice at once (POSIX locks are per process, so the inner one would not wait).
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
