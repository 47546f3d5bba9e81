# -*- test-case-name: tests.test_frontend,tests.test_tls_private,tests.test_security_misc -*-
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

The TLS protocol is L{LeanTLSProtocol}, a L{TLSMemoryBIOProtocol} with a
shorter path per received chunk, because this is where a proxy of small
messages spends its time (see C{bench/RESULTS.md}): Twisted's default
(L{twisted.protocols.tls.BufferingTLSTransport}) schedules a reactor call
for every write, to aggregate small writes, and then leaves the encrypted
bytes in the TCP transport's buffer for yet another reactor iteration
(C{startWriting}, a poll, C{doWrite}, C{stopWriting}: two C{epoll_ctl}
calls and a full event dispatch). L{TLSLayer.attach} also points the raw
protocol's C{dataReceived} straight at the TLS protocol, saving one more
call per chunk.

L{LeanTLSProtocol} relies on names Twisted and pyOpenSSL do not promise to
keep. L{pgtls_twisted.tls._private} lists them all and checks that they
are there; where one is not, L{TLSLayer} uses Twisted's own TLS protocol
instead (L{PUBLIC_PROTOCOL}), and only public names.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Final

from OpenSSL.SSL import Error, WantReadError, ZeroReturnError
from twisted.internet.interfaces import IProtocol, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure

from pgtls_twisted.tls import _private
from pgtls_twisted.tls._private import bytesToDecrypt, bytesToSend, directSender

#: Flush a protocol's pending writes at once beyond this many bytes (as
#: Twisted's own write aggregation does).
MAX_PENDING = 64_000

#: The most plaintext one C{SSL_write} is given: one TLS record.
RECORD_SIZE = 2**14


class Corker:
    """
    Holds back the writes made while a received chunk is being handled, for
    the L{LeanTLSProtocol}s that share it (see L{LeanTLSProtocol.write}).

    Both legs of a session must share one: the point is that the write a
    client's chunk causes on the server leg (the pump, the pooler, the
    startup relay) leaves when that chunk has been handled, not after a
    scheduled call. A route makes one and gives it to the L{TLSLayer}s of
    both its legs (a pump joins legs of one route only); the state is only
    ever set for the span of one synchronous C{dataReceived}.

    @ivar corked: while a chunk is being handled, the protocols holding
        writes, in the order of their first write; C{None} otherwise.
    """

    __slots__ = ("corked",)

    def __init__(self) -> None:
        self.corked: list[LeanTLSProtocol] | None = None


class LeanTLSProtocol(TLSMemoryBIOProtocol):
    """
    L{TLSMemoryBIOProtocol} with fewer Python calls and reactor turns per
    chunk, and the same behaviour.

     - B{Writes are aggregated per received chunk}, not per reactor turn:
       a write made while some L{LeanTLSProtocol} of the same L{Corker} is
       handling a received chunk (which is when a proxy writes: the pump,
       the pooler, the startup relay) is held until that chunk has been
       handled, then all writes to the same connection go out as one TLS
       record. Writes made anywhere else (timers, Deferred callbacks of
       plaintext connections) are aggregated until the next reactor turn,
       exactly as L{twisted.protocols.tls.BufferingTLSTransport} does. So a
       server's burst of startup messages still leaves as one record, while
       a forwarded query leaves at once instead of after a scheduled call.
     - B{Encrypted bytes are sent at once}: when the TCP transport has
       nothing queued, they are handed to C{socket.send} directly, and only
       what the kernel does not take is queued with C{transport.write}, so
       ordering, flow control (producers) and error handling stay
       Twisted's. A transport that is not a real TCP connection (tests'
       in-memory ones) always gets C{transport.write}.
     - B{Decrypted bytes are delivered once per chunk}, joined, straight to
       the wrapped protocol, instead of once per TLS record through
       L{ProtocolWrapper.dataReceived}.

    Handshakes, shutdown, errors and producers are the base class's code.
    The base class's names this class reads, calls or overrides are listed
    in L{pgtls_twisted.tls._private.RELIED_ON}; the rest goes through that
    module's functions.
    """

    #: The leg this TLS session belongs to, set by L{TLSLayer.attach}
    #: before the connection creator is called, which copies it to the
    #: connection (L{pgtls_twisted.tls._contexts.LegConnection}).
    leg: Any = None
    _pending: list[bytes]
    _pendingSize = 0
    _scheduled: Any = None
    _sendNow: Callable[[bytes], bytes] | None = None
    _closed = False

    def __init__(
        self,
        factory: TLSMemoryBIOFactory,
        wrappedProtocol: IProtocol,
        *,
        clock: IReactorTime,
        corker: Corker,
    ) -> None:
        """
        @param clock: schedules the flush of writes made outside any
            received chunk.
        @param corker: shared with the protocols whose writes this one's
            received chunks should hold back, and the other way round.
        """
        super().__init__(factory, wrappedProtocol)
        self._clock = clock
        self._corker = corker

    def makeConnection(self, transport: Any) -> None:
        self._pending = []
        self._sendNow = directSender(transport)
        super().makeConnection(transport)

    # -- receiving -------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        corker = self._corker
        if corker.corked is not None:
            # Re-entered from a write's handling (or a test feeding us
            # directly): the outer call uncorks.
            self._receive(data)
            return
        corker.corked = corked = []
        try:
            self._receive(data)
        finally:
            corker.corked = None
            for protocol in corked:
                protocol._flush()

    def _receive(self, data: bytes) -> None:
        conn = self._tlsConnection
        if not self._handshakeDone or self._appSendBuffer or self._lostTLSConnection:
            TLSMemoryBIOProtocol.dataReceived(self, data)
            return
        conn.bio_write(data)
        recv = conn.recv
        chunks: list[bytes] = []
        try:
            # Stop when nothing is left to decrypt, rather than at the
            # WantReadError that one more SSL_read would raise.
            while True:
                chunks.append(recv(RECORD_SIZE))
                if not bytesToDecrypt(conn):
                    break
        except WantReadError:
            pass
        except ZeroReturnError:
            # The peer's close_notify: as TLSMemoryBIOProtocol._flushReceiveBIO.
            self._deliver(chunks)
            self._shutdownTLS()
            self._tlsShutdownFinished(None)
            self._flushSendBIO()
            return
        except Error:
            failure = Failure()
            self._deliver(chunks)
            self._tlsShutdownFinished(failure)
            self._flushSendBIO()
            return
        self._deliver(chunks)
        # Reading can make OpenSSL want to send (a TLS 1.3 KeyUpdate reply).
        if bytesToSend(conn):
            self._flushSendBIO()

    def _deliver(self, chunks: list[bytes]) -> None:
        if chunks and not self._aborted:
            data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            if data:
                self.wrappedProtocol.dataReceived(data)

    # -- sending ---------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self._closed or not data:
            return
        pending = self._pending
        if not pending:
            corked = self._corker.corked
            if corked is not None:
                corked.append(self)
            elif self._scheduled is None:
                self._scheduled = self._clock.callLater(0, self._scheduledFlush)
        pending.append(data)
        self._pendingSize += len(data)
        if self._pendingSize > MAX_PENDING:
            self._flush()

    def writeSequence(self, iovec: Any) -> None:
        self.write(b"".join(iovec))

    def _scheduledFlush(self) -> None:
        self._scheduled = None
        self._flush()

    def _flush(self) -> None:
        pending = self._pending
        if not pending:
            return
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        pending.clear()
        self._pendingSize = 0
        if self.disconnecting and self._producer is None:
            return  # TLSMemoryBIOProtocol.write drops these too
        if not self._handshakeDone or self._appSendBuffer or self._lostTLSConnection:
            self._write(data)
            return
        conn = self._tlsConnection
        size = len(data)
        done = 0
        while done < size:
            try:
                done += conn.send(data if size <= RECORD_SIZE else data[done : done + RECORD_SIZE])
            except WantReadError:
                self._bufferedWrite(data[done:])
                break
            except Error:
                self._tlsShutdownFinished(Failure())
                return
        self._flushSendBIO()

    def _flushSendBIO(self) -> None:
        conn = self._tlsConnection
        size = bytesToSend(conn)
        if not size:
            return
        try:
            out = conn.bio_read(size)
        except WantReadError:
            return
        send = self._sendNow
        if send is not None:
            out = send(out)
            if not out:
                return
        self.transport.write(out)

    # -- handing over to the relay ---------------------------------------------

    def quiescentConnection(self) -> Any:
        """
        The L{SSL.Connection<OpenSSL.SSL.Connection>}, for the relay
        (L{pgtls_twisted.proxy._relay}) to carry on with, when this
        protocol is in plain steady state: handshake done, not closing,
        nothing held back, nothing encrypted waiting to be sent, nothing
        decrypted waiting to be read. C{None} otherwise.
        """
        conn = self._tlsConnection
        if (
            not self._handshakeDone
            or self._appSendBuffer
            or self._lostTLSConnection
            or self._closed
            or self._pending
            or self.disconnecting
            or bytesToSend(conn)
            or conn.pending()
        ):
            return None
        return conn

    def peerClosed(self) -> None:
        """
        The relay read the peer's close_notify: what L{_receive} does with
        one (the base class's own handling of a peer's shutdown).
        """
        self._shutdownTLS()
        self._tlsShutdownFinished(None)
        self._flushSendBIO()

    def failed(self, failure: Failure) -> None:
        """The relay met a TLS error: what L{_receive} does with one."""
        self._tlsShutdownFinished(failure)
        self._flushSendBIO()

    # -- closing ---------------------------------------------------------------

    def loseConnection(self) -> None:
        self._flush()
        super().loseConnection()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._closed = True
        if self._scheduled is not None and self._scheduled.active():
            self._scheduled.cancel()
        self._scheduled = None
        self._flush()
        super().connectionLost(reason)


#: Makes a connection's TLS protocol from C{(factory, wrappedProtocol)},
#: as a L{TLSMemoryBIOProtocol} class does.
TLSProtocolMaker = Callable[[TLSMemoryBIOFactory, IProtocol], TLSMemoryBIOProtocol]

#: Twisted's own TLS protocol: the one L{TLSMemoryBIOFactory} makes, and
#: C{startTLS} uses (L{twisted.protocols.tls.BufferingTLSTransport} today).
#: Public names only.
PUBLIC_PROTOCOL: Final[TLSProtocolMaker] = TLSMemoryBIOFactory.protocol


def chooseProtocol(
    clock: IReactorTime,
    corker: Corker | None = None,
    verdict: _private.Verdict | None = None,
) -> TLSProtocolMaker:
    """
    L{LeanTLSProtocol} (with C{clock} and C{corker}) where C{verdict}, by
    default L{_private.verdict}'s on the installed Twisted and pyOpenSSL,
    says its private names are all there; L{PUBLIC_PROTOCOL} otherwise.
    """
    if verdict is None:
        verdict = _private.verdict()
    if verdict.leanTLS:
        return functools.partial(
            LeanTLSProtocol, clock=clock, corker=corker if corker is not None else Corker()
        )
    return PUBLIC_PROTOCOL


class TLSLayer:
    """
    One per route and leg: a L{TLSMemoryBIOFactory} bound to a connection
    creator (whose context may be swapped by a reload) and a clock.

    @ivar protocol: makes each connection's TLS protocol.
    """

    def __init__(
        self,
        creator: Any,
        isClient: bool,
        clock: IReactorTime,
        protocol: TLSProtocolMaker | None = None,
        corker: Corker | None = None,
    ) -> None:
        """
        @param protocol: by default L{chooseProtocol}'s choice: the lean
            protocol where the installed libraries allow, Twisted's own
            otherwise.
        @param corker: shared with the other leg's layer (see L{Corker});
            by default one of this layer's own.
        """
        self._factory = TLSMemoryBIOFactory(creator, isClient, Factory(), clock=clock)
        self.protocol: TLSProtocolMaker = (
            protocol if protocol is not None else chooseProtocol(clock, corker)
        )

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
        to the TLS protocol. C{outer} is the leg the certificate verify
        callbacks report to (see L{LeanTLSProtocol.leg}).
        """
        tls = self.protocol(self._factory, inner)
        tls.leg = outer  # type: ignore[attr-defined]
        tls.makeConnection(outer.transport)
        outer.dataReceived = tls.dataReceived  # type: ignore[method-assign]
        if received:
            tls.dataReceived(received)
        return tls
