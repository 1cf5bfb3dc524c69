"""Integration tests of UserCouch's API against real servers (the suite's engine)."""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import requests
from helpers import pid_exists, pid_gone

from usercouch import LockError, StartError, StateError, UserCouch
from usercouch.errors import ConfigError
from usercouch.http import request

MakeCouch = Callable[..., UserCouch]


# -- construction and the lock ------------------------------------------------------------


def test_missing_basedir_is_named_and_not_created(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        UserCouch(missing)
    assert not missing.exists()


def test_basedir_that_is_a_file_is_named(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(NotADirectoryError, match=str(afile)):
        UserCouch(afile)


def test_empty_basedir_is_refused_not_taken_for_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="basedir is empty"):
        UserCouch("")
    assert list(tmp_path.iterdir()) == []
    UserCouch(".").close()  # the working directory, asked for explicitly
    assert (tmp_path / "lockfile").exists()


def test_unknown_engine_name_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'mongo'"):
        UserCouch(tmp_path, engine="mongo")
    assert not (tmp_path / "lockfile").exists()


def test_engine_auto_and_a_bad_usercouch_engine_variable(
    engine_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("USERCOUCH_ENGINE", "mongo")
    with pytest.raises(ValueError, match=r"^USERCOUCH_ENGINE: unknown engine 'mongo'"):
        UserCouch(tmp_path)
    assert not (tmp_path / "lockfile").exists()
    monkeypatch.delenv("USERCOUCH_ENGINE")
    with UserCouch(tmp_path, engine="auto") as couch:  # as USERCOUCH_ENGINE=auto means
        assert couch.engine.name in ("couchdb", "pouchdb")


def test_second_instance_on_same_basedir_gets_lock_error(make_couch: MakeCouch) -> None:
    first = make_couch()
    with pytest.raises(LockError) as info:
        UserCouch(first.basedir)
    lockfile = os.path.join(first.basedir, "lockfile")
    assert info.value.lockfile == lockfile
    assert str(info.value) == f"cannot acquire exclusive lock on '{lockfile}'"


def test_lock_is_released_by_close_with_and_gc(engine_name: str, tmp_path: Path) -> None:
    couch = UserCouch(tmp_path, engine=engine_name)
    couch.close()
    with UserCouch(tmp_path, engine=engine_name), pytest.raises(LockError):
        UserCouch(tmp_path, engine=engine_name)
    couch = UserCouch(tmp_path, engine=engine_name)
    del couch
    gc.collect()
    UserCouch(tmp_path, engine=engine_name).close()


def test_lock_holds_across_processes(engine_name: str, tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import sys
                from usercouch import UserCouch
                couch = UserCouch({str(tmp_path)!r}, engine={engine_name!r})
                print("locked", flush=True)
                sys.stdin.read()
                """
            ),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(LockError):
            UserCouch(tmp_path, engine=engine_name)
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(10)
    UserCouch(tmp_path, engine=engine_name).close()  # released when the holder exited


# -- bootstrap and the env ----------------------------------------------------------------


def test_bootstrap_env_and_document_round_trip(make_couch: MakeCouch) -> None:
    couch = make_couch()
    env = couch.bootstrap()
    assert set(env) == {"url", "port", "basic", "authorization"}
    assert env["url"] == f"http://127.0.0.1:{env['port']}/"
    assert json.loads(json.dumps(env)) == env
    assert couch.env == env
    assert request(env, "PUT", "/mydb").status == 201
    assert request(env, "PUT", "/mydb/doc1", body={"n": 1}).status == 201
    assert request(env, "GET", "/mydb/doc1").json()["n"] == 1


def test_bootstrap_twice_raises(make_couch: MakeCouch) -> None:
    couch = make_couch()
    couch.bootstrap()
    with pytest.raises(StateError, match="already bootstrapped"):
        couch.bootstrap()


def test_refused_bootstrap_writes_nothing_and_can_retry(make_couch: MakeCouch) -> None:
    couch = make_couch()
    before = sorted(os.listdir(couch.basedir))
    with pytest.raises(ConfigError, match="'bogus'"):
        couch.bootstrap(config={"bogus": 1})
    with pytest.raises(ConfigError):
        couch.bootstrap(extra="\0")
    assert sorted(os.listdir(couch.basedir)) == before == ["lockfile"]
    assert couch.pid is None
    env = couch.bootstrap()
    assert request(env, "GET", "/").status == 200


def test_given_credentials_are_used(make_couch: MakeCouch) -> None:
    env = make_couch().bootstrap(config={"username": "joe", "password": "correct horse"})
    assert env["basic"] == {"username": "joe", "password": "correct horse"}
    assert request(env, "GET", "/_all_dbs").status == 200


def test_basic_auth_refuses_anonymous_and_wrong_password(make_couch: MakeCouch) -> None:
    env = make_couch().bootstrap()
    for path in ("/", "/_all_dbs", "/_session", "/_uuids"):
        assert request(env, "GET", path, authorize=False).status == 401, path
    assert request(env, "PUT", "/newdb", authorize=False).status == 401
    wrong = dict(env, authorization="Basic " + "am9lOm5vcGU=")  # joe:nope
    assert request(wrong, "GET", "/_all_dbs").status == 401
    assert request(env, "GET", "/_all_dbs").status == 200  # the server survived it all


def test_open_auth_lets_anonymous_do_everything(make_couch: MakeCouch) -> None:
    env = make_couch().bootstrap(auth="open")
    assert "basic" not in env and "authorization" not in env
    assert request(env, "PUT", "/open").status == 201
    assert request(env, "POST", "/open", body={"_id": "x"}).status in (201, 202)
    assert request(env, "GET", "/open/x").status == 200


def test_bind_any_gives_a_loopback_url(make_couch: MakeCouch) -> None:
    env = make_couch().bootstrap(config={"bind_address": "0.0.0.0"})
    assert env["url"].startswith("http://127.0.0.1:")
    assert request(env, "GET", "/").status == 200


def _has_ipv6_loopback() -> bool:
    import socket

    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback on this machine")
def test_ipv6_loopback(make_couch: MakeCouch) -> None:
    env = make_couch().bootstrap(config={"bind_address": "::1"})
    assert env["url"] == f"http://[::1]:{env['port']}/"
    assert request(env, "GET", "/").status == 200


def test_many_instances_side_by_side(make_couch: MakeCouch) -> None:
    envs = [make_couch().bootstrap() for _ in range(3)]
    assert len({env["port"] for env in envs}) == 3
    for env in envs:
        assert request(env, "GET", "/").status == 200


def test_uuid_is_stable_per_basedir_and_settable(make_couch: MakeCouch, tmp_path: Path) -> None:
    basedir = tmp_path / "stable"
    basedir.mkdir()
    first = make_couch(basedir)
    env = first.bootstrap()
    uuid = request(env, "GET", "/").json()["uuid"]
    first.close()
    env = make_couch(basedir).bootstrap()
    assert request(env, "GET", "/").json()["uuid"] == uuid
    wanted = "0123456789abcdef0123456789abcdef"
    env = make_couch().bootstrap(config={"uuid": wanted})
    assert request(env, "GET", "/").json()["uuid"] == wanted


# -- life cycle -----------------------------------------------------------------------------


def test_kill_start_isalive(make_couch: MakeCouch) -> None:
    couch = make_couch()
    with pytest.raises(StateError):
        couch.start()
    env = couch.bootstrap()
    assert couch.isalive() is True
    assert couch.start() is False
    pid = couch.pid
    assert pid is not None
    assert couch.kill() is True
    assert pid_gone(pid)
    assert couch.isalive() is False
    assert couch.pid is None
    assert couch.kill() is False
    assert couch.start() is True
    assert couch.isalive() is True
    assert request(env, "GET", "/").status == 200  # same port, same credentials


def test_data_survives_kill_and_a_new_instance(make_couch: MakeCouch, tmp_path: Path) -> None:
    basedir = tmp_path / "keep"
    basedir.mkdir()
    couch = make_couch(basedir)
    env = couch.bootstrap()
    assert request(env, "PUT", "/keep").status == 201
    for i in range(20):
        assert request(env, "PUT", f"/keep/d{i}", body={"i": i}).status == 201
    couch.crash()
    couch.close()
    env = make_couch(basedir).bootstrap()
    rows = request(env, "GET", "/keep/_all_docs?include_docs=true").json()["rows"]
    assert sorted(row["doc"]["i"] for row in rows) == list(range(20))


def test_check_restarts_a_crashed_server_on_the_same_port(make_couch: MakeCouch) -> None:
    couch = make_couch()
    env = couch.bootstrap()
    assert couch.check() is False
    old_pid = couch.pid
    assert couch.crash() is True
    assert couch.isalive() is False
    assert couch.check() is True
    assert couch.pid != old_pid
    assert couch.env == env
    assert request(env, "GET", "/_all_dbs").status == 200


def test_check_restarts_after_an_outside_kill(make_couch: MakeCouch) -> None:
    couch = make_couch()
    env = couch.bootstrap()
    pid = couch.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    assert pid_gone(pid)
    assert couch.isalive() is False
    assert couch.check() is True
    assert request(env, "GET", "/").status == 200


def test_with_block_stops_server_and_unlocks(engine_name: str, tmp_path: Path) -> None:
    with UserCouch(tmp_path, engine=engine_name) as couch:
        couch.bootstrap()
        pid = couch.pid
        assert pid is not None and pid_exists(pid)
    assert pid_gone(pid)
    with pytest.raises(StateError, match="closed"):
        couch.bootstrap()
    UserCouch(tmp_path, engine=engine_name).close()


def test_garbage_collection_stops_server(engine_name: str, tmp_path: Path) -> None:
    couch = UserCouch(tmp_path, engine=engine_name)
    couch.bootstrap()
    pid = couch.pid
    assert pid is not None
    del couch
    gc.collect()
    assert pid_gone(pid)


def test_interpreter_exit_stops_server(engine_name: str, tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        from usercouch import UserCouch
        couch = UserCouch({str(tmp_path)!r}, engine={engine_name!r})
        couch.bootstrap()
        print(couch.pid, flush=True)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stderr == ""
    assert pid_gone(int(out.stdout))


def test_start_timeout_raises_and_leaves_nothing(make_couch: MakeCouch) -> None:
    couch = make_couch(timeout=0.001)
    with pytest.raises(StartError) as info:
        couch.bootstrap()
    assert "not ready after" in str(info.value)
    assert info.value.command and info.value.returncode == -signal.SIGKILL
    assert "killed by signal 9" in str(info.value)
    assert couch.pid is None


def test_log_is_rotated_on_restart(make_couch: MakeCouch) -> None:
    couch = make_couch()
    couch.bootstrap()
    couch.kill()
    couch.start()
    assert os.path.isfile(couch.logfile + ".previous")
    assert os.path.isfile(couch.logfile)


def test_log_tail_gives_the_last_n_lines_and_none_for_zero(make_couch: MakeCouch) -> None:
    couch = make_couch()
    env = couch.bootstrap(config={"loglevel": "debug"})
    for i in range(5):
        request(env, "GET", f"/_uuids?n={i + 1}")
    couch.kill()  # the log is final once the server is gone
    with open(couch.logfile, encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert len(lines) > 3
    assert couch.log_tail(3) == "\n".join(lines[-3:])
    assert couch.log_tail(1) == lines[-1]
    assert couch.log_tail(0) == ""
    assert couch.log_tail(-2) == ""


def test_version_is_known(make_couch: MakeCouch) -> None:
    couch = make_couch()
    couch.bootstrap()
    assert couch.version and couch.version[0].isdigit()


# -- interop --------------------------------------------------------------------------------


def test_requests_works_from_the_env_alone(make_couch: MakeCouch) -> None:
    env = make_couch().bootstrap()
    session = requests.Session()
    session.headers["Authorization"] = env["authorization"]
    url = env["url"]
    assert session.put(url + "interop").status_code == 201
    resp = session.post(url + "interop/", json={"_id": "a", "v": 1})
    assert resp.status_code == 201, resp.text
    bulk = session.post(
        url + "interop/_bulk_docs", json={"docs": [{"_id": f"k{i}"} for i in (3, 1, 2)]}
    )
    assert [row["id"] for row in bulk.json()] == ["k3", "k1", "k2"]
    auth = (env["basic"]["username"], env["basic"]["password"])
    basic = requests.get(url + "interop/a", auth=auth)
    assert basic.json()["v"] == 1


def test_a_documents_etag_is_its_revision(make_couch: MakeCouch) -> None:
    """Clients take the rev from HEAD's ETag (pycouchdb's delete(id) does), as CouchDB sends it."""
    env = make_couch().bootstrap()
    assert request(env, "PUT", "/tags").status == 201
    for doc_id in ("plain", "_design/ddoc"):
        rev = request(env, "PUT", f"/tags/{doc_id}", body={"v": 1}).json()["rev"]
        for method in ("HEAD", "GET"):
            resp = request(env, method, f"/tags/{doc_id}")
            assert resp.status == 200
            assert resp.headers["etag"] == f'"{rev}"', (method, doc_id)
    rev = request(env, "HEAD", "/tags/plain").headers["etag"].strip('"')
    assert request(env, "DELETE", f"/tags/plain?rev={rev}").status == 200


def test_a_forked_child_exiting_leaves_the_parents_server_alone(
    engine_name: str, tmp_path: Path
) -> None:
    script = textwrap.dedent(
        f"""
        import os, sys
        from usercouch import UserCouch
        couch = UserCouch({str(tmp_path)!r}, engine={engine_name!r})
        couch.bootstrap()
        child = os.fork()
        if child == 0:
            sys.exit(0)  # a normal exit runs finalizers and atexit in the child
        os.waitpid(child, 0)
        print(couch.isalive(), flush=True)
        couch.close()
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "True"
