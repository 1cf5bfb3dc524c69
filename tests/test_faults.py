"""Faults a private couch must survive: kills, races, crash leftovers, failed starts, load.

Every test runs real servers of the suite's engine. Waits are polls on a condition with a
deadline (``helpers.poll``), never fixed sleeps.
"""

from __future__ import annotations

import fcntl
import gc
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from helpers import children_of, group_members, pid_exists, poll, zombie_children

from usercouch import LockError, StartError, UserCouch
from usercouch.config import Options
from usercouch.engines import Engine, Launch, Ready, get_engine
from usercouch.http import request
from usercouch.layout import Paths

MakeCouch = Callable[..., UserCouch]


# -- helpers --------------------------------------------------------------------------------


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _my_flocks() -> int:
    """How many flock()s this process holds, from the kernel's own table."""
    me = str(os.getpid())
    with open("/proc/locks", encoding="ascii") as f:
        return sum(1 for line in f if " FLOCK " in line and line.split()[4] == me)


def _lock_is_free(lockfile: str) -> bool:
    fd = os.open(lockfile, os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def _write_docs(env: dict[str, Any], db: str, count: int) -> dict[str, str]:
    """Write ``count`` docs one by one plus a batch; return id -> acknowledged rev."""
    assert request(env, "PUT", f"/{db}").status == 201
    acked: dict[str, str] = {}
    for i in range(count):
        resp = request(env, "PUT", f"/{db}/doc-{i:04d}", body={"n": i})
        assert resp.status == 201, resp.body
        acked[f"doc-{i:04d}"] = resp.json()["rev"]
    batch = [{"_id": f"bulk-{i:04d}", "n": i} for i in range(count)]
    resp = request(env, "POST", f"/{db}/_bulk_docs", body={"docs": batch})
    assert resp.status == 201, resp.body
    for row in resp.json():
        assert "rev" in row, row
        acked[row["id"]] = row["rev"]
    return acked


def _read_revs(env: dict[str, Any], db: str) -> dict[str, str]:
    resp = request(env, "GET", f"/{db}/_all_docs")
    assert resp.status == 200, resp.body
    return {row["id"]: row["value"]["rev"] for row in resp.json()["rows"]}


def _python(script: str, *args: str, **kwargs: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def _bad_port_extra(engine_name: str, port: int) -> str:
    """Engine-specific extra config that makes the server bind a port already in use."""
    if engine_name == "pouchdb":
        return json.dumps({"httpd": {"port": port}})
    if engine_name == "couchdb":
        return f"[chttpd]\nport = {port}\n"
    raise AssertionError(f"no bad-port extra config known for engine {engine_name!r}")


@contextmanager
def _occupied_port(port: int = 0, host: str = "127.0.0.1") -> Iterator[int]:
    """Hold a listening socket on ``port`` (0: any) so a server cannot bind it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1)
        yield sock.getsockname()[1]
    finally:
        sock.close()


def _assert_nothing_running(before: set[int]) -> None:
    assert poll(lambda: children_of() <= before, 5.0), children_of() - before
    assert not zombie_children()


def _assert_fresh_couch_bootstraps(basedir: Path | str, engine_name: str) -> None:
    """The lock is free and the basedir is usable: a new UserCouch bootstraps there."""
    with UserCouch(basedir, engine=engine_name) as again:
        env = again.bootstrap()
        assert again.isalive()
        assert request(env, "GET", "/_all_dbs").status == 200


# -- the server is SIGKILLed ----------------------------------------------------------------


def test_sigkilled_server_restarts_with_every_acknowledged_write(make_couch: MakeCouch) -> None:
    couch = make_couch()
    env = couch.bootstrap()
    acked = _write_docs(env, "precious", 60)
    pid = couch.pid
    assert pid is not None

    os.killpg(pid, signal.SIGKILL)  # from outside, as the OOM killer or a user would
    assert poll(lambda: not pid_exists(pid))
    assert couch.isalive() is False

    assert couch.check() is True
    assert couch.pid not in (None, pid)
    assert couch.env == env  # same port, same credentials: handed-out envs stay valid
    assert couch.isalive() is True
    assert _read_revs(env, "precious") == acked
    resp = request(env, "GET", "/precious/doc-0059")
    assert resp.status == 200 and resp.json()["n"] == 59
    assert couch.check() is False  # healthy now: no second restart


@pytest.mark.parametrize("stop", ["kill", "crash"])
def test_databases_created_or_deleted_just_before_a_stop_stay_so(
    make_couch: MakeCouch, stop: str
) -> None:
    """An acknowledged PUT /db or DELETE /db is durable, however soon the server stops.

    PouchDB Server records databases in pouch__all_dbs__ from a queue, after its answer:
    stopped right after a 201, the database used to vanish (and a deleted one to come back).
    """
    couch = make_couch()
    env = couch.bootstrap()
    for i in range(4):
        assert request(env, "PUT", f"/made{i}").status == 201
        getattr(couch, stop)()
        assert couch.start() is True
        assert request(env, "GET", f"/made{i}").status == 200
        assert request(env, "DELETE", f"/made{i}").status == 200
        getattr(couch, stop)()
        assert couch.start() is True
        assert request(env, "GET", f"/made{i}").status == 404
    user_dbs = [db for db in request(env, "GET", "/_all_dbs").json() if not db.startswith("_")]
    assert user_dbs == []


def test_check_after_a_crash_keeps_old_credentials_and_refuses_others(
    make_couch: MakeCouch,
) -> None:
    couch = make_couch()
    env = couch.bootstrap()
    pid = couch.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    assert poll(lambda: not pid_exists(pid))
    assert couch.check() is True
    wrong = dict(env, authorization="Basic " + "d3Jvbmc6d3Jvbmc=")  # wrong:wrong
    assert request(wrong, "GET", "/_all_dbs").status == 401
    assert request(env, "GET", "/_all_dbs").status == 200


# -- the owning Python process is SIGKILLed -------------------------------------------------

_OWNER = """
import json, sys, threading
from usercouch import UserCouch

basedir, engine = sys.argv[1], sys.argv[2]
made = {}

def boot():
    # Bootstrapped from a short-lived thread: the server must outlive this thread.
    couch = UserCouch(basedir, engine=engine)
    made["couch"], made["env"] = couch, couch.bootstrap()

worker = threading.Thread(target=boot)
worker.start()
worker.join()
print(json.dumps({"pid": made["couch"].pid, "env": made["env"]}), flush=True)
sys.stdin.read()
"""


def test_owner_sigkilled_leaves_no_server(engine_name: str, tmp_path: Path) -> None:
    owner = _python(_OWNER, str(tmp_path), engine_name)
    try:
        assert owner.stdout is not None
        report = json.loads(owner.stdout.readline())
        pid, env = report["pid"], report["env"]
        # The thread that bootstrapped has exited; the server still answers.
        assert request(env, "GET", "/").status == 200
        group = group_members(pid)
        assert pid in group
    finally:
        owner.kill()  # SIGKILL: no atexit, no finalizer, no chance to clean up
        owner.wait()
    assert poll(lambda: not group_members(pid), 5.0), group_members(pid)
    assert all(not pid_exists(p) for p in group)
    with pytest.raises(OSError):
        request(env, "GET", "/", timeout=1.0)
    _assert_fresh_couch_bootstraps(tmp_path, engine_name)


# -- four processes race for one basedir ----------------------------------------------------

_RACER = """
import json, os, sys
from usercouch import LockError, UserCouch

basedir, engine, gate = sys.argv[1], sys.argv[2], int(sys.argv[3])
print("ready", flush=True)
os.read(gate, 1)  # every racer blocks here until the parent closes the gate's write end
try:
    couch = UserCouch(basedir, engine=engine)
except LockError as exc:
    print(json.dumps({"won": False, "message": str(exc), "lockfile": exc.lockfile}), flush=True)
    sys.exit(0)
env = couch.bootstrap()
print(json.dumps({"won": True, "env": env, "pid": couch.pid}), flush=True)
sys.stdin.read()
couch.close()
"""


@pytest.mark.slow
def test_four_processes_race_for_one_basedir(engine_name: str, tmp_path: Path) -> None:
    gate_r, gate_w = os.pipe()
    racers: list[subprocess.Popen[str]] = []
    try:
        for _ in range(4):
            racers.append(
                _python(_RACER, str(tmp_path), engine_name, str(gate_r), pass_fds=(gate_r,))
            )
        for racer in racers:
            assert racer.stdout is not None and racer.stdout.readline().strip() == "ready"
        os.close(gate_w)  # EOF for all four at once: they race
        gate_w = -1
        results = []
        for racer in racers:
            assert racer.stdout is not None
            results.append(json.loads(racer.stdout.readline()))
        winners = [r for r in results if r["won"]]
        losers = [r for r in results if not r["won"]]
        assert len(winners) == 1, results
        assert len(losers) == 3
        lockfile = str(tmp_path / "lockfile")
        for loser in losers:
            assert loser["lockfile"] == lockfile
            assert loser["message"] == f"cannot acquire exclusive lock on '{lockfile}'"
        env = winners[0]["env"]
        assert request(env, "GET", "/_all_dbs").status == 200
        assert group_members(winners[0]["pid"])
        with pytest.raises(LockError):
            UserCouch(tmp_path, engine=engine_name)  # still held by the winner
    finally:
        if gate_w != -1:
            os.close(gate_w)
        os.close(gate_r)
        for racer in racers:
            assert racer.stdin is not None
            racer.stdin.close()
        codes = [racer.wait(30) for racer in racers]
    assert codes == [0, 0, 0, 0]
    assert not group_members(winners[0]["pid"])
    _assert_fresh_couch_bootstraps(tmp_path, engine_name)


# -- leftovers of an earlier crash ----------------------------------------------------------

_CRASHER = """
import json, sys
from usercouch import UserCouch
from usercouch.http import request

couch = UserCouch(sys.argv[1], engine=sys.argv[2])
env = couch.bootstrap()
assert request(env, "PUT", "/kept").status == 201
assert request(env, "PUT", "/kept/before-crash", body={"v": 1}).status == 201
print(json.dumps({"pid": couch.pid}), flush=True)
sys.stdin.read()
"""


def _plant_leftovers(basedir: Path, occupied_port: int) -> None:
    """What a crash (of any engine) can leave behind, plus half-written files."""
    uri = f"http://127.0.0.1:{occupied_port}/\n"
    (basedir / "couch.uri").write_text(uri)  # points at a live listener that is not a couch
    for pidfile in ("couchdb.pid", "pouchdb-server.pid", "couch.pid"):
        (basedir / pidfile).write_text("999999\n")
    (basedir / "pouchdb-server.json").write_text('{"couchdb": {"database_dir": "/nonexis')
    (basedir / "session.ini").write_text("[couchdb]\ndatabase_dir = /nonexistent/da")
    (basedir / "vm.args").write_text("-name stale@")
    (basedir / "pouchdb-server.json.tmp4242").write_text('{"half": ')
    (basedir / "session.ini.tmp4242").write_text("[admins]\nstale = ")
    (basedir / "uuid").write_text("not-a-uuid\n")
    (basedir / "uuid.tmp4242").write_text("deadbeef")


def test_leftovers_of_a_crash_do_not_stop_the_next_start(
    engine_name: str, tmp_path: Path
) -> None:
    crasher = _python(_CRASHER, str(tmp_path), engine_name)
    try:
        assert crasher.stdout is not None
        pid = json.loads(crasher.stdout.readline())["pid"]
    finally:
        crasher.kill()
        crasher.wait()
    assert poll(lambda: not group_members(pid), 5.0)

    with _occupied_port() as decoy:
        _plant_leftovers(tmp_path, decoy)
        with UserCouch(tmp_path, engine=engine_name) as couch:
            env = couch.bootstrap()
            assert env["port"] != decoy
            assert couch.isalive()
            resp = request(env, "GET", "/kept/before-crash")
            assert resp.status == 200 and resp.json()["v"] == 1
            assert request(env, "PUT", "/kept/after-crash", body={"v": 2}).status == 201
            # The half-written uuid was replaced by a valid one.
            assert len((tmp_path / "uuid").read_text().strip()) == 32


def test_stale_unlocked_lockfile_is_taken_over(engine_name: str, tmp_path: Path) -> None:
    (tmp_path / "lockfile").write_text("garbage from a previous owner\n")
    os.chmod(tmp_path / "lockfile", 0o644)
    with UserCouch(tmp_path, engine=engine_name) as couch:
        couch.bootstrap()
        assert couch.isalive()
        assert not _lock_is_free(str(tmp_path / "lockfile"))


# -- the server exits during start ----------------------------------------------------------


def _assert_clear_start_error(err: StartError, *, exited: bool) -> None:
    assert err.command and all(isinstance(part, str) for part in err.command)
    if exited:
        assert isinstance(err.returncode, int) and err.returncode != 0
        assert err.log_tail.strip(), "the error must carry the server's last log lines"
        assert err.log_tail in str(err)
    assert err.command[0] in str(err)


def test_bad_extra_config_port_in_use(
    make_couch: MakeCouch, engine_name: str
) -> None:
    before = children_of()
    couch = make_couch()
    with _occupied_port() as port, pytest.raises(StartError) as info:
        couch.bootstrap(extra=_bad_port_extra(engine_name, port))
    _assert_clear_start_error(info.value, exited=True)
    assert "eaddrinuse" in info.value.log_tail.lower()
    assert couch.pid is None and couch.isalive() is False
    _assert_nothing_running(before)
    basedir = couch.basedir
    couch.close()
    _assert_fresh_couch_bootstraps(basedir, engine_name)


@pytest.mark.pouchdb_only
def test_bad_extra_config_invalid_port(make_couch: MakeCouch, engine_name: str) -> None:
    before = children_of()
    couch = make_couch()
    with pytest.raises(StartError) as info:
        couch.bootstrap(extra=json.dumps({"httpd": {"port": 70000}}))
    _assert_clear_start_error(info.value, exited=True)
    assert "70000" in info.value.log_tail
    _assert_nothing_running(before)
    # The refused bootstrap left the instance usable: a good bootstrap works on it.
    env = couch.bootstrap()
    assert request(env, "GET", "/").status == 200


def test_port_clash_on_restart(make_couch: MakeCouch, engine_name: str) -> None:
    before = children_of()
    couch = make_couch()
    env = couch.bootstrap()
    assert couch.kill() is True
    with _occupied_port(env["port"]):
        with pytest.raises(StartError) as info:
            couch.start()
        _assert_clear_start_error(info.value, exited=True)
        assert "eaddrinuse" in info.value.log_tail.lower()
        assert couch.pid is None and couch.isalive() is False
        _assert_nothing_running(before)
    # Port free again: the same instance comes back on the same port with the same env.
    assert couch.start() is True
    assert couch.env == env and request(env, "GET", "/_all_dbs").status == 200
    basedir = couch.basedir
    couch.close()
    _assert_fresh_couch_bootstraps(basedir, engine_name)


class _MissingBinary(Engine):
    """The suite's engine, except that its executable has vanished since detection."""

    name = "missing-binary"

    def __init__(self, inner: Engine, missing: str) -> None:
        self.inner = inner
        self.missing = missing

    @property
    def version(self) -> str | None:
        return self.inner.version

    def check_extra(self, extra: str) -> None:
        self.inner.check_extra(extra)

    def check_options(self, options: Options, paths: Paths) -> None:
        self.inner.check_options(options, paths)

    def prepare(
        self, paths: Paths, options: Options, uuid: str, port: int, https_port: int = 0
    ) -> Launch:
        launch = self.inner.prepare(paths, options, uuid, port, https_port)
        launch.command[0] = self.missing
        return launch

    def wait_ready(
        self, proc: subprocess.Popen[bytes], launch: Launch, options: Options, deadline: float
    ) -> Ready | None:
        return self.inner.wait_ready(proc, launch, options, deadline)


def _engine_without_binary(kind: str, engine_name: str, tmp_path: Path) -> Engine:
    missing = str(tmp_path / "uninstalled" / "bin" / "server")
    if kind == "wrapped":
        return _MissingBinary(get_engine(engine_name), missing)
    if engine_name != "pouchdb":
        pytest.skip("PouchDB Server only")
    from usercouch.engines.pouchdb import PouchDBServer

    # Node.js is there when the engine is made (it checks), and gone when the server starts.
    node = shutil.which(os.environ.get("USERCOUCH_NODE") or "node")
    assert node is not None
    os.makedirs(os.path.dirname(missing))
    os.symlink(node, missing)
    engine = PouchDBServer(node=missing)
    os.unlink(missing)
    return engine


@pytest.mark.parametrize("kind", ["wrapped", "pouchdb-node"])
def test_engine_binary_gone(kind: str, engine_name: str, tmp_path: Path) -> None:
    engine = _engine_without_binary(kind, engine_name, tmp_path)
    basedir = tmp_path / "couch"
    basedir.mkdir()
    before_children, before_fds = children_of(), _open_fds()
    couch = UserCouch(basedir, engine=engine)
    with pytest.raises(StartError) as info:
        couch.bootstrap()
    err = info.value
    _assert_clear_start_error(err, exited=False)
    assert err.command[0] == str(tmp_path / "uninstalled" / "bin" / "server")
    assert "(never started)" in str(err) and "still running" not in str(err)
    assert couch.pid is None
    _assert_nothing_running(before_children)
    couch.close()
    assert _open_fds() == before_fds  # nothing of the failed start (pipes, log fd) leaks
    _assert_fresh_couch_bootstraps(basedir, engine_name)


# -- load -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_eight_instances_bootstrapped_concurrently_from_threads(
    make_couch: MakeCouch, tmp_path: Path
) -> None:
    basedirs = []
    for i in range(8):
        basedirs.append(tmp_path / f"parallel{i}")
        basedirs[-1].mkdir()
    couches = [make_couch(d) for d in basedirs]
    barrier = threading.Barrier(len(couches))

    def boot(couch: UserCouch) -> dict[str, Any]:
        barrier.wait(timeout=30)
        return couch.bootstrap()

    with ThreadPoolExecutor(max_workers=len(couches)) as pool:
        envs = list(pool.map(boot, couches))
    # The pool's threads are gone now; the servers they started must not be.
    ports = [env["port"] for env in envs]
    assert len(set(ports)) == 8, ports
    assert len({couch.pid for couch in couches}) == 8
    for couch, env in zip(couches, envs, strict=True):
        assert couch.isalive()
        assert request(env, "PUT", "/mine").status == 201
    # Each server knows only its own admin: credentials do not cross instances.
    for env, other in zip(envs, envs[1:] + envs[:1], strict=True):
        assert request(dict(other, url=env["url"]), "GET", "/_all_dbs").status == 401


@pytest.mark.slow
def test_fifty_cycles_leak_nothing(
    engine_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(private_tmp))  # the servers' temp files land here too
    monkeypatch.setattr(tempfile, "tempdir", str(private_tmp))
    basedir = tmp_path / "cycled"
    basedir.mkdir()
    lockfile = str(basedir / "lockfile")

    def cycle(n: int) -> int:
        couch = UserCouch(basedir, engine=engine_name)
        couch.bootstrap()
        pid = couch.pid
        assert pid is not None and couch.isalive()
        assert couch.kill() is True
        # Three ways to let go of an instance, in turn: close(), with-block, garbage.
        if n % 3 == 0:
            couch.close()
        elif n % 3 == 1:
            with couch:
                pass
        else:
            del couch
            gc.collect()
        return pid

    cycle(-1)  # warm-up: the long-lived spawn thread and lazy imports exist from here on
    before_children, before_fds = children_of(), _open_fds()
    before_threads, before_locks = threading.active_count(), _my_flocks()
    pids = [cycle(n) for n in range(50)]

    assert len(set(pids)) == 50
    assert not any(pid_exists(pid) for pid in pids)
    assert children_of() == before_children
    assert not zombie_children()
    assert _open_fds() == before_fds
    assert threading.active_count() == before_threads
    assert _my_flocks() == before_locks
    assert _lock_is_free(lockfile)
    assert list(private_tmp.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cycled", "tmp"]
