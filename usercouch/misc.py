"""Throwaway couches for tests: TempCouch and CouchTestCase (names kept from the original).

A TempCouch lives in a fresh temporary basedir that goes away with it. The removal is part
of UserCouch's own cleanup, so it runs exactly once, after the server is stopped and the
lock released, whichever way the couch ends: close(), the with-block, garbage collection
or interpreter exit (and never in a forked child).
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
import unittest
from collections.abc import Mapping
from typing import Any, ClassVar

from .couch import DEFAULT_TIMEOUT, UserCouch
from .engines import Engine

#: The environment variable that skips every CouchTestCase (for machines with no engine).
SKIP_ENV_VAR = "SKIP_USERCOUCH_TEST_CASES"
_TRUE = ("1", "true", "yes", "on")

__all__ = ["SKIP_ENV_VAR", "CouchTestCase", "TempCouch", "skip_test_cases"]


class TempCouch(UserCouch):
    """A UserCouch in a new ``tempfile.mkdtemp()`` basedir, removed when the couch ends.

    ``engine`` and ``timeout`` are UserCouch's; ``dir`` is the parent of the temporary
    basedir (default: the system's temporary directory). Call ``bootstrap()`` to start it.
    """

    def __init__(
        self,
        engine: str | Engine | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        dir: str | os.PathLike[str] | None = None,
    ) -> None:
        basedir = tempfile.mkdtemp(prefix="usercouch.", dir=dir)
        try:
            super().__init__(basedir, engine, timeout=timeout)
        except BaseException:
            shutil.rmtree(basedir, ignore_errors=True)
            raise
        self._after_close(functools.partial(shutil.rmtree, basedir, ignore_errors=True))

    def __enter__(self) -> TempCouch:
        return self

    def __repr__(self) -> str:
        return f"TempCouch(basedir={self.basedir!r}, engine={self.engine.name!r})"


def skip_test_cases(environ: Mapping[str, str] | None = None) -> bool:
    """True if ``SKIP_USERCOUCH_TEST_CASES`` asks to skip every CouchTestCase."""
    value = (os.environ if environ is None else environ).get(SKIP_ENV_VAR, "")
    return value.strip().lower() in _TRUE


class CouchTestCase(unittest.TestCase):
    """A TestCase with a new, running TempCouch per test: ``self.couch`` and ``self.env``.

    Class attributes choose the server: ``auth`` ('basic' or 'open'), ``bind_address``,
    ``engine`` (None: auto-detect or ``USERCOUCH_ENGINE``) and ``config`` (more
    bootstrap config; its keys win over ``bind_address``). Set
    ``SKIP_USERCOUCH_TEST_CASES=true`` to skip them all.
    """

    auth: ClassVar[str] = "basic"
    bind_address: ClassVar[str] = "127.0.0.1"
    engine: ClassVar[str | Engine | None] = None
    config: ClassVar[Mapping[str, Any] | None] = None

    couch: TempCouch
    env: dict[str, Any]

    def setUp(self) -> None:
        super().setUp()
        if skip_test_cases():
            raise unittest.SkipTest(f"{SKIP_ENV_VAR} is set")
        couch = TempCouch(self.engine)
        # A cleanup runs even if a subclass's setUp fails after this or skips tearDown.
        self.addCleanup(couch.close)
        self.couch = couch
        config = {"bind_address": self.bind_address, **(self.config or {})}
        self.env = couch.bootstrap(self.auth, config)

    def tearDown(self) -> None:
        self.couch.close()
        super().tearDown()
