"""
A fake PostgreSQL server that answers the SSLRequest with C{S} and does TLS
with a chosen certificate from the test PKI: enough to test how pgtls
verifies backends with certificates no real cluster of the suite carries.
It answers the first StartupMessage with a FATAL ErrorResponse so a test
can see the startup got through.
"""

from __future__ import annotations

from typing import Any

from OpenSSL import SSL
from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol

from pgtls_twisted.protocol import _wire as wire
from pgtls_twisted.testing.pki import PKI
from pgtls_twisted.tls._lean import TLSLayer


class _Creator:
    def __init__(self, ctx: SSL.Context) -> None:
        self.ctx = ctx

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        return SSL.Connection(self.ctx, None)


class _Inner(Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(wire.error_response("28000", "fake backend got the startup packet"))
        self.transport.loseConnection()


class _Outer(Protocol):
    def __init__(self, layer: TLSLayer) -> None:
        self.layer = layer
        self.tls: Any = None

    def dataReceived(self, data: bytes) -> None:
        if data == wire.SSL_REQUEST:
            self.transport.write(b"S")
            self.tls = self.layer.attach(self, _Inner())
        else:
            self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        if self.tls is not None:
            self.tls.connectionLost(reason)


def tls_backend(pki: PKI, cert: str, max_version: int | None = None) -> Any:
    """Listen on 127.0.0.1:0 as a TLS-speaking fake backend; returns the port."""
    from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
    from zope.interface import directlyProvides

    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.use_certificate_chain_file(str(pki.cert(cert)))
    ctx.use_privatekey_file(str(pki.key(cert)))
    if max_version is not None:
        ctx.set_max_proto_version(max_version)
    creator = _Creator(ctx)
    directlyProvides(creator, IOpenSSLServerConnectionCreator)
    layer = TLSLayer(creator, False, reactor)
    return reactor.listenTCP(0, _factory(layer), interface="127.0.0.1")


def _factory(layer: TLSLayer) -> Factory:
    class F(Factory):
        def buildProtocol(self, addr: Any) -> Protocol:
            return _Outer(layer)

    return F()
