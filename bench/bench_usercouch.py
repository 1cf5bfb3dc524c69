#!/usr/bin/env python3
"""What a UserCouch costs: bootstrap against the bare engine, kill(), memory, concurrency.

Method, all in one run so that ratios compare like with like on a machine that may be busy:

* bootstrap: ``UserCouch(basedir).bootstrap()`` on a fresh basedir (lock, config, PBKDF2
  hash, spawn, wait for the ready report), and the same plus the first authenticated
  ``GET /``; against the bare engine started by hand on the same machine (PouchDB Server:
  the stock ``node_modules/.bin/pouchdb-server --port P --dir D --config C``) until its
  ``GET /`` answers, polled every 2 ms. Runs alternate (usercouch, bare, usercouch, ...).
* kill(): latency of ``kill()`` (SIGTERM, SIGKILL after the grace) on a server that has
  answered requests, plus ``crash()`` and the restart with ``start()``.
* memory: RSS and PSS (``/proc/<pid>/smaps_rollup``) of each server's process group, idle
  after bootstrap and after writing 1000 documents and querying a view.
* concurrency: 1, 2, 4 and 8 instances bootstrapped at once from as many threads (released
  by a barrier): the per-instance bootstrap time and the wall time until all are up.

Usage: python bench/bench_usercouch.py [--engine NAME] [--runs 10] [--kills 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import http.client
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from usercouch import UserCouch
from usercouch.engines import Engine, get_engine
from usercouch.http import request

POLL = 0.002  # seconds between probes of the bare server


# -- small statistics and tables ------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def p90(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}"


def table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A reStructuredText simple table (readable as plain text too)."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    rule = "  ".join("=" * w for w in widths)

    def line(cells: Sequence[str]) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    out = [title, "-" * len(title), "", rule, line(header), rule]
    out += [line(r) for r in rows]
    out += [rule, ""]
    return "\n".join(out)


# -- the bare engine ------------------------------------------------------------------------


def free_port() -> int:
    """A port free right now (bind-close: acceptable for a benchmark's bare baseline only)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def answers(port: int) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
    try:
        conn.request("GET", "/", headers={"Accept": "application/json"})
        conn.getresponse().read()
        return True
    except OSError:
        return False
    finally:
        conn.close()


def bare_pouchdb_start(engine: Engine, workdir: Path) -> float:
    """Seconds from spawning the stock pouchdb-server until its GET / answers."""
    home = getattr(engine, "home", None)
    if home is None:
        raise RuntimeError("the bare start is measured for PouchDB Server only")
    binary = os.path.join(home, "node_modules", ".bin", "pouchdb-server")
    data = workdir / "data"
    data.mkdir()
    port = free_port()
    command = [binary, "--port", str(port), "--dir", str(data),
               "--config", str(workdir / "config.json")]
    start = time.perf_counter()
    proc = subprocess.Popen(
        command, cwd=workdir, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        while not answers(port):
            if proc.poll() is not None:
                raise RuntimeError(f"bare pouchdb-server exited with {proc.returncode}")
            time.sleep(POLL)
        return time.perf_counter() - start
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# -- usercouch ------------------------------------------------------------------------------


def usercouch_start(engine_name: str, workdir: Path) -> tuple[float, float]:
    """Seconds to bootstrap(), and to bootstrap() plus the first authenticated GET /."""
    start = time.perf_counter()
    couch = UserCouch(workdir, engine=engine_name)
    try:
        env = couch.bootstrap()
        booted = time.perf_counter() - start
        assert request(env, "GET", "/").status == 200
        first = time.perf_counter() - start
        return booted, first
    finally:
        couch.close()


def group_memory(pid: int) -> tuple[int, int]:
    """RSS and PSS in KiB of the process group led by ``pid`` (server plus its helpers)."""
    rss = pss = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii") as f:
                if int(f.read().rsplit(")", 1)[1].split()[2]) != pid:
                    continue
            with open(f"/proc/{entry}/smaps_rollup", encoding="ascii") as f:
                for line in f:
                    key, value = line.split(":", 1)
                    if key == "Rss":
                        rss += int(value.split()[0])
                    elif key == "Pss":
                        pss += int(value.split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return rss, pss


def workload(env: dict[str, Any]) -> None:
    """1000 documents in batches and one view query: a small but real working set."""
    assert request(env, "PUT", "/bench").status == 201
    for batch in range(10):
        docs = [{"_id": f"d{batch:02d}-{i:03d}", "n": i, "text": "x" * 200} for i in range(100)]
        assert request(env, "POST", "/bench/_bulk_docs", body={"docs": docs}).status == 201
    ddoc = {"views": {"by_n": {"map": "function (doc) { emit(doc.n, null); }"}}}
    assert request(env, "PUT", "/bench/_design/b", body=ddoc).status == 201
    assert request(env, "GET", "/bench/_design/b/_view/by_n?limit=1", timeout=60).status == 200


def concurrent_round(engine_name: str, root: Path, count: int) -> tuple[list[float], float,
                                                                           list[UserCouch]]:
    """Bootstrap ``count`` instances at once; per-instance seconds, wall seconds, couches."""
    couches = []
    for i in range(count):
        basedir = root / f"c{i}"
        basedir.mkdir()
        couches.append(UserCouch(basedir, engine=engine_name))
    barrier = threading.Barrier(count + 1)

    def boot(couch: UserCouch) -> float:
        barrier.wait()
        start = time.perf_counter()
        couch.bootstrap()
        return time.perf_counter() - start

    with ThreadPoolExecutor(max_workers=count) as pool:
        futures = [pool.submit(boot, c) for c in couches]
        barrier.wait()
        start = time.perf_counter()
        times = [f.result() for f in futures]
        wall = time.perf_counter() - start
    return times, wall, couches


# -- the sections ---------------------------------------------------------------------------


def bench_bootstrap(engine: Engine, runs: int, scratch: Path) -> str:
    boots: list[float] = []
    firsts: list[float] = []
    bares: list[float] = []
    for i in range(runs):
        work = scratch / f"boot{i}"
        work.mkdir()
        booted, first = usercouch_start(engine.name, work)
        boots.append(booted)
        firsts.append(first)
        if engine.name == "pouchdb":
            bare = scratch / f"bare{i}"
            bare.mkdir()
            bares.append(bare_pouchdb_start(engine, bare))
    rows = [
        ["UserCouch().bootstrap()", ms(median(boots)), ms(p90(boots)), ms(min(boots))],
        ["... + first authenticated GET /", ms(median(firsts)), ms(p90(firsts)), ms(min(firsts))],
    ]
    if bares:
        rows.append(["bare pouchdb-server until GET / answers", ms(median(bares)),
                     ms(p90(bares)), ms(min(bares))])
        rows.append(["ratio bootstrap / bare (medians)",
                     f"{median(boots) / median(bares):.2f}", "", ""])
        rows.append(["ratio bootstrap + GET / bare (medians)",
                     f"{median(firsts) / median(bares):.2f}", "", ""])
    return table(f"Bootstrap against the bare engine ({runs} alternating runs each)",
                 ["what", "median ms", "p90 ms", "min ms"], rows)


def bench_kill(engine: Engine, kills: int, scratch: Path) -> str:
    basedir = scratch / "kill"
    basedir.mkdir()
    killed: list[float] = []
    crashed: list[float] = []
    restarts: list[float] = []
    with UserCouch(basedir, engine=engine.name) as couch:
        env = couch.bootstrap()
        for i in range(kills):
            assert request(env, "GET", "/_all_dbs").status == 200
            start = time.perf_counter()
            if i % 2 == 0:
                assert couch.kill() is True
                killed.append(time.perf_counter() - start)
            else:
                assert couch.crash() is True
                crashed.append(time.perf_counter() - start)
            start = time.perf_counter()
            assert couch.start() is True
            restarts.append(time.perf_counter() - start)
    rows = [
        ["kill() (SIGTERM, then SIGKILL)", str(len(killed)), ms(median(killed)), ms(p90(killed)),
         ms(max(killed))],
        ["crash() (SIGKILL)", str(len(crashed)), ms(median(crashed)), ms(p90(crashed)),
         ms(max(crashed))],
        ["start() after either (same port)", str(len(restarts)), ms(median(restarts)),
         ms(p90(restarts)), ms(max(restarts))],
    ]
    return table("Stopping and restarting a server", ["what", "runs", "median ms", "p90 ms",
                                                       "max ms"], rows)


def bench_concurrency(engine: Engine, rounds: int, scratch: Path) -> tuple[str, str]:
    levels = (1, 2, 4, 8)
    results: dict[int, tuple[list[float], list[float]]] = {n: ([], []) for n in levels}
    idle: list[tuple[int, int]] = []
    busy: list[tuple[int, int]] = []
    for r in range(rounds):
        for n in levels:
            root = scratch / f"conc{r}-{n}"
            root.mkdir()
            times, wall, couches = concurrent_round(engine.name, root, n)
            results[n][0].extend(times)
            results[n][1].append(wall)
            try:
                if n == 8 and r == rounds - 1:
                    pids = [c.pid for c in couches if c.pid is not None]
                    idle = [group_memory(pid) for pid in pids]
                    for c in couches:
                        assert c.env is not None
                        workload(c.env)
                    busy = [group_memory(pid) for pid in pids]
            finally:
                for c in couches:
                    c.close()
    base_each = median(results[1][0])
    base_wall = median(results[1][1])
    rows = []
    for n in levels:
        each, walls = results[n]
        rows.append([
            str(n), ms(median(each)), ms(p90(each)), f"{median(each) / base_each:.2f}",
            ms(median(walls)), f"{median(walls) / base_wall:.2f}",
            f"{n / median(walls):.1f}",
        ])
    scaling = table(
        f"Concurrent bootstraps from threads ({rounds} rounds per level, "
        f"{os.cpu_count()} cores)",
        ["instances", "each median ms", "each p90 ms", "each / 1", "all up ms", "all up / 1",
         "instances/s"],
        rows,
    )
    mem_rows = []
    for label, samples in (("idle, after bootstrap", idle), ("after 1000 docs + a view", busy)):
        if samples:
            rss = [s[0] / 1024 for s in samples]
            pss = [s[1] / 1024 for s in samples]
            mem_rows.append([label, str(len(samples)), f"{median(rss):.0f}", f"{max(rss):.0f}",
                             f"{median(pss):.0f}", f"{sum(pss):.0f}"])
    memory = table(
        "Memory per server (8 running at once)",
        ["state", "servers", "RSS median MiB", "RSS max MiB", "PSS median MiB",
         "PSS all 8 MiB"],
        mem_rows,
    )
    return scaling, memory


def describe_machine(engine: Engine) -> str:
    node = shutil.which("node")
    node_version = "n/a"
    if node:
        node_version = subprocess.run([node, "--version"], capture_output=True, text=True,
                                      check=False).stdout.strip()
    os_name = platform.platform()
    try:
        with open("/etc/os-release", encoding="utf-8") as f:
            fields = dict(line.rstrip().split("=", 1) for line in f if "=" in line)
        os_name = fields.get("PRETTY_NAME", os_name).strip('"')
    except OSError:
        pass
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return "\n".join([
        f"machine: {os.cpu_count()} cores, {os_name}, kernel {platform.release()}",
        f"python:  {platform.python_version()}   node: {node_version}",
        f"engine:  {engine.describe()}",
        f"load average at start: {load}",
        "",
    ])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--engine", default=None, help="engine name (default: auto)")
    parser.add_argument("--runs", type=int, default=10, help="bootstrap/bare pairs")
    parser.add_argument("--kills", type=int, default=20, help="kill()/crash() runs")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per concurrency level")
    args = parser.parse_args(argv)
    engine = get_engine(args.engine)
    emit: Callable[[str], None] = lambda text: print(text, flush=True)  # noqa: E731
    emit(describe_machine(engine))
    with tempfile.TemporaryDirectory(prefix="bench-usercouch-") as tmp:
        scratch = Path(tmp)
        emit(bench_bootstrap(engine, args.runs, scratch))
        emit(bench_kill(engine, args.kills, scratch))
        scaling, memory = bench_concurrency(engine, args.rounds, scratch)
        emit(scaling)
        emit(memory)
    return 0


if __name__ == "__main__":
    sys.exit(main())
