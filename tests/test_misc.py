"""TempCouch and CouchTestCase: real servers, and no temp dir or process left behind.

Temporary basedirs go to a per-test folder (``tempfile.tempdir`` or ``dir=``), so a leak is
seen exactly, whatever else runs on the machine.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import unittest
from pathlib import Path
from typing import Any, ClassVar

import pytest
from helpers import pid_exists

from usercouch import ConfigError, LockError, StartError, UserCouch
from usercouch.http import request
from usercouch.misc import SKIP_ENV_VAR, CouchTestCase, TempCouch, skip_test_cases

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def temp_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private stand-in for the system temp dir, so leftovers can be counted."""
    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


# -- TempCouch ------------------------------------------------------------------------------


def test_tempcouch_is_a_usercouch_in_a_fresh_private_dir(engine_name: str, tmp_path: Path) -> None:
    with TempCouch(engine_name, dir=tmp_path) as couch:
        assert isinstance(couch, UserCouch)
        assert Path(couch.basedir).parent == tmp_path
        assert Path(couch.basedir).name.startswith("usercouch.")
        assert (os.stat(couch.basedir).st_mode & 0o777) == 0o700
        env = couch.bootstrap()
        assert request(env, "GET", "/").status == 200
        with TempCouch(engine_name, dir=tmp_path) as other:
            assert other.basedir != couch.basedir


def test_close_stops_the_server_and_removes_the_dir(engine_name: str, tmp_path: Path) -> None:
    couch = TempCouch(engine_name, dir=tmp_path)
    couch.bootstrap()
    pid = couch.pid
    assert pid is not None and pid_exists(pid)
    couch.close()
    assert not pid_exists(pid)
    assert leftovers(tmp_path) == []
    couch.close()  # idempotent


def test_with_block_removes_the_dir_even_when_the_body_raises(
    engine_name: str, tmp_path: Path
) -> None:
    pid = None
    with (
        pytest.raises(RuntimeError, match="test body failed"),
        TempCouch(engine_name, dir=tmp_path) as couch,
    ):
        couch.bootstrap()
        pid = couch.pid
        raise RuntimeError("test body failed")
    assert pid is not None and not pid_exists(pid)
    assert leftovers(tmp_path) == []


def test_kill_then_garbage_collection_removes_the_dir(engine_name: str, tmp_path: Path) -> None:
    couch = TempCouch(engine_name, dir=tmp_path)
    couch.bootstrap()
    assert couch.kill() is True
    basedir = couch.basedir
    assert os.path.isdir(basedir)  # kill() stops the server; the dir stays for a restart
    del couch
    gc.collect()
    assert leftovers(tmp_path) == []


def test_garbage_collection_of_a_running_couch_stops_it_first(
    engine_name: str, tmp_path: Path
) -> None:
    couch = TempCouch(engine_name, dir=tmp_path)
    couch.bootstrap()
    pid = couch.pid
    assert pid is not None
    del couch
    gc.collect()
    assert not pid_exists(pid)
    assert leftovers(tmp_path) == []


def test_the_lock_is_held_until_the_end(engine_name: str, tmp_path: Path) -> None:
    with TempCouch(engine_name, dir=tmp_path) as couch, pytest.raises(LockError):
        UserCouch(couch.basedir, engine_name)


def test_failed_bootstrap_leaves_nothing_after_close(engine_name: str, tmp_path: Path) -> None:
    with TempCouch(engine_name, dir=tmp_path) as couch, pytest.raises(ConfigError, match="'nope'"):
        couch.bootstrap(config={"loglevel": "nope"})
    assert leftovers(tmp_path) == []


def test_bad_engine_raises_before_a_dir_is_left(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'no-such-engine'"):
        TempCouch("no-such-engine", dir=tmp_path)
    assert leftovers(tmp_path) == []


def test_failed_start_leaves_nothing(engine_name: str, tmp_path: Path) -> None:
    # A start that cannot finish in time: StartError, server gone, and close() cleans all.
    with TempCouch(engine_name, dir=tmp_path, timeout=0.001) as couch, pytest.raises(StartError):
        couch.bootstrap()
    assert leftovers(tmp_path) == []


def _run_child(code: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(tmp_path)}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("ending", ["return", "raise", "sys.exit(3)"])
def test_interpreter_exit_stops_the_server_and_removes_the_dir(
    engine_name: str, tmp_path: Path, ending: str
) -> None:
    child = _run_child(
        f"""
        import json, sys
        from usercouch.misc import TempCouch

        def main():
            couch = TempCouch({engine_name!r})
            couch.bootstrap()
            print(json.dumps({{"pid": couch.pid, "basedir": couch.basedir}}), flush=True)
            globals()["kept"] = couch  # alive until the interpreter exits
            {ending if ending != "raise" else "raise RuntimeError('unhandled')"}

        main()
        """,
        tmp_path,
    )
    assert child.stdout, child.stderr
    facts = json.loads(child.stdout.splitlines()[0])
    assert facts["basedir"].startswith(str(tmp_path))
    assert not pid_exists(facts["pid"])
    assert not os.path.exists(facts["basedir"])
    assert leftovers(tmp_path) == []


def test_a_forked_child_leaves_the_parents_couch_alone(engine_name: str, tmp_path: Path) -> None:
    child = _run_child(
        f"""
        import json, os, sys
        from usercouch.misc import TempCouch

        couch = TempCouch({engine_name!r})
        couch.bootstrap()
        pid = os.fork()
        if pid == 0:
            sys.exit(0)  # runs the inherited atexit finalizers in the child
        os.waitpid(pid, 0)
        print(json.dumps({{"alive": couch.isalive(), "dir": os.path.isdir(couch.basedir),
                          "pid": couch.pid}}), flush=True)
        """,
        tmp_path,
    )
    assert child.stdout, child.stderr
    facts = json.loads(child.stdout.splitlines()[0])
    assert facts["alive"] is True and facts["dir"] is True
    assert not pid_exists(facts["pid"])  # and the parent's own exit cleaned up
    assert leftovers(tmp_path) == []


# -- CouchTestCase --------------------------------------------------------------------------


def _run_case(case: type[unittest.TestCase], *names: str) -> unittest.TestResult:
    suite = unittest.TestSuite(case(name) for name in names)
    result = unittest.TestResult()
    suite.run(result)
    return result


def test_couch_test_case_gives_each_test_its_own_running_couch(
    engine_name: str, temp_root: Path
) -> None:
    seen: list[dict[str, Any]] = []

    class Case(CouchTestCase):
        engine = engine_name

        def test_one(self) -> None:
            self.record()

        def test_two(self) -> None:
            self.record()

        def record(self) -> None:
            self.assertIsInstance(self.couch, TempCouch)
            self.assertEqual(request(self.env, "GET", "/").status, 200)
            self.assertEqual(request(self.env, "GET", "/", authorize=False).status, 401)
            seen.append({"pid": self.couch.pid, "basedir": self.couch.basedir, **self.env})

    result = _run_case(Case, "test_one", "test_two")
    assert result.wasSuccessful(), result.errors + result.failures
    assert len(seen) == 2
    assert seen[0]["basedir"] != seen[1]["basedir"]
    assert seen[0]["url"].startswith("http://127.0.0.1:")
    for facts in seen:
        assert not pid_exists(facts["pid"])
    assert leftovers(temp_root) == []


def test_couch_test_case_cleans_up_after_failures_and_errors(
    engine_name: str, temp_root: Path
) -> None:
    pids: list[int | None] = []

    class Case(CouchTestCase):
        engine = engine_name

        def test_fails(self) -> None:
            pids.append(self.couch.pid)
            self.fail("on purpose")

        def test_errors(self) -> None:
            pids.append(self.couch.pid)
            raise RuntimeError("on purpose")

    class BrokenTearDown(CouchTestCase):
        engine = engine_name

        def tearDown(self) -> None:  # forgets super().tearDown(): the cleanup still runs
            pids.append(self.couch.pid)
            raise RuntimeError("broken tearDown")

        def test_ok(self) -> None:
            pass

    result = _run_case(Case, "test_fails", "test_errors")
    assert len(result.failures) == 1 and len(result.errors) == 1
    result = _run_case(BrokenTearDown, "test_ok")
    assert len(result.errors) == 1
    assert len(pids) == 3 and all(pid is not None for pid in pids)
    assert not any(pid_exists(pid) for pid in pids if pid is not None)
    assert leftovers(temp_root) == []


def test_couch_test_case_attributes_choose_the_server(engine_name: str, temp_root: Path) -> None:
    envs: list[dict[str, Any]] = []

    class OpenCase(CouchTestCase):
        engine = engine_name
        auth = "open"
        config: ClassVar[dict[str, str]] = {"loglevel": "debug"}

        def test_open(self) -> None:
            envs.append(self.env)
            self.assertEqual(request(self.env, "GET", "/", authorize=False).status, 200)

    result = _run_case(OpenCase, "test_open")
    assert result.wasSuccessful(), result.errors + result.failures
    assert "basic" not in envs[0] and "authorization" not in envs[0]


def test_bad_class_attribute_fails_the_test_and_leaves_nothing(
    engine_name: str, temp_root: Path
) -> None:
    class BadCase(CouchTestCase):
        engine = engine_name
        bind_address = "10.1.2.3"

        def test_never_runs(self) -> None:
            raise AssertionError("setUp should have failed")

    result = _run_case(BadCase, "test_never_runs")
    assert len(result.errors) == 1
    assert "10.1.2.3" in result.errors[0][1]
    assert leftovers(temp_root) == []


@pytest.mark.parametrize("value", ["true", "TRUE", "1", "yes"])
def test_skip_env_var_skips_every_couch_test_case(
    value: str, temp_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SKIP_ENV_VAR, value)
    ran: list[str] = []

    class Case(CouchTestCase):
        engine = "no-such-engine"  # proves no server is even looked for

        def test_skipped(self) -> None:
            ran.append("ran")

    result = _run_case(Case, "test_skipped")
    assert len(result.skipped) == 1 and SKIP_ENV_VAR in result.skipped[0][1]
    assert ran == []
    assert leftovers(temp_root) == []


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, False),
        ({SKIP_ENV_VAR: "false"}, False),
        ({SKIP_ENV_VAR: ""}, False),
        ({SKIP_ENV_VAR: "0"}, False),
        ({SKIP_ENV_VAR: " True "}, True),
    ],
)
def test_skip_test_cases_reads_the_variable(environ: dict[str, str], expected: bool) -> None:
    assert skip_test_cases(environ) is expected
