# -*- test-case-name: tests.test_frontend -*-
"""
What the two legs of a session have in common.

A leg is one TCP connection, client-facing (L{pgtls_twisted.proxy._frontend}) or
backend-facing (L{pgtls_twisted.proxy._backend}), that may switch to TLS in the
middle. Whoever uses a leg (a session, the pump, a cancel) sees only:

 - C{out}: where application bytes for the peer are written (the TLS
   protocol once TLS is up, else the TCP transport);
 - C{deliver}: where application bytes from the peer go;
 - C{onLost}: told once when the connection is gone;
 - L{Leg.close}: a graceful close that cannot hang.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

#: How long a closing connection may wait for the peer's TLS close_notify
#: (or its FIN) before it is aborted (Twisted #7926: TLS close waits for ever).
CLOSE_TIMEOUT = 10.0


def discard(data: bytes) -> None:
    """A C{deliver} for connections that are closing."""


@implementer(IHandshakeListener)
class Decrypted(Protocol):
    """The protocol inside a leg's TLS session: reports to its leg."""

    def __init__(self, leg: Leg) -> None:
        self.leg = leg

    def handshakeCompleted(self) -> None:
        self.leg.handshakeCompleted()

    def dataReceived(self, data: bytes) -> None:
        self.leg.deliver(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.leg.appConnectionLost(reason)


class Leg(Protocol):
    """
    Base of both legs.

    @ivar tls: the L{TLSMemoryBIOProtocol} once TLS is up, else C{None}.
    @ivar clock: for the close timeout; set by subclasses.
    """

    clock: Any

    def __init__(self) -> None:
        self.out: Any = None
        self.tls: Any = None
        self.deliver: Callable[[bytes], None] = discard
        self.onLost: Callable[[Failure], None] | None = None
        self._closing = False
        self._lost = False
        self._closeTimer: Any = None

    def connectionMade(self) -> None:
        self.out = self.transport
        setNoDelay = getattr(self.transport, "setTcpNoDelay", None)
        if setNoDelay is not None:
            try:
                setNoDelay(True)
            except OSError:
                pass

    def handshakeCompleted(self) -> None:
        """TLS is up; subclasses check what they must."""

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self.tls is not None:
            self.tls.connectionLost(reason)  # which calls appConnectionLost
        else:
            self.appConnectionLost(reason)

    def appConnectionLost(self, reason: Failure) -> None:
        """The connection is gone, after TLS (if any) has shut down."""
        self._lost = True
        if self._closeTimer is not None and self._closeTimer.active():
            self._closeTimer.cancel()
        self._closeTimer = None
        if self.onLost is not None:
            onLost, self.onLost = self.onLost, None
            onLost(reason)

    def close(self) -> None:
        """Close gracefully (TLS close_notify), aborting if the peer stalls."""
        if self._closing or self._lost:
            return
        self._closing = True
        self.deliver = discard
        self.out.unregisterProducer()
        self.out.loseConnection()
        # A paused socket would not notice the peer's close_notify or FIN
        # (it may have been paused for flow control, or while a backend was
        # being connected): read again so the close can complete.
        self.transport.resumeProducing()
        self._closeTimer = self.clock.callLater(CLOSE_TIMEOUT, self.transport.abortConnection)
