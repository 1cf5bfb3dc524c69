"""The command line, driven as users drive it: real subprocesses, real servers, real signals."""

from __future__ import annotations

import base64
import json
import os
import re
import select
import shlex
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from usercouch import UserCouch, credentialed_url

REPO = Path(__file__).resolve().parent.parent
DEADLINE = 60.0  # seconds: generous, only a guard against a hung test

Spawn = Callable[..., subprocess.Popen[bytes]]


def _cli_environ() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    for name in ("USERCOUCH_ENV", "COUCHDB_URL"):
        env.pop(name, None)
    return env


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "usercouch", *args]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        _command(*args), env=_cli_environ(), capture_output=True, text=True,
        timeout=DEADLINE, stdin=subprocess.DEVNULL, check=False,
    )


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    """Start the CLI in its own session (no terminal: SIGINT is ours to send); whatever is
    still running after the test is killed, group and all."""
    started: list[subprocess.Popen[bytes]] = []

    def factory(*args: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            _command(*args), env=_cli_environ(), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
            bufsize=0,  # unbuffered: select() then sees every line still unread
        )
        started.append(proc)
        return proc

    yield factory
    for proc in started:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def read_line(proc: subprocess.Popen[bytes]) -> str:
    """The next stdout line, waiting for it as an event (fails if the CLI exits first)."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], DEADLINE)
    assert ready, "no output from the CLI"
    line = proc.stdout.readline().decode()
    if not line:
        stderr = proc.stderr.read().decode() if proc.stderr else ""
        pytest.fail(f"CLI exited ({proc.wait()}) before printing a line: {stderr}")
    return line


def finish(proc: subprocess.Popen[bytes]) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=DEADLINE)
    return proc.returncode, out.decode(), err.decode()


def get(env: dict[str, Any], path: str = "", *, auth: bool = True) -> tuple[int, Any]:
    headers = {"Accept": "application/json"}
    if auth and "authorization" in env:
        headers["Authorization"] = env["authorization"]
    req = urllib.request.Request(env["url"] + path, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as exc:
        return exc.code, None


def refused(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=10).close()
    except urllib.error.HTTPError:
        return False
    except OSError:
        return True
    return False


def pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def progress_facts(stderr: str) -> tuple[str, int]:
    """The basedir and server pid the progress lines named."""
    basedir = re.search(r"starting a couch in (\S+) with", stderr)
    pid = re.search(r"\(pid (\d+)\)", stderr)
    assert basedir and pid, stderr
    return basedir.group(1), int(pid.group(1))


# -- start --------------------------------------------------------------------------------------


def test_start_json_serves_until_sigterm(spawn: Spawn, engine_name: str) -> None:
    proc = spawn("start", "--json", "--engine", engine_name)
    env = json.loads(read_line(proc))
    assert set(env) == {"port", "url", "basic", "authorization"}
    status, info = get(env)
    assert status == 200 and "version" in info
    assert get(env, auth=False)[0] == 401

    proc.send_signal(signal.SIGTERM)
    returncode, out, err = finish(proc)
    assert returncode == 0, err
    assert out == ""  # the JSON line was the whole of stdout
    basedir, pid = progress_facts(err)
    assert pid_gone(pid)
    assert refused(env["url"])
    assert not os.path.exists(basedir)  # the throwaway basedir went with the couch


def test_start_in_basedir_shell_format_sigint(
    spawn: Spawn, engine_name: str, tmp_path: Path
) -> None:
    proc = spawn("start", str(tmp_path), "--shell", "--engine", engine_name)
    lines = [read_line(proc), read_line(proc)]
    exported = {}
    for line in lines:
        words = shlex.split(line)
        assert words[0] == "export"
        name, _, value = words[1].partition("=")
        exported[name] = value
    env = json.loads(exported["USERCOUCH_ENV"])
    assert exported["COUCHDB_URL"] == credentialed_url(env)
    assert get(env)[0] == 200

    proc.send_signal(signal.SIGINT)
    returncode, _, err = finish(proc)
    assert returncode == 0, err
    assert refused(env["url"])
    assert (tmp_path / "lockfile").exists()  # a given basedir is kept
    assert (tmp_path / "log" / "couchdb.log").exists()


def test_start_summary_hides_the_password(spawn: Spawn, engine_name: str) -> None:
    proc = spawn("start", "--engine", engine_name)
    first = read_line(proc)
    assert engine_name in first and "running" in first
    lines = [read_line(proc) for _ in range(6)]
    url = lines[0].split()[-1]
    username = lines[1].split()[-1]
    proc.send_signal(signal.SIGTERM)
    returncode, out, err = finish(proc)
    assert returncode == 0, err
    text = first + "".join(lines) + out + err
    assert url.startswith("http://127.0.0.1:")
    assert len(username) == 24
    # The password never shows: neither in clear nor inside a Basic header.
    assert "password: (not shown" in text
    assert "Basic " not in text
    assert not re.search(r"[A-Z2-7]{24}:[A-Z2-7]{24}", text)


def test_start_open_auth_needs_no_credentials(spawn: Spawn, engine_name: str) -> None:
    proc = spawn("start", "--json", "--auth", "open", "--engine", engine_name, "--quiet")
    env = json.loads(read_line(proc))
    assert set(env) == {"port", "url"}
    assert get(env, auth=False)[0] == 200
    proc.send_signal(signal.SIGTERM)
    returncode, _, err = finish(proc)
    assert returncode == 0
    assert err == ""  # --quiet


def test_start_reports_a_server_that_dies(spawn: Spawn, engine_name: str) -> None:
    proc = spawn("start", "--json", "--engine", engine_name)
    env = json.loads(read_line(proc))
    assert proc.stderr is not None
    progress = b""
    while b"(pid " not in progress:
        line = proc.stderr.readline()
        assert line, progress
        progress += line
    _, pid = progress_facts(progress.decode())
    os.kill(pid, signal.SIGKILL)
    returncode, _, err = finish(proc)
    assert returncode == 1
    assert "usercouch: error: the server exited on its own" in err
    assert "Traceback" not in err
    assert refused(env["url"])


# -- run ----------------------------------------------------------------------------------------

CHILD = """
import json, os, sys, urllib.request
env = json.loads(os.environ["USERCOUCH_ENV"])
url = os.environ["COUCHDB_URL"]
assert url.startswith("http://" + env["basic"]["username"] + ":"), url
req = urllib.request.Request(env["url"] + "kids", method="PUT",
                             headers={"Authorization": env["authorization"]})
print(urllib.request.urlopen(req).status, env["url"], flush=True)
sys.exit(3)
"""


def test_run_passes_env_and_exit_status(engine_name: str) -> None:
    result = run_cli("run", "--engine", engine_name, "--", sys.executable, "-c", CHILD)
    assert result.returncode == 3, result.stderr
    status, url = result.stdout.split()
    assert status == "201"
    assert refused(url)  # stopped after the command
    basedir, pid = progress_facts(result.stderr)
    assert pid_gone(pid)
    assert not os.path.exists(basedir)


def test_run_open_auth_url_has_no_credentials(engine_name: str) -> None:
    script = "import os; print(os.environ['COUCHDB_URL']); print(os.environ['USERCOUCH_ENV'])"
    result = run_cli(
        "run", "-q", "--auth", "open", "--engine", engine_name, "--", sys.executable, "-c", script
    )
    assert result.returncode == 0, result.stderr
    url, env = result.stdout.splitlines()
    assert json.loads(env) == {"port": json.loads(env)["port"], "url": url}
    assert result.stderr == ""


SLEEPER = """
import os, signal
print(os.getpid(), flush=True)
signal.pause()
"""


def test_run_forwards_sigterm_to_the_command(spawn: Spawn, engine_name: str) -> None:
    proc = spawn("run", "--engine", engine_name, "--", sys.executable, "-c", SLEEPER)
    child_pid = int(read_line(proc))
    proc.send_signal(signal.SIGTERM)
    returncode, _, err = finish(proc)
    assert returncode == 128 + signal.SIGTERM, err  # the command died of the SIGTERM
    assert pid_gone(child_pid)
    _, server_pid = progress_facts(err)
    assert pid_gone(server_pid)


def test_run_forwards_sigint_when_not_from_a_terminal(spawn: Spawn, engine_name: str) -> None:
    catcher = (
        "import os, signal, sys\n"
        "signal.signal(signal.SIGINT, lambda *a: sys.exit(7))\n"
        "print(os.getpid(), flush=True)\n"
        "signal.pause()\n"
    )
    proc = spawn("run", "--engine", engine_name, "--", sys.executable, "-c", catcher)
    int(read_line(proc))
    proc.send_signal(signal.SIGINT)
    returncode, _, err = finish(proc)
    assert returncode == 7, err


# -- engines, install, errors ---------------------------------------------------------------------


def test_engines_reports_the_suite_engine(engine_name: str) -> None:
    result = run_cli("engines", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    entry = report["engines"][engine_name]
    assert entry["usable"] is True
    assert entry["version"] and entry["version"] in entry["description"]
    assert report["auto"] in report["engines"]
    assert report["engines"][report["auto"]]["usable"] is True

    human = run_cli("engines")
    assert human.returncode == 0
    assert f"{engine_name}: {entry['description']}" in human.stdout
    assert "auto-detection picks this" in human.stdout


def test_engines_explains_what_is_missing(tmp_path: Path) -> None:
    environ = _cli_environ()
    environ["USERCOUCH_POUCHDB_HOME"] = str(tmp_path)  # an empty home: no PouchDB Server
    environ["PATH"] = str(tmp_path)  # and no couchdb on PATH
    environ.pop("COUCHDB_HOME", None)
    result = subprocess.run(
        _command("engines", "--json"), env=environ, capture_output=True, text=True,
        timeout=DEADLINE, check=False,
    )
    report = json.loads(result.stdout)
    assert report["engines"]["pouchdb"]["usable"] is False
    assert str(tmp_path) in report["engines"]["pouchdb"]["reason"]
    if report["auto"] is None:
        assert result.returncode == 1
        assert "no usable engine" in result.stderr


@pytest.mark.parametrize(
    ("args", "status", "message"),
    [
        (["start", "/no/such/dir"], 1, "basedir does not exist: '/no/such/dir'"),
        (["start", "--auth", "oauth"], 2, "invalid choice: 'oauth'"),
        (["start", "--bind", "10.0.0.1"], 2, "invalid choice: '10.0.0.1'"),
        (["start", "--timeout", "0"], 2, "positive number of seconds; got '0'"),
        (["run", "--timeout", "inf", "--", "true"], 2, "positive number of seconds; got 'inf'"),
        (["start", "--json", "--shell"], 2, "not allowed with argument"),
        (["start", "--engine", "nosuch"], 1, "unknown engine 'nosuch'"),
        (["run"], 2, "run needs a command"),
        (["run", "--", "no-such-command-here"], 127, "command not found: 'no-such-command-here'"),
        (["install", "couchdb"], 2, "invalid choice: 'couchdb'"),
        (["frobnicate"], 2, "invalid choice: 'frobnicate'"),
    ],
)
def test_bad_arguments_get_one_clear_line(args: list[str], status: int, message: str) -> None:
    result = run_cli(*args)
    assert result.returncode == status
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "error: " in lines[0] and message in lines[0]


def test_error_detail_lines_are_indented(tmp_path: Path) -> None:
    environ = _cli_environ()
    environ["USERCOUCH_NODE"] = str(tmp_path / "no-node")  # PouchDB Server: not usable
    result = subprocess.run(
        _command("start", "--engine", "pouchdb"), env=environ, capture_output=True,
        text=True, timeout=DEADLINE, check=False,
    )
    assert result.returncode == 1 and result.stdout == ""
    first, *detail = result.stderr.splitlines()
    assert first.startswith("usercouch: error: ")
    assert detail and all(line.startswith("    ") for line in detail), result.stderr
    assert any(repr(str(tmp_path / "no-node")) in line for line in detail)


def test_run_refuses_a_file_that_is_not_executable(tmp_path: Path) -> None:
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o644)
    result = run_cli("run", "--", str(script))
    assert result.returncode == 126
    assert result.stderr == f"usercouch: error: command is not executable: {str(script)!r}\n"


def test_locked_basedir_is_refused(engine_name: str, tmp_path: Path) -> None:
    with UserCouch(tmp_path, engine_name):
        result = run_cli("start", str(tmp_path), "--engine", engine_name)
    assert result.returncode == 1
    assert result.stderr.startswith("usercouch: error: cannot acquire exclusive lock on")
    assert "Traceback" not in result.stderr


def test_debug_shows_the_traceback() -> None:
    result = run_cli("start", "/no/such/dir", "--debug")
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert "FileNotFoundError: basedir does not exist" in result.stderr


def test_version_and_help() -> None:
    assert run_cli("--version").stdout.startswith("usercouch ")
    helped = run_cli("run", "--help")
    assert helped.returncode == 0
    assert "USERCOUCH_ENV" in helped.stdout and "COUCHDB_URL" in helped.stdout


def test_basic_header_matches_credentials(spawn: Spawn, engine_name: str) -> None:
    """The printed env is self-consistent: its header is built from its own credentials."""
    proc = spawn("start", "--json", "-q", "--engine", engine_name)
    env = json.loads(read_line(proc))
    proc.send_signal(signal.SIGTERM)
    raw = f"{env['basic']['username']}:{env['basic']['password']}".encode()
    assert env["authorization"] == "Basic " + base64.b64encode(raw).decode()
    assert finish(proc)[0] == 0
