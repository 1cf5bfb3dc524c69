"""Declare your own couch fixtures, the way pytest-postgresql's ``factories`` do.

Assign what a factory returns to a module-level name (in a conftest.py or a test module);
that name becomes the fixture::

    from usercouch import factories

    open_couch = factories.couch_fixture(scope="module", auth="open")
    admin_server = factories.couch_server_fixture(config={"loglevel": "debug"})
    admin_db = factories.couch_db_fixture("admin_server")

Arguments are checked when the factory is called, so a typo fails at collection with the
bad value named, before any server starts.
"""

from __future__ import annotations

import contextlib
import copy
import re
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import pytest

from .config import build_options, random_hex
from .couch import DEFAULT_TIMEOUT, UserCouch, check_timeout
from .engines import Engine, check_name
from .errors import UserCouchError
from .http import request as http_request
from .misc import TempCouch

Scope = Literal["session", "package", "module", "class", "function"]
SCOPES: tuple[str, ...] = ("session", "package", "module", "class", "function")

#: The ini key and the command line option (dest) naming the engine for plugin fixtures.
ENGINE_INI = "usercouch_engine"
ENGINE_DEST = "usercouch_engine"

__all__ = [
    "CouchDatabase",
    "couch_db_fixture",
    "couch_fixture",
    "couch_server_fixture",
    "database_name",
    "engine_option",
    "finish_deletions",
    "server_spec",
]


# -- which server a fixture value belongs to (for log tails in failure reports) -----------

# id(value handed to a test) -> (fixture name, server). Entries live exactly as long as the
# fixture's value, so an id is never looked up after its object is gone.
_OWNERS: dict[int, tuple[str, UserCouch]] = {}


@contextlib.contextmanager
def _registered(value: object, name: str, server: UserCouch) -> Iterator[None]:
    _OWNERS[id(value)] = (name, server)
    try:
        yield
    finally:
        _OWNERS.pop(id(value), None)


def servers_behind(values: Iterable[object]) -> list[tuple[str, UserCouch]]:
    """The servers behind fixture values, each once, named by the fixtures that lead to it."""
    names: dict[int, list[str]] = {}
    servers: dict[int, UserCouch] = {}
    for value in values:
        owner = _OWNERS.get(id(value))
        if owner is not None:
            name, server = owner
            servers[id(server)] = server
            if name not in names.setdefault(id(server), []):
                names[id(server)].append(name)
    return [(", ".join(names[key]), server) for key, server in servers.items()]


# -- checking arguments -------------------------------------------------------------------


def check_engine(engine: object, what: str = "engine") -> str | Engine | None:
    """An engine spec as UserCouch takes it; 'auto' means None. Raises naming a bad value."""
    if engine is None or isinstance(engine, Engine):
        return engine
    if not isinstance(engine, str):
        raise TypeError(f"{what} must be None, an engine name or an Engine; got {engine!r}")
    if engine == "auto":
        return None
    try:
        return check_name(engine)
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from None


def _check_scope(scope: object) -> None:
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}; got {scope!r}")


def engine_option(config: pytest.Config) -> str | None:
    """The engine named by ``--usercouch-engine`` or the ``usercouch_engine`` ini key.

    None means auto-detection (which honours ``USERCOUCH_ENGINE``). Without the plugin
    (``-p no:usercouch``) there is no option: auto-detection too.
    """
    try:
        value = config.getoption(ENGINE_DEST) or config.getini(ENGINE_INI)
    except ValueError:
        return None
    engine = check_engine(value or None, "--usercouch-engine / usercouch_engine")
    assert not isinstance(engine, Engine)
    return engine


@dataclass(frozen=True)
class ServerSpec:
    """How a fixture's servers are made: checked once, used for every server it starts."""

    scope: Scope
    auth: str
    config: Mapping[str, Any] | None
    extra: str | None
    engine: str | Engine | None
    timeout: float
    follow_option: bool


def server_spec(
    scope: object = "session",
    auth: object = "basic",
    config: object = None,
    extra: object = None,
    engine: object = None,
    timeout: object = DEFAULT_TIMEOUT,
) -> ServerSpec:
    """Check a server fixture's arguments now, naming any bad value; return them frozen."""
    _check_scope(scope)
    # Validates auth, config and extra the way bootstrap() will (the credentials made here
    # are thrown away: every server gets its own).
    build_options(auth, config, extra)
    seconds = check_timeout(timeout)  # as UserCouch will check it, so no server starts first
    assert isinstance(auth, str) and (extra is None or isinstance(extra, str))
    return ServerSpec(
        scope=scope,  # type: ignore[arg-type]  # checked against SCOPES above
        auth=auth,
        config=copy.deepcopy(dict(config)) if isinstance(config, Mapping) else None,
        extra=extra,
        engine=check_engine(engine),
        timeout=seconds,
        follow_option=engine is None,
    )


# -- running servers ----------------------------------------------------------------------


def _name(request: pytest.FixtureRequest) -> str:
    return request.fixturename or "usercouch"


@contextlib.contextmanager
def running_server(request: pytest.FixtureRequest, spec: ServerSpec) -> Iterator[TempCouch]:
    """A bootstrapped TempCouch for a fixture; stopped and removed however the test ends."""
    engine = engine_option(request.config) if spec.follow_option else spec.engine
    config = copy.deepcopy(dict(spec.config)) if spec.config is not None else None
    with TempCouch(engine, timeout=spec.timeout) as server:
        env = server.bootstrap(spec.auth, config, spec.extra)
        try:
            with _registered(server, _name(request), server):
                yield server
        finally:
            finish_deletions(env["url"])


@contextlib.contextmanager
def env_of(server: UserCouch, name: str) -> Iterator[dict[str, Any]]:
    """A private copy of ``server``'s env, known to the plugin's failure reports."""
    if server.env is None:
        raise UserCouchError(f"{server!r} is not bootstrapped: it has no env")
    env = copy.deepcopy(server.env)
    with _registered(env, name, server):
        yield env


def couch_server_fixture(
    scope: Scope = "session",
    *,
    auth: str = "basic",
    config: Mapping[str, Any] | None = None,
    extra: str | None = None,
    engine: str | Engine | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Any:
    """A fixture giving a running TempCouch (for tests that kill, restart or read logs).

    ``auth``, ``config`` and ``extra`` are bootstrap()'s; ``engine`` None follows
    ``--usercouch-engine`` / ``usercouch_engine``, then auto-detection.
    """
    spec = server_spec(scope, auth, config, extra, engine, timeout)

    def server_fixture(request: pytest.FixtureRequest) -> Iterator[TempCouch]:
        with running_server(request, spec) as server:
            yield server

    server_fixture.__doc__ = f"A running TempCouch ({scope} scope, auth={auth!r})."
    return pytest.fixture(scope=spec.scope)(server_fixture)


def couch_fixture(
    scope: Scope = "session",
    *,
    auth: str = "basic",
    config: Mapping[str, Any] | None = None,
    extra: str | None = None,
    engine: str | Engine | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Any:
    """A fixture giving the env of its own running server (arguments as couch_server_fixture)."""
    spec = server_spec(scope, auth, config, extra, engine, timeout)

    def env_fixture(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
        with running_server(request, spec) as server, env_of(server, _name(request)) as env:
            yield env

    env_fixture.__doc__ = f"The env of a running couch ({scope} scope, auth={auth!r})."
    return pytest.fixture(scope=spec.scope)(env_fixture)


# -- per-test databases -------------------------------------------------------------------

# CouchDB's rule for database names; PouchDB Server accepts more, so names follow this one.
DB_NAME_RE = re.compile(r"^[a-z][a-z0-9_$()+/-]*\Z")
_NOT_IN_NAME = re.compile(r"[^a-z0-9_]+")
_SLUG_MAX = 40


def database_name(test_name: str, token: str | None = None) -> str:
    """A database name valid for CouchDB, readable in logs and unique per call.

    The test's name, folded to ``[a-z0-9_]``, then ``-`` and 48 random bits.
    """
    slug = _NOT_IN_NAME.sub("_", test_name.lower()).strip("_")[:_SLUG_MAX].rstrip("_")
    if not slug or not "a" <= slug[0] <= "z":
        slug = f"db_{slug}".rstrip("_")
    return f"{slug}-{token or random_hex(6)}"


@dataclass(frozen=True, eq=False)
class CouchDatabase:
    """A fresh, empty database for one test: its ``name``, ``url`` (ends in '/') and ``env``.

    ``env`` is the server's env (a private copy); ``server`` the UserCouch behind it.
    """

    name: str
    url: str
    env: dict[str, Any] = field(repr=False)
    server: UserCouch | None = field(default=None, repr=False)


def _create(env: dict[str, Any], test_name: str) -> str:
    """PUT a new database; a name taken already (412) is retried with a new token."""
    for _ in range(3):
        name = database_name(test_name)
        # One shard: the cheapest to create and delete on CouchDB 3, and all a single node
        # can use (PouchDB Server ignores q).
        response = http_request(env, "PUT", f"{name}?q=1", timeout=30.0)
        if response.status in (201, 202):
            return name
        if response.status != 412:
            raise UserCouchError(
                f"could not create test database {name!r} at {env['url']}: "
                f"HTTP {response.status} {response.body[:300]!r}"
            )
    raise UserCouchError(f"could not find a free database name at {env['url']} for {test_name!r}")


def _delete(env: dict[str, Any], name: str) -> None:
    response = http_request(env, "DELETE", name, timeout=30.0)
    if response.status not in (200, 202, 404):  # 404: the test deleted it itself
        raise UserCouchError(
            f"could not delete test database {name!r} at {env['url']}: "
            f"HTTP {response.status} {response.body[:300]!r}"
        )


class _Deletion(threading.Thread):
    """Deletes one test's database while the next test's is being created."""

    def __init__(self, env: dict[str, Any], name: str) -> None:
        super().__init__(name=f"usercouch-delete-{name}", daemon=True)
        self.env = env
        self.db_name = name
        self.error: Exception | None = None
        self.server_down = False

    def run(self) -> None:
        try:
            _delete(self.env, self.db_name)
        except ConnectionError:
            # The test stopped the server: finish_deletions() retries once it is back
            # (check() restarts it on the same basedir, databases and all).
            self.server_down = True
        except Exception as exc:  # handed to finish_deletions()
            self.error = exc


# server URL -> deletions started and not yet waited for (touched by the test thread only)
_DELETIONS: dict[str, list[_Deletion]] = {}


def finish_deletions(url: str) -> None:
    """Wait for the background deletions on the server at ``url``; raise if one failed.

    A deletion the server was down for is redone now; if the server is still down (its
    last test stopped it and nothing restarted it), its files go with its basedir.
    """
    errors = []
    for job in _DELETIONS.pop(url, []):
        job.join()
        if job.server_down:
            try:
                _delete(job.env, job.db_name)
            except ConnectionError:
                pass
            except Exception as exc:
                errors.append(str(exc))
        if job.error is not None:
            errors.append(str(job.error))
    if errors:
        raise UserCouchError("; ".join(errors))


@contextlib.contextmanager
def fresh_database(
    server_or_env: UserCouch | dict[str, Any], test_name: str, owner_name: str
) -> Iterator[CouchDatabase]:
    """Create an empty database on a running server, hand it out, delete it afterwards.

    The deletion runs in the background, overlapping the next database's creation, which
    waits for it: when a test starts, the databases of the tests before it are gone.
    A UserCouch whose server died (a test crashed it) is restarted once before giving up.
    """
    if isinstance(server_or_env, UserCouch):
        server: UserCouch | None = server_or_env
        env = server_or_env.env
    else:
        env = server_or_env
        owner = _OWNERS.get(id(env))
        server = owner[1] if owner is not None else None
    if env is None:
        raise UserCouchError(f"{server!r} is not bootstrapped: it has no env")
    try:
        name = _create(env, test_name)
    except OSError:
        if server is None or not server.check():
            raise
        name = _create(env, test_name)
    try:
        finish_deletions(env["url"])
    except BaseException:
        with contextlib.suppress(Exception):  # the error worth reporting is the first one
            _delete(env, name)
        raise
    database = CouchDatabase(name, f"{env['url']}{name}/", copy.deepcopy(env), server)
    try:
        if server is not None:
            with _registered(database, owner_name, server):
                yield database
        else:
            yield database
    finally:
        job = _Deletion(env, name)
        job.start()
        _DELETIONS.setdefault(env["url"], []).append(job)


def couch_db_fixture(server: str = "couch_server", *, scope: Scope = "function") -> Any:
    """A fixture giving a fresh, empty CouchDatabase on the fixture named ``server``.

    ``server`` names a fixture giving a running UserCouch (``couch_server``, or one made by
    couch_server_fixture) or an env dict.
    """
    if not isinstance(server, str) or not server.isidentifier():
        raise ValueError(f"server must be the name of a fixture; got {server!r}")
    _check_scope(scope)

    def db_fixture(request: pytest.FixtureRequest) -> Iterator[CouchDatabase]:
        value = request.getfixturevalue(server)
        if not isinstance(value, (UserCouch, dict)):
            raise TypeError(
                f"fixture {server!r} gave {type(value).__name__}: "
                f"{request.fixturename} needs a UserCouch or an env dict"
            )
        with fresh_database(value, request.node.name, _name(request)) as database:
            yield database

    db_fixture.__doc__ = f"A fresh, empty database on {server!r}, deleted after the test."
    return pytest.fixture(scope=scope)(db_fixture)
