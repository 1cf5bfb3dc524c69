"""The engine boundary: what UserCouch needs from a CouchDB-compatible server.

An engine knows its own files, command line and readiness signal; UserCouch knows none of
them. Adding a server means one module implementing :class:`Engine` and a registry line.
"""

from __future__ import annotations

import abc
import contextlib
import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..config import Options
from ..layout import Paths

# Variables a parent may have that would change how a server starts or where it writes.
SCRUBBED_ENV = (
    "ERL_FLAGS", "ERL_AFLAGS", "ERL_ZFLAGS", "ERL_LIBS", "COUCHDB_INI_FILES", "COUCHDB_ARGS_FILE",
    "COUCHDB_FAUXTON_DOCROOT", "COUCHDB_QUERY_SERVER_JAVASCRIPT", "NODE_OPTIONS", "NODE_PATH",
    "PORT", "USERCOUCH_ENV", "COUCHDB_URL",
    # Node's switch that turns off certificate checks would override config['replicator'].
    "NODE_TLS_REJECT_UNAUTHORIZED",
)


def child_environ(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment minus anything that could steer the server, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED_ENV}
    env.update(extra or {})
    return env


@dataclass
class Launch:
    """One start of a server: how to spawn it and the engine's notes for waiting on it."""

    command: list[str]
    env: dict[str, str]
    cwd: str
    pass_fds: tuple[int, ...] = ()
    #: This side's fds that wait_ready() consumes and closes (e.g. a ready pipe's read end).
    parent_fds: tuple[int, ...] = ()
    state: dict[str, Any] = field(default_factory=dict)

    def close_child_fds(self) -> None:
        """Close this side's copy of fds handed to the child (after spawn or on failure)."""
        for fd in self.pass_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.pass_fds = ()

    def abandon(self) -> None:
        """Close every fd of a launch whose spawn failed: wait_ready() will never run."""
        self.close_child_fds()
        for fd in self.parent_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.parent_fds = ()


@dataclass(frozen=True)
class Ready:
    """What a started server reported: its port(s) and version."""

    port: int
    https_port: int | None = None
    version: str | None = None


class Engine(abc.ABC):
    """A CouchDB-compatible server usercouch can start privately in a basedir."""

    name: ClassVar[str]
    #: Seconds to wait after SIGTERM before SIGKILL in kill().
    term_grace: ClassVar[float] = 1.0

    @property
    @abc.abstractmethod
    def version(self) -> str | None:
        """The version known before start (None if only the running server can tell)."""

    def check_extra(self, extra: str) -> None:
        """Raise ConfigError if ``extra`` config text is unusable for this engine."""
        return None

    def check_options(self, options: Options, paths: Paths) -> None:
        """Raise ConfigError for options (or basedir paths) this engine cannot honour.

        Called before anything is written into the basedir.
        """
        return None

    @abc.abstractmethod
    def prepare(
        self, paths: Paths, options: Options, uuid: str, port: int, https_port: int = 0
    ) -> Launch:
        """Write this engine's config files into the basedir and say how to start it.

        ``port`` 0 means any free port; otherwise the port to bind again (a restart).
        ``https_port`` likewise, for the HTTPS listener when ``options.ssl`` is set.
        """

    @abc.abstractmethod
    def wait_ready(
        self, proc: subprocess.Popen[bytes], launch: Launch, options: Options, deadline: float
    ) -> Ready | None:
        """Block until the server answers; None if it exited or the deadline passed."""

    def describe(self) -> str:
        """One line for humans: which engine, where, which version."""
        return f"{self.name} {self.version or '(version unknown)'}"

