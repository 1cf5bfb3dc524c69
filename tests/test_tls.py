"""TLS: certificates from sslhelpers, the HTTPS listener, and the replicator's trust."""

from __future__ import annotations

import ipaddress
import os
import ssl
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from usercouch import UserCouch, credentialed_url, sslhelpers
from usercouch.errors import ConfigError, UserCouchError
from usercouch.http import request

MakeCouch = Callable[..., UserCouch]
x509 = pytest.importorskip("cryptography.x509")


@pytest.fixture
def pki() -> Iterator[sslhelpers.TempPKI]:
    with sslhelpers.TempPKI(client_cert=True) as made:
        yield made


# -- sslhelpers -----------------------------------------------------------------------------


def test_pki_files_and_modes(pki: sslhelpers.TempPKI) -> None:
    assert pki.ca is not None and pki.server is not None and pki.client is not None
    for files in (pki.ca, pki.server, pki.client):
        assert stat.S_IMODE(os.stat(files.key_file).st_mode) == 0o600
        assert os.path.isfile(files.cert_file)


def test_server_certificate_names_and_chain(pki: sslhelpers.TempPKI) -> None:
    assert pki.server is not None and pki.ca is not None
    with open(pki.server.cert_file, "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    }
    # The IP literals as DNS names too, for Erlang/OTP's host name check (CouchDB 3.4+).
    assert sans.get_values_for_type(x509.DNSName) == ["localhost", "127.0.0.1", "::1"]
    context = ssl.create_default_context(cafile=pki.ca.cert_file)
    context.load_cert_chain(pki.server.cert_file, pki.server.key_file)


def test_temp_pki_removes_its_directory() -> None:
    made = sslhelpers.TempPKI()
    ssldir = made.ssldir
    assert os.path.isdir(ssldir)
    made.close()
    assert not os.path.exists(ssldir)


def test_missing_cryptography_gives_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sslhelpers, "HAVE_CRYPTOGRAPHY", False)
    with pytest.raises(UserCouchError, match=r"usercouch\[tls\]"):
        sslhelpers.PKI(str(tmp_path))


def test_bad_certificate_name_is_refused(tmp_path: Path) -> None:
    pki = sslhelpers.PKI(str(tmp_path))
    with pytest.raises(ValueError, match=r"'\.\./evil'"):
        pki.create_ca("../evil")


# -- config validation ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "needle"),
    [
        ({"cert_file": "/nonexistent/server.crt", "key_file": "KEY"}, "/nonexistent/server.crt"),
        ({"key_file": "KEY"}, "'cert_file'"),
        ({"cert_file": "CERT", "key_file": "KEY", "port": 1}, "'port'"),
        ({"cert_file": "CERT", "key_file": "KEY", "check_hostname": "yes"}, "'yes'"),
        ("CERT", "must be a dict"),
    ],
)
def test_bad_ssl_config_is_named_before_anything_starts(
    make_couch: MakeCouch, pki: sslhelpers.TempPKI, section: object, needle: str
) -> None:
    assert pki.server is not None
    if isinstance(section, dict):
        section = {
            k: {"CERT": pki.server.cert_file, "KEY": pki.server.key_file}.get(v, v)
            if isinstance(v, str) else v
            for k, v in section.items()
        }
    couch = make_couch()
    with pytest.raises(ConfigError) as info:
        couch.bootstrap(config={"ssl": section})
    assert needle in str(info.value)
    assert os.listdir(couch.basedir) == ["lockfile"]


def test_unreadable_replicator_ca_is_named(make_couch: MakeCouch, tmp_path: Path) -> None:
    directory = tmp_path / "ca.crt"
    directory.mkdir()  # exists, but is not a readable file
    couch = make_couch()
    with pytest.raises(ConfigError, match=r"ca\.crt"):
        couch.bootstrap(config={"replicator": {"ca_file": str(directory)}})


# -- HTTPS ----------------------------------------------------------------------------------


def test_https_round_trip_from_the_env_alone(
    make_couch: MakeCouch, pki: sslhelpers.TempPKI
) -> None:
    env = make_couch().bootstrap(config={"ssl": pki.server_config()})
    ssl_env = env["x_env_ssl"]
    assert ssl_env["url"] == f"https://127.0.0.1:{ssl_env['port']}/"
    assert ssl_env["port"] != env["port"]
    assert ssl_env["basic"] == env["basic"]
    assert ssl_env["ssl"] == {"ca_file": pki.server_config()["ca_file"], "check_hostname": True}
    # http.request builds a verifying context (CERT_REQUIRED + host name) from env['ssl'].
    assert request(ssl_env, "PUT", "/secure").status == 201
    assert request(ssl_env, "PUT", "/secure/doc", body={"x": 1}).status == 201
    assert request(env, "GET", "/secure/doc").json()["x"] == 1  # plain HTTP still on
    assert request(ssl_env, "GET", "/", authorize=False).status == 401


def test_https_with_a_wrong_ca_is_refused(make_couch: MakeCouch, pki: sslhelpers.TempPKI) -> None:
    env = make_couch().bootstrap(config={"ssl": pki.server_config()})
    with sslhelpers.TempPKI() as stranger:
        assert stranger.ca is not None
        wrong = dict(env["x_env_ssl"], ssl={"ca_file": stranger.ca.cert_file})
        with pytest.raises(ssl.SSLCertVerificationError):
            request(wrong, "GET", "/")


def test_https_port_is_kept_across_restart(make_couch: MakeCouch, pki: sslhelpers.TempPKI) -> None:
    couch = make_couch()
    env = couch.bootstrap(config={"ssl": pki.server_config()})
    couch.kill()
    couch.start()
    assert request(env["x_env_ssl"], "GET", "/").status == 200


def _replicate(target_env: dict[str, Any], source_url: str) -> int:
    # The target as a URL too: CouchDB 3.x refuses local endpoints ("Local endpoints not
    # supported since CouchDB 3.x"); PouchDB Server takes either.
    body = {"source": source_url, "target": credentialed_url(target_env) + "copy"}
    return request(target_env, "POST", "/_replicate", body=body, timeout=60).status


def test_replication_over_https_trusts_only_the_given_ca(
    make_couch: MakeCouch, pki: sslhelpers.TempPKI
) -> None:
    source = make_couch().bootstrap(config={"ssl": pki.server_config()})["x_env_ssl"]
    assert request(source, "PUT", "/orig").status == 201
    assert request(source, "PUT", "/orig/doc", body={"v": 42}).status == 201
    source_url = credentialed_url(source) + "orig"

    trusting = make_couch().bootstrap(config={"replicator": pki.replicator_config()})
    assert request(trusting, "PUT", "/copy").status == 201
    assert _replicate(trusting, source_url) == 200
    assert request(trusting, "GET", "/copy/doc").json()["v"] == 42

    with sslhelpers.TempPKI() as stranger:
        doubting = make_couch().bootstrap(config={"replicator": stranger.replicator_config()})
        assert request(doubting, "PUT", "/copy").status == 201
        assert _replicate(doubting, source_url) >= 400
        assert request(doubting, "GET", "/copy/doc").status == 404
        assert request(doubting, "GET", "/").status == 200  # a failed replication is no crash


def test_replicator_trust_ignores_the_callers_tls_environment(
    make_couch: MakeCouch, pki: sslhelpers.TempPKI, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A developer's NODE_TLS_REJECT_UNAUTHORIZED=0 (or extra CAs) meant for their own tools
    # must not widen what the replicator trusts: config['replicator'] is the whole answer.
    source = make_couch().bootstrap(config={"ssl": pki.server_config()})["x_env_ssl"]
    assert request(source, "PUT", "/orig").status == 201
    assert request(source, "PUT", "/orig/doc", body={"v": 42}).status == 201
    with sslhelpers.TempPKI() as stranger:
        monkeypatch.setenv("NODE_TLS_REJECT_UNAUTHORIZED", "0")
        monkeypatch.setenv("NODE_EXTRA_CA_CERTS", pki.ca.cert_file)
        doubting = make_couch().bootstrap(config={"replicator": stranger.replicator_config()})
        assert request(doubting, "PUT", "/copy").status == 201
        assert _replicate(doubting, credentialed_url(source) + "orig") >= 400
        assert request(doubting, "GET", "/copy/doc").status == 404


@pytest.mark.pouchdb_only
def test_pouchdb_refuses_replicator_max_depth(
    make_couch: MakeCouch, pki: sslhelpers.TempPKI
) -> None:
    couch = make_couch()
    with pytest.raises(ConfigError, match="not supported by the PouchDB Server engine"):
        couch.bootstrap(config={"replicator": dict(pki.replicator_config(), max_depth=2)})
    assert os.listdir(couch.basedir) == ["lockfile"]


def test_keys_are_not_written_through_a_planted_symlink(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("")
    (tmp_path / "ca.key").symlink_to(target)
    with pytest.raises(OSError):
        sslhelpers.PKI(str(tmp_path)).create_ca()
    assert target.read_text() == ""


def test_client_config_verifies_the_server_and_presents_the_client_cert(
    make_couch: MakeCouch, pki: sslhelpers.TempPKI
) -> None:
    env = make_couch().bootstrap(config={"ssl": pki.server_config()})
    client = pki.client_config()
    assert pki.client is not None and pki.ca is not None
    assert client == {
        "ca_file": pki.ca.cert_file,
        "check_hostname": True,
        "cert_file": pki.client.cert_file,
        "key_file": pki.client.key_file,
    }
    # An env whose ssl part is the client config works as is (the cert is offered, unused).
    assert request(dict(env["x_env_ssl"], ssl=client), "GET", "/").status == 200
