"""The Apache CouchDB 3.x engine: exact text handed to CouchDB, discovery, and the process side.

The unit tests pin every byte of session.ini, vm.args, the argv and the environment to the
facts in shared/reference/couchdb-3.md. The process tests run a stand-in bin/couchdb
(tests/fake_couchdb) that checks what a real CouchDB depends on and serves just enough
HTTP; they run on any machine, whatever USERCOUCH_ENGINE says. Against a real CouchDB the
engine-agnostic integration suite runs unchanged (USERCOUCH_ENGINE=couchdb COUCHDB_HOME=...).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import stat
import sys
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path

import pytest
from helpers import pid_gone

from usercouch import StartError, UserCouch
from usercouch.config import Credentials, Options, build_options, pbkdf2_hash
from usercouch.engines import auto_detect, get_engine
from usercouch.engines import couchdb_config as cfg
from usercouch.engines.base import child_environ
from usercouch.engines.couchdb import (
    CouchDB,
    Install,
    install_version,
    locate,
    previous_secret,
    run_brew_prefix,
    server_version,
)
from usercouch.errors import ConfigError, EngineNotFound
from usercouch.http import Response, request
from usercouch.layout import Paths

FAKE_TREE = Path(__file__).parent / "fake_couchdb"
BASE = "/base dir"  # a space, as in real home folders
PATHS = Paths(BASE)
UUID = "0123456789abcdef0123456789abcdef"
SECRET = "fedcba9876543210fedcba9876543210"
HASH = "-pbkdf2-abc,salt,10"
PW = "correct horse battery staple"


def options(auth: str = "basic", generated: bool = True, **changes: object) -> Options:
    creds = Credentials("admin", PW) if auth == "basic" else None
    base = Options(
        auth=auth,
        bind_address="127.0.0.1",
        loglevel="info",
        file_compression="snappy",
        credentials=creds,
        generated_password=generated and auth == "basic",
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def ini(opts: Options, port: int = 0, https_port: int = 0) -> str:
    return cfg.session_ini(
        PATHS,
        opts,
        uuid=UUID,
        port=port,
        https_port=https_port,
        secret=SECRET,
        admin_hash=HASH if opts.credentials else None,
    )


BASIC_INI = """\
; Written by usercouch at every start of this basedir's server: edits are lost.
[couchdb]
database_dir = /base dir/data
view_index_dir = /base dir/views
uuid = 0123456789abcdef0123456789abcdef
single_node = true
uri_file = /base dir/couch.uri
file_compression = snappy

[cluster]
q = 1
n = 1

[chttpd]
port = 0
bind_address = 127.0.0.1
require_valid_user = true

[chttpd_auth]
secret = fedcba9876543210fedcba9876543210
require_valid_user = true

[chttpd_auth_lockout]
mode = off

[admins]
admin = -pbkdf2-abc,salt,10

[log]
writer = file
file = /base dir/log/couchdb.log
level = info
"""


# -- session.ini ----------------------------------------------------------------------------


def test_session_ini_basic_with_generated_password() -> None:
    assert ini(options()) == BASIC_INI


def test_session_ini_basic_with_given_password_keeps_the_lockout() -> None:
    expected = BASIC_INI.replace("[chttpd_auth_lockout]\nmode = off\n\n", "")
    assert ini(options(generated=False)) == expected


def test_session_ini_open_has_no_admin_and_no_valid_user_requirement() -> None:
    expected = BASIC_INI.replace("require_valid_user = true", "require_valid_user = false")
    assert expected.count("require_valid_user = false") == 2
    expected = expected.replace("admin = -pbkdf2-abc,salt,10\n", "")
    assert ini(options("open")) == expected
    assert "[admins]\n\n[log]" in expected  # an empty [admins] section


def test_session_ini_restart_keeps_the_port() -> None:
    assert ini(options(), port=40781) == BASIC_INI.replace("port = 0", "port = 40781")


@pytest.mark.parametrize("bind", ["127.0.0.1", "::1", "0.0.0.0", "::"])
def test_session_ini_bind_address(bind: str) -> None:
    expected = BASIC_INI.replace("bind_address = 127.0.0.1", f"bind_address = {bind}")
    assert ini(options(bind_address=bind)) == expected


@pytest.mark.parametrize("level", ["debug", "warning", "none"])
def test_session_ini_loglevel(level: str) -> None:
    assert ini(options(loglevel=level)) == BASIC_INI.replace("level = info", f"level = {level}")


@pytest.mark.parametrize("compression", ["none", "deflate_6"])
def test_session_ini_file_compression(compression: str) -> None:
    expected = BASIC_INI.replace("file_compression = snappy", f"file_compression = {compression}")
    assert ini(options(file_compression=compression)) == expected


def test_session_ini_appends_extra_last_with_a_newline() -> None:
    tail = "\n; extra, as given to bootstrap()\n[couchdb]\nmax_document_size = 1000\n"
    assert ini(options(extra="[couchdb]\nmax_document_size = 1000")) == BASIC_INI + tail
    assert ini(options(extra="[couchdb]\nmax_document_size = 1000\n")) == BASIC_INI + tail


def test_session_ini_leaves_out_what_extra_sets() -> None:
    # CouchDB releases disagree on which of two equal keys in one file wins: no duplicates.
    extra = "[chttpd_auth_lockout]\nmode = enforce\n[log]\nlevel = debug\n"
    expected = (
        BASIC_INI.replace("mode = off\n", "").replace("level = info\n", "")
        + "\n; extra, as given to bootstrap()\n"
        + extra
    )
    assert ini(options(extra=extra)) == expected
    assert expected.count("mode = ") == expected.count("level = ") == 1


def test_session_ini_tls_listener() -> None:
    from usercouch.config import TLSServer

    tls = TLSServer(cert_file="/pki/server.crt", key_file="/pki/server.key", ca_file="/pki/ca.crt")
    section = (
        "[ssl]\nenable = true\nport = 6984\ncert_file = /pki/server.crt\n"
        "key_file = /pki/server.key\ncacert_file = /pki/ca.crt\n"
        "verify_ssl_certificates = false\n\n"
    )
    expected = BASIC_INI.replace("[log]\n", section + "[log]\n")
    assert ini(options(ssl=tls), https_port=6984) == expected
    no_ca = replace(tls, ca_file=None)
    assert ini(options(ssl=no_ca), https_port=6984) == expected.replace(
        "cacert_file = /pki/ca.crt\n", ""
    )


def test_session_ini_replicator_trust() -> None:
    from usercouch.config import ReplicatorTLS

    rep = ReplicatorTLS(ca_file="/pki/ca.crt")
    section = (
        "[replicator]\nverify_ssl_certificates = true\n"
        "ssl_trusted_certificates_file = /pki/ca.crt\n\n"
    )
    assert ini(options(replicator=rep)) == BASIC_INI.replace("[log]\n", section + "[log]\n")
    full = ReplicatorTLS(
        ca_file="/pki/ca.crt", max_depth=2, cert_file="/pki/c.crt", key_file="/pki/c.key"
    )
    section = (
        "[replicator]\nverify_ssl_certificates = true\n"
        "ssl_trusted_certificates_file = /pki/ca.crt\nssl_certificate_max_depth = 2\n"
        "cert_file = /pki/c.crt\nkey_file = /pki/c.key\n\n"
    )
    assert ini(options(replicator=full)) == BASIC_INI.replace("[log]\n", section + "[log]\n")


def test_session_ini_never_holds_the_clear_text_password() -> None:
    assert PW not in ini(options())


@pytest.mark.parametrize("base", ["/a ;b", "/a\nb", "/a = b", "/a\tb"])
def test_session_ini_refuses_paths_the_ini_reader_would_cut(base: str) -> None:
    with pytest.raises(ConfigError, match="folder"):
        cfg.session_ini(
            Paths(base), options(), uuid=UUID, port=0, secret=SECRET, admin_hash=HASH
        )


@pytest.mark.parametrize(
    "base", ["/a;b=c [admins] #x 'q' \"d\" \\e", "/$(touch x) `id` & | > <", "/ünï ☃/-rf --x"]
)
def test_session_ini_paths_read_back_unchanged(base: str) -> None:
    # parse_ini reads as config.erl does: comments at " ;"/"\t;", split at the first " = ".
    text = cfg.session_ini(
        Paths(base), options(), uuid=UUID, port=0, secret=SECRET, admin_hash=HASH
    )
    values = {(e.section, e.key): e.value for e in cfg.parse_ini(text, "session.ini")}
    assert values[("couchdb", "database_dir")] == f"{base}/data"
    assert values[("couchdb", "uri_file")] == f"{base}/couch.uri"
    assert values[("log", "file")] == f"{base}/log/couchdb.log"


def test_session_ini_refuses_a_tls_path_the_ini_reader_would_trim() -> None:
    from usercouch.config import TLSServer

    tls = TLSServer(cert_file="/pki/server.crt ", key_file="/pki/server.key")
    with pytest.raises(ConfigError, match=r"ssl cert_file starts or ends with white space"):
        ini(options(ssl=tls))


# -- the admin's hash -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "generated", "expected"),
    [
        ("3.5.0", True, ("sha256", 10_000)),
        ("3.4.0", True, ("sha256", 10_000)),
        ("3.3.3", True, ("sha1", 10_000)),
        (None, True, ("sha1", 10_000)),
        ("3.5.0", False, ("sha256", 600_000)),
        ("3.3.3", False, ("sha1", 20_000)),
        (None, False, ("sha1", 20_000)),
    ],
)
def test_hash_parameters(version: str | None, generated: bool, expected: tuple[str, int]) -> None:
    assert cfg.hash_parameters(version, generated) == expected


def test_admin_hash_formats_match_couchdb() -> None:
    creds = Credentials("admin", "secret")
    salt = "0123456789abcdef0123456789abcdef"
    sha1 = hashlib.pbkdf2_hmac("sha1", b"secret", salt.encode(), 10_000).hex()
    assert cfg.admin_hash(creds, "3.3.3", True, salt) == f"-pbkdf2-{sha1},{salt},10000"
    sha256 = hashlib.pbkdf2_hmac("sha256", b"secret", salt.encode(), 10_000).hex()
    assert cfg.admin_hash(creds, "3.5.0", True, salt) == f"-pbkdf2:sha256-{sha256},{salt},10000"


# -- vm.args, argv, environment -------------------------------------------------------------


def test_vm_args_name_no_node() -> None:
    assert cfg.VM_ARGS_TEXT == (
        "-kernel error_logger silent\n"
        "-sasl sasl_error_logger false\n"
        "+Bd -noinput\n"
        "+fnl\n"
        "-os_mon start_cpu_sup false\n"
        "-os_mon start_memsup false\n"
    )


def test_command_line() -> None:
    assert cfg.command("/opt/couchdb", PATHS) == [
        "/opt/couchdb/bin/couchdb",
        "-couch_ini",
        "/opt/couchdb/etc/default.ini",
        "/base dir/session.ini",
    ]


PARENT = {
    "PATH": "/usr/bin",
    "LANG": "C.UTF-8",
    "COUCHDB_INI_FILES": "/etc/other.ini",
    "COUCHDB_SYSCONFIG_FILE": "/etc/sys.config",
    "COUCHDB_TEST_ADMIN_PARTY_OVERRIDE": "1",
    "HOME": "/home/someone",
}


def test_child_env_basic() -> None:
    assert cfg.child_env(PATHS, options(), PARENT) == {
        "PATH": "/usr/bin",
        "LANG": "C.UTF-8",
        "COUCHDB_ARGS_FILE": "/base dir/vm.args",
        "ERL_CRASH_DUMP": "/base dir/erl_crash.dump",
        "HOME": "/base dir",
    }


def test_child_env_open_overrides_the_admin_party_refusal() -> None:
    assert cfg.child_env(PATHS, options("open"), PARENT) == {
        "PATH": "/usr/bin",
        "LANG": "C.UTF-8",
        "COUCHDB_ARGS_FILE": "/base dir/vm.args",
        "ERL_CRASH_DUMP": "/base dir/erl_crash.dump",
        "HOME": "/base dir",
        "COUCHDB_TEST_ADMIN_PARTY_OVERRIDE": "1",
    }


def test_child_env_scrubs_erlang_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("ERL_FLAGS", "ERL_AFLAGS", "ERL_ZFLAGS", "COUCHDB_INI_FILES"):
        monkeypatch.setenv(var, "-set_by_parent")
    env = cfg.child_env(PATHS, options(), child_environ())
    assert not {"ERL_FLAGS", "ERL_AFLAGS", "ERL_ZFLAGS", "COUCHDB_INI_FILES"} & set(env)
    assert env["COUCHDB_ARGS_FILE"] == "/base dir/vm.args"


# -- extra ----------------------------------------------------------------------------------


def test_extra_accepts_ordinary_ini() -> None:
    text = (
        "; a comment\n\n[couchdb]\nmax_document_size = 1000 ; inline comment\n"
        "[admins]\nother = -pbkdf2-0a1b,somesalt,10\n[chttpd_auth]\ntimeout=3600\n"
    )
    entries = cfg.check_extra(text, "3.5.0")
    assert [(e.section, e.key, e.value) for e in entries] == [
        ("couchdb", "max_document_size", "1000"),
        ("admins", "other", "-pbkdf2-0a1b,somesalt,10"),
        ("chttpd_auth", "timeout", "3600"),
    ]


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ("[couchdb]\nx = 1\0", "NUL character (line 2)"),
        ("[couchdb]\njust words\n", "line 2 is neither"),
        ("# hash comment\n", "line 1 is neither"),
        ("x = 1\n[couchdb]\n", "comes before any [section] header"),
        ("[couchdb]\n= 1\n", "no key before"),
        ("[couchdb]\nx =\n", "empty value"),
        ("[couchdb\nx = 1\n", "malformed section header"),
        ("[couchdb] ; note\n", "malformed section header"),
        ("[couchdb]\nuri_file = /tmp/u\n", "[couchdb] uri_file is set by usercouch"),
        ("[couchdb]\ndatabase_dir = /tmp\n", "[couchdb] database_dir is set by usercouch"),
        ("[chttpd]\nbind_address = ::\n", "config['bind_address']"),
        ("[log]\nfile = /tmp/x.log\n", "[log] file is set by usercouch"),
        ("[ssl]\nenable = true\n", "config['ssl']"),
        ("[couchdb]\nx = 1\n[log]\nlevel = debug\n[couchdb]\nx = 2\n",
         "extra line 6: [couchdb] x is already set on line 2"),
    ],
)
def test_extra_refused(extra: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        cfg.check_extra(extra, "3.5.0")
    assert needle in str(info.value)


def test_extra_may_fix_the_ports() -> None:
    # A fixed port replaces usercouch's port 0 line (the uri file still names it).
    extra = "[chttpd]\nport = 5999\n"
    assert cfg.check_extra(extra, "3.5.0")
    text = ini(options(extra=extra))
    assert "port = 0" not in text and text.endswith("[chttpd]\nport = 5999\n")


def test_extra_refuses_a_clear_text_admin_without_echoing_it() -> None:
    with pytest.raises(ConfigError, match=r"\[admins\] bob is not a password hash") as info:
        cfg.check_extra("[admins]\nbob = hunter2-secret\n", "3.5.0")
    assert "hunter2" not in str(info.value)
    with pytest.raises(ConfigError, match="not shown") as info:
        cfg.check_extra("[admins]\nhunter2-secret\n", "3.5.0")
    assert "hunter2" not in str(info.value)


def test_extra_sha256_admin_needs_3_4() -> None:
    line = "[admins]\nbob = -pbkdf2:sha256-0a1b,salt,600000\n"
    assert cfg.check_extra(line, "3.4.0")
    assert cfg.check_extra(line, None)  # unknown: the server decides
    with pytest.raises(ConfigError, match=r"need CouchDB 3\.4\+"):
        cfg.check_extra(line, "3.3.3")


def test_extra_admins_may_not_replace_ours_or_appear_in_open_mode() -> None:
    entries = cfg.check_extra("[admins]\nadmin = -pbkdf2-0a,s,1\n", "3.5.0")
    with pytest.raises(ConfigError, match="the admin usercouch creates"):
        cfg.check_extra_admins(entries, options())
    with pytest.raises(ConfigError, match="need auth='basic'"):
        cfg.check_extra_admins(entries, options("open"))
    cfg.check_extra_admins(cfg.check_extra("[admins]\nbob = -pbkdf2-0a,s,1\n", None), options())


# -- versions and the uri file --------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [("3.5.0", (3, 5, 0)), ("3.4", (3, 4, 0)), ("3.4.0-RC1", (3, 4, 0)), ("x", None)],
)
def test_parse_version(text: str, expected: tuple[int, int, int] | None) -> None:
    assert cfg.parse_version(text) == expected


@pytest.mark.parametrize("old", ["2.3.1", "1.6.1"])
def test_check_version_refuses_before_3(old: str) -> None:
    with pytest.raises(ConfigError, match=f"CouchDB {old} is not supported.*needs CouchDB 3.x"):
        cfg.check_version(old)
    cfg.check_version("3.0.0")
    cfg.check_version(None)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("http://127.0.0.1:40781/", ("http", "127.0.0.1", 40781)),
        ("http://::1:40781/", ("http", "::1", 40781)),
        ("http://[::1]:40781/", ("http", "::1", 40781)),
        ("https://0.0.0.0:6984/\n", ("https", "0.0.0.0", 6984)),
        ("http://:::5984/", ("http", "::", 5984)),
    ],
)
def test_parse_uri_line(line: str, expected: tuple[str, str, int]) -> None:
    assert cfg.parse_uri_line(line) == expected


@pytest.mark.parametrize("line", ["nonsense", "ftp://h:1/", "http://127.0.0.1/", "http://h:0/"])
def test_parse_uri_line_refuses_non_urls(line: str) -> None:
    with pytest.raises(ValueError):
        cfg.parse_uri_line(line)


def test_parse_uri_file_waits_for_complete_lines() -> None:
    assert cfg.parse_uri_file("") is None
    assert cfg.parse_uri_file("http://127.0.0.1:40") is None  # written half-way
    assert cfg.parse_uri_file("http://127.0.0.1:40781/\n") == {"http": 40781}
    both = "http://::1:40781/\nhttps://::1:43551/\n"
    assert cfg.parse_uri_file("http://::1:40781/\n", listeners=2) is None
    assert cfg.parse_uri_file(both, listeners=2) == {"http": 40781, "https": 43551}


def test_server_version_from_body_or_header() -> None:
    body = Response(200, {}, b'{"couchdb":"Welcome","version":"3.5.0"}')
    assert server_version(body) == "3.5.0"
    header = Response(401, {"server": "CouchDB/3.3.3 (Erlang OTP/24)"}, b"{}")
    assert server_version(header) == "3.3.3"
    assert server_version(Response(200, {}, b"not json")) is None


# -- finding an install ---------------------------------------------------------------------


def make_tree(root: Path, version: str | None = "3.5.0", *, exe: bool = True) -> Path:
    """A minimal install tree: bin/couchdb, etc/default.ini, lib/couch-<version>."""
    (root / "bin").mkdir(parents=True)
    (root / "etc").mkdir()
    script = root / "bin" / "couchdb"
    script.write_text("#!/bin/sh\nexit 1\n")
    script.chmod(0o755 if exe else 0o644)
    (root / "etc" / "default.ini").write_text("[couchdb]\n")
    if version is not None:
        (root / "lib" / f"couch-{version}").mkdir(parents=True)
    return root


def no_brew(environ: Mapping[str, str]) -> str | None:
    return None


def find(
    tmp_path: Path,
    home: str | None = None,
    environ: Mapping[str, str] | None = None,
    brew: Callable[[Mapping[str, str]], str | None] = no_brew,
) -> Install:
    return locate(
        home,
        {"PATH": str(tmp_path / "empty-path")} if environ is None else environ,
        opt_root=str(tmp_path / "opt" / "couchdb"),
        homebrew_prefixes=(str(tmp_path / "homebrew"),),
        brew_prefix=brew,
        snap_root=str(tmp_path / "snap" / "couchdb" / "current" / "opt" / "couchdb"),
    )


def test_install_version_from_lib(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "c", "3.3.3")
    (root / "lib" / "couch-3.5.0").mkdir()
    (root / "lib" / "couch_log-9.9.9").mkdir()
    (root / "lib" / "couch-notaversion").mkdir()
    assert install_version(str(root)) == "3.5.0"


def test_install_version_from_start_erl_data(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "c", None)
    assert install_version(str(root)) is None
    (root / "releases").mkdir()
    (root / "releases" / "start_erl.data").write_text("13.2.2 3.4.2\n")
    assert install_version(str(root)) == "3.4.2"


def test_explicit_home_comes_first(tmp_path: Path) -> None:
    mine = make_tree(tmp_path / "mine")
    env_home = make_tree(tmp_path / "env")
    make_tree(tmp_path / "opt" / "couchdb")
    found = find(tmp_path, str(mine), {"COUCHDB_HOME": str(env_home)})
    assert found == Install(str(mine), "3.5.0", f"CouchDB(home=...) = {mine}")


def test_couchdb_home_comes_next(tmp_path: Path) -> None:
    env_home = make_tree(tmp_path / "env", "3.4.1")
    make_tree(tmp_path / "opt" / "couchdb")
    found = find(tmp_path, None, {"COUCHDB_HOME": str(env_home)})
    assert (found.root, found.version) == (str(env_home), "3.4.1")
    assert found.executable == f"{env_home}/bin/couchdb"
    assert found.default_ini == f"{env_home}/etc/default.ini"


def test_an_unusable_explicit_choice_stops_the_search(tmp_path: Path) -> None:
    make_tree(tmp_path / "opt" / "couchdb")
    broken = make_tree(tmp_path / "broken", exe=False)
    with pytest.raises(EngineNotFound) as info:
        find(tmp_path, None, {"COUCHDB_HOME": str(broken)})
    message = str(info.value)
    assert f"$COUCHDB_HOME = {broken}: {broken} bin/couchdb is not executable" in message
    assert "opt" not in message.replace(str(broken), "")
    assert "COUCHDB_HOME=/path/to/couchdb" in message  # how to fix it


def test_couchdb_on_path_through_a_symlink(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "Cellar" / "couchdb" / "3.5.0")
    bindir = tmp_path / "usr-bin"
    bindir.mkdir()
    (bindir / "couchdb").symlink_to(root / "bin" / "couchdb")
    make_tree(tmp_path / "opt" / "couchdb")
    found = find(tmp_path, None, {"PATH": f"{tmp_path / 'nothing'}:{bindir}"})
    assert found.root == str(root)
    assert found.found_by == f"couchdb on $PATH ({bindir / 'couchdb'})"


def test_couchdb_on_path_directly(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "rel" / "couchdb")
    assert find(tmp_path, None, {"PATH": str(root / "bin")}).root == str(root)


def test_a_path_couchdb_outside_any_install_is_reported_and_skipped(tmp_path: Path) -> None:
    # Like the snap's /snap/bin/couchdb -> /usr/bin/snap.
    bindir = tmp_path / "snapbin"
    bindir.mkdir()
    launcher = tmp_path / "usr" / "bin" / "snap"
    launcher.parent.mkdir(parents=True)
    launcher.write_text("#!/bin/sh\n")
    launcher.chmod(0o755)
    (bindir / "couchdb").symlink_to(launcher)
    opt = make_tree(tmp_path / "opt" / "couchdb")
    assert find(tmp_path, None, {"PATH": str(bindir)}).root == str(opt)
    (opt / "bin" / "couchdb").unlink()
    with pytest.raises(EngineNotFound) as info:
        find(tmp_path, None, {"PATH": str(bindir)})
    assert f"couchdb on $PATH ({bindir / 'couchdb'}): {tmp_path / 'usr'} has no bin/couchdb" in (
        str(info.value)
    )


def test_opt_couchdb(tmp_path: Path) -> None:
    opt = make_tree(tmp_path / "opt" / "couchdb")
    assert find(tmp_path) == Install(str(opt), "3.5.0", str(opt))


def test_homebrew_prefixes(tmp_path: Path) -> None:
    brewed = make_tree(tmp_path / "homebrew" / "opt" / "couchdb")
    assert find(tmp_path).root == str(brewed)
    shutil.rmtree(tmp_path / "homebrew")
    elsewhere = make_tree(tmp_path / "hb-env" / "opt" / "couchdb")
    found = find(tmp_path, None, {"HOMEBREW_PREFIX": str(tmp_path / "hb-env")})
    assert found.root == str(elsewhere)
    assert found.found_by == f"Homebrew {elsewhere}"


def test_brew_prefix_is_asked_last_and_only_when_needed(tmp_path: Path) -> None:
    asked: list[Mapping[str, str]] = []

    def brew(environ: Mapping[str, str]) -> str | None:
        asked.append(environ)
        return str(tmp_path / "brew-says")

    make_tree(tmp_path / "opt" / "couchdb")
    find(tmp_path, brew=brew)
    assert asked == []
    shutil.rmtree(tmp_path / "opt")
    brewed = make_tree(tmp_path / "brew-says" / "opt" / "couchdb")
    assert find(tmp_path, brew=brew).root == str(brewed)
    assert len(asked) == 1


def test_run_brew_prefix_asks_brew_once(tmp_path: Path) -> None:
    assert run_brew_prefix({"PATH": str(tmp_path)}) is None  # no brew: nothing is run
    calls = tmp_path / "calls"
    brew = tmp_path / "brew"
    brew.write_text(f"#!/bin/sh\necho \"$1\" >> '{calls}'\necho /opt/brewed\n")
    brew.chmod(0o755)
    assert run_brew_prefix({"PATH": str(tmp_path)}) == "/opt/brewed"
    assert run_brew_prefix({"PATH": str(tmp_path)}) == "/opt/brewed"
    assert calls.read_text() == "--prefix\n"


def test_snap(tmp_path: Path) -> None:
    snap = make_tree(tmp_path / "snap" / "couchdb" / "current" / "opt" / "couchdb")
    assert find(tmp_path).found_by == f"snap {snap}"


def test_not_found_names_every_place_and_what_was_wrong(tmp_path: Path) -> None:
    opt = make_tree(tmp_path / "opt" / "couchdb", "2.3.1")
    (tmp_path / "homebrew" / "opt" / "couchdb").mkdir(parents=True)
    snap = make_tree(tmp_path / "snap" / "couchdb" / "current" / "opt" / "couchdb")
    (snap / "etc" / "default.ini").unlink()
    (snap / "etc" / "default.ini").mkdir()  # there, but not a readable file
    with pytest.raises(EngineNotFound) as info:
        find(tmp_path)
    lines = str(info.value).splitlines()
    assert lines[0] == "Apache CouchDB 3.x not found. Looked at:"
    assert lines[1:7] == [
        "  - CouchDB(home=...): not set",
        "  - $COUCHDB_HOME: not set",
        "  - couchdb on $PATH: none",
        f"  - {opt}: Apache CouchDB 2.3.1 is not supported: usercouch needs CouchDB 3.x "
        "(1.x and 2.x are long out of support upstream)",
        f"  - Homebrew {tmp_path}/homebrew/opt/couchdb: has no bin/couchdb",
        f"  - snap {snap}: etc/default.ini is unreadable (Is a directory)",
    ]
    assert "COUCHDB_HOME" in lines[7]


def test_a_default_ini_readable_only_by_its_group_says_how_to_fix_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The deb/rpm packages make etc/default.ini 0640 couchdb:couchdb. Root reads it anyway,
    # so the refusal is simulated rather than made with chmod.
    import grp

    from usercouch.engines import couchdb as module

    opt = make_tree(tmp_path / "opt" / "couchdb")
    ini = opt / "etc" / "default.ini"
    group = grp.getgrgid(ini.stat().st_gid).gr_name

    def refuse(path: str, *args: object, **kwargs: object) -> object:
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(module, "open", refuse, raising=False)
    with pytest.raises(EngineNotFound) as info:
        find(tmp_path)
    message = str(info.value)
    assert f"{opt}: etc/default.ini is not readable by this user" in message
    assert f"sudo usermod -aG {group} $USER" in message
    assert f"sudo chmod o+r {ini}" in message


def test_a_2x_home_is_refused_clearly(tmp_path: Path) -> None:
    old = make_tree(tmp_path / "old", "2.3.1")
    with pytest.raises(EngineNotFound, match=r"CouchDB 2\.3\.1 is not supported"):
        CouchDB(home=str(old))


# -- the stand-in server --------------------------------------------------------------------


@pytest.fixture
def fake_home(tmp_path: Path) -> Callable[..., str]:
    """Copies of tests/fake_couchdb at a chosen version, run by this Python."""

    def make(version: str = "3.5.0") -> str:
        root = tmp_path / f"fake-couchdb-{version}"
        shutil.copytree(FAKE_TREE, root)
        (root / "lib" / f"couch-{version}").mkdir(parents=True)
        script = root / "bin" / "couchdb"
        body = script.read_text().split("\n", 1)[1]
        script.write_text(f"#!{sys.executable}\n{body}")
        script.chmod(0o755)
        return str(root)

    return make


@pytest.fixture
def basedir(tmp_path: Path) -> str:
    path = tmp_path / "base"
    path.mkdir()
    return str(path)


def _fake_pid(basedir: str) -> int:
    with open(os.path.join(basedir, "fake-couchdb.pid"), encoding="ascii") as f:
        return int(f.read())


def test_bootstrap_against_the_stand_in(fake_home: Callable[..., str], basedir: str) -> None:
    with UserCouch(basedir, engine=CouchDB(home=fake_home())) as couch:
        env = couch.bootstrap()
        assert couch.version == "3.5.0"
        with open(os.path.join(basedir, "uuid"), encoding="ascii") as f:
            assert request(env, "GET", "/").json()["uuid"] == f.read().strip()
        assert request(env, "GET", "/", authorize=False).status == 401
        assert request(env, "GET", "/_users").status == 200
        for name in ("session.ini", "vm.args", "couch.uri", "uuid"):
            mode = stat.S_IMODE(os.stat(os.path.join(basedir, name)).st_mode)
            assert mode == 0o600, name
        password = env["basic"]["password"]
        for folder, _, files in os.walk(basedir):
            for name in files:
                with open(os.path.join(folder, name), "rb") as f:
                    assert password.encode() not in f.read(), name


def test_restart_keeps_port_secret_and_hash(fake_home: Callable[..., str], basedir: str) -> None:
    with UserCouch(basedir, engine=CouchDB(home=fake_home())) as couch:
        env = couch.bootstrap()
        with open(os.path.join(basedir, "session.ini"), encoding="utf-8") as f:
            first = f.read()
        pid = _fake_pid(basedir)
        assert couch.kill() is True
        assert pid_gone(pid)
        assert couch.start() is True
        assert couch.env is not None and couch.env["port"] == env["port"]
        assert request(env, "GET", "/").status == 200
        with open(os.path.join(basedir, "session.ini"), encoding="utf-8") as f:
            again = f.read()
        assert again == first.replace("port = 0", f"port = {env['port']}")
        couch.crash()
        assert couch.check() is True
        assert request(env, "GET", "/_replicator").status == 200
    # A new UserCouch on the same basedir keeps the cookie secret (a new port and admin).
    session = os.path.join(basedir, "session.ini")
    secret = previous_secret(session)
    assert secret is not None
    with UserCouch(basedir, engine=CouchDB(home=fake_home("3.4.0"))) as couch:
        couch.bootstrap()
        assert previous_secret(session) == secret


def test_open_mode(fake_home: Callable[..., str], basedir: str) -> None:
    with UserCouch(basedir, engine=CouchDB(home=fake_home())) as couch:
        env = couch.bootstrap("open")
        assert "basic" not in env
        assert request(env, "GET", "/_users").status == 200


@pytest.mark.parametrize("version", ["3.3.3", "3.5.0"])
def test_given_password_hash_is_accepted(
    fake_home: Callable[..., str], basedir: str, version: str
) -> None:
    # The stand-in refuses sha256 hashes before 3.4 and checks the PBKDF2 itself.
    with UserCouch(basedir, engine=CouchDB(home=fake_home(version))) as couch:
        env = couch.bootstrap(config={"username": "joe", "password": "s3cret pass"})
        assert couch.version == version
        assert request(env, "GET", "/").status == 200
    with open(os.path.join(basedir, "session.ini"), encoding="utf-8") as f:
        text = f.read()
    scheme = "-pbkdf2:sha256-" if version == "3.5.0" else "-pbkdf2-"
    assert f"joe = {scheme}" in text
    assert "[chttpd_auth_lockout]" not in text
    assert "s3cret" not in text


def test_ipv6_loopback(fake_home: Callable[..., str], basedir: str) -> None:
    try:
        socket.socket(socket.AF_INET6).bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    with UserCouch(basedir, engine=CouchDB(home=fake_home())) as couch:
        env = couch.bootstrap(config={"bind_address": "::1"})
        assert env["url"] == f"http://[::1]:{env['port']}/"
        assert request(env, "GET", "/").status == 200


def test_a_uri_file_written_in_two_parts(
    fake_home: Callable[..., str], basedir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_COUCHDB_MODE", "slow-uri")
    with UserCouch(basedir, engine=CouchDB(home=fake_home())) as couch:
        env = couch.bootstrap()
        assert request(env, "GET", "/").status == 200


def test_parent_erlang_flags_do_not_reach_the_server(
    fake_home: Callable[..., str], basedir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The stand-in exits if it sees any of them (as they would change how CouchDB starts).
    for var in ("ERL_FLAGS", "ERL_AFLAGS", "ERL_ZFLAGS", "COUCHDB_INI_FILES"):
        monkeypatch.setenv(var, "-bogus")
    with UserCouch(basedir, engine=CouchDB(home=fake_home())) as couch:
        assert request(couch.bootstrap(), "GET", "/").status == 200


def test_extra_reaches_the_ini_and_bad_extra_writes_nothing(
    fake_home: Callable[..., str], basedir: str
) -> None:
    with UserCouch(basedir, engine=CouchDB(home=fake_home())) as couch:
        with pytest.raises(ConfigError, match="not a password hash"):
            couch.bootstrap(extra="[admins]\nbob = plain-password\n")
        assert sorted(os.listdir(basedir)) == ["lockfile"]
        other = pbkdf2_hash("bob's", iterations=10)
        couch.bootstrap(extra=f"[couchdb]\nmax_document_size = 1000\n[admins]\nbob = {other}\n")
    with open(os.path.join(basedir, "session.ini"), encoding="utf-8") as f:
        assert f.read().endswith(f"[couchdb]\nmax_document_size = 1000\n[admins]\nbob = {other}\n")


@pytest.mark.parametrize(
    ("mode", "reason", "log_needle"),
    [
        ("exit-early", "server exited during start", "exiting early, as told"),
        ("garbage-uri", "unexpected uri file content", "listening"),
        ("deny", "GET / kept answering 401", "401"),
    ],
)
def test_start_failures_carry_the_log_and_leave_nothing_running(
    fake_home: Callable[..., str],
    basedir: str,
    monkeypatch: pytest.MonkeyPatch,
    mode: str,
    reason: str,
    log_needle: str,
) -> None:
    monkeypatch.setenv("FAKE_COUCHDB_MODE", mode)
    # deny: a short timeout, as the server keeps answering until the deadline.
    with UserCouch(basedir, engine=CouchDB(home=fake_home()), timeout=1.0) as couch:
        with pytest.raises(StartError) as info:
            couch.bootstrap()
        assert reason in str(info.value)
        assert log_needle in info.value.log_tail
        assert info.value.command[1:3] == ["-couch_ini", f"{couch.engine.home}/etc/default.ini"]
        assert pid_gone(_fake_pid(basedir))
        assert couch.pid is None


@pytest.mark.parametrize("mode", ["no-uri", "no-system-dbs"])
def test_timeouts(
    fake_home: Callable[..., str], basedir: str, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    monkeypatch.setenv("FAKE_COUCHDB_MODE", mode)
    with UserCouch(basedir, engine=CouchDB(home=fake_home()), timeout=0.5) as couch:
        with pytest.raises(StartError, match=r"not ready after 0\.5 s") as info:
            couch.bootstrap()
        assert info.value.returncode == -signal.SIGKILL  # stopped by usercouch
        assert pid_gone(_fake_pid(basedir))


def test_a_2x_server_is_refused_after_start(
    fake_home: Callable[..., str], basedir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A tree that names no version, whose server turns out to be 2.x.
    home = fake_home()
    shutil.rmtree(os.path.join(home, "lib"))
    os.unlink(os.path.join(home, "releases", "start_erl.data"))
    monkeypatch.setenv("FAKE_COUCHDB_SERVED_VERSION", "2.3.1")
    engine = CouchDB(home=home)
    assert engine.version is None
    with UserCouch(basedir, engine=engine) as couch:
        with pytest.raises(StartError, match=r"CouchDB 2\.3\.1 is not supported"):
            couch.bootstrap()
        assert pid_gone(_fake_pid(basedir))


def test_a_fixed_port_from_extra(fake_home: Callable[..., str], basedir: str) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with UserCouch(basedir, engine=CouchDB(home=fake_home())) as couch:
        env = couch.bootstrap(extra=f"[chttpd]\nport = {port}\n")
        assert env["port"] == port
        couch.kill()
        couch.start()
        assert request(env, "GET", "/").status == 200


def test_a_busy_port_on_restart_is_a_start_error(
    fake_home: Callable[..., str], basedir: str
) -> None:
    with UserCouch(basedir, engine=CouchDB(home=fake_home())) as couch:
        env = couch.bootstrap()
        couch.kill()
        with socket.socket() as squatter:
            # SO_REUSEADDR: the killed server's closed connections may still be in TIME_WAIT.
            squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            squatter.bind(("127.0.0.1", env["port"]))
            squatter.listen()
            with pytest.raises(StartError, match="exited during start"):
                couch.start()


def test_tls_through_the_stand_in(fake_home: Callable[..., str], basedir: str) -> None:
    pytest.importorskip("cryptography")
    from usercouch import sslhelpers

    with sslhelpers.TempPKI() as pki, UserCouch(
        basedir, engine=CouchDB(home=fake_home())
    ) as couch:
        env = couch.bootstrap(config={"ssl": pki.server_config()})
        ssl_env = env["x_env_ssl"]
        assert ssl_env["port"] != env["port"]
        assert request(ssl_env, "GET", "/").status == 200
        couch.kill()
        couch.start()
        assert couch.env is not None and couch.env["x_env_ssl"]["port"] == ssl_env["port"]
        assert request(ssl_env, "GET", "/").status == 200


# -- the registry ---------------------------------------------------------------------------


def test_registry_by_name_env_and_auto(
    fake_home: Callable[..., str], basedir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = fake_home()
    monkeypatch.setenv("COUCHDB_HOME", home)
    monkeypatch.delenv("USERCOUCH_ENGINE", raising=False)
    assert isinstance(auto_detect(), CouchDB)  # preferred over PouchDB Server
    assert isinstance(get_engine(None), CouchDB)
    monkeypatch.setenv("USERCOUCH_ENGINE", "couchdb")
    assert get_engine(None).describe() == (
        f"couchdb 3.5.0 in {home} (found by $COUCHDB_HOME = {home})"
    )
    with UserCouch(basedir, engine="couchdb") as couch:
        assert couch.engine.name == "couchdb"
        assert request(couch.bootstrap(), "GET", "/").status == 200


def test_check_options_runs_before_anything_is_written(
    fake_home: Callable[..., str], basedir: str
) -> None:
    engine = CouchDB(home=fake_home())
    opts = build_options("basic", {"username": "admin"}, "[admins]\nadmin = -pbkdf2-0a,s,1\n")
    with pytest.raises(ConfigError, match="the admin usercouch creates"):
        engine.check_options(opts, Paths(basedir))
    with UserCouch(basedir, engine=engine) as couch:
        with pytest.raises(ConfigError, match="need auth='basic'"):
            couch.bootstrap("open", extra="[admins]\nbob = -pbkdf2-0a,s,1\n")
        assert sorted(os.listdir(basedir)) == ["lockfile"]


@pytest.mark.parametrize("name", ["with ; semicolon", "with = equals", "new\nline"])
def test_basedir_the_ini_cannot_hold_is_refused_before_writing(
    fake_home: Callable[..., str], tmp_path: Path, name: str
) -> None:
    basedir = tmp_path / name
    basedir.mkdir()
    with UserCouch(basedir, engine=CouchDB(home=fake_home())) as couch:
        with pytest.raises(ConfigError):
            couch.bootstrap()
        assert sorted(os.listdir(basedir)) == ["lockfile"]
