"""The pytest plugin, run the way users run it: inner pytest sessions against real servers.

Each inner session runs in a subprocess (``runpytest_subprocess``) with its own TMPDIR, so a
leaked basedir is seen exactly; inner tests record their servers' PIDs and basedirs in JSON
files, checked once the inner session has exited.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import threading
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest
from helpers import pid_exists

from usercouch import ConfigError, UserCouchError, factories

pytest_plugins = ["pytester"]

REPO = Path(__file__).resolve().parent.parent
# pytester points HOME at its temp dir; engines installed per user (~/.cache) live in the real one.
REAL_HOME = os.path.expanduser("~")

# What inner test files import to write down facts about the servers they saw.
RECORDER = """
import json, os, uuid

def record(**facts):
    folder = os.environ["UC_RECORD"]
    facts["worker"] = os.environ.get("PYTEST_XDIST_WORKER", "main")
    with open(os.path.join(folder, uuid.uuid4().hex + ".json"), "w") as f:
        json.dump(facts, f)
"""


class Inner:
    """Runs inner pytest sessions with the plugin on, the suite's engine, a private TMPDIR."""

    def __init__(
        self, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, engine: str
    ) -> None:
        self.pytester = pytester
        self.engine = engine
        self.tmp = pytester.path.parent / f"{pytester.path.name}-tmp"
        self.records = pytester.path.parent / f"{pytester.path.name}-records"
        self.tmp.mkdir()
        self.records.mkdir()
        monkeypatch.setenv("TMPDIR", str(self.tmp))
        monkeypatch.setenv("UC_RECORD", str(self.records))
        monkeypatch.setenv("PYTHONPATH", str(REPO))
        monkeypatch.setenv("HOME", REAL_HOME)
        for name in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_ADDOPTS"):
            monkeypatch.delenv(name, raising=False)
        pytester.makepyfile(recorder=RECORDER)
        installed = any(ep.name == "usercouch" for ep in entry_points(group="pytest11"))
        self.plugin_args = [] if installed else ["-p", "usercouch.pytest_plugin"]

    def run(self, *args: str, engine_option: bool = True) -> pytest.RunResult:
        options = [f"--usercouch-engine={self.engine}"] if engine_option else []
        return self.pytester.runpytest_subprocess(
            *self.plugin_args, "-p", "no:cacheprovider", *options, *args, timeout=180
        )

    def facts(self) -> list[dict[str, Any]]:
        return [json.loads(p.read_text()) for p in sorted(self.records.iterdir())]

    def assert_nothing_left(self) -> None:
        """No server process alive and no temporary basedir left by the inner session."""
        facts = self.facts()
        pids = {f["pid"] for f in facts if f.get("pid")}
        assert pids, "the inner tests recorded no servers"
        assert [pid for pid in pids if pid_exists(pid)] == []
        assert [f["basedir"] for f in facts if os.path.exists(f.get("basedir", ""))] == []
        assert sorted(p.name for p in self.tmp.iterdir()) == []


@pytest.fixture
def inner(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, engine_name: str) -> Inner:
    return Inner(pytester, monkeypatch, engine_name)


# -- the built-in fixtures ------------------------------------------------------------------


def test_couch_db_gives_each_test_a_fresh_empty_database(inner: Inner) -> None:
    inner.pytester.makepyfile(
        test_dbs="""
        import re
        import pytest
        from usercouch.http import request
        from recorder import record

        NAMES = []

        @pytest.mark.parametrize("n", range(4))
        def test_fresh(couch_db, couch, couch_server, n):
            assert re.match(r"^[a-z][a-z0-9_$()+/-]*$", couch_db.name)
            assert couch_db.url == couch["url"] + couch_db.name + "/"
            assert couch_db.env["url"] == couch["url"]
            info = request(couch_db.env, "GET", couch_db.name).json()
            assert info["doc_count"] == 0
            for old in NAMES:  # the earlier tests' databases are deleted
                assert request(couch_db.env, "GET", old).status == 404
            assert request(couch_db.env, "PUT", couch_db.name + "/doc", body={"n": n}).status == 201
            NAMES.append(couch_db.name)
            record(pid=couch_server.pid, basedir=couch_server.basedir, port=couch["port"],
                   db=couch_db.name)
            if n == 1:  # a test may delete its own database
                assert request(couch_db.env, "DELETE", couch_db.name).status == 200
        """
    )
    result = inner.run()
    result.assert_outcomes(passed=4)
    facts = inner.facts()
    assert len({f["db"] for f in facts}) == 4
    assert len({(f["pid"], f["port"], f["basedir"]) for f in facts}) == 1  # one session server
    inner.assert_nothing_left()


def test_fresh_couch_is_a_new_server_per_test(inner: Inner) -> None:
    inner.pytester.makepyfile(
        test_fresh="""
        from usercouch.http import request
        from recorder import record

        def user_dbs(env):
            return [db for db in request(env, "GET", "_all_dbs").json() if db[:1] != "_"]

        def test_one(fresh_couch, fresh_couch_server):
            assert fresh_couch == fresh_couch_server.env
            assert user_dbs(fresh_couch) == []
            fresh_couch_server.kill()
            fresh_couch_server.start()  # restarts are what fresh servers are for
            assert request(fresh_couch, "PUT", "mine").status == 201
            assert user_dbs(fresh_couch) == ["mine"]
            record(pid=fresh_couch_server.pid, basedir=fresh_couch_server.basedir)

        def test_two(fresh_couch, fresh_couch_server):
            assert user_dbs(fresh_couch) == []
            record(pid=fresh_couch_server.pid, basedir=fresh_couch_server.basedir)
        """
    )
    inner.run().assert_outcomes(passed=2)
    assert len({f["basedir"] for f in inner.facts()}) == 2
    inner.assert_nothing_left()


def test_a_failing_test_gets_the_log_tail_and_leaves_nothing(inner: Inner) -> None:
    inner.pytester.makepyfile(
        test_fails="""
        from usercouch.http import request
        from recorder import record

        def test_fails(couch_db, couch_server, fresh_couch_server):
            for server in (couch_server, fresh_couch_server):
                record(pid=server.pid, basedir=server.basedir)
            request(fresh_couch_server.env, "PUT", "marker_db_for_the_log")
            assert couch_db.name == "something else"

        def test_passes(couch):
            pass
        """
    )
    result = inner.run()
    result.assert_outcomes(failed=1, passed=1)
    out = result.stdout.str()
    title = r"usercouch log tail: ([a-z_]+, )*{}(, [a-z_]+)* \(http://127\.0\.0\.1:\d+/\)"
    assert re.search(title.format("couch_db"), out)
    assert re.search(title.format("fresh_couch_server"), out)
    assert "PUT /marker_db_for_the_log" in out  # the fresh server's own log
    assert "PUT /test_fails-" in out  # the session server's log shows the test's database
    assert out.count("usercouch log tail:") == 2  # the passing test gets none
    inner.assert_nothing_left()


def test_failures_in_setup_and_teardown_leave_nothing(inner: Inner) -> None:
    inner.pytester.makepyfile(
        test_broken="""
        import pytest
        from recorder import record

        @pytest.fixture
        def broken_after(fresh_couch_server):
            record(pid=fresh_couch_server.pid, basedir=fresh_couch_server.basedir)
            yield
            raise RuntimeError("teardown broke")

        @pytest.fixture
        def broken_before(couch_server):
            record(pid=couch_server.pid, basedir=couch_server.basedir)
            raise RuntimeError("setup broke")

        def test_teardown_error(broken_after, couch_db):
            pass

        def test_setup_error(broken_before, fresh_couch):
            pass
        """
    )
    result = inner.run()
    result.assert_outcomes(passed=1, errors=2)
    inner.assert_nothing_left()


def test_couch_db_survives_a_test_that_crashed_the_session_server(inner: Inner) -> None:
    inner.pytester.makepyfile(
        test_crash="""
        from usercouch.http import request
        from recorder import record

        def test_crash(couch_server):
            record(pid=couch_server.pid, basedir=couch_server.basedir)
            couch_server.crash()

        def test_after(couch_db, couch_server):
            record(pid=couch_server.pid, basedir=couch_server.basedir)
            assert request(couch_db.env, "GET", couch_db.name).status == 200
        """
    )
    inner.run("-p", "no:randomly").assert_outcomes(passed=2)
    assert len({f["pid"] for f in inner.facts()}) == 2  # restarted
    inner.assert_nothing_left()


def test_the_database_of_a_test_that_stopped_the_server_is_deleted_after_the_restart(
    inner: Inner,
) -> None:
    """The restarted server keeps its basedir: a deletion refused while it was down is redone."""
    inner.pytester.makepyfile(
        test_stop="""
        import pytest
        from usercouch.http import request
        from recorder import record

        @pytest.mark.parametrize("how", ["kill", "crash"])
        def test_stops(couch_db, couch_server, how):
            record(pid=couch_server.pid, basedir=couch_server.basedir)
            getattr(couch_server, how)()

        @pytest.mark.parametrize("after", ["kill", "crash"])
        def test_next(couch_db, couch_server, after):
            record(pid=couch_server.pid, basedir=couch_server.basedir)
            dbs = request(couch_db.env, "GET", "/_all_dbs").json()
            assert [db for db in dbs if not db.startswith("_")] == [couch_db.name]
        """
    )
    inner.run("-p", "no:randomly").assert_outcomes(passed=4)
    inner.assert_nothing_left()


@pytest.mark.slow
def test_xdist_workers_get_their_own_servers(inner: Inner) -> None:
    inner.pytester.makepyfile(
        test_parallel="""
        import pytest
        from usercouch.http import request
        from recorder import record

        @pytest.mark.parametrize("n", range(8))
        def test_db(couch_db, couch_server, n):
            assert request(couch_db.env, "GET", couch_db.name).json()["doc_count"] == 0
            record(pid=couch_server.pid, basedir=couch_server.basedir,
                   port=couch_server.env["port"], db=couch_db.name)

        @pytest.mark.parametrize("n", range(2))
        def test_fresh(fresh_couch_server, n):
            record(pid=fresh_couch_server.pid, basedir=fresh_couch_server.basedir,
                   port=fresh_couch_server.env["port"])
        """
    )
    inner.run("-n", "2").assert_outcomes(passed=10)
    facts = inner.facts()
    dbs = [f for f in facts if "db" in f]
    assert {f["worker"] for f in facts} == {"gw0", "gw1"}
    by_worker = {f["worker"]: (f["pid"], f["port"], f["basedir"]) for f in dbs}
    assert len({(f["worker"], f["pid"]) for f in dbs}) == len(by_worker)  # one per worker
    servers = {(f["port"], f["basedir"]) for f in facts}
    assert len(servers) == len(by_worker) + 2  # no two servers share a port or basedir
    assert len({port for port, _ in servers}) == len(servers)
    assert len({basedir for _, basedir in servers}) == len(servers)
    assert len({f["db"] for f in dbs}) == 8
    inner.assert_nothing_left()


# -- the factory ----------------------------------------------------------------------------


def test_factory_fixtures_take_their_scope_auth_and_config(inner: Inner) -> None:
    inner.pytester.makeconftest(
        """
        from usercouch import factories

        open_couch = factories.couch_fixture(scope="module", auth="open")
        open_db = factories.couch_db_fixture("open_couch")
        debug_server = factories.couch_server_fixture(
            "function", config={"loglevel": "debug", "username": "alice", "password": "s3cret"}
        )
        """
    )
    common = """
        from usercouch.http import request
        from recorder import record

        def test_open(open_couch, open_db):
            assert "basic" not in open_couch and "authorization" not in open_couch
            assert request(open_couch, "GET", "", authorize=False).status == 200
            assert open_db.url.startswith(open_couch["url"])
            assert request(open_db.env, "GET", open_db.name, authorize=False).status == 200
            record(port=open_couch["port"], db=open_db.name, module=__name__)

        def test_open_again(open_couch):
            record(port=open_couch["port"], module=__name__)

        def test_debug(debug_server):
            assert debug_server.env["basic"] == {"username": "alice", "password": "s3cret"}
            assert request(debug_server.env, "GET", "", authorize=False).status == 401
            record(pid=debug_server.pid, basedir=debug_server.basedir)
        """
    inner.pytester.makepyfile(test_mod_a=common, test_mod_b=common)
    inner.run().assert_outcomes(passed=6)
    ports: dict[str, set[int]] = {}
    for f in inner.facts():
        if "module" in f:
            ports.setdefault(f["module"], set()).add(f["port"])
    # module scope: one server per module, a different one in each module
    assert [len(p) for p in ports.values()] == [1, 1]
    assert ports["test_mod_a"] != ports["test_mod_b"]
    inner.assert_nothing_left()


def test_factory_failure_report_names_the_factory_fixture(inner: Inner) -> None:
    inner.pytester.makepyfile(
        test_named="""
        from usercouch import factories
        from recorder import record

        my_server = factories.couch_server_fixture("function")

        def test_fails(my_server):
            record(pid=my_server.pid, basedir=my_server.basedir)
            assert False
        """
    )
    result = inner.run()
    result.assert_outcomes(failed=1)
    assert "usercouch log tail: my_server (" in result.stdout.str()
    inner.assert_nothing_left()


@pytest.mark.parametrize(
    ("call", "error", "named"),
    [
        (lambda: factories.couch_fixture(auth="oauth"), ConfigError, "oauth"),
        (lambda: factories.couch_fixture(config={"loglevl": "x"}), ConfigError, "loglevl"),
        (lambda: factories.couch_fixture(scope="forever"), ValueError, "forever"),
        (lambda: factories.couch_server_fixture(engine="nosuch"), ValueError, "nosuch"),
        (lambda: factories.couch_server_fixture(timeout=0), ValueError, "0"),
        (lambda: factories.couch_db_fixture("not a name"), ValueError, "not a name"),
        (lambda: factories.couch_db_fixture(scope="always"), ValueError, "always"),
    ],
)
def test_factories_refuse_bad_arguments_naming_them(call: Any, error: type, named: str) -> None:
    with pytest.raises(error, match=re.escape(repr(named)) if named != "0" else "got 0"):
        call()


@pytest.mark.parametrize("timeout", [float("inf"), float("nan")])
def test_factories_refuse_a_timeout_usercouch_would_refuse(timeout: float) -> None:
    # At collection, not when the first test's server would start.
    with pytest.raises(ValueError, match=f"positive, finite number of seconds; got {timeout}"):
        factories.couch_server_fixture(timeout=timeout)


@pytest.mark.parametrize(
    "test_name",
    ["test_x", "test_x[1-2]", "Test Case::test/ä", "123", "", "_", "x" * 300, "a-b$c(d)"],
)
def test_database_names_are_valid_for_couchdb_and_unique(test_name: str) -> None:
    names = {factories.database_name(test_name) for _ in range(50)}
    assert len(names) == 50
    for name in names:
        assert factories.DB_NAME_RE.match(name), name
        assert len(name) <= 64


# -- options --------------------------------------------------------------------------------

ENGINE_PROBE = """
from recorder import record

def test_engine(couch_server):
    record(pid=couch_server.pid, basedir=couch_server.basedir, engine=couch_server.engine.name)
"""


def test_ini_key_chooses_the_engine_over_the_environment(
    inner: Inner, monkeypatch: pytest.MonkeyPatch
) -> None:
    # USERCOUCH_ENGINE is what auto-detection reads; the ini key must win over it.
    monkeypatch.setenv("USERCOUCH_ENGINE", "no-such-engine")
    inner.pytester.makeini(f"[pytest]\nusercouch_engine = {inner.engine}\n")
    inner.pytester.makepyfile(test_engine=ENGINE_PROBE)
    inner.run(engine_option=False).assert_outcomes(passed=1)
    assert [f["engine"] for f in inner.facts()] == [inner.engine]
    inner.assert_nothing_left()


def test_command_line_option_wins_over_the_ini_key(inner: Inner) -> None:
    inner.pytester.makeini("[pytest]\nusercouch_engine = no-such-engine\n")
    inner.pytester.makepyfile(test_engine=ENGINE_PROBE)
    inner.run().assert_outcomes(passed=1)
    assert [f["engine"] for f in inner.facts()] == [inner.engine]
    inner.assert_nothing_left()


def test_without_options_auto_detection_honours_usercouch_engine(
    inner: Inner, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("USERCOUCH_ENGINE", inner.engine)
    inner.pytester.makepyfile(test_engine=ENGINE_PROBE)
    inner.run(engine_option=False).assert_outcomes(passed=1)
    assert [f["engine"] for f in inner.facts()] == [inner.engine]
    inner.assert_nothing_left()


@pytest.mark.parametrize(
    ("args", "ini", "named"),
    [
        (["--usercouch-engine=bogus"], "", "'bogus'"),
        ([], "usercouch_engine = bogus2", "'bogus2'"),
        ([], "usercouch_log_lines = many", "'many'"),
    ],
)
def test_bad_options_are_usage_errors_naming_the_value(
    inner: Inner, args: list[str], ini: str, named: str
) -> None:
    if ini:
        inner.pytester.makeini(f"[pytest]\n{ini}\n")
    inner.pytester.makepyfile(test_engine=ENGINE_PROBE)
    result = inner.run(*args, engine_option=False)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert named in result.stderr.str()
    assert inner.facts() == [] and list(inner.tmp.iterdir()) == []


def test_log_lines_zero_attaches_no_log(inner: Inner) -> None:
    inner.pytester.makeini("[pytest]\nusercouch_log_lines = 0\n")
    inner.pytester.makepyfile(
        test_quiet="""
        def test_fails(couch):
            assert False
        """
    )
    result = inner.run()
    result.assert_outcomes(failed=1)
    assert "usercouch log tail" not in result.stdout.str()


def test_the_plugin_starts_nothing_unless_asked(inner: Inner) -> None:
    inner.pytester.makepyfile(
        test_plain="""
        def test_plain():
            assert 1

        def test_fails():
            assert 0
        """
    )
    result = inner.run()
    result.assert_outcomes(passed=1, failed=1)
    assert list(inner.tmp.iterdir()) == []  # no TempCouch was made
    assert "usercouch log tail" not in result.stdout.str()
    help_text = inner.run("--help").stdout.str()
    assert "--usercouch-engine" in help_text and "usercouch_engine" in help_text


class _FakeCouch(http.server.BaseHTTPRequestHandler):
    """Answers PUT with 201 and DELETE with 500: a server whose deletions fail."""

    def do_PUT(self) -> None:
        self._answer(201, b'{"ok":true}')

    def do_DELETE(self) -> None:
        self._answer(500, b'{"error":"disk on fire"}')

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_a_failed_background_deletion_is_reported_naming_the_database() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeCouch)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        env = {"url": f"http://127.0.0.1:{server.server_address[1]}/", "port": 0}
        with factories.fresh_database(env, "test_first", "couch_db") as first:
            pass
        with (
            pytest.raises(UserCouchError, match=re.escape(repr(first.name))) as caught,
            factories.fresh_database(env, "test_second", "couch_db"),
        ):
            raise AssertionError("the test must not start")
        assert "disk on fire" in str(caught.value)
        with factories.fresh_database(env, "test_third", "couch_db") as third:
            pass
        with pytest.raises(UserCouchError, match=re.escape(repr(third.name))):
            factories.finish_deletions(env["url"])
        factories.finish_deletions(env["url"])  # nothing left pending
    finally:
        server.shutdown()
        server.server_close()
