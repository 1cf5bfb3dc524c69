"""Suite-wide engine selection: one engine for the whole run, real servers only.

``USERCOUCH_ENGINE`` picks the engine (``pouchdb``, ``couchdb``); unset means
auto-detection. Tests that start servers ask for the ``engine_name`` or ``make_couch``
fixtures. Where no engine is usable they are skipped — except under ``CI=true``, where a
missing engine fails the run.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from usercouch import UserCouch
from usercouch.engines import Engine, get_engine
from usercouch.errors import EngineNotFound

_ENGINE: Engine | None = None
_ENGINE_ERROR: str | None = None


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def pytest_configure(config: pytest.Config) -> None:
    global _ENGINE, _ENGINE_ERROR
    try:
        _ENGINE = get_engine(None)
    except (EngineNotFound, ValueError) as exc:
        _ENGINE_ERROR = str(exc)
        if _in_ci():
            raise pytest.UsageError(f"CI=true but no usable engine: {exc}") from None


def pytest_report_header(config: pytest.Config) -> str:
    if _ENGINE is not None:
        return f"usercouch engine: {_ENGINE.describe()}"
    return f"usercouch engine: none ({_ENGINE_ERROR})"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    name = _ENGINE.name if _ENGINE is not None else None
    for item in items:
        if item.get_closest_marker("pouchdb_only") and name != "pouchdb":
            item.add_marker(pytest.mark.skip(reason="PouchDB Server only"))
        if item.get_closest_marker("couchdb_only") and name != "couchdb":
            item.add_marker(pytest.mark.skip(reason="Apache CouchDB only"))


@pytest.fixture(scope="session")
def engine_name() -> str:
    """The engine this run tests (skips the test where none is installed, outside CI)."""
    if _ENGINE is None:
        pytest.skip(f"no usercouch engine available: {_ENGINE_ERROR}")
    return _ENGINE.name


@pytest.fixture
def make_couch(
    engine_name: str, tmp_path: Path
) -> Iterator[Callable[..., UserCouch]]:
    """Build UserCouch instances on fresh basedirs; all are closed after the test."""
    made: list[UserCouch] = []
    counter = 0

    def factory(basedir: Any = None, **kwargs: Any) -> UserCouch:
        nonlocal counter
        if basedir is None:
            counter += 1
            basedir = tmp_path / f"couch{counter}"
            basedir.mkdir()
        couch = UserCouch(basedir, engine=kwargs.pop("engine", engine_name), **kwargs)
        made.append(couch)
        return couch

    yield factory
    for couch in made:
        couch.close()
