"""Child-process plumbing: spawn a server that dies with us, wait for it, stop it.

Every server is forked from one long-lived thread. Linux's parent-death signal
(PR_SET_PDEATHSIG) fires when the *thread* that forked the child exits, so forking from a
short-lived thread (a test runner's worker, a thread pool) would kill the server early.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import queue
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")

POLL_INTERVAL = 0.005  # seconds between polls of a condition (the rule is <= 10 ms)
_PR_SET_PDEATHSIG = 1


def _load_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        prctl: Callable[..., int] = libc.prctl
        return prctl
    except (OSError, AttributeError):
        return None


_prctl = _load_prctl()


def _die_with_parent(parent_pid: int) -> Callable[[], None]:
    """A preexec_fn: ask the kernel to SIGKILL the child when its forking thread dies."""

    def preexec() -> None:
        if _prctl is not None:
            _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


class _SpawnThread:
    """One daemon thread that lives as long as the interpreter and runs every fork."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = (
            queue.SimpleQueue()
        )
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._start_lock = threading.Lock()

    def _ensure_thread(self) -> None:
        with self._start_lock:
            # After os.fork() the child has the object but not the thread: start a new one.
            if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
                self._jobs = queue.SimpleQueue()
                self._thread = threading.Thread(
                    target=self._run, args=(self._jobs,), name="usercouch-spawn", daemon=True
                )
                self._pid = os.getpid()
                self._thread.start()

    @staticmethod
    def _run(jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]]) -> None:
        while True:
            fn, future = jobs.get()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as exc:  # handed to the caller, not swallowed
                    future.set_exception(exc)

    def call(self, fn: Callable[[], T]) -> T:
        self._ensure_thread()
        if threading.current_thread() is self._thread:
            return fn()
        future: Future[T] = Future()
        self._jobs.put((fn, future))
        return future.result()


_spawner = _SpawnThread()


def spawn(
    command: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: str,
    log_path: str,
    pass_fds: Sequence[int] = (),
) -> subprocess.Popen[bytes]:
    """Start ``command`` in its own process group, output appended to ``log_path``.

    The child gets umask 077 (so the server creates private files), no stdin, and is killed
    by the kernel if this process dies.
    """
    parent_pid = os.getpid()
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        return _spawner.call(
            lambda: subprocess.Popen(
                list(command),
                env=dict(env),
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=fd,
                stderr=fd,
                start_new_session=True,
                umask=0o077,
                close_fds=True,
                pass_fds=tuple(pass_fds),
                preexec_fn=_die_with_parent(parent_pid),
            )
        )
    finally:
        os.close(fd)


def stop(proc: subprocess.Popen[bytes], grace: float) -> bool:
    """Stop the child's whole process group: SIGTERM, then SIGKILL after ``grace`` seconds.

    Returns True if the child was still running when called.
    """
    was_running = proc.poll() is None
    _signal_group(proc, signal.SIGTERM if grace > 0 else signal.SIGKILL)
    if grace > 0:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
    # Whatever is left of the group (the leader, or helpers it spawned) gets SIGKILL.
    _signal_group(proc, signal.SIGKILL)
    proc.wait()
    return was_running


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def wait_for(
    condition: Callable[[], T | None],
    proc: subprocess.Popen[bytes],
    deadline: float,
) -> T | None:
    """Poll ``condition`` every few ms until it returns a value, the child exits or time runs out.

    Returns the value, or None if the child exited or the deadline passed (check
    ``proc.poll()`` to tell which).
    """
    while True:
        value = condition()
        if value is not None:
            return value
        if proc.poll() is not None or time.monotonic() >= deadline:
            return None
        time.sleep(POLL_INTERVAL)


def read_line(fd: int, deadline: float) -> bytes | None:
    """Read one newline-terminated line from a pipe, waiting for it as an event.

    Returns the line, b'' if the writer closed the pipe first (the child exited), or None
    when the deadline passed.
    """
    buf = b""
    while b"\n" not in buf:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            return b""
        buf += chunk
    return buf.split(b"\n", 1)[0]
