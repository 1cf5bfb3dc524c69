"""Certificates for tests and private couches: a CA, server and client certificates.

Needs the optional ``cryptography`` package (``pip install usercouch[tls]``). Server
certificates carry the SANs ``127.0.0.1``, ``::1`` and ``localhost``: CouchDB 3.4+ and
Python's ``ssl`` check host names.

>>> pki = TempPKI()                                     # doctest: +SKIP
>>> env = couch.bootstrap(config={'ssl': pki.server_config()})  # doctest: +SKIP
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from typing import Any

from .errors import UserCouchError

_MISSING = (
    "usercouch.sslhelpers needs the 'cryptography' package: pip install 'usercouch[tls]'"
)


try:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    HAVE_CRYPTOGRAPHY = True
except ImportError:  # the optional extra is not installed: fail when a PKI is made
    HAVE_CRYPTOGRAPHY = False


@dataclass(frozen=True)
class CertFiles:
    """A certificate and its private key on disk (PEM)."""

    cert_file: str
    key_file: str


SERVER_NAMES = ("127.0.0.1", "::1", "localhost")
_VALIDITY = datetime.timedelta(days=365)


def _write(path: str, data: bytes, mode: int) -> None:
    # O_NOFOLLOW: a symlink planted at a key's path must not redirect the private key.
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW
    fd = os.open(path, flags, mode)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), mode)  # an existing file keeps its old mode through O_CREAT
        f.write(data)


def _check_name(name: str) -> str:
    if not name or not name.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"certificate name must be letters, digits, '-' or '_'; got {name!r}")
    return name


class PKI:
    """A small public-key infrastructure in ``ssldir``: one CA that signs everything else."""

    def __init__(self, ssldir: str) -> None:
        if not os.path.isdir(ssldir):
            raise NotADirectoryError(f"ssldir is not a directory: {ssldir!r}")
        self.ssldir = os.path.abspath(ssldir)
        if not HAVE_CRYPTOGRAPHY:
            raise UserCouchError(_MISSING)
        self.ca: CertFiles | None = None
        self.server: CertFiles | None = None
        self.client: CertFiles | None = None

    def _paths(self, name: str) -> CertFiles:
        name = _check_name(name)
        return CertFiles(
            os.path.join(self.ssldir, f"{name}.crt"), os.path.join(self.ssldir, f"{name}.key")
        )

    def _new_key(self, files: CertFiles) -> Any:
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        _write(files.key_file, pem, 0o600)
        return key

    def _save(self, files: CertFiles, cert: Any) -> CertFiles:
        _write(files.cert_file, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        return files

    def _load_ca(self) -> tuple[Any, Any]:
        if self.ca is None:
            raise UserCouchError("create_ca() first: certificates are signed by the PKI's CA")
        with open(self.ca.cert_file, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
        with open(self.ca.key_file, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), password=None)
        return cert, key

    def create_ca(self, name: str = "ca") -> CertFiles:
        """A self-signed CA certificate and key."""
        files = self._paths(name)
        key = self._new_key(files)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"usercouch {name}")])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + _VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        self.ca = self._save(files, cert)
        return self.ca

    def _issue(self, name: str, *, server: bool) -> CertFiles:
        ca_cert, ca_key = self._load_ca()
        files = self._paths(name)
        key = self._new_key(files)
        now = datetime.datetime.now(datetime.timezone.utc)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"usercouch {name}")])
            )
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + _VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
            )
        )
        if server:
            ips = [n for n in SERVER_NAMES if n[0].isdigit() or ":" in n]
            sans: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address(n)) for n in ips]
            sans += [x509.DNSName(n) for n in SERVER_NAMES if n not in ips]
            # The IP literals as DNS names too: Erlang/OTP's ssl (CouchDB 3.4+'s replicator)
            # sends an IP host as SNI and checks it as a DNS name, so an IP SAN alone fails
            # its host name check (seen with OTP 25). Python and Node.js ignore these.
            sans += [x509.DNSName(n) for n in ips]
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return self._save(files, builder.sign(ca_key, hashes.SHA256()))

    def create_server(self, name: str = "server") -> CertFiles:
        """A server certificate for 127.0.0.1, ::1 and localhost, signed by the CA."""
        self.server = self._issue(name, server=True)
        return self.server

    def create_client(self, name: str = "client") -> CertFiles:
        """A client certificate (for TLS client authentication), signed by the CA."""
        self.client = self._issue(name, server=False)
        return self.client

    def server_config(self) -> dict[str, str]:
        """The value for ``bootstrap(config={'ssl': ...})``."""
        if self.ca is None or self.server is None:
            raise UserCouchError("create_ca() and create_server() first")
        return {
            "cert_file": self.server.cert_file,
            "key_file": self.server.key_file,
            "ca_file": self.ca.cert_file,
        }

    def replicator_config(self, *, client_cert: bool = False) -> dict[str, str]:
        """The value for ``bootstrap(config={'replicator': ...})``: trust this PKI's CA."""
        if self.ca is None:
            raise UserCouchError("create_ca() first")
        conf = {"ca_file": self.ca.cert_file}
        if client_cert:
            if self.client is None:
                raise UserCouchError("create_client() first")
            conf.update(cert_file=self.client.cert_file, key_file=self.client.key_file)
        return conf

    def client_config(self) -> dict[str, Any]:
        """The ``ssl`` part of an env: what a client needs to verify the server."""
        if self.ca is None:
            raise UserCouchError("create_ca() first")
        conf: dict[str, Any] = {"ca_file": self.ca.cert_file, "check_hostname": True}
        if self.client is not None:
            conf.update(cert_file=self.client.cert_file, key_file=self.client.key_file)
        return conf


class TempPKI(PKI):
    """A PKI in a fresh temporary directory (CA + server cert made at once), removed with it."""

    def __init__(self, client_cert: bool = False) -> None:
        ssldir = tempfile.mkdtemp(prefix="usercouch-pki.")
        self._finalizer = weakref.finalize(self, shutil.rmtree, ssldir, ignore_errors=True)
        try:
            super().__init__(ssldir)
            self.create_ca()
            self.create_server()
            if client_cert:
                self.create_client()
        except BaseException:
            self._finalizer()
            raise

    def close(self) -> None:
        """Remove the directory and everything in it (idempotent)."""
        self._finalizer()

    def __enter__(self) -> TempPKI:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
