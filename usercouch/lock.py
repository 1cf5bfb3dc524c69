"""The exclusive flock on ``basedir/lockfile`` that makes a basedir one couch's alone."""

from __future__ import annotations

import contextlib
import fcntl
import os

from .errors import LockError


def acquire(lockfile: str) -> int:
    """Open and flock ``lockfile`` without blocking; return the fd that holds the lock.

    The lock lives as long as the fd: closing it (or the process dying) releases it, so a
    crashed owner never leaves a basedir locked.
    """
    fd = os.open(lockfile, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise LockError(lockfile) from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def release(fd: int) -> None:
    """Release the lock held by ``fd`` (closing the fd is what releases it)."""
    with contextlib.suppress(OSError):
        os.close(fd)
