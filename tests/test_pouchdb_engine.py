"""Unit tests of the PouchDB Server engine's pure parts: config building, extra, discovery."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from usercouch.config import build_options, pbkdf2_hash
from usercouch.engines import pouchdb
from usercouch.errors import ConfigError, EngineNotFound, UserCouchError
from usercouch.layout import Paths

PATHS = Paths("/base dir")
UUID = "0123456789abcdef0123456789abcdef"


def test_config_for_basic_auth() -> None:
    options = build_options("basic", {"username": "joe", "password": "pw"})
    config = pouchdb.build_config(PATHS, options, UUID, 0)
    secret = config["couch_httpd_auth"].pop("secret")
    assert len(secret) == 32
    admin_hash = config.pop("admins")["joe"]
    assert config == {
        "couchdb": {
            "database_dir": "/base dir/data",
            "uuid": UUID,
            "file_compression": "snappy",
        },
        "httpd": {"bind_address": "127.0.0.1", "port": 0},
        "couch_httpd_auth": {"iterations": 10, "require_valid_user": True},
        "log": {"file": "/base dir/log/couchdb.log", "level": "info"},
        "usercouch": {"auth": "basic"},
    }
    derived, salt, iterations = admin_hash.removeprefix("-pbkdf2-").split(",")
    assert derived == hashlib.pbkdf2_hmac("sha1", b"pw", salt.encode(), 10, 20).hex()
    assert iterations == "10"
    assert "pw" not in json.dumps(config)


def test_config_for_open_auth_has_no_admins() -> None:
    config = pouchdb.build_config(PATHS, build_options("open"), UUID, 5984)
    assert "admins" not in config
    assert config["couch_httpd_auth"]["require_valid_user"] is False
    assert config["usercouch"] == {"auth": "open"}
    assert config["httpd"]["port"] == 5984


@pytest.mark.parametrize(
    ("couch_level", "pouch_level"),
    [("debug", "debug"), ("notice", "info"), ("warning", "warning"), ("critical", "error"),
     ("none", "none")],
)
def test_log_levels_map_to_pouchdb_levels(couch_level: str, pouch_level: str) -> None:
    options = build_options("open", {"loglevel": couch_level})
    assert pouchdb.build_config(PATHS, options, UUID, 0)["log"]["level"] == pouch_level


def test_extra_sections_are_merged_last() -> None:
    extra = json.dumps({"log": {"level": "error"}, "couch_httpd_auth": {"timeout": 60}})
    config = pouchdb.build_config(PATHS, build_options("open", extra=extra), UUID, 0)
    assert config["log"] == {"file": "/base dir/log/couchdb.log", "level": "error"}
    assert config["couch_httpd_auth"]["timeout"] == 60


def test_tls_sections(tmp_path: Path) -> None:
    files = {}
    for name in ("crt", "key", "ca"):
        files[name] = str(tmp_path / name)
        Path(files[name]).write_text(name)
    options = build_options(
        "open",
        {
            "ssl": {"cert_file": files["crt"], "key_file": files["key"]},
            "replicator": {"ca_file": files["ca"]},
        },
    )
    config = pouchdb.build_config(PATHS, options, UUID, 0, 4443)
    assert config["usercouch"]["ssl"] == {
        "cert_file": files["crt"], "key_file": files["key"], "ca_file": None, "port": 4443,
    }
    assert config["usercouch"]["replicator"] == {
        "ca_file": files["ca"], "cert_file": None, "key_file": None,
    }


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ("not json", "JSON object"),
        ("[1, 2]", "got [1, 2]"),
        ('{"log": "debug"}', "section 'log' must be a JSON object"),
        ('{"admins": "hunter2"}', "section 'admins'"),
        ('{"usercouch": {"auth": "open"}}', "reserved"),
        ('{"couchdb": {"database_dir": "/elsewhere"}}', "couchdb.database_dir"),
        ('{"httpd": {"bind_address": "0.0.0.0"}}', "config['bind_address']"),
        ('{"log": {"file": "/tmp/x.log"}}', "log.file"),
        ('{"couchdb": {"uuid": "x"}}', "config['uuid']"),
        ('{"admins": {"eve": "hunter2"}}', "admins['eve']"),
        ('{"admins": {"eve": "-hashed-abc,def"}}', "admins['eve']"),
    ],
)
def test_bad_extra_is_refused(extra: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        pouchdb.check_extra(extra)
    assert needle in str(info.value)
    assert "hunter2" not in str(info.value)


def test_hashed_extra_admins_are_accepted() -> None:
    extra = json.dumps({"admins": {"eve": pbkdf2_hash("pw")}})
    assert set(pouchdb.check_extra(extra)["admins"]) == {"eve"}


def test_missing_install_says_how_to_get_one(tmp_path: Path) -> None:
    with pytest.raises(EngineNotFound, match="python -m usercouch install pouchdb"):
        pouchdb.PouchDBServer(home=str(tmp_path), node="/usr/bin/node")


def test_home_comes_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("USERCOUCH_POUCHDB_HOME", str(tmp_path))
    with pytest.raises(EngineNotFound, match=str(tmp_path)):
        pouchdb.PouchDBServer(node="/usr/bin/node")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert pouchdb.default_home() == str(tmp_path / "cache" / "usercouch" / "pouchdb-server")


@pytest.mark.parametrize("kind", ["missing", "not executable", "directory", "bare name"])
@pytest.mark.parametrize("via", ["argument", "environment"])
def test_a_wrong_node_makes_the_engine_unusable(
    kind: str, via: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Found unusable up front (and so in `usercouch engines`), not when the server starts.
    node = {
        "missing": str(tmp_path / "no" / "node"),
        "not executable": str(tmp_path / "node.txt"),
        "directory": str(tmp_path),
        "bare name": "no-such-node-binary-here",
    }[kind]
    (tmp_path / "node.txt").write_text("#!/bin/sh\n")
    if via == "environment":
        monkeypatch.setenv("USERCOUCH_NODE", node)
    with pytest.raises(EngineNotFound) as info:
        pouchdb.PouchDBServer(home=str(tmp_path), node=node if via == "argument" else None)
    message = str(info.value)
    assert repr(node) in message
    assert ("$USERCOUCH_NODE=" in message) is (via == "environment")
    assert "install pouchdb" in message  # tmp_path holds no install either


def test_a_wrong_node_alone_does_not_suggest_installing(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / "node_modules" / "pouchdb-server").mkdir(parents=True)
    (home / "node_modules" / "pouchdb-server" / "package.json").write_text('{"version": "4.2.0"}')
    with pytest.raises(EngineNotFound) as info:
        pouchdb.PouchDBServer(home=str(home), node=str(tmp_path / "no-node"))
    assert "Node.js" in str(info.value) and "install pouchdb" not in str(info.value)


def test_node_is_resolved_to_an_executable_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "mynode"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o700)
    monkeypatch.setenv("PATH", str(bindir))
    home = tmp_path / "home"
    server = home / "node_modules" / "pouchdb-server"
    server.mkdir(parents=True)
    (server / "package.json").write_text('{"version": "4.2.0"}')
    assert pouchdb.PouchDBServer(home=str(home), node="mynode").node == str(fake)
    monkeypatch.setenv("USERCOUCH_NODE", "mynode")
    assert pouchdb.PouchDBServer(home=str(home)).node == str(fake)


def test_is_installed_needs_the_stamp_of_this_lockfile(tmp_path: Path) -> None:
    server = tmp_path / "node_modules" / "pouchdb-server"
    server.mkdir(parents=True)
    (server / "package.json").write_text('{"version": "4.2.0"}')
    assert not pouchdb.is_installed(str(tmp_path))
    (tmp_path / ".usercouch-installed").write_text("stale\n")
    assert not pouchdb.is_installed(str(tmp_path))
    with open(os.path.join(pouchdb.runtime_dir(), "package-lock.json"), "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    (tmp_path / ".usercouch-installed").write_text(digest + "\n")
    assert pouchdb.is_installed(str(tmp_path))
    messages: list[str] = []
    assert pouchdb.install(str(tmp_path), progress=messages.append) == str(tmp_path)
    assert messages == [f"PouchDB Server already installed in {tmp_path}"]


def test_install_refuses_a_prefix_that_is_not_its_own(tmp_path: Path) -> None:
    # A project directory named by mistake: its package.json and node_modules must survive.
    project = tmp_path / "myapp"
    (project / "node_modules" / "mylib").mkdir(parents=True)
    (project / "package.json").write_text('{"name": "myapp"}')
    with pytest.raises(UserCouchError, match="is not empty and holds no usercouch"):
        pouchdb.install(str(project), progress=lambda msg: None)
    assert (project / "package.json").read_text() == '{"name": "myapp"}'
    assert os.listdir(project / "node_modules") == ["mylib"]
    assert sorted(os.listdir(project)) == ["node_modules", "package.json"]
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    with pytest.raises(NotADirectoryError, match=repr(str(a_file))):
        pouchdb.install(str(a_file), progress=lambda msg: None)


@pytest.mark.parametrize("kind", ["new", "empty", "interrupted install"])
def test_install_accepts_a_new_empty_or_own_prefix(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prefix = tmp_path / "prefix"
    if kind != "new":
        prefix.mkdir()
    if kind == "interrupted install":
        shutil.copyfile(
            os.path.join(pouchdb.runtime_dir(), "package.json"), prefix / "package.json"
        )
    monkeypatch.setenv("PATH", str(tmp_path / "empty-path"))  # stop where npm would run
    with pytest.raises(EngineNotFound, match="npm not found"):
        pouchdb.install(str(prefix), progress=lambda msg: None)


def test_runtime_files_ship_with_the_package() -> None:
    for name in ("launcher.js", "package.json", "package-lock.json", ".npmrc"):
        assert os.path.isfile(os.path.join(pouchdb.runtime_dir(), name)), name
    with open(os.path.join(pouchdb.runtime_dir(), ".npmrc"), encoding="utf-8") as f:
        npmrc = f.read()
    assert "omit=optional" in npmrc and "ignore-scripts=true" in npmrc


@pytest.mark.slow
def test_concurrent_installs_into_one_prefix_run_npm_once(tmp_path: Path) -> None:
    """Two installs racing for a new prefix: one runs npm ci, the other waits and reuses it."""
    import threading

    prefix = str(tmp_path / "pouchdb-server")
    barrier = threading.Barrier(2)
    messages: list[list[str]] = [[], []]
    errors: list[BaseException] = []

    def run(i: int) -> None:
        barrier.wait()
        try:
            pouchdb.install(prefix, progress=messages[i].append)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert not errors
    assert pouchdb.is_installed(prefix)
    ran_npm = [m for m in messages if any("npm ci" in line for line in m)]
    assert len(ran_npm) == 1, messages
    assert any(f"already installed in {prefix}" in line for m in messages for line in m)
