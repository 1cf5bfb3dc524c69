"""Unit tests for the pure option handling: no files, no processes."""

from __future__ import annotations

import base64
import hashlib
import json
import re

import pytest

from usercouch import config
from usercouch.errors import ConfigError


def test_defaults_basic_auth_makes_random_credentials() -> None:
    options = config.build_options()
    assert options.auth == "basic"
    assert options.bind_address == "127.0.0.1"
    assert options.loglevel == "info"
    assert options.file_compression == "snappy"
    assert options.credentials is not None
    for value in (options.credentials.username, options.credentials.password):
        assert re.fullmatch(r"[A-Z2-7]{24}", value)
    assert options.credentials.username != options.credentials.password


def test_credentials_come_from_urandom_120_bits() -> None:
    calls: list[int] = []

    def fake_urandom(n: int) -> bytes:
        calls.append(n)
        return bytes(range(n))

    options = config.build_options(urandom=fake_urandom)
    assert calls == [15, 15]
    assert options.credentials is not None
    assert options.credentials.username == base64.b32encode(bytes(range(15))).decode()


def test_random_values_differ_between_calls() -> None:
    a = config.build_options().credentials
    b = config.build_options().credentials
    assert a is not None and b is not None
    assert a.password != b.password


def test_password_is_hidden_from_repr() -> None:
    options = config.build_options(config={"password": "s3cret-value"})
    assert "s3cret-value" not in repr(options)


def test_open_auth_has_no_credentials() -> None:
    options = config.build_options("open")
    assert options.credentials is None
    env = config.build_env(options, 5984)
    assert env == {"port": 5984, "url": "http://127.0.0.1:5984/"}


def test_explicit_values_are_kept() -> None:
    options = config.build_options(
        "basic",
        {
            "bind_address": "::1",
            "loglevel": "debug",
            "file_compression": "deflate_6",
            "username": "admin",
            "password": "pw with spaces",
            "uuid": "0123456789abcdef0123456789abcdef",
        },
        '{"log": {"level": "error"}}',
    )
    assert options.bind_address == "::1"
    assert options.loglevel == "debug"
    assert options.file_compression == "deflate_6"
    assert options.credentials == config.Credentials("admin", "pw with spaces")
    assert options.uuid == "0123456789abcdef0123456789abcdef"
    assert options.extra == '{"log": {"level": "error"}}'


@pytest.mark.parametrize("auth", ["oauth"])
def test_oauth_is_refused_with_the_reason(auth: str) -> None:
    with pytest.raises(ConfigError, match=r"OAuth.*2\.0"):
        config.build_options(auth)


@pytest.mark.parametrize(
    ("auth", "config_", "extra", "error", "needle"),
    [
        ("digest", None, None, ConfigError, "'digest'"),
        (None, None, None, ConfigError, "None"),
        ("basic", [], None, TypeError, "list"),
        ("basic", None, b"[x]", TypeError, "bytes"),
        ("basic", {"port": 5984}, None, ConfigError, "'port'"),
        ("basic", {"bind_address": "10.0.0.1"}, None, ConfigError, "10.0.0.1"),
        ("basic", {"bind_address": "127.0.0.1\n[x]"}, None, ConfigError, "bind_address"),
        ("basic", {"loglevel": "verbose"}, None, ConfigError, "verbose"),
        ("basic", {"file_compression": "deflate_10"}, None, ConfigError, "deflate_10"),
        ("basic", {"file_compression": 1}, None, ConfigError, "file_compression"),
        ("basic", {"username": "a=b"}, None, ConfigError, "a=b"),
        ("basic", {"username": "x\n[admins]"}, None, ConfigError, "username"),
        ("basic", {"username": "a:b"}, None, ConfigError, "a:b"),
        ("basic", {"username": ""}, None, ConfigError, "username"),
        ("basic", {"password": "two\nlines"}, None, ConfigError, "password"),
        ("basic", {"password": ""}, None, ConfigError, "password"),
        ("basic", {"password": 123}, None, ConfigError, "password"),
        ("basic", {"uuid": "not-a-uuid"}, None, ConfigError, "not-a-uuid"),
        ("basic", {"uuid": "0123456789ABCDEF0123456789ABCDEF"}, None, ConfigError, "uuid"),
        ("open", {"username": "admin"}, None, ConfigError, "auth='basic'"),
    ],
)
def test_bad_input_is_refused_by_name(
    auth: object, config_: object, extra: object, error: type[Exception], needle: str
) -> None:
    with pytest.raises(error) as info:
        config.build_options(auth, config_, extra)
    assert needle in str(info.value)


def test_bad_password_is_not_echoed() -> None:
    with pytest.raises(ConfigError) as info:
        config.build_options(config={"password": "secret\x00value"})
    assert "secret" not in str(info.value)


@pytest.mark.parametrize(
    ("bind", "url"),
    [
        ("127.0.0.1", "http://127.0.0.1:1234/"),
        ("0.0.0.0", "http://127.0.0.1:1234/"),
        ("::1", "http://[::1]:1234/"),
        ("::", "http://[::1]:1234/"),
    ],
)
def test_url_is_loopback_and_bracketed(bind: str, url: str) -> None:
    options = config.build_options(config={"bind_address": bind})
    assert config.build_env(options, 1234)["url"] == url


def test_env_follows_the_contract() -> None:
    options = config.build_options(config={"username": "joe", "password": "pw"})
    env = config.build_env(options, 41234)
    assert env == {
        "port": 41234,
        "url": "http://127.0.0.1:41234/",
        "basic": {"username": "joe", "password": "pw"},
        "authorization": "Basic " + base64.b64encode(b"joe:pw").decode(),
    }
    assert json.loads(json.dumps(env)) == env


def test_credentialed_url_quotes_specials() -> None:
    env = {"url": "http://[::1]:5/", "basic": {"username": "a@b", "password": "p/w:x"}}
    assert config.credentialed_url(env) == "http://a%40b:p%2Fw%3Ax@[::1]:5/"
    assert config.credentialed_url({"url": "http://127.0.0.1:5/"}) == "http://127.0.0.1:5/"


def test_pbkdf2_sha1_matches_couchdb_format() -> None:
    hashed = config.pbkdf2_hash("password", salt="00112233", iterations=10)
    expected = hashlib.pbkdf2_hmac("sha1", b"password", b"00112233", 10, 20).hex()
    assert hashed == f"-pbkdf2-{expected},00112233,10"


def test_pbkdf2_sha256_uses_the_digest_in_the_scheme() -> None:
    hashed = config.pbkdf2_hash("pw", digest="sha256", salt="ab", iterations=3)
    expected = hashlib.pbkdf2_hmac("sha256", b"pw", b"ab", 3, 32).hex()
    assert hashed == f"-pbkdf2:sha256-{expected},ab,3"


def test_pbkdf2_random_salt_is_hex_and_fresh() -> None:
    a = config.pbkdf2_hash("pw")
    b = config.pbkdf2_hash("pw")
    salt = a.split(",")[1]
    assert re.fullmatch(r"[0-9a-f]{32}", salt)
    assert a != b
    assert "pw" not in a.split(",")[0][8:]
