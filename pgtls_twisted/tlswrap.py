# -*- test-case-name: tests.test_frontend -*-
"""
Putting TLS under a protocol that is already connected.

Why not C{ITLSTransport.startTLS}? PostgreSQL negotiates TLS in-band, so
both legs must switch a live TCP connection to TLS, which is what
C{startTLS} is for. We deliberately wrap L{TLSMemoryBIOProtocol} ourselves
instead, because C{startTLS}:

 - cannot take bytes we already read: a PostgreSQL 17 direct-TLS client's
   ClientHello arrives in the very chunk we classify, and must be handed to
   the TLS engine (C{startTLS} would need C{transport.protocol} internals);
 - hides the ALPN result (the startTLS'd transport has no
   C{negotiatedProtocol}), which the direct-TLS path must check;
 - always uses the global reactor as its clock, so deterministic tests
   with a L{twisted.internet.task.Clock} and C{iosim} cannot run real TLS;
 - monkey-patches the transport, where wrapping is a plain composition
   that C{twisted/protocols/tls.py} supports as public API.

The cost is one extra Python call per received chunk while TLS is active,
which L{TLSLayer.attach} removes by pointing the raw protocol's
C{dataReceived} straight at the TLS protocol.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol


class TLSLayer:
    """
    One per route and leg: a L{TLSMemoryBIOFactory} bound to a connection
    creator (whose context may be swapped by a reload) and a clock.
    """

    def __init__(self, creator: Any, isClient: bool, clock: IReactorTime) -> None:
        self._factory = TLSMemoryBIOFactory(creator, isClient, Factory(), clock=clock)

    def attach(
        self, outer: Protocol, inner: Protocol, received: bytes = b""
    ) -> TLSMemoryBIOProtocol:
        """
        Start TLS on C{outer}'s transport, delivering decrypted bytes to
        C{inner}, whose transport becomes the returned TLS protocol.

        From here on the reactor's calls of C{outer.dataReceived} go
        straight into the TLS engine (an instance attribute shadows the
        method), and C{received} (bytes already read, such as a direct-TLS
        ClientHello) is fed in first. C{outer.connectionLost} must forward
        to the TLS protocol.
        """
        tls = self._factory.protocol(self._factory, inner)
        tls.makeConnection(outer.transport)
        outer.dataReceived = tls.dataReceived  # type: ignore[method-assign]
        if received:
            tls.dataReceived(received)
        return tls
