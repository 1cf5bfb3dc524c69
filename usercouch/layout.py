"""Where things live inside a basedir, and making those places private."""

from __future__ import annotations

import os
from dataclasses import dataclass

from .config import random_hex


@dataclass(frozen=True)
class Paths:
    """The files and folders of one basedir (all absolute)."""

    basedir: str

    def join(self, *parts: str) -> str:
        return os.path.join(self.basedir, *parts)

    @property
    def lockfile(self) -> str:
        return self.join("lockfile")

    @property
    def data(self) -> str:
        return self.join("data")

    @property
    def views(self) -> str:
        return self.join("views")

    @property
    def log_dir(self) -> str:
        return self.join("log")

    @property
    def logfile(self) -> str:
        return self.join("log", "couchdb.log")

    @property
    def uuid_file(self) -> str:
        return self.join("uuid")


def check_basedir(basedir: object) -> str:
    """Return ``basedir`` as an absolute path, or raise naming it if it is not a directory."""
    if not isinstance(basedir, (str, os.PathLike)):
        raise TypeError(f"basedir must be a str or os.PathLike; got {type(basedir).__name__}")
    if os.fsdecode(basedir) == "":
        # abspath('') is the working directory: an unset variable must not lock and fill it.
        raise ValueError("basedir is empty: name a directory ('.' for the current one)")
    path = os.path.abspath(os.fsdecode(basedir))
    if "\0" in path:
        raise ValueError(f"basedir contains a NUL character: {path!r}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"basedir does not exist: {path!r}")
    if not os.path.isdir(path):
        raise NotADirectoryError(f"basedir is not a directory: {path!r}")
    return path


def write_private(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically, readable by the owner only (0600)."""
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def make_private_dirs(paths: Paths) -> None:
    """Create data, views and log folders with mode 0700 (existing ones are tightened)."""
    for d in (paths.data, paths.views, paths.log_dir):
        os.makedirs(d, mode=0o700, exist_ok=True)
        os.chmod(d, 0o700)


def rotate_log(paths: Paths) -> None:
    """Keep the previous run's log as ``couchdb.log.previous``; start the new run empty."""
    if os.path.exists(paths.logfile):
        os.replace(paths.logfile, paths.logfile + ".previous")


def stable_uuid(paths: Paths, wanted: str | None) -> str:
    """The server uuid for this basedir: ``wanted`` if given, else the stored one, else new.

    Kept in the basedir so restarts and replication checkpoints see the same server.
    """
    if wanted is None:
        try:
            with open(paths.uuid_file, encoding="ascii") as f:
                stored = f.read().strip()
            if len(stored) == 32 and all(c in "0123456789abcdef" for c in stored):
                return stored
        except (OSError, UnicodeDecodeError):
            pass
        wanted = random_hex()
    write_private(paths.uuid_file, wanted + "\n")
    return wanted


def tail(path: str, lines: int = 30, max_bytes: int = 16384) -> str:
    """The last ``lines`` lines of a text file ('' if it is missing, or if ``lines`` <= 0)."""
    if lines <= 0:
        return ""  # a [-0:] slice would be the whole text
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except OSError:
        return ""
    text = data.decode("utf-8", "replace")
    return "\n".join(text.splitlines()[-lines:])
