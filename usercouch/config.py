"""Pure option handling: validate bootstrap arguments, make credentials, build the env.

Nothing here touches the disk or starts a process, so every rule is testable in isolation
and a refused bootstrap provably writes nothing.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

AUTH_MODES = ("basic", "open")
BIND_ADDRESSES = ("127.0.0.1", "::1", "0.0.0.0", "::")
LOG_LEVELS = (
    "debug", "info", "notice", "warning", "error", "critical", "alert", "emergency", "none",
)
FILE_COMPRESSIONS = ("none", "snappy", *tuple(f"deflate_{n}" for n in range(1, 10)))
CONFIG_KEYS = (
    "bind_address", "loglevel", "file_compression", "username", "password", "uuid",
    "ssl", "replicator",
)
SSL_KEYS = ("cert_file", "key_file", "ca_file", "check_hostname")
REPLICATOR_KEYS = ("ca_file", "max_depth", "cert_file", "key_file")
DEFAULTS: Mapping[str, str] = {
    "bind_address": "127.0.0.1",
    "loglevel": "info",
    "file_compression": "snappy",
}

# Names go into ini keys, JSON keys and Basic auth headers: keep them to a safe alphabet.
_USERNAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@+-]{0,63}\Z")
_UUID_RE = re.compile(r"[0-9a-f]{32}\Z")
_MAX_PASSWORD = 256


@dataclass(frozen=True)
class Credentials:
    """The admin's name and clear-text password; the password stays in memory only."""

    username: str
    password: str = field(repr=False)

    @property
    def authorization(self) -> str:
        """The pre-built value of an HTTP Basic ``Authorization`` header."""
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")


@dataclass(frozen=True)
class TLSServer:
    """The HTTPS listener: the server's certificate and key, and the CA clients should trust."""

    cert_file: str
    key_file: str
    ca_file: str | None = None
    check_hostname: bool = True


@dataclass(frozen=True)
class ReplicatorTLS:
    """Which remotes the replicator trusts (a CA) and the client certificate it presents."""

    ca_file: str
    max_depth: int | None = None
    cert_file: str | None = None
    key_file: str | None = None


@dataclass(frozen=True)
class Options:
    """Validated bootstrap options: everything an engine needs to write its config."""

    auth: str
    bind_address: str
    loglevel: str
    file_compression: str
    credentials: Credentials | None
    uuid: str | None = None
    extra: str | None = None
    ssl: TLSServer | None = None
    replicator: ReplicatorTLS | None = None
    #: True if usercouch made the password (120 random bits), False if the caller chose it.
    generated_password: bool = False


def random_b32(nbytes: int = 15, urandom: Callable[[int], bytes] = os.urandom) -> str:
    """A random base32 string: 15 bytes (120 bits) make 24 characters, no padding."""
    return base64.b32encode(urandom(nbytes)).decode("ascii")


def random_hex(nbytes: int = 16, urandom: Callable[[int], bytes] = os.urandom) -> str:
    """A random lowercase hex string (32 characters for the default 16 bytes)."""
    return urandom(nbytes).hex()


def pbkdf2_hash(
    password: str,
    *,
    digest: str = "sha1",
    iterations: int = 10,
    salt: str | None = None,
) -> str:
    """Hash a password the way CouchDB stores admins.

    ``sha1`` gives the ``-pbkdf2-`` form every CouchDB 3.x and PouchDB Server accept;
    other digests give ``-pbkdf2:<digest>-`` (CouchDB 3.4+). The salt is used as the literal
    bytes of a hex string, as CouchDB does.
    """
    if iterations < 1:
        raise ConfigError(f"iterations must be >= 1, got {iterations!r}")
    salt = random_hex() if salt is None else salt
    key_len = hashlib.new(digest).digest_size
    derived = hashlib.pbkdf2_hmac(digest, password.encode(), salt.encode(), iterations, key_len)
    scheme = "-pbkdf2-" if digest == "sha1" else f"-pbkdf2:{digest}-"
    return f"{scheme}{derived.hex()},{salt},{iterations}"


def _check_choice(key: str, value: object, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise ConfigError(f"config[{key!r}] must be one of {allowed}; got {value!r}")
    return value


def _check_username(value: object) -> str:
    if not isinstance(value, str) or not _USERNAME_RE.match(value):
        raise ConfigError(
            f"config['username'] must be 1-64 characters of letters, digits and _.@+- "
            f"(starting with a letter or digit); got {value!r}"
        )
    return value


def _check_password(value: object) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"config['password'] must be a str; got {type(value).__name__}")
    if not 1 <= len(value) <= _MAX_PASSWORD or not value.isprintable():
        # The value itself is a secret: name the rule, not the password.
        raise ConfigError(
            f"config['password'] must be 1-{_MAX_PASSWORD} printable characters "
            "(no newlines, NUL or other control characters)"
        )
    return value


def _check_uuid(value: object) -> str:
    if not isinstance(value, str) or not _UUID_RE.match(value):
        raise ConfigError(f"config['uuid'] must be 32 lowercase hex characters; got {value!r}")
    return value


def _check_file(where: str, value: object) -> str:
    """An existing, readable regular file, as an absolute path (the server's cwd may differ)."""
    if not isinstance(value, str) or not value or "\0" in value or "\n" in value:
        raise ConfigError(f"{where} must be a file path; got {value!r}")
    path = os.path.abspath(value)
    if not os.path.isfile(path):
        raise ConfigError(f"{where}: no such file: {path!r}")
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {path!r}: {exc.strerror}") from None
    return path


def _refuse_unknown(keys: Iterable[object], known: tuple[str, ...], what: str) -> None:
    bad = [k for k in keys if k not in known]
    if bad:
        raise ConfigError(
            f"unknown {what}: {', '.join(repr(k) for k in bad)}; known keys: {', '.join(known)}"
        )


def _check_section(key: str, value: object, known: tuple[str, ...]) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"config[{key!r}] must be a dict; got {type(value).__name__}")
    _refuse_unknown(value, known, f"key(s) in config[{key!r}]")
    return value


def _check_ssl(value: object) -> TLSServer:
    section = _check_section("ssl", value, SSL_KEYS)
    for required in ("cert_file", "key_file"):
        if required not in section:
            raise ConfigError(f"config['ssl'] needs {required!r}")
    check_hostname = section.get("check_hostname", True)
    if not isinstance(check_hostname, bool):
        raise ConfigError(
            f"config['ssl']['check_hostname'] must be True or False; got {check_hostname!r}"
        )
    ca_file = section.get("ca_file")
    return TLSServer(
        cert_file=_check_file("config['ssl']['cert_file']", section["cert_file"]),
        key_file=_check_file("config['ssl']['key_file']", section["key_file"]),
        ca_file=None if ca_file is None else _check_file("config['ssl']['ca_file']", ca_file),
        check_hostname=check_hostname,
    )


def _check_replicator(value: object) -> ReplicatorTLS:
    section = _check_section("replicator", value, REPLICATOR_KEYS)
    if "ca_file" not in section:
        raise ConfigError("config['replicator'] needs 'ca_file'")
    max_depth = section.get("max_depth")
    if max_depth is not None and (
        not isinstance(max_depth, int) or isinstance(max_depth, bool) or not 1 <= max_depth <= 16
    ):
        raise ConfigError(
            f"config['replicator']['max_depth'] must be an int from 1 to 16; got {max_depth!r}"
        )
    if ("cert_file" in section) != ("key_file" in section):
        raise ConfigError("config['replicator'] needs both 'cert_file' and 'key_file', or neither")
    where = "config['replicator']"
    return ReplicatorTLS(
        ca_file=_check_file(f"{where}['ca_file']", section["ca_file"]),
        max_depth=max_depth,
        cert_file=(
            _check_file(f"{where}['cert_file']", section["cert_file"])
            if "cert_file" in section else None
        ),
        key_file=(
            _check_file(f"{where}['key_file']", section["key_file"])
            if "key_file" in section else None
        ),
    )


def check_auth(auth: object) -> str:
    """Validate the ``auth`` argument of bootstrap()."""
    if auth == "oauth":
        raise ConfigError(
            "auth='oauth' is not supported: Apache CouchDB removed OAuth in 2.0; "
            "use auth='basic' (or 'open')"
        )
    if not isinstance(auth, str) or auth not in AUTH_MODES:
        raise ConfigError(f"auth must be 'basic' or 'open'; got {auth!r}")
    return auth


def build_options(
    auth: object = "basic",
    config: object = None,
    extra: object = None,
    *,
    urandom: Callable[[int], bytes] = os.urandom,
) -> Options:
    """Validate bootstrap()'s arguments and fill in defaults and random credentials."""
    auth = check_auth(auth)
    if config is None:
        config = {}
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a dict or None; got {type(config).__name__}")
    if extra is not None and not isinstance(extra, str):
        raise TypeError(f"extra must be a str or None; got {type(extra).__name__}")
    _refuse_unknown(config, CONFIG_KEYS, "config key(s)")
    merged: dict[str, Any] = {**DEFAULTS, **config}
    bind_address = _check_choice("bind_address", merged["bind_address"], BIND_ADDRESSES)
    loglevel = _check_choice("loglevel", merged["loglevel"], LOG_LEVELS)
    compression = _check_choice(
        "file_compression", merged["file_compression"], FILE_COMPRESSIONS
    )
    uuid = _check_uuid(merged["uuid"]) if "uuid" in merged else None
    ssl = _check_ssl(merged["ssl"]) if merged.get("ssl") is not None else None
    replicator = (
        _check_replicator(merged["replicator"]) if merged.get("replicator") is not None else None
    )
    credentials = None
    if auth == "basic":
        username = merged.get("username")
        password = merged.get("password")
        credentials = Credentials(
            _check_username(username) if username is not None else random_b32(urandom=urandom),
            _check_password(password) if password is not None else random_b32(urandom=urandom),
        )
    elif "username" in merged or "password" in merged:
        raise ConfigError("config['username'] and config['password'] need auth='basic'")
    return Options(
        auth=auth,
        bind_address=bind_address,
        loglevel=loglevel,
        file_compression=compression,
        credentials=credentials,
        uuid=uuid,
        extra=extra,
        ssl=ssl,
        replicator=replicator,
        generated_password=credentials is not None and merged.get("password") is None,
    )


def loopback_host(bind_address: str) -> str:
    """The address a local client should use to reach a server bound to ``bind_address``."""
    if bind_address == "0.0.0.0":
        return "127.0.0.1"
    if bind_address == "::":
        return "::1"
    return bind_address


def build_url(bind_address: str, port: int, scheme: str = "http") -> str:
    """The server's root URL (no credentials), IPv6 hosts in brackets, ending in ``/``."""
    host = loopback_host(bind_address)
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}/"


def build_env(options: Options, port: int, https_port: int | None = None) -> dict[str, Any]:
    """The Microfiber-style env dict handed to callers: plain JSON-serialisable data.

    With TLS on, ``x_env_ssl`` is a complete second env for the HTTPS listener, with the
    ``ssl`` facts a client needs to verify the server from the env alone.
    """
    env = _base_env(options, port, "http")
    if options.ssl is not None and https_port is not None:
        ssl_env = _base_env(options, https_port, "https")
        ssl_env["ssl"] = {
            "ca_file": options.ssl.ca_file or options.ssl.cert_file,
            "check_hostname": options.ssl.check_hostname,
        }
        env["x_env_ssl"] = ssl_env
    return env


def _base_env(options: Options, port: int, scheme: str) -> dict[str, Any]:
    env: dict[str, Any] = {"port": port, "url": build_url(options.bind_address, port, scheme)}
    if options.credentials is not None:
        env["basic"] = {
            "username": options.credentials.username,
            "password": options.credentials.password,
        }
        env["authorization"] = options.credentials.authorization
    return env


def credentialed_url(env: Mapping[str, Any]) -> str:
    """``env['url']`` with the Basic credentials in it, for clients that only take a URL."""
    url: str = env["url"]
    basic = env.get("basic")
    if not basic:
        return url
    from urllib.parse import quote

    scheme, rest = url.split("://", 1)
    user = quote(basic["username"], safe="")
    password = quote(basic["password"], safe="")
    return f"{scheme}://{user}:{password}@{rest}"
