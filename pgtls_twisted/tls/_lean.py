# -*- test-case-name: tests.test_frontend,tests.test_security_misc -*-
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
"""

from __future__ import annotations

from typing import Any

from OpenSSL import SSL
from OpenSSL.SSL import Error, WantReadError, ZeroReturnError
from twisted.internet import tcp
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure

#: Flush a protocol's pending writes at once beyond this many bytes (as
#: Twisted's own write aggregation does).
MAX_PENDING = 64_000

#: The most plaintext one C{SSL_write} is given: one TLS record.
RECORD_SIZE = 2**14

#: Protocols holding writes made while a received chunk is being handled,
#: or C{None} outside any. See L{LeanTLSProtocol.write}.
_corked: list[LeanTLSProtocol] | None = None


class LeanTLSProtocol(TLSMemoryBIOProtocol):
    """
    L{TLSMemoryBIOProtocol} with fewer Python calls and reactor turns per
    chunk, and the same behaviour.

     - B{Writes are aggregated per received chunk}, not per reactor turn:
       a write made while some L{LeanTLSProtocol} is handling a received
       chunk (which is when a proxy writes: the pump, the pooler, the
       startup relay) is held until that chunk has been handled, then all
       writes to the same connection go out as one TLS record. Writes made
       anywhere else (timers, Deferred callbacks of plaintext
       connections) are aggregated until the next reactor turn, exactly as
       L{twisted.protocols.tls.BufferingTLSTransport} does. So a server's
       burst of startup messages still leaves as one record, while a
       forwarded query leaves at once instead of after a scheduled call.
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
    """

    #: The leg this TLS session belongs to, set by L{TLSLayer.attach}
    #: before the connection creator is called, which copies it to the
    #: connection (L{pgtls_twisted.tls._contexts.LegConnection}).
    leg: Any = None
    _pending: list[bytes]
    _pendingSize = 0
    _scheduled: Any = None
    _rawSocket: Any = None
    _closed = False

    def makeConnection(self, transport: Any) -> None:
        self._pending = []
        if type(transport) in _TCP_TYPES:
            self._rawSocket = transport.socket
        super().makeConnection(transport)

    # -- receiving -------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        global _corked
        if _corked is not None:
            # Re-entered from a write's handling (or a test feeding us
            # directly): the outer call uncorks.
            self._receive(data)
            return
        _corked = corked = []
        try:
            self._receive(data)
        finally:
            _corked = None
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
                if not _toDecrypt(conn):
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
        if _toSend(conn):
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
            if _corked is not None:
                _corked.append(self)
            elif self._scheduled is None:
                self._scheduled = self.factory._clock.callLater(0, self._scheduledFlush)
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
        size = _toSend(conn)
        if not size:
            return
        try:
            out = conn.bio_read(size)
        except WantReadError:
            return
        if not _EXACT:
            parts = [out]
            try:
                while True:
                    parts.append(conn.bio_read(size))
            except WantReadError:
                out = b"".join(parts)
        sock = self._rawSocket
        transport = self.transport
        if (
            sock is not None
            and not transport.dataBuffer
            and not transport._tempDataLen
            and transport.connected
            and not transport.disconnecting
            and not transport._writeDisconnecting
        ):
            try:
                sent = sock.send(out)
            except BlockingIOError:
                sent = 0
            except OSError:
                # Let Twisted meet the error in its own write path.
                sent = 0
            if sent == len(out):
                return
            out = out[sent:]
        transport.write(out)

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


#: The transports whose socket L{LeanTLSProtocol} may write to directly.
_TCP_TYPES = (tcp.Server, tcp.Client)


def _loadPending() -> tuple[Any, Any, bool]:
    """
    C{(toDecrypt, toSend, exact)}: how many bytes wait in a connection's
    incoming memory BIO (and OpenSSL's buffer) and in its outgoing one, and
    whether those counts are exact. Asking is
    cheaper than the C{WantReadError} an empty read raises, but pyOpenSSL
    has no public call for it, so this uses its cffi bindings (as
    L{pgtls_twisted.tls._contexts} does for the curves list); without them,
    every count is "maybe" and reads go until C{WantReadError}.
    """
    try:
        from OpenSSL._util import ffi, lib

        memData, sslPending, null = lib.BIO_get_mem_data, lib.SSL_pending, ffi.NULL
        SSL.Connection(SSL.Context(SSL.TLS_METHOD), None)._from_ssl  # noqa: B018
    except (ImportError, AttributeError):
        return (lambda conn: 1), (lambda conn: 65536), False

    def toDecrypt(conn: Any) -> int:
        return memData(conn._into_ssl, null) or sslPending(conn._ssl)  # type: ignore[no-any-return]

    def toSend(conn: Any) -> int:
        return memData(conn._from_ssl, null)  # type: ignore[no-any-return]

    return toDecrypt, toSend, True


_toDecrypt, _toSend, _EXACT = _loadPending()


class TLSLayer:
    """
    One per route and leg: a L{TLSMemoryBIOFactory} bound to a connection
    creator (whose context may be swapped by a reload) and a clock.
    """

    def __init__(self, creator: Any, isClient: bool, clock: IReactorTime) -> None:
        self._factory = TLSMemoryBIOFactory(creator, isClient, Factory(), clock=clock)
        self._factory.protocol = LeanTLSProtocol

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
        tls = self._factory.protocol(self._factory, inner)
        tls.leg = outer
        tls.makeConnection(outer.transport)
        outer.dataReceived = tls.dataReceived  # type: ignore[method-assign]
        if received:
            tls.dataReceived(received)
        return tls
