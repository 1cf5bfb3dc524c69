"""Pure text building for Apache CouchDB 3.x: session.ini, vm.args, argv, env, the uri file.

Nothing here reads or writes files or starts processes, so every byte CouchDB is handed
can be checked in a unit test. The facts behind each line are in
``shared/reference/couchdb-3.md`` (checked against a real CouchDB 3.5.0).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from ..config import Credentials, Options, pbkdf2_hash
from ..errors import ConfigError
from ..layout import Paths

#: The oldest CouchDB usercouch runs: 1.x and 2.x are long out of support upstream.
MIN_VERSION = (3, 0)
#: From 3.4 CouchDB accepts ``-pbkdf2:sha256-`` admin hashes (and caches verified logins).
SHA256_VERSION = (3, 4)

# Iteration counts for the admin's PBKDF2 hash. A generated password has 120 random bits, so
# no iteration count adds anything against brute force: keep logins free. A password the
# caller chose may be guessable: on 3.4+ use CouchDB's own default for sha256 (only the first
# login pays ~0.25 s, later ones hit CouchDB's password cache); older versions re-derive the
# key on every request, so there the count is a per-request cost and stays moderate.
GENERATED_ITERATIONS = 10_000
GIVEN_ITERATIONS_SHA256 = 600_000
GIVEN_ITERATIONS_SHA1 = 20_000

SESSION_INI = "session.ini"
VM_ARGS = "vm.args"
URI_FILE = "couch.uri"
CRASH_DUMP = "erl_crash.dump"

#: Variables set for the child; every other ``COUCHDB_*`` of the parent is dropped.
ADMIN_PARTY_VAR = "COUCHDB_TEST_ADMIN_PARTY_OVERRIDE"

#: No -name/-sname: the node runs as nonode@nohost without epmd, a cookie or a distribution
#: port, so any number of instances run side by side (the tested file, plus ``+fnl``).
#: ``+fnl``: CouchDB reads the ini as bytes, one character per byte, and hands those to the
#: file system; under a UTF-8 locale Erlang would re-encode each byte of a non-ASCII path
#: (``é`` becoming ``Ã©``) and write data, log and uri file outside the basedir. Latin-1
#: file names pass the bytes through unchanged (checked with Erlang/OTP 25).
VM_ARGS_TEXT = (
    "-kernel error_logger silent\n"
    "-sasl sasl_error_logger false\n"
    "+Bd -noinput\n"
    "+fnl\n"
    "-os_mon start_cpu_sup false\n"
    "-os_mon start_memsup false\n"
)

# Admin hash prefixes CouchDB leaves alone (anything else it treats as a clear-text password).
_HASH_RE = re.compile(
    r"(?:-pbkdf2(?::(?P<digest>sha|sha224|sha256|sha384|sha512))?-[0-9a-f]+,[^,\s]+,[1-9][0-9]*"
    r"|-hashed-[0-9a-f]+,[^,\s]+)\Z"
)
_SECTION_RE = re.compile(r"\[([^\[\]]+)\]\Z")
_VERSION_RE = re.compile(r"(\d+)\.(\d+)(?:\.(\d+))?")

# Keys of the session.ini that usercouch itself depends on: extra may not move them.
# (A fixed [chttpd] or [ssl] port is fine: the uri file still names it, restarts keep it.)
_MANAGED = {
    ("couchdb", "database_dir"): "the data lives in the basedir",
    ("couchdb", "view_index_dir"): "the views live in the basedir",
    ("couchdb", "uri_file"): "usercouch learns the port from it",
    ("couchdb", "uuid"): "use config['uuid']",
    ("chttpd", "bind_address"): "use config['bind_address']",
    ("log", "file"): "the log is basedir/log/couchdb.log",
    ("log", "writer"): "the log is basedir/log/couchdb.log",
    ("ssl", "enable"): "use config['ssl']",
    ("ssl", "cert_file"): "use config['ssl']",
    ("ssl", "key_file"): "use config['ssl']",
}


# -- versions -------------------------------------------------------------------------------


def parse_version(text: str) -> tuple[int, int, int] | None:
    """``'3.5.0'`` -> ``(3, 5, 0)``; tolerates suffixes (``3.4.0-RC1``); None if no version."""
    match = _VERSION_RE.match(text.strip())
    if match is None:
        return None
    major, minor, patch = match.groups()
    return int(major), int(minor), int(patch or 0)


def check_version(version: str | None) -> None:
    """Raise ConfigError for a CouchDB older than 3.0 (an unknown version passes)."""
    parsed = parse_version(version) if version else None
    if parsed is not None and parsed[:2] < MIN_VERSION:
        raise ConfigError(
            f"Apache CouchDB {version} is not supported: usercouch needs CouchDB 3.x "
            "(1.x and 2.x are long out of support upstream)"
        )


def supports_sha256(version: str | None) -> bool:
    """True if this CouchDB accepts ``-pbkdf2:sha256-`` admin hashes (3.4+)."""
    parsed = parse_version(version) if version else None
    return parsed is not None and parsed[:2] >= SHA256_VERSION


def hash_parameters(version: str | None, generated: bool) -> tuple[str, int]:
    """The (digest, iterations) for the admin's hash on this version.

    sha1 (``-pbkdf2-``) works on every 3.x, so it is the choice whenever the version is
    unknown or older than 3.4.
    """
    if generated:
        return ("sha256" if supports_sha256(version) else "sha1"), GENERATED_ITERATIONS
    if supports_sha256(version):
        return "sha256", GIVEN_ITERATIONS_SHA256
    return "sha1", GIVEN_ITERATIONS_SHA1


def admin_hash(
    credentials: Credentials, version: str | None, generated: bool, salt: str | None = None
) -> str:
    """The admin's password as a PBKDF2 hash this CouchDB accepts (never the clear text)."""
    digest, iterations = hash_parameters(version, generated)
    return pbkdf2_hash(credentials.password, digest=digest, iterations=iterations, salt=salt)


# -- ini text -------------------------------------------------------------------------------


@dataclass(frozen=True)
class IniEntry:
    """One ``key = value`` line of ini text, with where it was."""

    lineno: int
    section: str
    key: str
    value: str


def _strip_inline_comment(line: str) -> str:
    # CouchDB cuts a value at " ;" or "\t;" (a ';' inside a value is kept).
    return re.split(r" ;|\t;", line, maxsplit=1)[0]


def parse_ini(text: str, what: str = "extra") -> list[IniEntry]:
    """Parse ini text the way CouchDB reads it, refusing anything it would silently drop.

    Accepted lines: blank, ``;`` comments, ``[section]`` headers and ``key = value`` with a
    non-empty key and value, after a section header. Error messages never quote a line of
    the ``[admins]`` section: it may hold a password.
    """
    if "\0" in text:
        at = text[: text.index("\0")].count("\n") + 1
        raise ConfigError(f"{what} contains a NUL character (line {at})")
    entries: list[IniEntry] = []
    section = ""
    for lineno, raw in enumerate(re.split(r"\r\n|\n|\r|\x1a", text), 1):
        line = raw.strip()
        if not line or line.startswith(";"):
            continue
        shown = "(not shown: [admins] lines may hold passwords)" if section == "admins" else (
            repr(raw[:80])
        )
        if line.startswith("["):
            match = _SECTION_RE.match(line)
            if match is None or match.group(1).strip() != match.group(1):
                raise ConfigError(f"{what} line {lineno}: malformed section header {raw!r}")
            section = match.group(1)
            continue
        body = _strip_inline_comment(line).strip()
        if " = " in body:
            key, value = body.split(" = ", 1)
        elif "=" in body:
            key, value = body.split("=", 1)
        else:
            raise ConfigError(
                f"{what} line {lineno} is neither a [section] header, a ';' comment, a blank "
                f"line nor 'key = value': {shown}"
            )
        key, value = key.strip(), value.strip()
        if not key:
            raise ConfigError(f"{what} line {lineno} has no key before '=': {shown}")
        if not section:
            raise ConfigError(
                f"{what} line {lineno} ({key!r}) comes before any [section] header; "
                "start extra with a header such as [couchdb]"
            )
        if not value:
            # CouchDB versions disagree on an empty value (delete the key, or ignore the line).
            raise ConfigError(f"{what} line {lineno}: [{section}] {key} has an empty value")
        entries.append(IniEntry(lineno, section, key, value))
    return entries


def check_extra(extra: str, version: str | None) -> list[IniEntry]:
    """Refuse ``extra`` ini text CouchDB would misread, that moves what usercouch manages,
    or that would put a clear-text admin password on disk. Returns the parsed entries.
    """
    entries = parse_ini(extra)
    seen: dict[tuple[str, str], int] = {}
    for entry in entries:
        where = f"extra line {entry.lineno}: [{entry.section}] {entry.key}"
        first = seen.setdefault((entry.section, entry.key), entry.lineno)
        if first != entry.lineno:
            # CouchDB loads a file's keys in one ets:insert; which duplicate wins is undefined.
            raise ConfigError(f"{where} is already set on line {first}: give each key once")
        why = _MANAGED.get((entry.section, entry.key))
        if why is not None:
            raise ConfigError(f"{where} is set by usercouch and cannot be overridden ({why})")
        if entry.section == "admins":
            match = _HASH_RE.match(entry.value)
            if match is None:
                # Never echo the value: it is (or may be) a password.
                raise ConfigError(
                    f"{where} is not a password hash: CouchDB would store a clear-text password "
                    "in the basedir first. Give a '-pbkdf2-' hash instead, e.g. from "
                    "usercouch.config.pbkdf2_hash(password, iterations=...)"
                )
            digest = match.group("digest")
            if digest is not None and version is not None and not supports_sha256(version):
                raise ConfigError(
                    f"{where}: '-pbkdf2:{digest}-' hashes need CouchDB 3.4+, this is {version}; "
                    "use a '-pbkdf2-' (sha1) hash"
                )
    return entries


def check_extra_admins(entries: list[IniEntry], options: Options) -> None:
    """Refuse [admins] in extra that would lock usercouch out of its own server."""
    admins = [e for e in entries if e.section == "admins"]
    if not admins:
        return
    if options.credentials is None:
        raise ConfigError(
            f"extra line {admins[0].lineno}: [admins] entries need auth='basic' "
            "(auth='open' runs CouchDB with no admin at all)"
        )
    for entry in admins:
        if entry.key == options.credentials.username:
            raise ConfigError(
                f"extra line {entry.lineno}: [admins] {entry.key} is the admin usercouch "
                "creates; set config['username'] and config['password'] instead"
            )


def check_ini_path(name: str, path: str) -> str:
    """Refuse a path CouchDB's ini reader would cut short or split; return it unchanged."""
    if any(ord(c) < 32 or ord(c) == 127 for c in path):
        raise ConfigError(f"{name} contains a control character: {path!r}")
    if path != path.strip():
        raise ConfigError(
            f"{name} starts or ends with white space, which CouchDB's ini reader trims: {path!r}"
        )
    if " ;" in path or "\t;" in path or " =" in path or "= " in path:
        raise ConfigError(
            f"{name} cannot go into CouchDB's ini file (' ;' starts a comment there and "
            f"' = ' splits a line): {path!r}"
        )
    return path


def lockout_enabled(options: Options) -> bool:
    """Whether to keep CouchDB 3.4+'s lock-out after 5 failed logins from one address.

    It guards a password someone could guess. A generated admin (random name, 120-bit
    password) cannot be guessed, so there the lock-out only bites the owner: a test that
    tries wrong passwords would then get 403 for the right one. An ``open`` server has no
    admin to protect. So it stays on only for a password the caller chose.
    """
    return options.auth == "basic" and not options.generated_password


Section = tuple[str, list[tuple[str, str]]]


def render_ini(sections: list[Section], overridden: set[tuple[str, str]]) -> str:
    """Ini text for ``sections``, leaving out the keys ``extra`` sets itself.

    Leaving them out (rather than relying on the later line winning) matters: CouchDB
    releases disagree on which of two equal keys in one file wins.
    """
    blocks = []
    for name, items in sections:
        lines = [f"[{name}]"]
        lines += [f"{key} = {value}" for key, value in items if (name, key) not in overridden]
        blocks.append("\n".join(lines) + "\n")
    return "\n".join(blocks)


def session_ini(
    paths: Paths,
    options: Options,
    *,
    uuid: str,
    port: int,
    secret: str,
    admin_hash: str | None,
    https_port: int = 0,
) -> str:
    """The last file of CouchDB's ini chain: everything this instance needs, then ``extra``.

    CouchDB writes config changes back into this file, so nothing in it is a clear-text
    password. ``port``/``https_port`` 0 mean any free port (learned from the uri file).
    A key that ``extra`` sets is left out of usercouch's part, so ``extra`` wins.
    """
    if options.auth == "basic" and (options.credentials is None or admin_hash is None):
        raise ValueError("auth='basic' needs credentials and their hash")
    valid_user = "true" if options.auth == "basic" else "false"
    sections: list[Section] = [
        ("couchdb", [
            ("database_dir", check_ini_path("data folder", paths.data)),
            ("view_index_dir", check_ini_path("views folder", paths.views)),
            ("uuid", uuid),
            ("single_node", "true"),
            ("uri_file", check_ini_path("uri file", paths.join(URI_FILE))),
            ("file_compression", options.file_compression),
        ]),
        ("cluster", [("q", "1"), ("n", "1")]),
        ("chttpd", [
            ("port", str(port)),
            ("bind_address", options.bind_address),
            ("require_valid_user", valid_user),
        ]),
        # Some 3.x releases read require_valid_user from [chttpd_auth]: say it in both.
        ("chttpd_auth", [("secret", secret), ("require_valid_user", valid_user)]),
    ]
    if not lockout_enabled(options):
        sections.append(("chttpd_auth_lockout", [("mode", "off")]))
    admins = [] if options.credentials is None else [(options.credentials.username, admin_hash)]
    sections.append(("admins", [(k, v) for k, v in admins if v is not None]))
    if options.ssl is not None:
        tls = [
            ("enable", "true"),
            ("port", str(https_port)),
            ("cert_file", check_ini_path("ssl cert_file", options.ssl.cert_file)),
            ("key_file", check_ini_path("ssl key_file", options.ssl.key_file)),
        ]
        if options.ssl.ca_file is not None:
            tls.append(("cacert_file", check_ini_path("ssl ca_file", options.ssl.ca_file)))
        tls.append(("verify_ssl_certificates", "false"))
        sections.append(("ssl", tls))
    if options.replicator is not None:
        rep = options.replicator
        trust = [
            ("verify_ssl_certificates", "true"),
            ("ssl_trusted_certificates_file", check_ini_path("replicator ca_file", rep.ca_file)),
        ]
        if rep.max_depth is not None:
            trust.append(("ssl_certificate_max_depth", str(rep.max_depth)))
        if rep.cert_file is not None and rep.key_file is not None:
            trust.append(("cert_file", check_ini_path("replicator cert_file", rep.cert_file)))
            trust.append(("key_file", check_ini_path("replicator key_file", rep.key_file)))
        sections.append(("replicator", trust))
    sections.append(("log", [
        ("writer", "file"),
        ("file", check_ini_path("log file", paths.logfile)),
        ("level", options.loglevel),
    ]))
    overridden = {(e.section, e.key) for e in parse_ini(options.extra)} if options.extra else set()
    text = "; Written by usercouch at every start of this basedir's server: edits are lost.\n"
    text += render_ini(sections, overridden)
    if options.extra:
        text += "\n; extra, as given to bootstrap()\n" + options.extra
        if not options.extra.endswith("\n"):
            text += "\n"
    return text


# -- process --------------------------------------------------------------------------------


def command(root: str, paths: Paths) -> list[str]:
    """The argv: the install's default.ini first, our session.ini last (the whole chain)."""
    return [
        f"{root}/bin/couchdb",
        "-couch_ini",
        f"{root}/etc/default.ini",
        paths.join(SESSION_INI),
    ]


def child_env(paths: Paths, options: Options, base: Mapping[str, str]) -> dict[str, str]:
    """The child's environment: ``base`` minus the parent's ``COUCHDB_*``, plus ours.

    ``base`` is the already scrubbed parent environment (see ``engines.base.child_environ``).
    """
    env = {k: v for k, v in base.items() if not k.startswith("COUCHDB_")}
    env["COUCHDB_ARGS_FILE"] = paths.join(VM_ARGS)
    env["ERL_CRASH_DUMP"] = paths.join(CRASH_DUMP)
    env["HOME"] = paths.basedir
    if options.auth == "open":
        env[ADMIN_PARTY_VAR] = "1"
    return env


# -- the uri file ---------------------------------------------------------------------------


def parse_uri_line(line: str) -> tuple[str, str, int]:
    """``'http://::1:5984/'`` -> ``('http', '::1', 5984)``; ValueError if it is not a URL.

    CouchDB copies the bind address verbatim, so IPv6 hosts come without brackets.
    """
    scheme, sep, rest = line.strip().partition("://")
    if not sep or scheme not in ("http", "https"):
        raise ValueError(f"not an http(s) URL: {line!r}")
    rest = rest.rstrip("/")
    host, sep, port_text = rest.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"no host:port in {line!r}")
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError(f"port out of range in {line!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return scheme, host, port


def parse_uri_file(text: str, listeners: int = 1) -> dict[str, int] | None:
    """The ports by scheme once the file holds ``listeners`` complete lines, else None.

    CouchDB writes the file non-atomically, one line per listener (http first): a line
    counts only once its newline is there.
    """
    complete = [line for line in text.split("\n")[:-1] if line.strip()]
    if len(complete) < listeners:
        return None
    ports: dict[str, int] = {}
    for line in complete:
        scheme, _host, port = parse_uri_line(line)
        ports.setdefault(scheme, port)
    return ports
