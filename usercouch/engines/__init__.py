"""The engine registry: pick a server by name, by ``USERCOUCH_ENGINE``, or by what is installed."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import EngineNotFound
from .base import Engine, Launch, Ready
from .couchdb import CouchDB
from .pouchdb import PouchDBServer

#: Engine names and how to build each with its default discovery.
ENGINES: dict[str, Callable[[], Engine]] = {
    "couchdb": CouchDB,
    "pouchdb": PouchDBServer,
}
#: Auto-detection tries these in order: the real CouchDB first.
AUTO_ORDER = ("couchdb", "pouchdb")

__all__ = [
    "ENGINES", "Engine", "Launch", "Ready", "Survey", "auto_detect", "check_name", "get_engine",
    "survey",
]


def check_name(name: str) -> str:
    """``name`` if it is a registered engine; else ValueError listing the known names."""
    if name not in ENGINES:
        known = ", ".join(repr(n) for n in ("auto", *ENGINES))
        raise ValueError(f"unknown engine {name!r}; known engines: {known}")
    return name


def _by_name(name: str) -> Engine:
    return ENGINES[check_name(name)]()


def auto_detect() -> Engine:
    """The best engine installed here, or EngineNotFound saying how to get one."""
    reasons = []
    for name in AUTO_ORDER:
        if name not in ENGINES:
            continue
        try:
            return ENGINES[name]()
        except EngineNotFound as exc:
            reasons.append(str(exc))
    raise EngineNotFound(
        "no CouchDB-compatible server found. Either install Apache CouchDB 3.x (and set "
        "COUCHDB_HOME if it is not in /opt/couchdb or on PATH), or run:\n"
        "    python -m usercouch install pouchdb\n"
        "What was looked at:\n" + "\n".join(reasons)
    )


def get_engine(spec: str | Engine | None = None) -> Engine:
    """Resolve UserCouch's ``engine`` argument: an Engine, a name, 'auto' or None.

    None follows ``USERCOUCH_ENGINE``; 'auto' (there or here) picks the best installed.
    """
    if isinstance(spec, Engine):
        return spec
    if spec is None:
        spec = os.environ.get("USERCOUCH_ENGINE") or "auto"
        if spec != "auto":
            try:
                check_name(spec)
            except ValueError as exc:  # a stale variable is easy to forget: say where it came from
                raise ValueError(f"USERCOUCH_ENGINE: {exc}") from None
    elif not isinstance(spec, str):
        raise TypeError(f"engine must be None, a name or an Engine; got {type(spec).__name__}")
    return auto_detect() if spec == "auto" else _by_name(spec)


@dataclass(frozen=True)
class Survey:
    """What is usable here: each engine, or why not; what auto-detection and the env pick."""

    engines: dict[str, Engine | EngineNotFound]
    auto: str | None
    requested: str | None


def survey() -> Survey:
    """Try every registered engine with its default discovery (for ``usercouch engines``)."""
    names = [n for n in AUTO_ORDER if n in ENGINES] + [n for n in ENGINES if n not in AUTO_ORDER]
    found: dict[str, Engine | EngineNotFound] = {}
    for name in names:
        try:
            found[name] = ENGINES[name]()
        except EngineNotFound as exc:
            found[name] = exc
    auto = next((n for n in names if isinstance(found[n], Engine)), None)
    return Survey(found, auto, os.environ.get("USERCOUCH_ENGINE") or None)
