#!/usr/bin/env python3
"""What a test pays for its couch: ``couch_db`` against ``fresh_couch`` and CouchTestCase.

Method: one run of this script writes a throwaway test project and runs it with pytest in
a subprocess, the way users run the plugin. The project holds empty tests that use
``couch_db`` (100), ``fresh_couch`` (10), a CouchTestCase (10), and two baselines that use
nothing (100 plain functions, 10 plain unittest cases). A small conftest records each
test's setup + call + teardown durations (pytest's own report timings). A test's overhead
is its median duration minus the median of its baseline (plain functions for the pytest
fixtures, plain TestCases for CouchTestCase); the first ``couch_db`` test also pays for the
session server, which the median leaves out and the table shows on its own line.
A second subprocess runs only the 100 ``couch_db`` tests and times the whole pytest run,
startup and session server included. Ratios come from the same run, so a slow or busy
machine slows every row alike.

Usage: python bench/bench_fixtures.py [--engine NAME] [--db-tests 100] [--server-tests 10]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import entry_points
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the usercouch of this checkout, installed or not

CONFTEST = """
import json, os

DURATIONS = {}

def pytest_runtest_logreport(report):
    DURATIONS.setdefault(report.nodeid, {"total": 0.0, "ok": True})
    DURATIONS[report.nodeid]["total"] += report.duration
    if report.failed:
        DURATIONS[report.nodeid]["ok"] = False

def pytest_sessionfinish(session):
    with open(os.environ["BENCH_OUT"], "w") as f:
        json.dump(DURATIONS, f)
"""

GOALS = {"couch_db_ms": 20.0, "ratio": 30.0, "run_s": 15.0}


def write_project(root: Path, db_tests: int, server_tests: int) -> None:
    """One module whose tests alternate kinds in rounds, so load changes hit all kinds alike."""
    per_round = max(1, db_tests // server_tests)
    lines = ["import unittest", "from usercouch.misc import CouchTestCase", ""]
    made = 0
    for r in range(server_tests):
        count = per_round if r < server_tests - 1 else db_tests - made
        for i in range(count):
            lines += [f"def test_nothing_{r}_{i}():", "    pass", ""]
            lines += [f"def test_couch_db_{r}_{i}(couch_db):", "    pass", ""]
        made += count
        lines += [f"def test_fresh_couch_{r}(fresh_couch):", "    pass", ""]
        lines += [
            f"class Plain{r}(unittest.TestCase):",
            "    def test_plain(self):",
            "        pass",
        ]
        lines += [
            f"class Couch{r}(CouchTestCase):",
            "    def test_couch(self):",
            "        pass",
            "",
        ]
    (root / "conftest.py").write_text(CONFTEST)
    (root / "test_kinds.py").write_text("\n".join(lines) + "\n")


def run_pytest(root: Path, engine: str | None, *args: str) -> tuple[dict[str, dict], float]:
    out = root / f"durations-{time.monotonic_ns()}.json"
    env = {**os.environ, "BENCH_OUT": str(out), "PYTHONPATH": str(REPO)}
    env.pop("PYTEST_ADDOPTS", None)
    if engine:
        env["USERCOUCH_ENGINE"] = engine
    installed = any(ep.name == "usercouch" for ep in entry_points(group="pytest11"))
    plugin = [] if installed else ["-p", "usercouch.pytest_plugin"]
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *plugin, *args]
    started = time.perf_counter()
    result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"inner pytest failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return json.loads(out.read_text()), elapsed


def ms(seconds: list[float]) -> list[float]:
    return [s * 1000 for s in seconds]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engine", default=None, help="engine name (default: auto-detect)")
    parser.add_argument("--db-tests", type=int, default=100)
    parser.add_argument("--server-tests", type=int, default=10)
    args = parser.parse_args()

    from usercouch.engines import get_engine

    print(f"engine: {get_engine(args.engine).describe()}")
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores")
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="usercouch-bench-") as tmp:
        root = Path(tmp)
        write_project(root, args.db_tests, args.server_tests)
        durations, _ = run_pytest(root, args.engine)
        _, db_run = run_pytest(root, args.engine, "-k", "couch_db")

    def group(pattern: str) -> list[float]:
        picked = [d for node, d in durations.items() if re.search(pattern, node)]
        assert picked and all(d["ok"] for d in picked), pattern
        return ms([d["total"] for d in picked])

    rows = {
        "baseline (pytest)": group(r"::test_nothing_"),
        "couch_db": group(r"::test_couch_db_"),
        "fresh_couch": group(r"::test_fresh_couch_"),
        "baseline (unittest)": group(r"::Plain\d+::test_plain$"),
        "CouchTestCase": group(r"::Couch\d+::test_couch$"),
    }
    med = {name: statistics.median(values) for name, values in rows.items()}
    overhead = {
        "couch_db": med["couch_db"] - med["baseline (pytest)"],
        "fresh_couch": med["fresh_couch"] - med["baseline (pytest)"],
        "CouchTestCase": med["CouchTestCase"] - med["baseline (unittest)"],
    }
    first_db = rows["couch_db"][0]  # the parametrized tests run in order: the first starts it
    session_start = first_db - med["couch_db"]

    print(
        f"{'test kind':<20} {'tests':>5} {'median ms':>10} {'p90 ms':>9} "
        f"{'overhead ms':>12} {'x couch_db':>11}"
    )
    for name, values in rows.items():
        p90 = statistics.quantiles(values, n=10)[-1] if len(values) > 1 else values[0]
        extra = overhead.get(name)
        ratio = f"{extra / overhead['couch_db']:>10.1f}x" if extra is not None else f"{'':>11}"
        over = f"{extra:>12.1f}" if extra is not None else f"{'':>12}"
        print(f"{name:<20} {len(values):>5} {med[name]:>10.1f} {p90:>9.1f} {over} {ratio}")
    print(f"load average: {load_before:.2f} at the start, {os.getloadavg()[0]:.2f} at the end")
    print(f"session server start (paid by the first couch_db test): {session_start:.0f} ms")
    print(f"{args.db_tests} couch_db tests + session server, whole pytest run: {db_run:.2f} s")

    fresh_ratio = overhead["fresh_couch"] / overhead["couch_db"]
    case_ratio = overhead["CouchTestCase"] / overhead["couch_db"]
    checks = [
        (
            f"couch_db median overhead < {GOALS['couch_db_ms']:g} ms",
            overhead["couch_db"] < GOALS["couch_db_ms"],
        ),
        (
            f"fresh_couch / couch_db >= {GOALS['ratio']:g}x ({fresh_ratio:.0f}x)",
            fresh_ratio >= GOALS["ratio"],
        ),
        (
            f"CouchTestCase / couch_db >= {GOALS['ratio']:g}x ({case_ratio:.0f}x)",
            case_ratio >= GOALS["ratio"],
        ),
        (f"{args.db_tests} couch_db tests run < {GOALS['run_s']:g} s", db_run < GOALS["run_s"]),
    ]
    for label, ok in checks:
        print(f"{'met ' if ok else 'MISS'}  {label}")
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
