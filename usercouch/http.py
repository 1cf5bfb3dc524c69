"""A minimal HTTP client for usercouch's own requests (readiness and liveness probes, the
fixtures' test databases, the demo).

The standard library only: usercouch must not need a CouchDB client to run one.
"""

from __future__ import annotations

import http.client
import json
import ssl
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit


class Response:
    """Status, headers (lower-case names) and raw body of one response; ``json()`` decodes it."""

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)


def request(
    env: dict[str, Any],
    method: str = "GET",
    path: str = "",
    *,
    body: Any = None,
    timeout: float = 5.0,
    authorize: bool = True,
    headers: Mapping[str, str] | None = None,
) -> Response:
    """Send one request to ``env['url'] + path``, with the env's credentials unless told not.

    ``headers`` are added last (they win over the defaults, ``Authorization`` included).
    """
    url = urlsplit(env["url"])
    host = url.hostname or "127.0.0.1"
    conn: http.client.HTTPConnection
    if url.scheme == "https":
        ssl_env = env.get("ssl") or {}
        context = ssl.create_default_context(cafile=ssl_env.get("ca_file"))
        context.check_hostname = bool(ssl_env.get("check_hostname", True))
        if ssl_env.get("cert_file"):
            context.load_cert_chain(ssl_env["cert_file"], ssl_env.get("key_file"))
        conn = http.client.HTTPSConnection(host, url.port, timeout=timeout, context=context)
    else:
        conn = http.client.HTTPConnection(host, url.port, timeout=timeout)
    sent = {"Accept": "application/json", "Host": url.netloc}
    if authorize and env.get("authorization"):
        sent["Authorization"] = env["authorization"]
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        sent["Content-Type"] = "application/json"
    sent.update(headers or {})
    try:
        conn.request(method, url.path + path.lstrip("/"), body=data, headers=sent)
        resp = conn.getresponse()
        return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()
