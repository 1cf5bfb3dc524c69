"""Small test utilities shared by the integration tests (no fixed sleeps: polls with deadlines)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable


def poll(condition: Callable[[], bool], timeout: float = 5.0, interval: float = 0.01) -> bool:
    """Re-check ``condition`` until it holds or ``timeout`` passes; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def pid_exists(pid: int) -> bool:
    """True if ``pid`` is a live (non-zombie) process."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def pid_gone(pid: int, timeout: float = 5.0) -> bool:
    """Wait up to ``timeout`` for ``pid`` to exit."""
    return poll(lambda: not pid_exists(pid), timeout)


def children_of(pid: int | None = None) -> set[int]:
    """PIDs of the live direct children of ``pid`` (default: this process)."""
    parent = os.getpid() if pid is None else pid
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent and fields[0] not in ("Z", "X"):
            found.add(int(entry))
    return found
