# -*- test-case-name: tests.test_direct,tests.test_direct_unit -*-
"""
Direct legs: a pooled session's sockets read and written without Twisted's
TCP transport and TLS protocol, by the relay's calls into OpenSSL.

A pooled session (L{pgtls_twisted.pool._session}) must read every message
header, so it cannot hand its legs to a L{Relay<pgtls_twisted.proxy._relay.Relay>},
which only copies. What it can skip is what lies under C{leg.deliver} and
C{leg.out.write}: Twisted's TCP transport, its producer machinery, the
TLS protocol and pyOpenSSL's per-call wrappers, about 60 % of the
transaction pool's CPU before this module (see C{bench/results}). A
L{DirectLeg} takes one leg's socket from its transport, as the relay does,
and becomes that leg's C{out} and reader:

 - a readable event is one C{recv_into}, C{BIO_write} and C{SSL_read}
   loop, as in the relay, and one C{leg.deliver(bytes)} of what was
   decrypted;
 - C{write} is C{SSL_write} and C{send} straight to the socket (or
   C{send} alone on a plaintext leg);
 - flow control is the consumer and producer Twisted's transports offer,
   as small as it can be: the producer registered with a leg (the other
   leg's reading, L{pgtls_twisted.proxy._pump.join}) is paused while this
   socket has bytes the kernel did not take, and the leg's own reading is
   paused and resumed by C{pauseProducing}/C{resumeProducing}
   (L{Leg.pauseReading<pgtls_twisted.proxy._leg.Leg.pauseReading>}). So
   joining a server to a client, and separating them, per transaction,
   sets a few attributes.

B{Taking over.} A leg is adopted (L{adoptSoon}) from a clean reactor turn,
never from inside its own transport's read, and only when its transport
and TLS protocol hold nothing (the relay's L{idleSocket} and
C{quiescentConnection}) and its reading is not paused; otherwise it stays
as it is and is tried again at its next use, a bounded number of times.

B{Handing back} (L{DirectLeg.stop}) is the relay's: before anything
closes, fails or aborts the leg (C{Leg.handBack}), or when the peer's
FIN, a socket error, a close_notify or a TLS error ends the socket's
direct life, the bytes not yet sent go to the TCP transport's buffer, a
registered producer goes back to the leg's own C{out}, and the transport
reads again; the leg then closes as it always has.

Memory and TLS 1.3 post-handshake messages are as in the relay: one
read's worth per event, a KeyUpdate's reply flushed after every read.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.python.failure import Failure
from zope.interface import implementer

from pgtls_twisted.proxy._leg import Phase
from pgtls_twisted.proxy._relay import (
    RECORD_SIZE,
    _End,
    _plainPtr,
    _plainView,
    _raw,
    _rawPtr,
    _rawView,
    handOverTLSEnd,
    legPossible,
    quietSocket,
)
from pgtls_twisted.tls import _private
from pgtls_twisted.tls._private import opensslFFI, opensslLib

#: How many times a leg that is busy when asked is tried again, at its
#: next uses, before it is left on Twisted's path for good.
ADOPT_TRIES = 50


@implementer(IConsumer, IPushProducer)
class DirectLeg(_End):
    """
    One leg's socket, read and written directly (see the module). It is
    the leg's C{out} (an L{IConsumer}) and its reading's producer while
    L{running}.

    @ivar producer: what writes to this leg and is paused while the
        socket is full (the other leg's reading), or C{None}.
    @ivar paused: the leg's reading is paused (its consumer is full, or
        its session holds enough of its bytes).
    """

    __slots__ = ("reactor", "running", "producer", "paused", "savedOut", "_producerPaused")

    def __init__(self, reactor: Any, leg: Any, sock: Any, conn: Any) -> None:
        _End.__init__(self, self, leg, sock, conn, fromServer=False)
        self.reactor = reactor
        self.running = False
        self.producer: Any = None
        self._producerPaused = False
        self.paused = False
        self.savedOut: Any = leg.out

    # -- what _End asks of its relay ---------------------------------------------

    def start(self) -> None:
        """Take the socket from the transport (see L{adopt})."""
        leg, reactor = self.leg, self.reactor
        transport = leg.transport
        reactor.removeReader(transport)
        reactor.removeWriter(transport)
        producer = getattr(leg, "producer", None)
        if producer is not None:
            self.savedOut.unregisterProducer()
            self.producer = producer
        self.running = True
        leg.out = self
        leg.direct = self
        leg.handBack = self.stop
        reactor.addReader(self)

    def stop(self) -> None:
        """Hand the socket back to its transport (see the module)."""
        if not self.running:
            return
        self.running = False
        reactor, leg = self.reactor, self.leg
        reactor.removeReader(self)
        reactor.removeWriter(self)
        leg.direct = None
        leg.handBack = None
        leg.out = self.savedOut
        transport = leg.transport
        if self.out:
            data = bytes(self.out)
            self.out.clear()
            transport.write(data)
        producer, self.producer = self.producer, None
        if producer is not None:
            self.savedOut.registerProducer(producer, True)
        if transport.connected and not self.paused:
            transport.startReading()

    def tlsEnded(self, end: _End, error: int) -> None:
        handOverTLSEnd(self.stop, self.leg, error)

    # -- reading ------------------------------------------------------------------

    def doRead(self) -> None:
        try:
            n = self.sock.recv_into(_raw)
        except BlockingIOError:
            return
        except OSError:
            self.stop()  # Twisted's own read meets the error
            return
        if not n:
            self.stop()  # and the FIN
            return
        if self.ssl is None:
            self.leg.deliver(bytes(_rawView[:n]))
            return
        opensslLib.BIO_write(self.rbio, _rawPtr, n)
        self.decrypt()

    def decrypt(self) -> None:
        """Decrypt what the incoming BIO holds (one read's worth at most) and deliver it."""
        lib, ssl, rbio, null = opensslLib, self.ssl, self.rbio, opensslFFI.NULL
        data = b""
        while True:
            n = lib.SSL_read(ssl, _plainPtr, RECORD_SIZE)
            if n <= 0:
                error = lib.SSL_get_error(ssl, n)
                lib.ERR_clear_error()
                if error == lib.SSL_ERROR_WANT_READ:
                    break
                if data:
                    self.leg.deliver(data)
                if self.running:
                    self.tlsEnded(self, error)
                return
            data += _plainView[:n]
            if not lib.SSL_pending(ssl) and not lib.BIO_get_mem_data(rbio, null):
                break
        # Reading may have made OpenSSL write (a KeyUpdate's reply).
        if lib.BIO_get_mem_data(self.wbio, null):
            self.flush()
        if data and self.running:
            self.leg.deliver(data)

    # -- IPushProducer: the leg's reading ------------------------------------------

    def pauseProducing(self) -> None:
        if not self.paused:
            self.paused = True
            self.reactor.removeReader(self)

    def resumeProducing(self) -> None:
        if not self.paused:
            return
        self.paused = False
        if not self.running:
            return
        # What OpenSSL already holds raises no readable event.
        if self.ssl is not None and (
            opensslLib.SSL_pending(self.ssl)
            or opensslLib.BIO_get_mem_data(self.rbio, opensslFFI.NULL)
        ):
            self.decrypt()
            if not self.running or self.paused:
                return
        self.reactor.addReader(self)

    def stopProducing(self) -> None:
        """Teardown is the leg's (C{Leg.close}), as for the pump's valves."""

    # -- IConsumer: the leg's out --------------------------------------------------

    def write(self, data: bytes) -> None:
        if not data:
            return
        if not self.running:
            self.leg.out.write(data)  # handed back meanwhile
            return
        if self.ssl is None:
            self.send(memoryview(data))
        else:
            self.seal(opensslFFI.from_buffer(data), len(data))
        if self.out and self.producer is not None and not self._producerPaused:
            self._producerPaused = True
            self.producer.pauseProducing()

    def writeSequence(self, data: list[bytes]) -> None:
        self.write(b"".join(data))

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer
        self._producerPaused = False
        if self.out:
            self._producerPaused = True
            producer.pauseProducing()

    def unregisterProducer(self) -> None:
        self.producer = None
        self._producerPaused = False

    def loseConnection(self) -> None:
        """Not expected (a leg hands back before it closes); close as the leg would have."""
        self.stop()
        self.leg.out.loseConnection()

    def doWrite(self) -> None:
        if not self.running:
            return
        out = self.out
        try:
            sent = self.sock.send(out)
        except BlockingIOError:
            return
        except OSError:
            self.stop()
            return
        del out[:sent]
        if out:
            return
        self.reactor.removeWriter(self)
        if self._producerPaused:
            self._producerPaused = False
            self.producer.resumeProducing()

    def connectionLost(self, reason: Failure) -> None:
        """The reactor dropped this descriptor: hand back, and let the transport close."""
        self.stop()
        self.leg.transport.connectionLost(reason)


_private.SHORT_DISPATCH_TYPES.add(DirectLeg)


def adopt(leg: Any, reactor: Any) -> DirectLeg | None:
    """
    Start a L{DirectLeg} on C{leg} if it is in plain steady state now: its
    transport idle, its TLS protocol (if any) quiescent, its reading not
    paused. C{None} when not, yet.
    """
    if leg.direct is not None:
        return leg.direct  # type: ignore[no-any-return]
    if getattr(leg, "readingPaused", False):
        return None
    quiet = quietSocket(leg)
    if quiet is None:
        return None
    direct = DirectLeg(reactor, leg, *quiet)
    direct.start()
    return direct


def adoptSoon(leg: Any, reactor: Any, clock: Any) -> None:
    """
    L{adopt} C{leg} on a clean reactor turn, if it can ever be (see
    L{legPossible}) and has not been tried L{ADOPT_TRIES} times already.
    """
    if leg.direct is not None or leg.adopting is not None or leg.adoptTries >= ADOPT_TRIES:
        return
    if not legPossible(leg, reactor):
        leg.adoptTries = ADOPT_TRIES
        return

    def attempt() -> None:
        leg.adopting = None
        leg.adoptTries += 1
        if leg.phase is not Phase.READY:
            return
        adopt(leg, reactor)

    leg.adopting = clock.callLater(0, attempt)
