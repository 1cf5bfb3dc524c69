"""Secrets and access: the password stays in memory, basedir is private, and nobody without
the credentials gets anything, from any route, origin or address.

Engine-agnostic: the same assertions hold for PouchDB Server and Apache CouchDB.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import stat
import subprocess
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest

import usercouch.http
from usercouch import UserCouch
from usercouch.http import Response, request

MakeCouch = Callable[..., UserCouch]
SECRET_VALUE = "TOP-SECRET-VALUE-7f3a"
EVIL_ORIGIN = "http://evil.example"


# -- helpers --------------------------------------------------------------------------------


def _raw(
    env: dict[str, Any],
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    body: Any = None,
) -> Response:
    """One request with exactly the headers given (no credentials unless passed)."""
    return request(env, method, path, body=body, headers=headers, authorize=False, timeout=10)


def _basic(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode("ascii")


def _group(pgid: int) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", encoding="ascii") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[2]) == pgid:
                        members.append(int(entry))
            except OSError:
                continue
    return members


def _files_under(root: str) -> Iterator[str]:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            yield os.path.join(dirpath, name)


def _needles(env: dict[str, Any]) -> list[bytes]:
    """The forms a leaked password would take: clear text, and inside the Basic header."""
    password = env["basic"]["password"]
    return [
        password.encode(),
        env["authorization"].split()[1].encode(),
        base64.b64encode(password.encode()),
    ]


def _seed(env: dict[str, Any]) -> dict[str, Any]:
    """A database with a secret doc, a design doc with a view, a _local doc and _security."""
    assert request(env, "PUT", "/vault").status == 201
    doc = request(env, "PUT", "/vault/secret", body={"secret": SECRET_VALUE}).json()
    ddoc = {"views": {"by_secret": {"map": "function (doc) { emit(doc.secret, 1); }"}}}
    assert request(env, "PUT", "/vault/_design/app", body=ddoc).status == 201
    assert request(env, "PUT", "/vault/_local/checkpoint", body={"seq": 1}).status == 201
    nobody: dict[str, list[str]] = {"names": [], "roles": []}
    security = {"admins": nobody, "members": nobody}
    assert request(env, "PUT", "/vault/_security", body=security).status == 200
    return {"rev": doc["rev"]}


# -- the password never leaves memory -------------------------------------------------------


@pytest.fixture(params=["generated", "chosen", "debug-log"])
def busy_couch(request: pytest.FixtureRequest, make_couch: MakeCouch) -> Iterator[UserCouch]:
    """A couch that has served requests, refused a wrong password, restarted and crashed."""
    http = usercouch.http.request  # ``request`` is pytest's fixture request here
    couch = make_couch()
    config = {}
    if request.param == "chosen":
        config = {"username": "owner", "password": "Correct-Horse-Battery-Staple-42"}
    if request.param == "debug-log":
        config = {"loglevel": "debug"}  # PouchDB Server's debug log printed request headers
    env = couch.bootstrap(config=config)
    _seed(env)
    password = env["basic"]["password"]
    user = env["basic"]["username"]
    # A wrong password that contains the right one: a server logging attempts would leak it.
    wrong = dict(env, authorization=_basic(user, password + "-wrong"))
    assert http(wrong, "GET", "/vault").status == 401
    resp = _raw(env, "POST", "/_session", body={"name": user, "password": password + "x"})
    assert resp.status == 401
    resp = _raw(env, "POST", "/_session", body={"name": user, "password": password})
    assert resp.status == 200
    assert http(env, "GET", "/vault/_design/app/_view/by_secret").status == 200
    couch.kill()
    couch.start()
    assert http(env, "GET", "/vault/secret").status == 200
    couch.crash()
    assert couch.check() is True
    assert http(env, "GET", "/_all_dbs").status == 200
    yield couch


def test_password_is_in_no_file_under_basedir(busy_couch: UserCouch) -> None:
    env = busy_couch.env
    assert env is not None
    needles = _needles(env)
    scanned = 0
    for path in _files_under(busy_couch.basedir):
        assert not any(n.decode() in path for n in needles), path
        if os.path.isfile(path) and not os.path.islink(path):
            with open(path, "rb") as f:
                content = f.read()
            scanned += len(content)
            for needle in needles:
                assert needle not in content, f"password found in {path}"
    logs = [busy_couch.logfile, busy_couch.logfile + ".previous"]
    assert all(os.path.getsize(log) > 0 for log in logs)  # the logs were really read
    assert scanned > 0


def test_password_is_not_in_server_argv_or_environment(busy_couch: UserCouch) -> None:
    env = busy_couch.env
    assert env is not None and busy_couch.pid is not None
    needles = _needles(env)
    members = _group(busy_couch.pid)
    assert busy_couch.pid in members
    for pid in members:
        for what in ("cmdline", "environ"):
            with open(f"/proc/{pid}/{what}", "rb") as f:
                content = f.read()
            assert content, f"/proc/{pid}/{what} is empty: not really checked"
            for needle in needles:
                assert needle not in content, f"password in /proc/{pid}/{what}"


def test_exported_env_of_the_parent_does_not_reach_the_server(
    make_couch: MakeCouch, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Handing an env to child processes through the environment is common; the server
    must not inherit those credentials."""
    password = "Exported-Secret-Pa55"
    fake = {"url": "http://127.0.0.1:1/", "basic": {"username": "owner", "password": password}}
    monkeypatch.setenv("USERCOUCH_ENV", json.dumps(fake))
    monkeypatch.setenv("COUCHDB_URL", f"http://owner:{password}@127.0.0.1:1/")
    couch = make_couch()
    couch.bootstrap(config={"username": "owner", "password": password})
    assert couch.pid is not None
    for pid in _group(couch.pid):
        with open(f"/proc/{pid}/environ", "rb") as f:
            assert password.encode() not in f.read()


def test_everything_under_basedir_is_private(busy_couch: UserCouch) -> None:
    checked = 0
    for path in _files_under(busy_couch.basedir):
        st = os.lstat(path)
        mode = stat.S_IMODE(st.st_mode)
        if stat.S_ISDIR(st.st_mode):
            assert mode == 0o700, f"{path}: {oct(mode)}"
        else:
            assert stat.S_ISREG(st.st_mode), f"{path}: not a regular file"
            assert mode == 0o600, f"{path}: {oct(mode)}"
        checked += 1
    assert checked >= 5


# -- nobody gets in without the credentials -------------------------------------------------

# (method, path, body): ``{rev}`` is filled in with the secret doc's revision.
ANONYMOUS_ROUTES: list[tuple[str, str, Any]] = [
    ("GET", "/", None),
    ("GET", "/_all_dbs", None),
    ("GET", "/_config", None),
    ("GET", "/_config/admins", None),
    ("GET", "/_node/_local/_config", None),
    ("GET", "/_node/_local/_config/admins", None),
    ("PUT", "/_node/_local/_config/admins/intruder", "intruder-password"),
    ("PUT", "/_config/admins/intruder", "intruder-password"),
    ("GET", "/_node/_local/_stats", None),
    ("POST", "/_replicate", {"source": "vault", "target": "stolen", "create_target": True}),
    ("GET", "/_session", None),
    ("DELETE", "/_session", None),
    ("GET", "/_uuids", None),
    ("GET", "/_active_tasks", None),
    ("GET", "/_utils/", None),
    ("GET", "/_up", None),
    ("GET", "/_users/_all_docs", None),
    ("PUT", "/_users/org.couchdb.user:intruder",
     {"name": "intruder", "password": "x", "roles": ["_admin"], "type": "user"}),
    ("GET", "/_replicator/_all_docs", None),
    ("GET", "/_scheduler/jobs", None),
    ("GET", "/_membership", None),
    ("GET", "/vault", None),
    ("HEAD", "/vault", None),
    ("PUT", "/anon-db", None),
    ("DELETE", "/vault", None),
    ("POST", "/vault", {"_id": "planted"}),
    ("GET", "/vault/secret", None),
    ("GET", "/vault/secret?revs_info=true", None),
    ("PUT", "/vault/planted", {"planted": True}),
    ("DELETE", "/vault/secret?rev={rev}", None),
    ("GET", "/vault/_design/app", None),
    ("PUT", "/vault/_design/evil", {"views": {"v": {"map": "function (d) { emit(1); }"}}}),
    ("GET", "/vault/_design/app/_view/by_secret", None),
    ("GET", "/vault/_all_docs", None),
    ("GET", "/vault/_all_docs?include_docs=true", None),
    ("POST", "/vault/_all_docs", {"keys": ["secret"]}),
    ("POST", "/vault/_find", {"selector": {"secret": {"$exists": True}}}),
    ("POST", "/vault/_index", {"index": {"fields": ["secret"]}}),
    ("POST", "/vault/_bulk_docs", {"docs": [{"_id": "planted-bulk"}]}),
    ("POST", "/vault/_bulk_get", {"docs": [{"id": "secret"}]}),
    ("POST", "/vault/_revs_diff", {"secret": ["1-0"]}),
    ("GET", "/vault/_changes", None),
    ("GET", "/vault/_changes?include_docs=true", None),
    ("GET", "/vault/_security", None),
    ("PUT", "/vault/_security", {"admins": {"names": ["intruder"], "roles": []}}),
    ("GET", "/vault/_local/checkpoint", None),
    ("POST", "/vault/_compact", None),
]


@pytest.fixture
def seeded(make_couch: MakeCouch) -> tuple[UserCouch, dict[str, Any], dict[str, Any]]:
    couch = make_couch()
    env = couch.bootstrap()
    return couch, env, _seed(env)


def _state(env: dict[str, Any]) -> dict[str, Any]:
    """What an intruder might try to change, as the admin sees it."""
    state: dict[str, Any] = {
        "all_dbs": request(env, "GET", "/_all_dbs").json(),
        "docs": request(env, "GET", "/vault/_all_docs").json()["rows"],
        "secret": request(env, "GET", "/vault/secret").json(),
        "security": request(env, "GET", "/vault/_security").json(),
        "users": request(env, "GET", "/_users/_all_docs").json().get("rows"),
    }
    for path in ("/_node/_local/_config/admins", "/_config/admins"):
        resp = request(env, "GET", path)
        if resp.status == 200:
            state[path] = sorted(resp.json())
    return state


def test_anonymous_requests_get_401_everywhere(
    seeded: tuple[UserCouch, dict[str, Any], dict[str, Any]],
) -> None:
    couch, env, facts = seeded
    assert len(ANONYMOUS_ROUTES) >= 20
    before = _state(env)
    refused = []
    for method, path, body in ANONYMOUS_ROUTES:
        path = path.format(**facts)
        resp = _raw(env, method, path, body=body)
        assert resp.status == 401, f"anonymous {method} {path}: {resp.status} {resp.body!r}"
        assert SECRET_VALUE.encode() not in resp.body
        refused.append((method, path))
    assert len(refused) == len(ANONYMOUS_ROUTES)
    assert _state(env) == before  # nothing was created, changed or deleted
    assert couch.isalive()


MALFORMED_BASIC = "Basic !!!not-base64!!!"


def test_wrong_credentials_get_401(
    seeded: tuple[UserCouch, dict[str, Any], dict[str, Any]], engine_name: str
) -> None:
    _, env, _ = seeded
    user, password = env["basic"]["username"], env["basic"]["password"]
    bad_headers = [
        _basic(user, password[:-1] + ("A" if password[-1] != "A" else "B")),
        _basic(user, ""),
        _basic(user.lower() + "x", password),
        _basic("", password),
        MALFORMED_BASIC,
        "Bearer " + password,
    ]
    for header in bad_headers:
        expected: tuple[int, ...] = (401,)
        if header == MALFORMED_BASIC and engine_name == "couchdb":
            # CouchDB's basic_name_pw turns only a function_clause from base64:decode into
            # 400; Erlang/OTP 25 raises badarg for this header, which CouchDB answers with
            # 500. Refused either way.
            expected = (400, 500)
        for method, path in (("GET", "/_all_dbs"), ("GET", "/vault/secret"), ("PUT", "/x-db")):
            resp = _raw(env, method, path, headers={"Authorization": header})
            assert resp.status in expected, f"{header!r} {method} {path}: {resp.status}"
            assert SECRET_VALUE.encode() not in resp.body
    resp = _raw(env, "POST", "/_session", body={"name": user, "password": password + "x"})
    assert resp.status == 401
    assert "AuthSession" not in resp.headers.get("set-cookie", "")
    assert request(env, "GET", "/x-db").status == 404
    assert request(env, "GET", "/vault/secret").status == 200  # the right one still works


@pytest.mark.pouchdb_only
@pytest.mark.parametrize("auth", ["basic", "open"])
def test_runtime_config_changes_are_refused_even_to_the_admin(
    make_couch: MakeCouch, auth: str
) -> None:
    """PouchDB Server would let an admin rewrite its config file (admins, bind address) at
    runtime; the launcher refuses it. Apache CouchDB's admin may: that is CouchDB's contract."""
    env = make_couch().bootstrap(auth=auth)
    before = request(env, "GET", "/_config").json()
    for method, path, body in (
        ("PUT", "/_config/admins/intruder", "intruder-password"),
        ("PUT", "/_config/httpd/bind_address", "0.0.0.0"),
        ("DELETE", "/_config/couch_httpd_auth/require_valid_user", None),
    ):
        resp = request(env, method, path, body=body)
        assert resp.status == 403, f"{method} {path}: {resp.status} {resp.body!r}"
    assert request(env, "GET", "/_config").json() == before


def _assert_no_cors_grant(resp: Response) -> None:
    allow = resp.headers.get("access-control-allow-origin")
    assert allow not in (EVIL_ORIGIN, "*"), resp.headers
    assert allow is None, f"unexpected CORS grant: {allow!r}"
    assert resp.headers.get("access-control-allow-credentials") is None


def test_foreign_origin_gets_no_cors_grant(
    seeded: tuple[UserCouch, dict[str, Any], dict[str, Any]],
) -> None:
    _, env, _ = seeded
    with_creds = {"Origin": EVIL_ORIGIN, "Authorization": env["authorization"]}
    for path in ("/", "/vault", "/vault/secret", "/_session"):
        resp = _raw(env, "GET", path, headers=with_creds)
        assert resp.status == 200  # the owner's request works: it just carries no grant
        _assert_no_cors_grant(resp)
        _assert_no_cors_grant(_raw(env, "GET", path, headers={"Origin": EVIL_ORIGIN}))
    preflight = {
        "Origin": EVIL_ORIGIN,
        "Access-Control-Request-Method": "PUT",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    for path in ("/", "/vault", "/vault/secret", "/_session"):
        _assert_no_cors_grant(_raw(env, "OPTIONS", path, headers=preflight))
        resp = _raw(env, "OPTIONS", path, headers={**preflight, **with_creds})
        _assert_no_cors_grant(resp)
        assert "access-control-allow-methods" not in resp.headers


def test_responses_do_not_advertise_the_web_framework(
    seeded: tuple[UserCouch, dict[str, Any], dict[str, Any]],
) -> None:
    _, env, _ = seeded
    for path in ("/", "/vault", "/vault/secret", "/_session", "/_all_dbs", "/nothing"):
        for headers in ({"Authorization": env["authorization"]}, {}):
            resp = _raw(env, "GET", path, headers=headers)
            assert "x-powered-by" not in resp.headers, (path, resp.headers)


# -- loopback only --------------------------------------------------------------------------


def _listening_addresses(port: int) -> set[str]:
    """Local addresses with a TCP socket in LISTEN state on ``port`` (from /proc/net)."""
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            with open(table, encoding="ascii") as f:
                lines = f.readlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            local, state = fields[1], fields[3]
            addr_hex, port_hex = local.split(":")
            if state != "0A" or int(port_hex, 16) != port:
                continue
            raw = bytes.fromhex(addr_hex)
            # /proc/net stores each 32-bit word in host (little-endian) order.
            words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            family = socket.AF_INET if width == 8 else socket.AF_INET6
            found.add(socket.inet_ntop(family, words))
    return found


def _own_non_loopback_ipv4() -> list[str]:
    """This machine's own non-loopback IPv4 addresses (proven ours by binding to them)."""
    candidates: set[str] = set()
    try:
        out = subprocess.run(
            ["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True, timeout=10
        ).stdout
        candidates.update(line.split()[3].split("/")[0] for line in out.splitlines())
    except (OSError, subprocess.SubprocessError, IndexError):
        pass
    with contextlib.suppress(OSError):
        for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET):
            candidates.add(str(info[4][0]))
    own = []
    for addr in sorted(candidates):
        if addr.startswith("127."):
            continue
        probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            probe.bind((addr, 0))  # succeeds only for an address of this machine
            own.append(addr)
        except OSError:
            pass
        finally:
            probe.close()
    return own


def test_default_bind_is_loopback_only(make_couch: MakeCouch) -> None:
    couch = make_couch()
    env = couch.bootstrap()
    assert urlsplit(env["url"]).hostname == "127.0.0.1"
    assert _listening_addresses(env["port"]) == {"127.0.0.1"}
    for addr in _own_non_loopback_ipv4():
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((addr, env["port"]), timeout=5).close()
    assert request(env, "GET", "/").status == 200
