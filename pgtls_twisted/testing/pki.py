"""
A throwaway PKI for tests, the demo and the benchmarks, made with
C{cryptography} in well under a second.

The layout mirrors the certificate cases of PostgreSQL's own SSL test suite
(C{src/test/ssl}) that matter to a TLS-terminating proxy: a trusted root and
an untrusted one, a separate client CA with a CRL, and server leaves that
are expired, for the wrong host, wildcard, IP-only or CN-only, so that each
verification rule can be tested against a real handshake.

Every certificate C{NAME} is written as C{NAME.crt} next to its key
C{NAME.key} (unencrypted PKCS#8 PEM, mode 0600, because libpq and PostgreSQL
refuse keys that others can read). Keys are ECDSA P-256, which is fast to
generate, except C{server_rsa}, which keeps RSA covered.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "PKI",
    "CA_NAMES",
    "SERVER_NAMES",
    "CLIENT_NAMES",
    "make_pki",
    "write_leaf",
]

#: The certificate authorities C{make_pki} creates, by name.
CA_NAMES = ("ca", "other_ca", "client_ca")
#: Server leaves: name -> what is special about it.
SERVER_NAMES = (
    "server",
    "server_rsa",
    "server_other_ca",
    "server_expired",
    "server_wrong_host",
    "server_wildcard",
    "server_ip_only",
    "server_cn_only",
)
#: Client leaves (all with extendedKeyUsage clientAuth).
CLIENT_NAMES = ("client", "client_other_ca", "client_revoked", "client_wrong_user", "proxy_client")

#: The SANs a "good" server certificate carries: what a test connecting to
#: C{localhost}, C{127.0.0.1} or C{::1} verifies against.
LOCALHOST_SANS = ("DNS:localhost", "IP:127.0.0.1", "IP:::1")

_CA_LIFETIME = datetime.timedelta(days=3650)
#: TLS scanners flag leaves valid for more than 398 days; stay well under.
_LEAF_LIFETIME = datetime.timedelta(days=365)
#: Not-before in the past, so a clock a little behind does not reject a
#: certificate made a moment ago.
_BACKDATE = datetime.timedelta(hours=1)

Usage = Literal["server", "client"]
KeyType = Literal["ec", "rsa"]


@dataclass(frozen=True)
class PKI:
    """
    Where C{make_pki} wrote everything: just the directory, with accessors.

    Paths are derived from the directory rather than stored one by one, so a
    certificate added later with L{write_leaf} is reached the same way as the
    built-in ones.

    @ivar directory: the directory holding every C{.crt}, C{.key} and C{.crl}.
    """

    directory: Path

    def cert(self, name: str) -> Path:
        """
        The PEM certificate file called C{name} (a leaf, a CA, or a bundle
        such as C{server_chain} or C{ca_bundle_both}).

        @raise FileNotFoundError: no such certificate was written, so that a
            typo fails here, loudly, and not as a puzzling TLS error later.
        """
        return self._existing(self.directory / f"{name}.crt", "certificate", name)

    def key(self, name: str) -> Path:
        """
        The private key file of certificate C{name}.

        @raise FileNotFoundError: no such key was written.
        """
        return self._existing(self.directory / f"{name}.key", "key", name)

    @property
    def names(self) -> list[str]:
        """
        Every certificate file's name, sorted: for error messages and for
        tests that iterate over the whole PKI.
        """
        return sorted(p.stem for p in self.directory.glob("*.crt"))

    def _existing(self, path: Path, what: str, name: str) -> Path:
        if not path.is_file():
            raise FileNotFoundError(
                f"no {what} {name!r} in {self.directory}; known certificates: "
                + ", ".join(self.names)
            )
        return path

    # The paths tests use most, as attributes.

    @property
    def ca_cert(self) -> Path:
        """The trusted root: C{sslrootcert} for clients, and the backend's C{ssl_ca_file}."""
        return self.cert("ca")

    @property
    def ca_key(self) -> Path:
        """The root's key, for tests that sign something unusual themselves."""
        return self.key("ca")

    @property
    def other_ca_cert(self) -> Path:
        """A second, unrelated root: trusting only this must make verification fail."""
        return self.cert("other_ca")

    @property
    def client_ca_cert(self) -> Path:
        """The root of client certificates, kept apart from C{ca} as in PostgreSQL's suite."""
        return self.cert("client_ca")

    @property
    def ca_bundle_both(self) -> Path:
        """C{ca} followed by C{other_ca}: a multi-root trust file."""
        return self.cert("ca_bundle_both")

    @property
    def server_cert(self) -> Path:
        """The good server leaf (localhost, 127.0.0.1, ::1), signed by C{ca}."""
        return self.cert("server")

    @property
    def server_key(self) -> Path:
        """The good server leaf's key."""
        return self.key("server")

    @property
    def server_chain(self) -> Path:
        """The server leaf followed by C{ca}: for servers that send their chain."""
        return self.cert("server_chain")

    @property
    def client_cert(self) -> Path:
        """C{cert_user}'s certificate, signed by C{client_ca}."""
        return self.cert("client")

    @property
    def client_key(self) -> Path:
        """C{cert_user}'s key."""
        return self.key("client")

    @property
    def client_crl(self) -> Path:
        """C{client_ca}'s CRL (PEM), revoking C{client_revoked}."""
        path = self.directory / "client_crl.crl"
        return self._existing(path, "CRL", "client_crl")

    @property
    def proxy_client_cert(self) -> Path:
        """The proxy's own client certificate (CN C{pgtls_proxy}, signed by C{ca})."""
        return self.cert("proxy_client")

    @property
    def proxy_client_key(self) -> Path:
        """The key of the proxy's own client certificate."""
        return self.key("proxy_client")


# ---------------------------------------------------------------------------
# Internals


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _new_key(key_type: KeyType) -> CertificateIssuerPrivateKeyTypes:
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


def _write_private(path: Path, data: bytes) -> None:
    """
    Write C{data} to C{path} with mode 0600 from the start, never briefly
    world-readable (libpq refuses group/world-readable client keys).
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)  # O_CREAT's mode does not apply to an existing file


def _write_key(path: Path, key: CertificateIssuerPrivateKeyTypes) -> None:
    _write_private(
        path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _parse_san(entry: str) -> x509.GeneralName:
    """
    C{"DNS:name"}, C{"IP:addr"}, or a bare value (an IP address if it parses
    as one, else a DNS name), as in OpenSSL's subjectAltName syntax.
    """
    kind, sep, value = entry.partition(":")
    if sep and kind.upper() == "DNS":
        return x509.DNSName(value)
    if sep and kind.upper() == "IP":
        return x509.IPAddress(ipaddress.ip_address(value))
    try:
        return x509.IPAddress(ipaddress.ip_address(entry))
    except ValueError:
        return x509.DNSName(entry)


def _signature_hash(key: CertificateIssuerPrivateKeyTypes) -> hashes.SHA256 | None:
    # Ed25519/Ed448 keys sign without a separate hash; everything else SHA-256.
    if isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        return hashes.SHA256()
    return None


@dataclass(frozen=True)
class _Authority:
    cert: x509.Certificate
    key: CertificateIssuerPrivateKeyTypes


def _make_ca(directory: Path, name: str, common_name: str, now: datetime.datetime) -> _Authority:
    key = _new_key("ec")
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + _CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, _signature_hash(key))
    )
    (directory / f"{name}.crt").write_bytes(_pem(cert))
    _write_key(directory / f"{name}.key", key)
    return _Authority(cert, key)


def _make_leaf(
    directory: Path,
    name: str,
    issuer: _Authority,
    *,
    sans: Sequence[str],
    common_name: str,
    not_before: datetime.datetime,
    not_after: datetime.datetime,
    usage: Usage,
    key_type: KeyType,
) -> tuple[Path, Path, x509.Certificate]:
    key = _new_key(key_type)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(issuer.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                # RSA key exchange (TLS 1.2 static RSA) needs keyEncipherment.
                key_encipherment=key_type == "rsa",
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [
                    ExtendedKeyUsageOID.SERVER_AUTH
                    if usage == "server"
                    else ExtendedKeyUsageOID.CLIENT_AUTH
                ]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
            critical=False,
        )
    )
    if sans:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_parse_san(s) for s in sans]), critical=False
        )
    cert = builder.sign(issuer.key, _signature_hash(issuer.key))
    cert_path = directory / f"{name}.crt"
    key_path = directory / f"{name}.key"
    cert_path.write_bytes(_pem(cert))
    _write_key(key_path, key)
    return cert_path, key_path, cert


def _load_authority(pki: PKI, name: str) -> _Authority:
    cert = x509.load_pem_x509_certificate(pki.cert(name).read_bytes())
    key = serialization.load_pem_private_key(pki.key(name).read_bytes(), password=None)
    return _Authority(cert, cast(CertificateIssuerPrivateKeyTypes, key))


# ---------------------------------------------------------------------------
# Public API


def write_leaf(
    pki: PKI,
    name: str,
    sans: Sequence[str],
    *,
    issuer: str = "ca",
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
    common_name: str | None = None,
    usage: Usage = "server",
    key_type: KeyType = "ec",
) -> tuple[Path, Path]:
    """
    Mint one more leaf certificate into C{pki}, e.g. a replacement for a
    certificate-rotation test, and return C{(cert_path, key_path)}.

    An existing C{name} is overwritten in place, which is what a rotation
    test wants: the paths a running proxy was configured with now hold new
    material.

    @param sans: subjectAltName entries, C{"DNS:host"}, C{"IP:addr"} or bare
        values; empty for no subjectAltName extension at all.
    @param issuer: the name of the signing CA in C{pki} (C{"ca"},
        C{"other_ca"}, C{"client_ca"}).
    @param not_before: defaults to an hour ago.
    @param not_after: defaults to 365 days from now (scanners flag longer).
    @param common_name: defaults to the first SAN's value, else C{name}.
    @param usage: C{"server"} or C{"client"}: which extendedKeyUsage to set.
    @param key_type: C{"ec"} (P-256) or C{"rsa"} (2048 bits).
    """
    now = _now()
    if common_name is None:
        common_name = str(_parse_san(sans[0]).value) if sans else name
    cert_path, key_path, _ = _make_leaf(
        pki.directory,
        name,
        _load_authority(pki, issuer),
        sans=sans,
        common_name=common_name,
        not_before=now - _BACKDATE if not_before is None else not_before,
        not_after=now + _LEAF_LIFETIME if not_after is None else not_after,
        usage=usage,
        key_type=key_type,
    )
    return cert_path, key_path


def make_pki(directory: Path) -> PKI:
    """
    Create the whole test PKI in C{directory} (created if missing) and
    return its L{PKI}.

    Contents, each leaf C{NAME.crt} with C{NAME.key}:
     - roots C{ca} ("pgtls test root CA"), C{other_ca} and C{client_ca};
     - C{server}: CN localhost, SAN localhost/127.0.0.1/::1, by C{ca}, plus
       C{server_chain} (leaf + C{ca});
     - C{server_rsa}: the same, RSA 2048;
     - C{server_other_ca}: the same names, by C{other_ca};
     - C{server_expired}: by C{ca}, valid from -30 to -1 days;
     - C{server_wrong_host}: SAN db.example.com, db2.example.com only;
     - C{server_wildcard}: SAN *.pgtls.test;
     - C{server_ip_only}: SAN IP 127.0.0.1 only (CN not a host name);
     - C{server_cn_only}: CN localhost, no subjectAltName;
     - C{client} (CN cert_user, by C{client_ca}), C{client_other_ca},
       C{client_revoked} (listed in C{client_crl.crl}), C{client_wrong_user}
       (CN someone_else);
     - C{proxy_client}: CN pgtls_proxy, by C{ca}, for a backend using C{cert}
       auth;
     - C{ca_bundle_both}: C{ca} + C{other_ca}.
    """
    directory.mkdir(parents=True, exist_ok=True)
    now = _now()
    ca = _make_ca(directory, "ca", "pgtls test root CA", now)
    other_ca = _make_ca(directory, "other_ca", "pgtls test other root CA", now)
    client_ca = _make_ca(directory, "client_ca", "pgtls test client CA", now)
    valid_from, valid_to = now - _BACKDATE, now + _LEAF_LIFETIME

    def server(
        name: str,
        issuer: _Authority = ca,
        sans: Sequence[str] = LOCALHOST_SANS,
        common_name: str = "localhost",
        key_type: KeyType = "ec",
        not_before: datetime.datetime = valid_from,
        not_after: datetime.datetime = valid_to,
    ) -> x509.Certificate:
        return _make_leaf(
            directory,
            name,
            issuer,
            sans=sans,
            common_name=common_name,
            usage="server",
            key_type=key_type,
            not_before=not_before,
            not_after=not_after,
        )[2]

    def client(name: str, issuer: _Authority, common_name: str) -> x509.Certificate:
        return _make_leaf(
            directory,
            name,
            issuer,
            sans=(),
            common_name=common_name,
            usage="client",
            key_type="ec",
            not_before=valid_from,
            not_after=valid_to,
        )[2]

    server_cert = server("server")
    server("server_rsa", key_type="rsa")
    server("server_other_ca", issuer=other_ca)
    server(
        "server_expired",
        not_before=now - datetime.timedelta(days=30),
        not_after=now - datetime.timedelta(days=1),
    )
    server(
        "server_wrong_host",
        sans=("DNS:db.example.com", "DNS:db2.example.com"),
        common_name="db.example.com",
    )
    server("server_wildcard", sans=("DNS:*.pgtls.test",), common_name="*.pgtls.test")
    # The CN must not be a name the tests connect to, or libpq's CN fallback
    # would hide whether the IP SAN is what matched.
    server("server_ip_only", sans=("IP:127.0.0.1",), common_name="pgtls test server (IP SAN)")
    server("server_cn_only", sans=())

    client("client", client_ca, "cert_user")
    client("client_other_ca", other_ca, "cert_user")
    revoked = client("client_revoked", client_ca, "cert_user")
    client("client_wrong_user", client_ca, "someone_else")
    client("proxy_client", ca, "pgtls_proxy")

    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(client_ca.cert.subject)
        .last_update(now - _BACKDATE)
        .next_update(now + _LEAF_LIFETIME)
        .add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(revoked.serial_number)
            .revocation_date(now - _BACKDATE)
            .build()
        )
        .add_extension(x509.CRLNumber(1), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(client_ca.key.public_key()),
            critical=False,
        )
        .sign(client_ca.key, _signature_hash(client_ca.key))
    )
    (directory / "client_crl.crl").write_bytes(crl.public_bytes(serialization.Encoding.PEM))

    (directory / "server_chain.crt").write_bytes(_pem(server_cert) + _pem(ca.cert))
    (directory / "ca_bundle_both.crt").write_bytes(_pem(ca.cert) + _pem(other_ca.cert))
    return PKI(directory)
