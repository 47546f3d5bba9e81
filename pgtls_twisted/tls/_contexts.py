# -*- test-case-name: tests.test_tls_policy,tests.test_security_misc -*-
"""
TLS policy: the pyOpenSSL contexts for both legs, and what a verification
failure means in words a person can act on.

One L{OpenSSL.SSL.Context} is built per route and leg, never per
connection: building one parses certificates and cipher lists, and
pyOpenSSL forbids changing a context once a connection has used it, so a
reload builds a new one and swaps the reference (see L{ServerTLS.reload}).

We build contexts ourselves rather than through
L{twisted.internet.ssl.CertificateOptions}/C{optionsForClientTLS} because
the policy we need is PostgreSQL's, not a web browser's: C{verify-ca}
(chain without hostname), C{require} (no verification at all), ALPN that
is fatal only on the direct-TLS path, and error messages that say which
check failed.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from service_identity import CertificateError, VerificationError
from service_identity.pyopenssl import verify_hostname, verify_ip_address
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
)
from twisted.logger import Logger
from zope.interface import implementer

from pgtls_twisted.config import secret_file_problem
from pgtls_twisted.tls._private import setGroups

if TYPE_CHECKING:
    from pgtls_twisted.config import BackendConfig, ListenerConfig

ALPN_POSTGRESQL = b"postgresql"

_VERSIONS = {"1.2": SSL.TLS1_2_VERSION, "1.3": SSL.TLS1_3_VERSION}

# The PostgreSQL server's hardening (be_tls_init): no compression, no
# renegotiation, no session resumption, server cipher preference.
_HARDENING = (
    SSL.OP_NO_COMPRESSION
    | SSL.OP_NO_RENEGOTIATION
    | SSL.OP_NO_TICKET
    | SSL.OP_CIPHER_SERVER_PREFERENCE
    | SSL.OP_SINGLE_ECDH_USE
    | SSL.OP_SINGLE_DH_USE
)

# X.509 verification results worth a sentence of their own (OpenSSL's
# X509_V_ERR_* numbers); anything else is reported by number.
_X509_ERRORS = {
    2: "unable to get issuer certificate (unknown CA)",
    9: "certificate is not yet valid",
    10: "certificate has expired",
    18: "self-signed certificate (unknown CA)",
    19: "self-signed certificate in certificate chain (unknown CA)",
    20: "unable to get local issuer certificate (unknown CA)",
    21: "unable to verify the first certificate (unknown CA)",
    23: "certificate has been revoked",
    26: "unsupported certificate purpose",
}


def describe_x509_error(errno: int) -> str:
    return _X509_ERRORS.get(errno, f"certificate verify failed (X509 error {errno})")


class TLSConfigError(Exception):
    """A certificate, key or CA file could not be used."""


def _load_error(what: str, path: Path | None, exc: Exception) -> TLSConfigError:
    return TLSConfigError(f"{what} {path}: {exc}")


def _tls_version(text: str) -> int:
    return _VERSIONS[text]


#: Key exchange groups: Mozilla's "intermediate" set. OpenSSL's defaults
#: also offer X448 and P-521, which that profile rejects.
_GROUPS = b"X25519:P-256:P-384"


def _set_groups(ctx: SSL.Context) -> None:
    """
    Restrict the key exchange groups. pyOpenSSL has no public setter for a
    group list (only C{set_tmp_ecdh}, one curve, which would drop X25519),
    so this goes through L{pgtls_twisted.tls._private.setGroups}, and falls
    back to P-256 alone where that is not available.
    """
    if not setGroups(ctx, _GROUPS):
        ctx.set_tmp_ecdh(ec.SECP256R1())


def _hardened_context(method: int, min_version: str) -> SSL.Context:
    ctx = SSL.Context(method)
    ctx.set_min_proto_version(_tls_version(min_version))
    ctx.set_options(_HARDENING)
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
    _set_groups(ctx)
    return ctx


def _use_certificate(ctx: SSL.Context, cert: Path, key: Path, what: str) -> None:
    try:
        ctx.use_certificate_chain_file(str(cert))
    except SSL.Error as e:
        raise _load_error(f"{what} certificate", cert, e) from None
    # The configuration checked the key's mode at load; this is for the
    # certificate refresh, which must not start using a key that has
    # since become readable by others (the last good context is kept).
    problem = secret_file_problem(key)
    if problem is not None:
        raise TLSConfigError(f"{what} key: {problem}")
    try:
        ctx.use_privatekey_file(str(key))
    except SSL.Error as e:
        raise _load_error(f"{what} key", key, e) from None
    try:
        ctx.check_privatekey()
    except SSL.Error:
        raise TLSConfigError(f"{what} key {key} does not match certificate {cert}") from None


# ---------------------------------------------------------------------------
# Client-facing leg (pgtls is the TLS server)


def _select_alpn(conn: SSL.Connection, offered: list[bytes]) -> bytes:
    """
    PostgreSQL's ALPN rule: choose C{postgresql} when offered; a client that
    offers other protocols but not ours gets the fatal no_application_protocol
    alert (raising from the callback makes pyOpenSSL return
    SSL_TLSEXT_ERR_ALERT_FATAL). A client that offers nothing never reaches
    this callback; the direct-TLS path checks for that after the handshake.
    """
    if ALPN_POSTGRESQL in offered:
        return ALPN_POSTGRESQL
    # pyOpenSSL re-raises this from do_handshake; Twisted's TLS layer
    # expects the shape of OpenSSL's error queue in it.
    raise SSL.Error([("SSL routines", "", "client offered ALPN protocols without postgresql")])


class LegConnection(SSL.Connection):
    """
    An L{SSL.Connection} that knows the leg (client or backend protocol) it
    belongs to, so the verify callbacks can report to it.

    Why not C{set_app_data}: the app data is Twisted's. Its connection
    factory sets it to the TLS protocol I{after} our creator returns (see
    C{_convertToAppropriateFactory} in C{twisted.protocols._tls_legacy}),
    so anything a creator stored there would be overwritten, and finding
    the leg from what Twisted leaves there means walking its protocol
    wrappers. An attribute of our own connection object survives that, and
    pyOpenSSL hands the callbacks that very object.

    @ivar leg: the leg, or C{None} for a connection made outside a
        L{pgtls_twisted.tls._lean.TLSLayer} (the verify callbacks then refuse
        any certificate that fails, see L{_record_client_verify}).
    """

    leg: Any = None


def _new_connection(context: SSL.Context, tlsProtocol: object) -> LegConnection:
    """
    A connection for C{tlsProtocol}, carrying the leg that
    L{pgtls_twisted.tls._lean.TLSLayer.attach} gave it.
    """
    conn = LegConnection(context, None)
    conn.leg = getattr(tlsProtocol, "leg", None)
    return conn


def _leg_of(conn: SSL.Connection) -> Any:
    """The leg a TLS connection belongs to (see L{LegConnection})."""
    return getattr(conn, "leg", None)


def _record_client_verify(
    conn: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int
) -> bool:
    """
    Remember why a client certificate failed, but let the handshake finish:
    like PostgreSQL, pgtls decides after the handshake, when it can tell the
    client why in a FATAL ErrorResponse instead of a bare TLS alert.
    L{pgtls_twisted.proxy._frontend} refuses the session before anything else
    happens when C{verifyError} is set.

    Nothing but this callback stands between a certificate from another CA
    and a session, so it fails closed: a failure with no leg to remember it
    aborts the handshake instead of being forgotten.
    """
    if not ok:
        leg = _leg_of(conn)
        if leg is None:
            return False
        if leg.verifyError is None:
            leg.verifyError = describe_x509_error(errno)
    return True


def build_server_context(listener: ListenerConfig) -> SSL.Context:
    """
    The listener's context: the route's certificate chain and key, TLS 1.2 or
    later, forward-secret AEAD ciphers, ALPN C{postgresql}, and with C{mtls}
    a client certificate that must chain to C{client_ca} (and not be revoked
    by C{client_crl}).
    """
    ctx = _hardened_context(SSL.TLS_SERVER_METHOD, listener.min_tls_version)
    try:
        ctx.set_cipher_list(listener.ciphers.encode())
    except SSL.Error as e:
        raise TLSConfigError(f"listener ciphers {listener.ciphers!r}: {e}") from None
    _use_certificate(ctx, listener.server_cert, listener.server_key, "listener server")
    ctx.set_alpn_select_callback(_select_alpn)
    if listener.client_ca is not None:
        try:
            ctx.load_verify_locations(str(listener.client_ca))
            ctx.load_client_ca(str(listener.client_ca).encode())
        except SSL.Error as e:
            raise _load_error("client CA", listener.client_ca, e) from None
        if listener.client_crl is not None:
            try:
                crl = x509.load_pem_x509_crl(listener.client_crl.read_bytes())
            except (OSError, ValueError) as e:
                raise _load_error("client CRL", listener.client_crl, e) from None
            store = ctx.get_cert_store()
            store.add_crl(crl)
            store.set_flags(crypto.X509StoreFlags.CRL_CHECK)
        ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_CLIENT_ONCE, _record_client_verify)
    return ctx


class _ReloadableContext:
    """
    A context built from files, rebuilt when they change. Connections made
    after a reload use the new context; live sessions keep the one they
    started with. A file that fails to load keeps the last good context
    and logs why: a half-written certificate must not take a route down.
    """

    _log = Logger()
    what = "TLS"

    def __init__(self) -> None:
        self.context = self._build()
        self._stamp = self._filesStamp()

    def _build(self) -> SSL.Context:
        raise NotImplementedError

    def _files(self) -> list[Path]:
        raise NotImplementedError

    def _filesStamp(self) -> tuple[tuple[str, int, int, int, int], ...]:
        """
        What says a file changed: its modification time and size, and its
        mode and owner too, so a key made readable by others is noticed
        (and refused, see L{_use_certificate}) even though C{chmod} and
        C{chown} leave the modification time alone.
        """
        stamp = []
        for path in self._files():
            try:
                st = path.stat()
            except OSError:
                stamp.append((str(path), -1, -1, -1, -1))
            else:
                stamp.append((str(path), st.st_mtime_ns, st.st_size, st.st_mode, st.st_uid))
        return tuple(stamp)

    def reload(self, force: bool = False) -> bool:
        """
        Rebuild the context if any file changed, or always with C{force}.

        @return: whether a new context is now in use.
        """
        stamp = self._filesStamp()
        if not force and stamp == self._stamp:
            return False
        try:
            context = self._build()
        except TLSConfigError as e:
            self._log.error(
                "keeping the previous {what} context: {error}", what=self.what, error=str(e)
            )
            return False
        self.context = context
        self._stamp = stamp
        self._log.info("{what} certificates reloaded", what=self.what)
        return True


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS(_ReloadableContext):
    """Makes the server-side L{SSL.Connection} for each client."""

    what = "listener TLS"

    def __init__(self, listener: ListenerConfig) -> None:
        self._listener = listener
        super().__init__()

    def _build(self) -> SSL.Context:
        return build_server_context(self._listener)

    def _files(self) -> list[Path]:
        lst = self._listener
        return [
            p
            for p in (lst.server_cert, lst.server_key, lst.client_ca, lst.client_crl)
            if p is not None
        ]

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        return _new_connection(self.context, tlsProtocol)


# ---------------------------------------------------------------------------
# Backend leg (pgtls is the TLS client)

VERIFYING_MODES = ("verify-ca", "verify-full")


@dataclass
class BackendVerification:
    """
    What the backend leg learned while verifying the server, so a failure
    can be explained to the client and the log.
    """

    chain_error: str | None = None
    names: list[str] = field(default_factory=list)


def _record_server_verify(
    conn: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int
) -> bool:
    if not ok:
        leg = _leg_of(conn)
        if leg is not None and leg.verification.chain_error is None:
            leg.verification.chain_error = describe_x509_error(errno)
    return bool(ok)


def build_backend_context(backend: BackendConfig) -> SSL.Context:
    ctx = _hardened_context(SSL.TLS_CLIENT_METHOD, backend.min_tls_version)
    ctx.set_alpn_protos([ALPN_POSTGRESQL])
    if backend.tls in VERIFYING_MODES:
        try:
            if backend.root_ca is not None:
                ctx.load_verify_locations(str(backend.root_ca))
            else:
                ctx.set_default_verify_paths()
        except SSL.Error as e:
            raise _load_error("backend root CA", backend.root_ca, e) from None
        ctx.set_verify(SSL.VERIFY_PEER, _record_server_verify)
    else:
        ctx.set_verify(SSL.VERIFY_NONE, lambda *a: True)
    if backend.client_cert is not None and backend.client_key is not None:
        _use_certificate(ctx, backend.client_cert, backend.client_key, "backend client")
    return ctx


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@implementer(IOpenSSLClientConnectionCreator)
class BackendTLS(_ReloadableContext):
    """
    Makes the client-side L{SSL.Connection} to a backend: SNI set to the
    route's C{server_name} (not for IP literals, as libpq does), and after
    the handshake L{check_hostname} applies C{verify-full}.
    """

    what = "backend TLS"

    def __init__(self, backend: BackendConfig) -> None:
        self._backend = backend
        self.mode = backend.tls
        self.server_name = backend.server_name
        super().__init__()

    def _build(self) -> SSL.Context:
        return build_backend_context(self._backend)

    def _files(self) -> list[Path]:
        b = self._backend
        return [p for p in (b.root_ca, b.client_cert, b.client_key) if p is not None]

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        conn = _new_connection(self.context, tlsProtocol)
        if not _is_ip(self.server_name):
            conn.set_tlsext_host_name(self.server_name.encode("idna"))
        return conn

    def check_hostname(self, conn: SSL.Connection) -> str | None:
        """
        @return: C{None} if the certificate names the server (or the mode
            does not ask), else the reason, naming what the certificate
            does carry.
        """
        if self.mode != "verify-full":
            return None
        try:
            if _is_ip(self.server_name):
                verify_ip_address(conn, self.server_name)
            else:
                verify_hostname(conn, self.server_name)
        except VerificationError:
            names = certificate_names(conn.get_peer_certificate(as_cryptography=True))
            return (
                f'server certificate for "{", ".join(names) or "?"}" does not match '
                f'host name "{self.server_name}"'
            )
        except CertificateError:
            return (
                "server certificate has no subjectAltName: pgtls verifies host names "
                "against subjectAltName only (use verify-ca, or reissue the certificate)"
            )
        return None


def certificate_names(cert: object) -> list[str]:
    """DNS and IP subjectAltNames of a C{cryptography} certificate."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value  # type: ignore[attr-defined]
    except x509.ExtensionNotFound:
        return []
    return [str(n) for n in san.get_values_for_type(x509.DNSName)] + [
        str(n) for n in san.get_values_for_type(x509.IPAddress)
    ]


def channel_binding_data(der: bytes) -> bytes | None:
    """
    The C{tls-server-end-point} channel binding (RFC 5929 section 4.1) of a
    server certificate: its hash with the certificate's own signature hash,
    SHA-256 in place of MD5 or SHA-1. C{None} for certificates without a
    single hash algorithm (Ed25519/Ed448), where binding is undefined.
    """
    cert = x509.load_der_x509_certificate(der)
    algorithm = cert.signature_hash_algorithm
    if algorithm is None:
        return None
    if isinstance(algorithm, (hashes.MD5, hashes.SHA1)):
        algorithm = hashes.SHA256()
    digest = hashes.Hash(algorithm)
    digest.update(der)
    return digest.finalize()


def peer_binding(conn: SSL.Connection) -> bytes | None:
    """The C{tls-server-end-point} binding of the certificate the peer showed."""
    cert = conn.get_peer_certificate(as_cryptography=True)
    return None if cert is None else channel_binding_data(cert.public_bytes(Encoding.DER))


def own_binding(conn: SSL.Connection) -> bytes | None:
    """The C{tls-server-end-point} binding of the certificate pgtls showed."""
    cert = conn.get_certificate()
    if cert is None:
        return None
    return channel_binding_data(cert.to_cryptography().public_bytes(Encoding.DER))


def common_name(cert: x509.Certificate | None) -> str | None:
    """A certificate's (first) CN, or C{None}."""
    if cert is None:
        return None
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = cns[0].value if cns else None
    return value if isinstance(value, str) else None


def describe_tls(conn: SSL.Connection | None) -> dict[str, str | None]:
    """The TLS version and cipher of a finished handshake, for logs."""
    if conn is None:
        return {"version": None, "cipher": None}
    return {"version": conn.get_protocol_version_name(), "cipher": conn.get_cipher_name()}
