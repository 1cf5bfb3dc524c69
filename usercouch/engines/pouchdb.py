"""PouchDB Server: the CouchDB-compatible engine that installs anywhere Node.js does.

usercouch runs it through its own small launcher (``pouchdb_server/launcher.js``) built on
the pinned npm packages, which adds what a private couch needs and the stock bin lacks.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from importlib import resources
from typing import Any

from .. import process
from ..config import Options, pbkdf2_hash, random_hex
from ..errors import ConfigError, EngineNotFound, UserCouchError
from ..layout import Paths, write_private
from .base import Engine, Launch, Ready, child_environ

CONFIG_NAME = "pouchdb-server.json"
# PouchDB Server checks passwords in pure JavaScript on every request, so the iteration
# count is PouchDB's own default. The random password has 120 bits: brute force is moot.
HASH_ITERATIONS = 10
_LOG_LEVELS = {
    "debug": "debug", "info": "info", "notice": "info", "warning": "warning",
    "error": "error", "critical": "error", "alert": "error", "emergency": "error",
    "none": "none",
}
_RUNTIME_FILES = ("package.json", "package-lock.json", ".npmrc")
_STAMP = ".usercouch-installed"
_PACKAGE_NAME = "usercouch-pouchdb-server"  # the "name" in the shipped package.json


def runtime_dir() -> str:
    """The folder inside the package holding the launcher and the pinned npm manifest."""
    return str(resources.files("usercouch.engines").joinpath("pouchdb_server"))


def default_home() -> str:
    """Where ``install`` puts PouchDB Server unless told otherwise (a per-user cache)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "usercouch", "pouchdb-server")


def _lock_digest() -> str:
    with open(os.path.join(runtime_dir(), "package-lock.json"), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _server_manifest(home: str) -> str:
    """The installed pouchdb-server's package.json: there if the install is, names its version."""
    return os.path.join(home, "node_modules", "pouchdb-server", "package.json")


def is_installed(home: str) -> bool:
    """True if ``home`` holds the exact pinned PouchDB Server this usercouch expects."""
    try:
        with open(os.path.join(home, _STAMP), encoding="ascii") as f:
            stamp = f.read().strip()
    except OSError:
        return False
    return stamp == _lock_digest() and os.path.isfile(_server_manifest(home))


def find_npm() -> str:
    npm = shutil.which("npm")
    if npm is None:
        raise EngineNotFound("npm not found on PATH: install Node.js (>= 14) with npm first")
    return npm


def _check_prefix(home: str) -> None:
    """Refuse a prefix holding anything but a usercouch install: we overwrite package.json
    and ``npm ci`` deletes node_modules, so a project directory named by mistake would be
    wrecked."""
    if not os.path.exists(home):
        return
    if not os.path.isdir(home):
        raise NotADirectoryError(f"install prefix is not a directory: {home!r}")
    if not os.listdir(home):
        return
    try:
        with open(os.path.join(home, "package.json"), encoding="utf-8") as f:
            name = json.load(f).get("name")
    except (OSError, ValueError, AttributeError):
        name = None
    if name != _PACKAGE_NAME:
        raise UserCouchError(
            f"install prefix {home!r} is not empty and holds no usercouch PouchDB Server "
            "(installing would replace its package.json and node_modules); "
            "choose a new or empty directory"
        )


def install(
    prefix: str | None = None,
    *,
    progress: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr),
) -> str:
    """Install the pinned PouchDB Server into ``prefix`` (default: the per-user cache).

    Idempotent: a prefix that already holds this exact lockfile's packages is left alone.
    A prefix holding anything but an earlier install is refused. Returns the prefix.
    """
    home = os.path.abspath(prefix or default_home())
    if is_installed(home):
        progress(f"PouchDB Server already installed in {home}")
        return home
    _check_prefix(home)
    npm = find_npm()
    with _install_lock(home):
        if is_installed(home):  # another process finished the same install meanwhile
            progress(f"PouchDB Server already installed in {home}")
            return home
        _run_npm_ci(npm, home, progress)
    progress(f"PouchDB Server installed in {home}")
    return home


@contextlib.contextmanager
def _install_lock(home: str) -> Iterator[None]:
    """Serialise installs into one prefix (two ``npm ci`` in one folder corrupt it).

    The lock file sits beside the prefix, so the prefix itself stays empty until npm runs.
    """
    os.makedirs(os.path.dirname(home), exist_ok=True)
    fd = os.open(home + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _run_npm_ci(npm: str, home: str, progress: Callable[[str], None]) -> None:
    os.makedirs(home, exist_ok=True)
    for name in _RUNTIME_FILES:
        shutil.copyfile(os.path.join(runtime_dir(), name), os.path.join(home, name))
    progress(f"installing PouchDB Server into {home} (npm ci) ...")
    result = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=home,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise UserCouchError(
            f"npm ci failed in {home} (exit status {result.returncode}):\n{result.stdout[-4000:]}"
        )
    with open(os.path.join(home, _STAMP), "w", encoding="ascii") as f:
        f.write(_lock_digest() + "\n")


# What express-pouchdb takes as an already-hashed admin (anything else it hashes itself,
# after the clear text has been on disk in the config file).
_ADMIN_HASH_RE = re.compile(r"-pbkdf2-[0-9a-f]+,[0-9a-f]+,[0-9]+\Z")


# Keys whose value usercouch owns: overriding them would move data or logs out of the
# basedir, bypass bind_address validation, or break the stable uuid (CouchDB refuses them too).
_MANAGED = {
    ("couchdb", "database_dir"): "the data lives in the basedir",
    ("couchdb", "uuid"): "use config['uuid']",
    ("httpd", "bind_address"): "use config['bind_address']",
    ("log", "file"): "the log lives in the basedir",
}


def _shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_extra(extra: str) -> dict[str, dict[str, Any]]:
    """Parse ``extra`` (a JSON object of config sections) or say what is wrong with it.

    Error messages never quote an admin's value: it may be a password.
    """
    try:
        parsed = json.loads(extra)
    except ValueError as exc:
        raise ConfigError(f"extra must be a JSON object for PouchDB Server: {exc}") from None
    example = '{"couch_httpd_auth": {"timeout": 3600}}'
    if not isinstance(parsed, dict):
        raise ConfigError(
            f"extra must be a JSON object of sections, e.g. {example}; got {_shorten(extra)}"
        )
    for section, values in parsed.items():
        if not isinstance(values, dict):
            shown = "a non-object" if section == "admins" else json.dumps(values)
            raise ConfigError(
                f"extra section {section!r} must be a JSON object, e.g. {example}; "
                f"got {_shorten(shown)}"
            )
    for section, key in _MANAGED:
        if key in parsed.get(section, {}):
            raise ConfigError(
                f"extra {section}.{key} is set by usercouch and cannot be overridden "
                f"({_MANAGED[section, key]})"
            )
    if "usercouch" in parsed:
        raise ConfigError("extra section 'usercouch' is reserved for usercouch's launcher")
    for name, value in parsed.get("admins", {}).items():
        if not isinstance(value, str) or not _ADMIN_HASH_RE.match(value):
            # Never echo the value: it is (or may be) a password.
            raise ConfigError(
                f"extra admins[{name!r}] is not a '-pbkdf2-<hex>,<hex salt>,<iterations>' "
                "hash: a clear-text password would be written into the basedir first. Use "
                "usercouch.config.pbkdf2_hash(password) to make one."
            )
    return parsed


def build_config(
    paths: Paths, options: Options, uuid: str, port: int, https_port: int = 0
) -> dict[str, Any]:
    """The launcher's config (express-pouchdb's config.json format plus a usercouch section)."""
    config: dict[str, Any] = {
        "couchdb": {
            "database_dir": paths.data,
            "uuid": uuid,
            "file_compression": options.file_compression,
        },
        "httpd": {"bind_address": options.bind_address, "port": port},
        "couch_httpd_auth": {
            "secret": random_hex(),
            "iterations": HASH_ITERATIONS,
            "require_valid_user": options.auth == "basic",
        },
        "log": {"file": paths.logfile, "level": _LOG_LEVELS[options.loglevel]},
        "usercouch": {"auth": options.auth},
    }
    if options.credentials is not None:
        config["admins"] = {
            options.credentials.username: pbkdf2_hash(
                options.credentials.password, digest="sha1", iterations=HASH_ITERATIONS
            )
        }
    if options.ssl is not None:
        config["usercouch"]["ssl"] = {
            "cert_file": options.ssl.cert_file,
            "key_file": options.ssl.key_file,
            "ca_file": options.ssl.ca_file,
            "port": https_port,
        }
    if options.replicator is not None:
        config["usercouch"]["replicator"] = {
            "ca_file": options.replicator.ca_file,
            "cert_file": options.replicator.cert_file,
            "key_file": options.replicator.key_file,
        }
    if options.extra:
        for section, values in check_extra(options.extra).items():
            config.setdefault(section, {}).update(values)
    return config


def _find_node(node: str | None) -> tuple[str | None, str | None]:
    """Node.js as an executable path, or why not: a wrong ``node``/``USERCOUCH_NODE`` must
    make the engine unusable here (and in ``usercouch engines``), not fail at start."""
    if node:
        given, source = node, "node="
    elif os.environ.get("USERCOUCH_NODE"):
        given, source = os.environ["USERCOUCH_NODE"], "$USERCOUCH_NODE="
    else:
        found = shutil.which("node")
        if found is None:
            return None, "Node.js: no 'node' on PATH (set USERCOUCH_NODE or install Node.js)"
        return found, None
    found = shutil.which(given)
    if found is None:
        return None, f"Node.js: {source}{given!r} is not an executable file or a command on PATH"
    return os.path.abspath(found), None


class PouchDBServer(Engine):
    """PouchDB Server 4.2.0 on Node.js, run through usercouch's launcher."""

    name = "pouchdb"
    term_grace = 2.0  # the launcher exits within milliseconds of SIGTERM

    def __init__(self, home: str | None = None, node: str | None = None) -> None:
        self.home = os.path.abspath(
            home or os.environ.get("USERCOUCH_POUCHDB_HOME") or default_home()
        )
        self.node, node_problem = _find_node(node)
        problems = [node_problem] if node_problem else []
        server = _server_manifest(self.home)
        installed = os.path.isfile(server)
        if not installed:
            problems.append(f"PouchDB Server: not installed in {self.home}")
        if problems:
            hint = "" if installed else "\nInstall it with: python -m usercouch install pouchdb"
            raise EngineNotFound(
                "PouchDB Server engine not usable:\n  - " + "\n  - ".join(problems) + hint
            )
        with open(server, encoding="utf-8") as f:
            self._version: str | None = json.load(f).get("version")

    @property
    def version(self) -> str | None:
        return self._version

    def describe(self) -> str:
        return f"pouchdb {self.version} in {self.home} (node: {self.node})"

    def check_extra(self, extra: str) -> None:
        check_extra(extra)

    def check_options(self, options: Options, paths: Paths) -> None:
        if options.replicator is not None and options.replicator.max_depth is not None:
            raise ConfigError(
                "config['replicator']['max_depth'] is not supported by the PouchDB Server "
                "engine (Node.js has no certificate chain depth limit); leave it out"
            )

    def child_env(self, options: Options) -> dict[str, str]:
        """The launcher's environment: with TLS and no replicator CA, trust our own CA so
        the server can replicate to its own HTTPS URL."""
        extra = {}
        if options.ssl is not None and options.replicator is None:
            extra["NODE_EXTRA_CA_CERTS"] = options.ssl.ca_file or options.ssl.cert_file
        return child_environ(extra)

    def prepare(
        self, paths: Paths, options: Options, uuid: str, port: int, https_port: int = 0
    ) -> Launch:
        config_path = paths.join(CONFIG_NAME)
        config = build_config(paths, options, uuid, port, https_port)
        write_private(config_path, json.dumps(config, indent=2))
        read_fd, write_fd = os.pipe()
        assert self.node is not None
        command = [
            self.node,
            os.path.join(runtime_dir(), "launcher.js"),
            "--modules", os.path.join(self.home, "node_modules"),
            "--config", config_path,
            "--ready-fd", str(write_fd),
        ]
        return Launch(
            command=command,
            env=self.child_env(options),
            cwd=paths.basedir,
            pass_fds=(write_fd,),
            parent_fds=(read_fd,),
            state={"ready_fd": read_fd},
        )

    def wait_ready(
        self, proc: subprocess.Popen[bytes], launch: Launch, options: Options, deadline: float
    ) -> Ready | None:
        read_fd = launch.state.pop("ready_fd")
        try:
            line = process.read_line(read_fd, deadline)
        finally:
            os.close(read_fd)
        if not line:
            return None
        report = json.loads(line)
        return Ready(
            port=int(report["port"]),
            https_port=report.get("https_port"),
            version=report.get("version"),
        )
