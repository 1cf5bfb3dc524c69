"""The usercouch pytest plugin: private couches as fixtures (entry point ``pytest11``).

Fixtures: ``couch`` (one server per session, or per xdist worker: its env),
``couch_server`` (that server's TempCouch), ``couch_db`` (a fresh, empty database on it for
each test), ``fresh_couch`` / ``fresh_couch_server`` (a whole new server per test).
Make more with :mod:`usercouch.factories`. No server starts unless a test asks for one.
When a test that used these couches fails, each server's log tail joins its report.
Disable with ``-p no:usercouch``.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from typing import Any

import pytest

from . import factories
from .factories import CouchDatabase
from .misc import TempCouch

LOG_LINES_INI = "usercouch_log_lines"
DEFAULT_LOG_LINES = 30


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("usercouch", "private CouchDB-compatible servers (usercouch)")
    group.addoption(
        "--usercouch-engine",
        dest=factories.ENGINE_DEST,
        metavar="NAME",
        default=None,
        help="engine for the usercouch fixtures: 'auto' (default), 'pouchdb', 'couchdb', ... "
        "(overrides the usercouch_engine ini key)",
    )
    parser.addini(
        factories.ENGINE_INI,
        "engine for the usercouch fixtures (default: auto-detect, honouring USERCOUCH_ENGINE)",
        default="",
    )
    parser.addini(
        LOG_LINES_INI,
        f"lines of server log attached to a failing test's report (default {DEFAULT_LOG_LINES};"
        " 0: none)",
        default=str(DEFAULT_LOG_LINES),
    )


def pytest_configure(config: pytest.Config) -> None:
    """Refuse a bad engine name or log line count before any test runs."""
    try:
        factories.engine_option(config)
    except (ValueError, TypeError) as exc:
        raise pytest.UsageError(str(exc)) from None
    _log_lines(config)


def _log_lines(config: pytest.Config) -> int:
    raw = config.getini(LOG_LINES_INI)
    try:
        lines = int(raw)
    except (TypeError, ValueError):
        lines = -1
    if lines < 0:
        raise pytest.UsageError(f"{LOG_LINES_INI} must be a whole number >= 0; got {raw!r}")
    return lines


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, None]:
    """Attach the log tail of every couch a failing test used to its report."""
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if not report.failed:
        return
    funcargs: dict[str, Any] = getattr(item, "funcargs", None) or {}
    if not funcargs:
        return
    lines = _log_lines(item.config)
    if lines == 0:
        return
    for name, server in factories.servers_behind(funcargs.values()):
        text = server.log_tail(lines)
        if text:
            url = server.env["url"] if server.env else server.basedir
            report.sections.append((f"usercouch log tail: {name} ({url})", text))


# -- the built-in fixtures ----------------------------------------------------------------

# Every built-in server: basic auth, default config, the engine chosen by the options.
_DEFAULT_SERVER = factories.server_spec("session")


@pytest.fixture(scope="session")
def couch_server(request: pytest.FixtureRequest) -> Iterator[TempCouch]:
    """The session's running TempCouch (one per xdist worker); ``couch`` is its env."""
    with factories.running_server(request, _DEFAULT_SERVER) as server:
        yield server


@pytest.fixture(scope="session")
def couch(couch_server: TempCouch) -> Iterator[dict[str, Any]]:
    """The env of the session's couch: one server per test session (per xdist worker)."""
    with factories.env_of(couch_server, "couch") as env:
        yield env


@pytest.fixture
def couch_db(request: pytest.FixtureRequest, couch_server: TempCouch) -> Iterator[CouchDatabase]:
    """A fresh, empty database on the session's couch, deleted after the test.

    An object with ``.name``, ``.url`` (the database URL, ending in '/') and ``.env``.
    """
    with factories.fresh_database(couch_server, request.node.name, "couch_db") as database:
        yield database


@pytest.fixture
def fresh_couch_server(request: pytest.FixtureRequest) -> Iterator[TempCouch]:
    """A new running TempCouch for this test alone (to kill, restart, read its log)."""
    with factories.running_server(request, _DEFAULT_SERVER) as server:
        yield server


@pytest.fixture
def fresh_couch(fresh_couch_server: TempCouch) -> Iterator[dict[str, Any]]:
    """The env of a whole new server for this test (empty, yours to reconfigure or restart)."""
    with factories.env_of(fresh_couch_server, "fresh_couch") as env:
        yield env
