"""Apache CouchDB 3.x: find an install, run it privately in a basedir, know when it is up.

The text CouchDB is handed (session.ini, vm.args, argv, environment) is built by the pure
functions of :mod:`.couchdb_config`; this module adds the file system and the process.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .. import process
from ..config import Credentials, Options, build_env, random_hex
from ..errors import ConfigError, EngineNotFound, StartError
from ..http import Response, request
from ..layout import Paths, tail, write_private
from . import couchdb_config as cfg
from .base import Engine, Launch, Ready, child_environ

OPT_ROOT = "/opt/couchdb"
SNAP_ROOT = "/snap/couchdb/current/opt/couchdb"
#: Where Homebrew usually lives (Apple silicon, Intel macOS, Linux), besides ``brew --prefix``.
HOMEBREW_PREFIXES = ("/opt/homebrew", "/usr/local", "/home/linuxbrew/.linuxbrew")
INSTALL_HINT = (
    "Install Apache CouchDB 3.x (https://docs.couchdb.org/en/stable/install/) and point "
    "usercouch at it with COUCHDB_HOME=/path/to/couchdb (the folder holding bin/couchdb and "
    "etc/default.ini), or use the PouchDB Server engine: python -m usercouch install pouchdb"
)

_LIB_RE = re.compile(r"couch-(\d+\.\d+(?:\.\d+)?(?:[-+.][0-9A-Za-z.+-]*)?)\Z")
_SERVER_RE = re.compile(r"CouchDB/(\S+)")
_PROBE_TIMEOUT = 2.0


# -- finding an install ---------------------------------------------------------------------


class Unusable(Exception):
    """A candidate install root that cannot be used; the message says why."""


@dataclass(frozen=True)
class Install:
    """A usable CouchDB install: its root, version (if the tree names it), how it was found."""

    root: str
    version: str | None
    found_by: str

    @property
    def executable(self) -> str:
        return os.path.join(self.root, "bin", "couchdb")

    @property
    def default_ini(self) -> str:
        return os.path.join(self.root, "etc", "default.ini")


def install_version(root: str) -> str | None:
    """The version an install's tree names: ``lib/couch-<vsn>``, else start_erl.data's."""
    found: list[tuple[tuple[int, int, int], str]] = []
    try:
        names = os.listdir(os.path.join(root, "lib"))
    except OSError:
        names = []
    for name in names:
        match = _LIB_RE.match(name)
        parsed = cfg.parse_version(match.group(1)) if match else None
        if match and parsed:
            found.append((parsed, match.group(1)))
    if found:
        return max(found)[1]
    try:
        with open(os.path.join(root, "releases", "start_erl.data"), encoding="utf-8") as f:
            fields = f.read().split()
    except (OSError, UnicodeDecodeError):
        return None
    if len(fields) == 2 and cfg.parse_version(fields[1]):
        return fields[1]
    return None


def inspect_root(root: str) -> str | None:
    """Check that ``root`` is a usable CouchDB 3.x install; return its version or raise Unusable."""
    if not os.path.exists(root):
        raise Unusable("does not exist")
    if not os.path.isdir(root):
        raise Unusable("is not a directory")
    exe = os.path.join(root, "bin", "couchdb")
    if not os.path.isfile(exe):
        raise Unusable("has no bin/couchdb")
    if not os.access(exe, os.X_OK):
        raise Unusable("bin/couchdb is not executable")
    ini = os.path.join(root, "etc", "default.ini")
    try:
        with open(ini, "rb"):
            pass
    except PermissionError:
        raise Unusable(permission_hint(ini)) from None
    except OSError as exc:
        raise Unusable(f"etc/default.ini is unreadable ({exc.strerror or exc})") from None
    version = install_version(root)
    try:
        cfg.check_version(version)
    except ConfigError as exc:
        raise Unusable(str(exc)) from None
    return version


def permission_hint(ini: str) -> str:
    """Why ``ini`` cannot be read, and the fix (the .deb package makes it 0640 couchdb).

    CouchDB reads etc/default.ini as the user running it, so usercouch cannot work around
    this: the owner of the machine has to grant read access once.
    """
    group = "couchdb"
    with contextlib.suppress(OSError, KeyError, ImportError):
        import grp

        group = grp.getgrgid(os.stat(ini).st_gid).gr_name
    return (
        "etc/default.ini is not readable by this user (the Debian and Ubuntu packages make "
        f"it readable to the '{group}' group only). Join that group (sudo usermod -aG {group} "
        f"$USER, then log in again) or make the file readable (sudo chmod o+r {ini})"
    )


def roots_of_executable(path: str) -> list[str]:
    """Install roots a ``couchdb`` found on PATH may belong to, the real file's root first.

    bin/couchdb finds its release relative to its own path (``$0``), so the root that
    holds the real script is the one to run; the roots of symlinks on the way come next.
    """
    roots = [os.path.dirname(os.path.dirname(os.path.realpath(path)))]
    current = os.path.abspath(path)
    for _ in range(40):  # a symlink loop ends here
        root = os.path.dirname(os.path.dirname(current))
        if root not in roots:
            roots.append(root)
        if not os.path.islink(current):
            break
        target = os.readlink(current)
        current = os.path.normpath(os.path.join(os.path.dirname(current), target))
    return roots


_brew_prefixes: dict[str, str | None] = {}


def run_brew_prefix(environ: Mapping[str, str]) -> str | None:
    """``brew --prefix`` if brew is on PATH (None if absent, failing or slow).

    Remembered per brew executable: auto-detection may ask at every UserCouch().
    """
    brew = shutil.which("brew", path=environ.get("PATH", os.defpath))
    if brew is None:
        return None
    if brew not in _brew_prefixes:
        _brew_prefixes[brew] = _ask_brew(brew)
    return _brew_prefixes[brew]


def _ask_brew(brew: str) -> str | None:
    try:
        result = subprocess.run(
            [brew, "--prefix"], capture_output=True, text=True, timeout=10, check=False,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    prefix = result.stdout.strip()
    return prefix if result.returncode == 0 and prefix else None


def homebrew_roots(
    environ: Mapping[str, str],
    prefixes: Sequence[str],
    brew_prefix: Callable[[Mapping[str, str]], str | None],
) -> Iterator[str]:
    """``<prefix>/opt/couchdb`` for $HOMEBREW_PREFIX, the usual prefixes, then ``brew --prefix``.

    Lazy: brew runs only if nothing before it was usable.
    """
    seen: set[str] = set()
    known = [environ.get("HOMEBREW_PREFIX", ""), *prefixes]
    for prefix in known:
        if prefix and prefix not in seen:
            seen.add(prefix)
            yield os.path.join(prefix, "opt", "couchdb")
    found = brew_prefix(environ)
    if found and found not in seen:
        yield os.path.join(found, "opt", "couchdb")


def locate(
    home: str | None,
    environ: Mapping[str, str],
    *,
    opt_root: str = OPT_ROOT,
    homebrew_prefixes: Sequence[str] = HOMEBREW_PREFIXES,
    brew_prefix: Callable[[Mapping[str, str]], str | None] = run_brew_prefix,
    snap_root: str = SNAP_ROOT,
) -> Install:
    """Find a usable CouchDB 3.x install, or raise EngineNotFound naming every place tried.

    Order: ``home``, ``$COUCHDB_HOME``, ``couchdb`` on ``$PATH``, ``/opt/couchdb``,
    Homebrew's ``opt/couchdb``, the snap. An explicit ``home`` or ``$COUCHDB_HOME`` is a
    choice, not a hint: if it is unusable, nothing else is tried.
    """
    looked: list[str] = []

    def fail() -> EngineNotFound:
        return EngineNotFound(
            "Apache CouchDB 3.x not found. Looked at:\n  - "
            + "\n  - ".join(looked)
            + "\n"
            + INSTALL_HINT
        )

    chosen_by = (("CouchDB(home=...)", home), ("$COUCHDB_HOME", environ.get("COUCHDB_HOME")))
    for label, chosen in chosen_by:
        if chosen:
            root = os.path.abspath(os.path.expanduser(chosen))
            try:
                return Install(root, inspect_root(root), f"{label} = {chosen}")
            except Unusable as exc:
                looked.append(f"{label} = {chosen}: {root} {exc}")
                raise fail() from None
        looked.append(f"{label}: not set")

    exe = shutil.which("couchdb", path=environ.get("PATH", os.defpath))
    if exe is None:
        looked.append("couchdb on $PATH: none")
    else:
        problems = []
        for root in roots_of_executable(exe):
            try:
                return Install(root, inspect_root(root), f"couchdb on $PATH ({exe})")
            except Unusable as exc:
                problems.append(f"{root} {exc}")
        looked.append(f"couchdb on $PATH ({exe}): {'; '.join(problems)}")

    def fixed() -> Iterator[tuple[str, str]]:
        yield opt_root, opt_root
        for root in homebrew_roots(environ, homebrew_prefixes, brew_prefix):
            yield root, f"Homebrew {root}"
        yield snap_root, f"snap {snap_root}"

    for root, label in fixed():
        try:
            return Install(root, inspect_root(root), label)
        except Unusable as exc:
            looked.append(f"{label}: {exc}")
    raise fail()


# -- the engine -----------------------------------------------------------------------------


def previous_secret(session_ini: str) -> str | None:
    """The [chttpd_auth] secret of an earlier session.ini, so cookies survive restarts."""
    try:
        with open(session_ini, encoding="utf-8") as f:
            text = f.read()
        entries = cfg.parse_ini(text, "session.ini")
    except (OSError, UnicodeDecodeError, ConfigError):
        return None
    for entry in entries:
        if (entry.section, entry.key) == ("chttpd_auth", "secret"):
            return entry.value if re.fullmatch(r"[0-9a-f]{32}", entry.value) else None
    return None


def server_version(response: Response) -> str | None:
    """The version a CouchDB answer names: ``GET /``'s "version", else the Server header."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("version"), str):
        return str(body["version"])
    match = _SERVER_RE.search(response.headers.get("server", ""))
    return match.group(1) if match else None


class CouchDB(Engine):
    """Apache CouchDB 3.x, from the install found by :func:`locate`."""

    name = "couchdb"
    # SIGTERM makes CouchDB shut down cleanly in 1-2.6 s. It only acknowledges writes once
    # they are fsynced to its append-only files, so SIGKILL at once loses nothing.
    term_grace = 0.0

    def __init__(self, home: str | None = None) -> None:
        self.install = locate(home, os.environ)
        self.home = self.install.root
        self._hashes: dict[str, tuple[Credentials, str]] = {}

    @property
    def version(self) -> str | None:
        return self.install.version

    def describe(self) -> str:
        return (
            f"couchdb {self.version or '(version unknown until started)'} in {self.home} "
            f"(found by {self.install.found_by})"
        )

    def check_extra(self, extra: str) -> None:
        cfg.check_extra(extra, self.version)

    def check_options(self, options: Options, paths: Paths) -> None:
        if options.extra:
            cfg.check_extra_admins(cfg.check_extra(options.extra, self.version), options)
        # A dry run of the pure ini builder refuses paths the ini cannot hold (a basedir
        # with a newline or ' ;') before bootstrap creates anything in the basedir.
        dummy_hash = None if options.credentials is None else "-pbkdf2-00,00,1"
        cfg.session_ini(
            paths, options, uuid="0" * 32, port=0, secret="dry-run", admin_hash=dummy_hash
        )

    def _admin_hash(self, paths: Paths, options: Options) -> str | None:
        """The admin's hash, made once per basedir and credentials (a restart reuses it)."""
        if options.credentials is None:
            return None
        cached = self._hashes.get(paths.basedir)
        if cached is not None and cached[0] == options.credentials:
            return cached[1]
        hashed = cfg.admin_hash(options.credentials, self.version, options.generated_password)
        self._hashes[paths.basedir] = (options.credentials, hashed)
        return hashed

    def prepare(
        self, paths: Paths, options: Options, uuid: str, port: int, https_port: int = 0
    ) -> Launch:
        session = paths.join(cfg.SESSION_INI)
        text = cfg.session_ini(
            paths,
            options,
            uuid=uuid,
            port=port,
            https_port=https_port,
            secret=previous_secret(session) or random_hex(),
            admin_hash=self._admin_hash(paths, options),
        )
        write_private(paths.join(cfg.VM_ARGS), cfg.VM_ARGS_TEXT)
        write_private(session, text)
        uri_file = paths.join(cfg.URI_FILE)
        # CouchDB leaves the file behind at exit: an old one would name an old port.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(uri_file)
        return Launch(
            command=cfg.command(self.home, paths),
            env=cfg.child_env(paths, options, child_environ()),
            cwd=paths.basedir,
            state={"uri_file": uri_file, "logfile": paths.logfile},
        )

    def wait_ready(
        self, proc: subprocess.Popen[bytes], launch: Launch, options: Options, deadline: float
    ) -> Ready | None:
        """Ready = the uri file names every listener, ``GET /`` answers 200 with our
        credentials, and ``_users`` and ``_replicator`` exist (they appear just after)."""
        listeners = 2 if options.ssl is not None else 1
        ports = process.wait_for(
            lambda: self._read_uri_file(launch, proc, listeners), proc, deadline
        )
        if ports is None:
            return None
        if "http" not in ports or (options.ssl is not None and "https" not in ports):
            raise self._error(launch, proc, f"the uri file names no expected listener: {ports}")
        probe = _Probe(build_env(options, ports["http"]), deadline)
        root = process.wait_for(probe.root, proc, deadline)
        if root is None:
            return self._not_ready(launch, proc, probe)
        version = server_version(root)
        try:
            cfg.check_version(version)
        except ConfigError as exc:
            raise self._error(launch, proc, str(exc)) from None
        if process.wait_for(probe.system_dbs, proc, deadline) is None:
            return self._not_ready(launch, proc, probe)
        return Ready(port=ports["http"], https_port=ports.get("https"), version=version)

    def _read_uri_file(
        self, launch: Launch, proc: subprocess.Popen[bytes], listeners: int
    ) -> dict[str, int] | None:
        try:
            with open(launch.state["uri_file"], encoding="utf-8") as f:
                text = f.read()
        except (FileNotFoundError, UnicodeDecodeError):
            return None
        try:
            return cfg.parse_uri_file(text, listeners)
        except ValueError as exc:
            raise self._error(launch, proc, f"unexpected uri file content: {exc}") from None

    def _error(self, launch: Launch, proc: subprocess.Popen[bytes], reason: str) -> StartError:
        return StartError(
            f"couchdb: {reason}",
            command=launch.command,
            returncode=proc.poll(),
            log_tail=tail(launch.state["logfile"]),
        )

    def _not_ready(
        self, launch: Launch, proc: subprocess.Popen[bytes], probe: _Probe
    ) -> Ready | None:
        """None (UserCouch reports exit or timeout), or a sharper error if the answers say why."""
        if proc.poll() is None and probe.last_status in (401, 403):
            raise self._error(
                launch,
                proc,
                f"not ready: GET {probe.last_path} kept answering {probe.last_status} to the "
                "admin's credentials (does extra change [admins] or require_valid_user?)",
            )
        return None


class _Probe:
    """Readiness requests against the new server; remembers the last answer for errors."""

    def __init__(self, env: dict[str, Any], deadline: float) -> None:
        self.env = env
        self.deadline = deadline
        self.last_status: int | None = None
        self.last_path = ""

    def get(self, path: str) -> Response | None:
        """The response if ``path`` answers 200, else None (not yet: keep polling)."""
        timeout = min(_PROBE_TIMEOUT, max(0.05, self.deadline - time.monotonic()))
        try:
            response = request(self.env, "GET", path, timeout=timeout)
        except (OSError, http.client.HTTPException):
            return None  # not listening yet, or reset while starting
        self.last_status, self.last_path = response.status, path
        return response if response.status == 200 else None

    def root(self) -> Response | None:
        return self.get("/")

    def system_dbs(self) -> bool | None:
        """True once both system databases exist (single_node creates them just after start)."""
        return True if self.get("/_users") and self.get("/_replicator") else None


__all__ = ["CouchDB", "Install", "install_version", "locate"]
