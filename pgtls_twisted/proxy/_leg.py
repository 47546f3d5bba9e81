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

Where a leg is, from accept (or connect) to close, is its L{Phase}: one
attribute, not a flag per fact, so that a deadline, a shutdown or the
admin console asks one question and gets one answer.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IHandshakeListener, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

#: How long a closing connection may wait for the peer's TLS close_notify
#: (or its FIN) before it is aborted (Twisted #7926: TLS close waits for ever).
CLOSE_TIMEOUT = 10.0


class Phase(enum.Enum):
    """
    Where a leg is. A client leg (L{pgtls_twisted.proxy._frontend}) goes

        NEGOTIATING -> [TLS_HANDSHAKE -> STARTUP] -> AUTHENTICATING -> READY

    (a plaintext client's startup packet ends its negotiation), a backend
    leg (L{pgtls_twisted.proxy._backend})

        NEGOTIATING -> [TLS_HANDSHAKE] -> READY

    and either may go to CLOSING, then CLOSED, from any phase (or to CLOSED
    at once, when the peer goes first).
    """

    #: Encryption is being chosen: a client's GSSENCRequest, SSLRequest or
    #: direct TLS ClientHello may come (a plaintext client's first other
    #: packet is its startup packet); pgtls's SSLRequest awaits the
    #: server's answer.
    NEGOTIATING = "negotiating"
    #: TLS is being set up on the connection; nothing is read from it yet.
    TLS_HANDSHAKE = "TLS handshake"
    #: A client inside TLS: its one startup packet may come.
    STARTUP = "startup"
    #: The client's StartupMessage has come: its session logs it in.
    AUTHENTICATING = "authenticating"
    #: A client's session has started; a backend leg is in its user's hands.
    READY = "ready"
    #: pgtls is closing it: what was written is flushed (and TLS
    #: close_notify sent), nothing more is read, until the peer closes too
    #: or L{CLOSE_TIMEOUT} passes.
    CLOSING = "closing"
    #: The connection is gone.
    CLOSED = "closed"


def discard(data: bytes) -> None:
    """A C{deliver} for connections that are closing."""


@implementer(IPushProducer)
class ReadingValve:
    """
    A leg's reading as a producer, for the other leg's C{out} to pause
    while it is full (L{pgtls_twisted.proxy._pump.join}). It ignores
    C{stopProducing}: Twisted calls that on a registered producer when the
    consumer's connection is lost, which would close this leg's TCP
    connection underneath its TLS layer (no close_notify, and no chance to
    tell the client why); teardown is the session's.
    """

    __slots__ = ("_leg",)

    def __init__(self, leg: Leg) -> None:
        self._leg = leg

    def pauseProducing(self) -> None:
        self._leg.pauseReading()

    def resumeProducing(self) -> None:
        self._leg.resumeReading()

    def stopProducing(self) -> None:
        pass


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
    @ivar phase: where the connection is (see L{Phase}).
    """

    clock: Any
    # Class-level defaults, set on an instance only once they change: an
    # idle client's leg costs no memory for them.
    #: The L{DirectLeg<pgtls_twisted.proxy._direct.DirectLeg>} that reads
    #: and writes the socket now (and is C{out}), or C{None}.
    direct: Any = None
    #: A pending adoption by a direct leg, and how many were tried.
    adopting: Any = None
    adoptTries = 0
    #: What is registered with C{out} as its producer
    #: (L{pgtls_twisted.proxy._pump.join}), so that a direct leg can take
    #: it over and give it back.
    producer: Any = None
    #: Reading is paused (L{pauseReading}): flow control, or a client not
    #: to be read yet.
    readingPaused = False
    _valve: ReadingValve | None = None

    @property
    def valve(self) -> ReadingValve:
        """This leg's reading as a producer (made once: pooled legs are joined per transaction)."""
        valve = self._valve
        if valve is None:
            valve = self._valve = ReadingValve(self)
        return valve

    def __init__(self) -> None:
        self.out: Any = None
        self.tls: Any = None
        self.deliver: Callable[[bytes], None] = discard
        self.onLost: Callable[[Failure], None] | None = None
        self.phase = Phase.NEGOTIATING
        #: The phase the connection was in when its end began (a close, or
        #: the peer leaving), or C{None} while it is open: once CLOSING or
        #: CLOSED, the phase no longer says how far the connection got, and
        #: a few still ask (see L{reached}).
        self._endedIn: Phase | None = None
        self._closeTimer: Any = None
        #: While a relay (L{pgtls_twisted.proxy._relay}) or a direct leg
        #: (L{pgtls_twisted.proxy._direct}) owns the socket: gives it back
        #: to the transport. Called before anything else touches the
        #: connection (a close, a FATAL, an abort).
        self.handBack: Callable[[], None] | None = None

    @property
    def reached(self) -> Phase:
        """
        How far the connection got: its phase, or, once it is closing or
        closed, the phase it was in when that began. A deadline that fires
        while the connection closes, the admin console and the traffic
        figures ask this (whether a client had logged in), not L{phase}.
        """
        return self.phase if self._endedIn is None else self._endedIn

    def _beginClosing(self) -> None:
        """Enter CLOSING (once), remembering how far the connection got."""
        if self._endedIn is None:
            self._endedIn = self.phase
        self.phase = Phase.CLOSING

    def _gone(self) -> None:
        """Enter CLOSED, remembering how far the connection got."""
        if self._endedIn is None:
            self._endedIn = self.phase
        self.phase = Phase.CLOSED

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

    def pauseReading(self) -> None:
        """Read nothing more from the socket until L{resumeReading}."""
        self.readingPaused = True
        (self.direct or self.transport).pauseProducing()

    def resumeReading(self) -> None:
        """Read from the socket again (whoever owns it: transport or direct leg)."""
        self.readingPaused = False
        (self.direct or self.transport).resumeProducing()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self.tls is not None:
            self.tls.connectionLost(reason)  # which calls appConnectionLost
        else:
            self.appConnectionLost(reason)

    def appConnectionLost(self, reason: Failure) -> None:
        """The connection is gone, after TLS (if any) has shut down."""
        self._gone()
        if self._closeTimer is not None and self._closeTimer.active():
            self._closeTimer.cancel()
        self._closeTimer = None
        if self.onLost is not None:
            onLost, self.onLost = self.onLost, None
            onLost(reason)

    def close(self) -> None:
        """Close gracefully (TLS close_notify), aborting if the peer stalls."""
        if self.phase in (Phase.CLOSING, Phase.CLOSED):
            return
        if self.handBack is not None:
            self.handBack()
        self._beginClosing()
        self.deliver = discard
        self.out.unregisterProducer()
        self.out.loseConnection()
        # A paused socket would not notice the peer's close_notify or FIN
        # (it may have been paused for flow control, or while a backend was
        # being connected): read again so the close can complete.
        self.resumeReading()
        self._closeTimer = self.clock.callLater(CLOSE_TIMEOUT, self.transport.abortConnection)
