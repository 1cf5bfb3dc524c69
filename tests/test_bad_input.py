"""Bad input through the public API, end to end: a clear error naming the value, nothing
written, and the instance (or the basedir) still bootstraps correctly afterwards.

The unit tests of ``config.build_options`` live in test_config.py; here every case goes
through ``UserCouch(...)`` or ``bootstrap(...)`` with a real engine behind it, and the
basedir is compared file by file before and after.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from usercouch import ConfigError, UserCouch
from usercouch.http import request

Snapshot = dict[str, tuple[bool, int, int, int]]


def _snapshot(root: Path) -> Snapshot:
    """Every path under ``root`` with kind, size, mtime and mode: any write shows up."""
    found: Snapshot = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            found[os.path.relpath(path, root)] = (
                os.path.isdir(path),
                st.st_size,
                st.st_mtime_ns,
                st.st_mode,
            )
    return found


@dataclass(frozen=True)
class Case:
    """One bad input: where it goes, what it is, which error and which names it must show.

    ``args`` builds the keyword arguments from ``(good_basedir, scratch_dir)``; ``names``
    (given those arguments) must all appear in the error message; ``secret`` must never
    appear anywhere in it.
    """

    call: str  # "init": UserCouch(**args); "bootstrap": UserCouch(good).bootstrap(**args)
    args: Callable[[Path, Path], dict[str, Any]]
    error: type[Exception]
    names: Callable[[dict[str, Any]], tuple[str, ...]] = field(default=lambda args: ())
    secret: str | None = None


def _init(error: type[Exception], *names: str, **args: Any) -> Case:
    return Case("init", lambda good, scratch: {"basedir": good, **args}, error, lambda a: names)


def _boot(error: type[Exception], *names: str, secret: str | None = None, **args: Any) -> Case:
    return Case("bootstrap", lambda good, scratch: args, error, lambda a: names, secret)


def _cfg(error: type[Exception], key: str, value: Any, *names: str, **more: Any) -> Case:
    """A bad value for one config key: the message names the key and (by default) the value."""
    shown = names or (key, repr(value) if not isinstance(value, str) else value)
    return _boot(error, *shown, config={key: value}, **more)


def _basedir(error: type[Exception], make: Callable[[Path], Any], *, shows_path: bool = True,
             names: tuple[str, ...] = ()) -> Case:
    """A bad basedir built inside the scratch dir; the message must show the path given."""

    def shown(args: dict[str, Any]) -> tuple[str, ...]:
        return ((os.fsdecode(args["basedir"]),) if shows_path else ()) + names

    return Case("init", lambda good, scratch: {"basedir": make(scratch)}, error, shown)


def _make_file(scratch: Path) -> Path:
    path = scratch / "plain file.txt"
    path.write_text("not a directory\n")
    return path


def _make_dangling_link(scratch: Path) -> Path:
    link = scratch / "dangling ☂"
    link.symlink_to(scratch / "gone for good")
    return link


_BAD_PASSWORDS = {
    "newline": "Sup3r\nsecret-pw",
    "nul": "Sup3r\x00secret-pw",
    "tab": "Sup3r\tsecret-pw",
    "escape": "Sup3r\x1b[31msecret-pw",
    "too-long": "Sup3rsecret-pw" * 20,
}

CASES: dict[str, Case | Any] = {
    # -- UserCouch(basedir) -----------------------------------------------------------------
    "basedir-missing": _basedir(FileNotFoundError, lambda s: s / "no such dir"),
    "basedir-missing-unicode": _basedir(FileNotFoundError, lambda s: s / "nëw dïr ☃ 日本"),
    "basedir-is-a-file": _basedir(NotADirectoryError, _make_file),
    "basedir-dangling-symlink": _basedir(FileNotFoundError, _make_dangling_link),
    "basedir-nul": _basedir(ValueError, lambda s: f"{s}/bad\x00dir", shows_path=False,
                            names=("NUL", "\\x00")),
    "basedir-int": _basedir(TypeError, lambda s: 42, shows_path=False, names=("basedir", "int")),
    "basedir-none": _basedir(TypeError, lambda s: None, shows_path=False,
                             names=("basedir", "NoneType")),
    "basedir-bytes": _basedir(TypeError, lambda s: os.fsencode(s), shows_path=False,
                              names=("basedir", "bytes")),
    # -- UserCouch(engine=) -----------------------------------------------------------------
    "engine-unknown": _init(ValueError, "nosuchengine", engine="nosuchengine"),
    "engine-injection": _init(ValueError, "pouchdb\\n[admins]", engine="pouchdb\n[admins]"),
    "engine-int": _init(TypeError, "engine", "int", engine=42),
    "engine-not-an-engine": _init(TypeError, "engine", "object", engine=object()),
    # -- UserCouch(timeout=) ----------------------------------------------------------------
    "timeout-zero": _init(ValueError, "timeout", "0", timeout=0),
    "timeout-negative": _init(ValueError, "timeout", "-1.5", timeout=-1.5),
    "timeout-str": _init(ValueError, "timeout", "'30'", timeout="30"),
    "timeout-bool": _init(ValueError, "timeout", "True", timeout=True),
    "timeout-nan": _init(ValueError, "timeout", "nan", timeout=float("nan")),
    "timeout-inf": _init(ValueError, "timeout", "inf", timeout=float("inf")),
    "timeout-none": _init(ValueError, "timeout", "None", timeout=None),
    # -- bootstrap(auth=) -------------------------------------------------------------------
    "auth-oauth": _boot(ConfigError, "oauth", "2.0", auth="oauth"),
    "auth-unknown": _boot(ConfigError, "auth", "digest", auth="digest"),
    "auth-wrong-case": _boot(ConfigError, "auth", "BASIC", auth="BASIC"),
    "auth-none": _boot(ConfigError, "auth", "None", auth=None),
    "auth-int": _boot(ConfigError, "auth", "1", auth=1),
    "auth-injection": _boot(ConfigError, "auth", "basic\\n[admins]", auth="basic\n[admins]"),
    # -- bootstrap(config=) as a whole ------------------------------------------------------
    "config-list": _boot(TypeError, "config", "list", config=[("loglevel", "debug")]),
    "config-str": _boot(TypeError, "config", "str", config="loglevel=debug"),
    "config-unknown-key": _boot(ConfigError, "'port'", config={"port": 5984}),
    "config-key-injection": _boot(ConfigError, "'[admins]\\nroot'",
                                  config={"[admins]\nroot": "x"}),
    "config-key-not-str": _boot(ConfigError, "1", config={1: "x"}),
    # -- config keys ------------------------------------------------------------------------
    "bind-not-loopback-or-any": _cfg(ConfigError, "bind_address", "10.0.0.1"),
    "bind-hostname": _cfg(ConfigError, "bind_address", "localhost"),
    "bind-injection": _cfg(ConfigError, "bind_address", "127.0.0.1\n[admins]",
                           "bind_address", "127.0.0.1\\n[admins]"),
    "bind-int": _cfg(ConfigError, "bind_address", 2130706433),
    "bind-none": _cfg(ConfigError, "bind_address", None),
    "loglevel-unknown": _cfg(ConfigError, "loglevel", "verbose"),
    "loglevel-semicolon": _cfg(ConfigError, "loglevel", "info ; debug"),
    "loglevel-injection": _cfg(ConfigError, "loglevel", "info\n[admins]\nroot = x",
                               "loglevel", "info\\n[admins]"),
    "compression-deflate-10": _cfg(ConfigError, "file_compression", "deflate_10"),
    "compression-gzip": _cfg(ConfigError, "file_compression", "gzip"),
    "compression-equals": _cfg(ConfigError, "file_compression", "snappy = none"),
    "username-equals": _cfg(ConfigError, "username", "root=x"),
    "username-section": _cfg(ConfigError, "username", "[admins]"),
    "username-newline": _cfg(ConfigError, "username", "root\n[admins]", "username",
                             "root\\n[admins]"),
    "username-semicolon": _cfg(ConfigError, "username", "root;x"),
    "username-double-quote": _cfg(ConfigError, "username", 'root"x'),
    "username-single-quote": _cfg(ConfigError, "username", "root'x"),
    "username-nul": _cfg(ConfigError, "username", "root\x00x", "username", "root\\x00x"),
    "username-colon": _cfg(ConfigError, "username", "root:x"),
    "username-empty": _cfg(ConfigError, "username", "", "username", "''"),
    "username-too-long": _cfg(ConfigError, "username", "u" * 65),
    "username-unicode": _cfg(ConfigError, "username", "ädmin"),
    "username-int": _cfg(ConfigError, "username", 42),
    **{
        f"password-{kind}": _cfg(ConfigError, "password", pw, "password", secret=pw)
        for kind, pw in _BAD_PASSWORDS.items()
    },
    "password-empty": _cfg(ConfigError, "password", "", "password"),
    "password-int": _cfg(ConfigError, "password", 12345678, "password", secret="12345678"),
    "password-with-open-auth": _boot(ConfigError, "password", "basic", auth="open",
                                     config={"password": "OpenSesame-42"},
                                     secret="OpenSesame-42"),
    "username-with-open-auth": _boot(ConfigError, "username", "basic", auth="open",
                                     config={"username": "admin"}),
    "uuid-not-hex": _cfg(ConfigError, "uuid", "not-a-uuid"),
    "uuid-uppercase": _cfg(ConfigError, "uuid", "0123456789ABCDEF0123456789ABCDEF"),
    "uuid-short": _cfg(ConfigError, "uuid", "0123456789abcdef0123456789abcde"),
    "uuid-newline": _cfg(ConfigError, "uuid", "0123456789abcdef0123456789abcdef\n",
                         "uuid", "0123456789abcdef0123456789abcdef\\n"),
    "ssl-not-a-dict": _cfg(ConfigError, "ssl", "yes", "ssl", "str"),
    "ssl-unknown-key": _cfg(ConfigError, "ssl", {"certfile": "x"}, "ssl", "certfile"),
    "replicator-max-depth": _boot(ConfigError, "max_depth", "0",
                                  config={"replicator": {"ca_file": __file__, "max_depth": 0}}),
    "ssl-check-hostname-str": _boot(
        ConfigError, "check_hostname", "'no'",
        config={"ssl": {"cert_file": __file__, "key_file": __file__, "check_hostname": "no"}},
    ),
    # -- bootstrap(extra=) ------------------------------------------------------------------
    "extra-int": _boot(TypeError, "extra", "int", extra=42),
    "extra-bytes": _boot(TypeError, "extra", "bytes", extra=b"{}"),
    "extra-dict": _boot(TypeError, "extra", "dict", extra={"httpd": {}}),
    "extra-ini-for-pouchdb": pytest.param(
        _boot(ConfigError, "extra", extra="[httpd]\nport = 1\n"), marks=pytest.mark.pouchdb_only
    ),
    "extra-json-list": pytest.param(
        _boot(ConfigError, "extra", '["a"]', extra='["a"]'), marks=pytest.mark.pouchdb_only
    ),
    "extra-section-not-object": pytest.param(
        _boot(ConfigError, "extra", "'httpd'", "got 5", extra='{"httpd": 5}'),
        marks=pytest.mark.pouchdb_only,
    ),
}


def _file_cases() -> dict[str, Case]:
    """Certificate paths that do not exist, are directories, or hold a NUL."""

    def ssl(cert: Callable[[Path], str]) -> Callable[[Path, Path], dict[str, Any]]:
        return lambda good, scratch: {
            "config": {"ssl": {"cert_file": cert(scratch), "key_file": __file__}}
        }

    def cert(args: dict[str, Any]) -> tuple[str, ...]:
        return ("cert_file", args["config"]["ssl"]["cert_file"])

    def missing(scratch: Path) -> str:
        return str(scratch / "certs ✓" / "no such.pem")

    return {
        "ssl-cert-missing-unicode-path": Case("bootstrap", ssl(missing), ConfigError, cert),
        "ssl-cert-is-a-directory": Case("bootstrap", ssl(str), ConfigError, cert),
        "ssl-cert-nul": Case(
            "bootstrap", ssl(lambda scratch: "cert\x00.pem"), ConfigError,
            lambda args: ("cert_file", "cert\\x00.pem"),
        ),
        "replicator-ca-missing": Case(
            "bootstrap",
            lambda good, scratch: {"config": {"replicator": {"ca_file": missing(scratch)}}},
            ConfigError,
            lambda args: ("ca_file", args["config"]["replicator"]["ca_file"]),
        ),
    }


CASES.update(_file_cases())


def _params() -> list[Any]:
    params = []
    for name, case in CASES.items():
        if isinstance(case, Case):
            params.append(pytest.param(case, id=name))
        else:  # already a pytest.param carrying marks
            params.append(pytest.param(*case.values, marks=case.marks, id=name))
    return params


def test_enough_cases() -> None:
    assert len(CASES) >= 25


def _assert_names_and_secrets(exc: BaseException, case: Case, args: dict[str, Any]) -> None:
    message = str(exc)
    for name in case.names(args):
        assert name in message, f"{name!r} not named in: {message!r}"
    if case.secret is not None:
        chain: list[BaseException] = [exc]
        while chain[-1].__cause__ or chain[-1].__context__:
            chain.append(chain[-1].__cause__ or chain[-1].__context__)  # type: ignore[arg-type]
        for err in chain:
            assert case.secret not in str(err)
            assert case.secret not in repr(err)
            assert repr(case.secret) not in repr(err.args)


@pytest.mark.parametrize("case", _params())
def test_bad_input_is_named_writes_nothing_and_leaves_a_usable_instance(
    case: Case, engine_name: str, tmp_path: Path
) -> None:
    good = tmp_path / "good"
    good.mkdir()
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    args = case.args(good, scratch)

    if case.call == "init":
        args.setdefault("engine", engine_name)
        before = _snapshot(tmp_path)
        with pytest.raises(case.error) as info:
            UserCouch(**args)
        assert _snapshot(tmp_path) == before  # not even a lockfile
        _assert_names_and_secrets(info.value, case, args)
        couch = UserCouch(good, engine=engine_name)  # no lock or other state was left behind
    else:
        couch = UserCouch(good, engine=engine_name)
        before = _snapshot(tmp_path)
        assert sorted(before) == ["good", os.path.join("good", "lockfile"), "scratch"]
        with pytest.raises(case.error) as info:
            couch.bootstrap(**args)
        assert _snapshot(tmp_path) == before
        assert couch.pid is None
        _assert_names_and_secrets(info.value, case, args)
    with couch:
        env = couch.bootstrap()
        assert couch.isalive()
        assert request(env, "PUT", "/after-bad-input").status == 201
        assert request(env, "GET", "/", authorize=False).status == 401


def test_repeated_bad_bootstraps_then_a_good_one(make_couch: Callable[..., UserCouch]) -> None:
    couch = make_couch()
    before = _snapshot(Path(couch.basedir))
    for config in ({"loglevel": "loud"}, {"username": "a\nb"}, {"uuid": "x"}):
        with pytest.raises(ConfigError):
            couch.bootstrap(config=config)
    assert _snapshot(Path(couch.basedir)) == before
    env = couch.bootstrap(config={"username": "admin", "password": "correct horse"})
    assert env["basic"] == {"username": "admin", "password": "correct horse"}
    assert request(env, "GET", "/_all_dbs").status == 200


# -- valid but unusual paths must work ------------------------------------------------------

_HARD_NAMES = {
    "spaces-and-unicode": "with spaces/ünïcödé ☃ 日本語 dir",
    "ini-and-json-syntax": "a;b=c [admins] #x 'q' \"d\" \\e",
    "shell-syntax": "$(touch pwned) `id` & | > <",
    "leading-dash": "-rf --config",
}


@pytest.mark.parametrize("name", list(_HARD_NAMES.values()), ids=list(_HARD_NAMES))
def test_valid_path_with_unusual_characters_works(
    name: str, engine_name: str, tmp_path: Path
) -> None:
    basedir = tmp_path / name
    basedir.mkdir(parents=True)
    with UserCouch(basedir, engine=engine_name) as couch:
        env = couch.bootstrap()
        assert couch.isalive()
        assert request(env, "PUT", "/db").status == 201
        assert request(env, "PUT", "/db/doc", body={"where": name}).status == 201
        assert request(env, "GET", "/db/doc").json()["where"] == name
        assert couch.logfile.startswith(str(basedir))
        assert os.path.getsize(couch.logfile) > 0
        couch.kill()
        assert couch.start() is True
        assert request(env, "GET", "/db/doc").json()["where"] == name
    assert not (tmp_path / "pwned").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [name.split("/")[0]]


def test_path_with_a_newline_works_or_is_refused_by_name(
    engine_name: str, tmp_path: Path
) -> None:
    """A newline is legal in a Linux path but breaks line-based config files (ini): an engine
    may refuse it, but then before writing anything and naming the path."""
    basedir = tmp_path / "line\nbreak"
    basedir.mkdir()
    with UserCouch(basedir, engine=engine_name) as couch:
        before = _snapshot(basedir)
        try:
            env = couch.bootstrap()
        except (ConfigError, ValueError) as exc:
            assert repr(str(basedir))[1:-1] in str(exc) or str(basedir) in str(exc)
            assert _snapshot(basedir) == before
            return
        assert request(env, "PUT", "/db").status == 201
        assert request(env, "GET", "/db").status == 200
