"""The exceptions usercouch raises, in one place so callers can catch them by kind."""

from __future__ import annotations

from collections.abc import Sequence


class UserCouchError(Exception):
    """Base class for every error usercouch raises on its own account."""


class LockError(UserCouchError):
    """Another UserCouch (in this or another process) holds the basedir's lock."""

    def __init__(self, lockfile: str) -> None:
        self.lockfile = lockfile
        # The documented message, quoted as written even if the path holds a quote.
        super().__init__(f"cannot acquire exclusive lock on '{lockfile}'")


class ConfigError(UserCouchError, ValueError):
    """A bootstrap argument or config value was refused before anything was written."""


class EngineNotFound(UserCouchError):
    """No usable server engine was found; the message says where we looked and how to get one."""


class StateError(UserCouchError):
    """An operation was called at the wrong point of an instance's life (e.g. bootstrap twice)."""


class StartError(UserCouchError):
    """The server exited or did not become ready; carries what is needed to see why."""

    def __init__(
        self,
        reason: str,
        *,
        command: Sequence[str],
        returncode: int | None,
        log_tail: str,
        started: bool = True,
    ) -> None:
        self.reason = reason
        self.command = list(command)
        self.returncode = returncode
        self.log_tail = log_tail
        if not started:  # the command could not even be run
            status = "never started"
        elif returncode is None:
            status = "still running"
        elif returncode < 0:
            status = f"killed by signal {-returncode}"
        else:
            status = f"exit status {returncode}"
        message = f"{reason} ({status})\ncommand: {' '.join(self.command)}"
        if log_tail:
            message += f"\nlast lines of the server log:\n{log_tail}"
        super().__init__(message)
