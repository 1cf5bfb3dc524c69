"""Small test utilities shared by the integration tests (no fixed sleeps: polls with deadlines)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator


def poll(condition: Callable[[], bool], timeout: float = 5.0, interval: float = 0.01) -> bool:
    """Re-check ``condition`` until it holds or ``timeout`` passes; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def _stat(pid: int | str) -> list[str]:
    """The fields of ``/proc/PID/stat`` after the command name: state, parent pid, group, ..."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        return f.read().rsplit(")", 1)[1].split()


def _live(state: str) -> bool:
    return state not in ("Z", "X")


def pid_exists(pid: int) -> bool:
    """True if ``pid`` is a live (non-zombie) process."""
    try:
        state = _stat(pid)[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return _live(state)


def pid_gone(pid: int, timeout: float = 5.0) -> bool:
    """Wait up to ``timeout`` for ``pid`` to exit."""
    return poll(lambda: not pid_exists(pid), timeout)


def _processes() -> Iterator[tuple[int, str, int, int]]:
    """(pid, state, parent pid, process group) of every process, from /proc."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = _stat(entry)
        except OSError:
            continue
        yield int(entry), fields[0], int(fields[1]), int(fields[2])


def children_of(pid: int | None = None) -> set[int]:
    """PIDs of the live direct children of ``pid`` (default: this process)."""
    parent = os.getpid() if pid is None else pid
    return {p for p, state, ppid, _ in _processes() if ppid == parent and _live(state)}


def group_members(pgid: int) -> set[int]:
    """Live processes whose process group is ``pgid`` (a server and anything it spawned)."""
    return {p for p, state, _, pgrp in _processes() if pgrp == pgid and _live(state)}


def zombie_children() -> set[int]:
    """Children of this process that exited but were never reaped (a leak too)."""
    me = os.getpid()
    return {p for p, state, ppid, _ in _processes() if ppid == me and state == "Z"}
