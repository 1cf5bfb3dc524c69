"""UserCouch: one private CouchDB-compatible server per basedir, for the life of an object.

This module orchestrates: the lock, the options, the engine's files and process, and the
env handed to callers. It owns no file format and no engine detail.
"""

from __future__ import annotations

import contextlib
import copy
import http.client
import math
import os
import subprocess
import threading
import time
import weakref
from collections.abc import Callable
from types import TracebackType
from typing import Any

from . import layout, lock, process
from .config import Options, build_env, build_options
from .engines import Engine, Ready, get_engine
from .errors import StartError, StateError
from .http import request

DEFAULT_TIMEOUT = 30.0


def check_timeout(timeout: object) -> float:
    """``timeout`` as seconds, or ValueError naming it: it must be positive and finite."""
    if (
        not isinstance(timeout, (int, float))
        or isinstance(timeout, bool)
        or not 0 < timeout < math.inf  # also refuses NaN: a start must never hang
    ):
        raise ValueError(f"timeout must be a positive, finite number of seconds; got {timeout!r}")
    return float(timeout)


class _Resources:
    """What must be released when a UserCouch goes away: the server and the lock.

    Held by ``weakref.finalize`` and holding nothing of the UserCouch, so garbage
    collection, the with-block, close() and interpreter exit all end in the same place.
    """

    def __init__(self, lock_fd: int, grace: float) -> None:
        self.owner_pid = os.getpid()
        self.lock_fd: int | None = lock_fd
        self.proc: subprocess.Popen[bytes] | None = None
        self.grace = grace
        self.after_close: list[Callable[[], object]] = []

    def stop_server(self, grace: float | None = None) -> bool:
        proc, self.proc = self.proc, None
        if proc is None:
            return False
        return process.stop(proc, self.grace if grace is None else grace)

    def close(self) -> None:
        if os.getpid() != self.owner_pid:
            # A forked child inherited this object: the server and lock are the parent's.
            return
        try:
            self.stop_server()
        finally:
            if self.lock_fd is not None:
                lock.release(self.lock_fd)
                self.lock_fd = None
            while self.after_close:
                with contextlib.suppress(Exception):
                    self.after_close.pop()()


def _release(resources: _Resources) -> None:
    with contextlib.suppress(Exception):
        resources.close()


class UserCouch:
    """A private CouchDB-compatible server living in ``basedir``.

    The basedir must exist; it is locked (``basedir/lockfile``) for this object's life.
    ``engine`` is None (auto-detect, or ``USERCOUCH_ENGINE``), an engine name such as
    ``'pouchdb'`` or ``'couchdb'``, or an engine object. ``timeout`` bounds each start.
    """

    def __init__(
        self,
        basedir: Any,
        engine: str | Engine | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.basedir = layout.check_basedir(basedir)
        self.timeout = check_timeout(timeout)
        self.paths = layout.Paths(self.basedir)
        self.lockfile = self.paths.lockfile
        self.engine = get_engine(engine)
        self._resources = _Resources(lock.acquire(self.lockfile), self.engine.term_grace)
        self._finalizer = weakref.finalize(self, _release, self._resources)
        self._mutex = threading.RLock()
        self._options: Options | None = None
        self._uuid: str | None = None
        self._ready: Ready | None = None  # the last start's report; a restart binds its ports
        self.env: dict[str, Any] | None = None

    # -- life cycle -----------------------------------------------------------------------

    def bootstrap(
        self, auth: str = "basic", config: dict[str, Any] | None = None, extra: str | None = None
    ) -> dict[str, Any]:
        """Write the server's config, start it and return its env (once per instance).

        Bad arguments raise before anything is written or started.
        """
        with self._mutex:
            self._check_open()
            if self._options is not None:
                raise StateError(f"UserCouch({self.basedir!r}) is already bootstrapped")
            options = build_options(auth, config, extra)
            if options.extra is not None:
                self.engine.check_extra(options.extra)
            self.engine.check_options(options, self.paths)
            layout.make_private_dirs(self.paths)
            self._uuid = layout.stable_uuid(self.paths, options.uuid)
            self._options = options
            try:
                ready = self._start()
            except BaseException:
                self._options = None
                raise
            self.env = build_env(options, ready.port, ready.https_port)
            return copy.deepcopy(self.env)

    def start(self) -> bool:
        """Start the server again after kill() (same port, same credentials).

        Returns False if it was already running.
        """
        with self._mutex:
            self._check_bootstrapped()
            if self._resources.proc is not None and self._resources.proc.poll() is None:
                return False
            self._start()
            return True

    def kill(self) -> bool:
        """Stop the server (SIGTERM, then SIGKILL after a short grace); True if it was running."""
        with self._mutex:
            return self._resources.stop_server()

    def crash(self) -> bool:
        """SIGKILL the server with no grace, as a crash would (for tests of recovery)."""
        with self._mutex:
            return self._resources.stop_server(grace=0)

    def isalive(self) -> bool:
        """True if the server process runs and answers an authenticated request."""
        with self._mutex:
            proc = self._resources.proc
            if self.env is None or proc is None or proc.poll() is not None:
                return False
            try:
                # Any HTTP answer means alive: CouchDB 3.4+ may answer 403 to a locked-out user.
                return request(self.env, "GET", "/", timeout=2.0).status < 500
            except (OSError, http.client.HTTPException):  # refused, reset, or a torn answer
                return False

    def check(self) -> bool:
        """Restart the server if it is dead (same port and credentials); True if it restarted."""
        with self._mutex:
            self._check_bootstrapped()
            if self.isalive():
                return False
            self._resources.stop_server(grace=0)
            self._start()
            return True

    def close(self) -> None:
        """Stop the server and release the basedir's lock (idempotent)."""
        self._finalizer()

    def _after_close(self, action: Callable[[], object]) -> None:
        """Run ``action`` once, after the server is stopped and the lock released.

        For subclasses that own more than the basedir's contents (TempCouch removes the
        basedir itself); like the rest of the cleanup it runs only in the creating process.
        """
        self._resources.after_close.append(action)

    def __enter__(self) -> UserCouch:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"UserCouch({self.basedir!r}, engine={self.engine.name!r})"

    # -- facts ----------------------------------------------------------------------------

    @property
    def version(self) -> str | None:
        """The server's version: as reported by the running server, else as installed."""
        if self._ready is not None and self._ready.version:
            return self._ready.version
        return self.engine.version

    @property
    def pid(self) -> int | None:
        """The server process's PID while it runs."""
        proc = self._resources.proc
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def logfile(self) -> str:
        return self.paths.logfile

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the server's log, for error reports."""
        return layout.tail(self.paths.logfile, lines)

    # -- internals ------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._resources.lock_fd is None:
            raise StateError(f"UserCouch({self.basedir!r}) is closed")

    def _check_bootstrapped(self) -> None:
        self._check_open()
        if self._options is None:
            raise StateError(f"UserCouch({self.basedir!r}) is not bootstrapped yet")

    def _start(self) -> Ready:
        assert self._options is not None and self._uuid is not None
        layout.rotate_log(self.paths)
        last = self._ready
        port = last.port if last is not None else 0
        https_port = (last.https_port or 0) if last is not None else 0
        launch = self.engine.prepare(self.paths, self._options, self._uuid, port, https_port)
        try:
            proc = process.spawn(
                launch.command,
                env=launch.env,
                cwd=launch.cwd,
                log_path=self.paths.logfile,
                pass_fds=launch.pass_fds,
            )
        except OSError as exc:  # e.g. the engine's executable is gone since detection
            launch.abandon()
            raise StartError(
                f"{self.engine.name}: cannot run the server: {exc}",
                command=launch.command,
                returncode=None,
                log_tail=self.log_tail(),
                started=False,
            ) from exc
        finally:
            launch.close_child_fds()
        self._resources.proc = proc
        deadline = time.monotonic() + self.timeout
        try:
            ready = self.engine.wait_ready(proc, launch, self._options, deadline)
        except BaseException:
            self._resources.stop_server(grace=0)
            raise
        if ready is None:
            returncode = proc.poll()
            if returncode is None and time.monotonic() < deadline:
                # wait_ready gave up early because the child is going: its pipes close a
                # moment before it can be reaped, so collect the status instead of guessing.
                with contextlib.suppress(subprocess.TimeoutExpired):
                    returncode = proc.wait(max(0.0, min(2.0, deadline - time.monotonic())))
            reason = (
                "server exited during start"
                if returncode is not None
                else f"server not ready after {self.timeout:g} s; usercouch stopped it"
            )
            self._resources.stop_server(grace=0)
            returncode = proc.returncode
            raise StartError(
                f"{self.engine.name}: {reason}",
                command=launch.command,
                returncode=returncode,
                log_tail=self.log_tail(),
            )
        self._ready = ready
        return ready
