# -*- test-case-name: tests.test_relay,tests.test_proxy -*-
"""
The relay: a pass-through session's steady state, without Twisted's
protocol and transport layers.

After its first ReadyForQuery a pass-through session is two streams of
bytes (L{pgtls_twisted.proxy._pump}). The byte pump carries them through
Twisted's TCP transports and L{LeanTLSProtocol
<pgtls_twisted.tls._lean.LeanTLSProtocol>}, which costs about 150 Python
calls per transaction, most of them pyOpenSSL's checks around each OpenSSL
call and Twisted's buffering and producers. A L{Relay} takes both sockets
from their transports once the pump has run dry, registers itself with the
reactor as their reader and writer (C{IReactorFDSet.addReader} and
C{addWriter}), and on each readable event runs one loop: C{recv_into} a
preallocated buffer, C{BIO_write} into the TLS session's incoming memory
BIO, C{SSL_read} record by record until OpenSSL has nothing left (asking
C{SSL_pending} and the BIO, not reading once more into an error), and
C{SSL_write} on the other leg, whose outgoing BIO is sent at once. A
plaintext leg is C{recv_into} and C{send}. The measured floor of this
design is in C{../shared/reference/perf-floor.md} and C{bench/results}.

B{Memory BIOs, not socket BIOs.} The TLS sessions keep the memory BIOs
their handshake ran on. Moving a live pyOpenSSL connection to C{SSL_set_fd}
frees BIOs that pyOpenSSL and Twisted's TLS protocol still point to, and is
safe only with both BIOs empty and Twisted's send buffer drained; the
relay hands the session back to that protocol to close it (below), which
would then write through freed memory. The experiment measured 24.4
against 22.9 µs per transaction for the two, outside Twisted: most of the
gain is in calling OpenSSL directly, which memory BIOs allow too.

B{Flow control.} A leg's socket that does not take everything
(C{EAGAIN}) keeps the rest in that leg's L{_End.out} and is watched for
writability; meanwhile the other leg is not read, and whatever it already
sent waits undecrypted in its incoming BIO (at most one C{recv}). Each
direction holds at most one read's worth of bytes.

B{TLS 1.3 after the handshake.} NewSessionTicket and KeyUpdate arrive
inside C{SSL_read}; a KeyUpdate that asks for a reply makes OpenSSL
write, so a leg's outgoing BIO is flushed after every read, in order
with what the other leg sends it. A peer's close_notify, a TLS error, the
peer's FIN or a socket error end the relay: see below.

B{Ownership.} The relay owns the sockets only while the session runs.
L{Relay.stop} (called by the session, or by a leg about to be closed,
failed or aborted: C{Leg.handBack}) hands both back: bytes not yet sent go
to the TCP transport's own buffer, the transports read again, and the
session closes its legs as it always has (TLS close_notify, the close
timeout, the close reason and log line). A FIN or a socket error is left
for Twisted to find on its next read; a close_notify or a TLS error is
given to the leg's TLS protocol (C{peerClosed}, C{failed}).

B{Dispatch.} On pgtls's own reactor (L{pgtls_twisted.app._reactor}) the
reactor calls an end's C{doRead} and C{doWrite} itself, without Twisted's
log context layers; on any other it is an ordinary descriptor.

The names of OpenSSL's binding, pyOpenSSL and Twisted this relies on are
in L{pgtls_twisted.tls._private} (feature C{RELAY}); without them, or when
a leg is not a TCP connection with the lean TLS protocol (tests' in-memory
transports), sessions keep the pump.
"""

from __future__ import annotations

from typing import Any

from OpenSSL.SSL import Error as TLSError
from twisted.internet.interfaces import IReactorFDSet, IReadDescriptor, IWriteDescriptor
from twisted.python.failure import Failure
from zope.interface import implementer

from pgtls_twisted.proxy._stats import ConnectionStats
from pgtls_twisted.tls import _private
from pgtls_twisted.tls._private import idleSocket, isTCP, opensslFFI, opensslLib

#: The most one C{recv} takes from a socket.
READ_SIZE = 2**16
#: The most one C{SSL_read} gives: one TLS record's plaintext.
RECORD_SIZE = 2**14

#: A ReadyForQuery message's type and length.
_READY_HEADER = b"Z\x00\x00\x00\x05"

# The buffers every relay shares: the reactor runs one event at a time,
# and nothing is kept in them between events (what must wait is copied to
# an end's C{out}), so a session costs no buffer of its own while idle.
_raw = bytearray(READ_SIZE)
_plain = bytearray(RECORD_SIZE)
_sealed = bytearray(READ_SIZE)
_rawView = memoryview(_raw)
_plainView = memoryview(_plain)
_sealedView = memoryview(_sealed)
if opensslFFI is not None and hasattr(opensslFFI, "from_buffer"):
    _rawPtr: Any = opensslFFI.from_buffer(_raw)
    _plainPtr: Any = opensslFFI.from_buffer(_plain)
    _sealedPtr: Any = opensslFFI.from_buffer(_sealed)


def possible(client: Any, server: Any, reactor: object) -> bool:
    """
    Whether a relay could ever take these legs over: the private names
    are there, the reactor lets descriptors be added, and each leg is a
    TCP connection (with the lean TLS protocol, when TLS). Whether it can
    I{now} is L{takeOver}'s question.
    """
    return legPossible(client, reactor) and legPossible(server, reactor)


def legPossible(leg: Any, reactor: object) -> bool:
    """L{possible} for one leg (a direct leg's question too: L{pgtls_twisted.proxy._direct})."""
    if not IReactorFDSet.providedBy(reactor) or not _private.verdict().relay:
        return False
    return isTCP(leg.transport) and (leg.tls is None or hasattr(leg.tls, "quiescentConnection"))


def quietSocket(leg: Any) -> tuple[Any, Any] | None:
    """
    A leg's socket and TLS connection (C{None} for plaintext) if its
    transport holds nothing and its TLS protocol is quiescent, for a relay
    or a direct leg to take over; C{None} when not, yet.
    """
    sock = idleSocket(leg.transport)
    if sock is None:
        return None
    conn = None
    if leg.tls is not None:
        conn = leg.tls.quiescentConnection()
        if conn is None:
            return None
    return sock, conn


def handOverTLSEnd(stop: Any, leg: Any, error: int) -> None:
    """
    C{SSL_read} or C{SSL_write} failed on C{leg}, which a relay or a direct
    leg runs: hand the sockets back (C{stop}), and give the leg's TLS
    protocol the close_notify or the error.
    """
    stop()
    tls = leg.tls
    if error == opensslLib.SSL_ERROR_ZERO_RETURN:
        tls.peerClosed()
    else:
        tls.failed(Failure(TLSError(f"TLS error (SSL_get_error {error})")))


def takeOver(
    client: Any,
    server: Any,
    stats: ConnectionStats,
    reactor: Any,
    tail: bytes,
) -> Relay | None:
    """
    Start a L{Relay} on two legs if both are in plain steady state (see
    L{possible} for whether they ever can be): open, nothing queued in
    their transports or TLS protocols. C{None} when not, yet.

    @param tail: the last bytes the server sent (for L{Relay.atReady}).
    """
    ends = []
    for leg in (client, server):
        quiet = quietSocket(leg)
        if quiet is None:
            return None
        ends.append((leg, *quiet))
    relay = Relay(reactor, stats, tail)
    relay.start(*ends)
    return relay


@implementer(IReadDescriptor, IWriteDescriptor)
class _End:
    """
    One leg's socket, as the reactor sees it while the relay runs.

    @ivar out: bytes for this socket the kernel has not taken yet.
    @ivar stalled: this socket is not read until the other end's C{out}
        is sent.
    """

    __slots__ = (
        "relay",
        "leg",
        "sock",
        "fd",
        "ssl",
        "rbio",
        "wbio",
        "out",
        "peer",
        "stalled",
        "fromServer",
    )

    def __init__(self, relay: Relay, leg: Any, sock: Any, conn: Any, fromServer: bool) -> None:
        self.relay = relay
        self.leg = leg
        self.sock = sock
        self.fd = sock.fileno()
        self.ssl = self.rbio = self.wbio = None
        if conn is not None:
            self.ssl, self.rbio, self.wbio = conn._ssl, conn._into_ssl, conn._from_ssl
        self.out = bytearray()
        self.peer: _End = self
        self.stalled = False
        self.fromServer = fromServer

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:
        return "pgtls relay"

    def connectionLost(self, reason: Failure) -> None:
        """
        The reactor drops this descriptor: an exception escaped C{doRead}
        or C{doWrite}, or the reactor is stopping. Hand back, and let the
        transport close as it would have.
        """
        self.relay.stop()
        self.leg.transport.connectionLost(reason)

    # -- reading ----------------------------------------------------------------

    def doRead(self) -> None:
        try:
            n = self.sock.recv_into(_raw)
        except BlockingIOError:
            return
        except OSError:
            self.relay.stop()  # Twisted's own read meets the error
            return
        if not n:
            self.relay.stop()  # and the FIN
            return
        if self.ssl is None:
            self._count(_rawView, n)
            peer = self.peer
            if peer.ssl is None:
                peer.send(_rawView[:n])
            else:
                peer.seal(_rawPtr, n)
            if peer.out and self.relay.running:
                self.stall()
            return
        opensslLib.BIO_write(self.rbio, _rawPtr, n)
        self.decrypt()

    def decrypt(self) -> None:
        """
        Decrypt what the incoming BIO holds and send it on, until the other
        end is full. The hot path: counting is inline, and so is most of
        L{seal}, a Python call being dearer than most of what it does.
        """
        lib = opensslLib
        ssl, rbio, peer, relay = self.ssl, self.rbio, self.peer, self.relay
        null = opensslFFI.NULL
        stats, fromServer, plainPeer = relay.stats, self.fromServer, peer.ssl is None
        while not peer.out:
            n = lib.SSL_read(ssl, _plainPtr, RECORD_SIZE)
            if n <= 0:
                error = lib.SSL_get_error(ssl, n)
                lib.ERR_clear_error()
                if error == lib.SSL_ERROR_WANT_READ:
                    break
                relay.tlsEnded(self, error)
                return
            if fromServer:
                stats.bytes_out += n
                relay.tail = (
                    bytes(_plainView[n - 6 : n])
                    if n >= 6
                    else (relay.tail + bytes(_plainView[:n]))[-6:]
                )
            else:
                stats.bytes_in += n
            if plainPeer:
                peer.send(_plainView[:n])
            else:
                peer.seal(_plainPtr, n)
            if not relay.running:
                return
            if not lib.SSL_pending(ssl) and not lib.BIO_get_mem_data(rbio, null):
                break
        # Reading may have made OpenSSL write (a KeyUpdate's reply).
        if lib.BIO_get_mem_data(self.wbio, null):
            self.flush()
        if peer.out and relay.running:
            self.stall()

    def _count(self, view: memoryview, n: int) -> None:
        """Count C{n} bytes read from this end (L{decrypt} does the same inline)."""
        stats = self.relay.stats
        if not self.fromServer:
            stats.bytes_in += n
            return
        stats.bytes_out += n
        relay = self.relay
        relay.tail = bytes(view[n - 6 : n]) if n >= 6 else (relay.tail + bytes(view[:n]))[-6:]

    def stall(self) -> None:
        self.stalled = True
        self.relay.reactor.removeReader(self)

    # -- writing ----------------------------------------------------------------

    def seal(self, pointer: Any, n: int) -> None:
        """
        Encrypt C{n} bytes of a shared buffer for this (TLS) end, and send
        them. pyOpenSSL's contexts enable partial writes, so one
        C{SSL_write} may take only a record's worth: loop. What the common
        case needs of L{flush} and L{send} is inline.
        """
        lib, ssl = opensslLib, self.ssl
        done = lib.SSL_write(ssl, pointer, n)
        while 0 < done < n:
            more = lib.SSL_write(ssl, pointer + done, n - done)
            if more <= 0:
                done = more
                break
            done += more
        if done <= 0:
            error = lib.SSL_get_error(ssl, done)
            lib.ERR_clear_error()
            self.relay.tlsEnded(self, error)
            return
        wbio = self.wbio
        size = lib.BIO_get_mem_data(wbio, opensslFFI.NULL)
        if self.out or not 0 < size <= READ_SIZE:
            self.flush()
            return
        sealed = lib.BIO_read(wbio, _sealedPtr, size)
        if sealed != size:
            if sealed > 0:
                self.send(_sealedView[:sealed])
            else:
                lib.ERR_clear_error()
            self.flush()
            return
        try:
            sent = self.sock.send(_sealedView[:size])
        except BlockingIOError:
            sent = 0
        except OSError:
            self.relay.stop()  # the peer is gone: Twisted finds out on its next read
            return
        if sent < size:
            self.out += _sealedView[sent:size]
            self.relay.reactor.addWriter(self)

    def flush(self) -> None:
        """Send what OpenSSL wrote into the outgoing BIO."""
        lib, wbio, null = opensslLib, self.wbio, opensslFFI.NULL
        size = lib.BIO_get_mem_data(wbio, null)
        while size > 0:
            n = lib.BIO_read(wbio, _sealedPtr, min(size, READ_SIZE))
            if n <= 0:
                lib.ERR_clear_error()
                return
            self.send(_sealedView[:n])
            size -= n

    def send(self, data: memoryview) -> None:
        """Send bytes on this socket, keeping what the kernel does not take."""
        if not self.relay.running:
            return
        out = self.out
        if out:
            out += data
            return
        try:
            sent = self.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            # The peer is gone: Twisted finds out on its next read.
            self.relay.stop()
            return
        if sent < len(data):
            out += data[sent:]
            self.relay.reactor.addWriter(self)

    def doWrite(self) -> None:
        if not self.relay.running:
            return  # handed back during this event's read: the transport has it all
        out = self.out
        try:
            sent = self.sock.send(out)
        except BlockingIOError:
            return
        except OSError:
            self.relay.stop()
            return
        del out[:sent]
        if out:
            return
        relay = self.relay
        relay.reactor.removeWriter(self)
        source = self.peer
        if source.stalled:
            source.stalled = False
            if source.ssl is not None:
                source.decrypt()
                if source.stalled or not relay.running:
                    return
            relay.reactor.addReader(source)


# Dispatched by pgtls's reactor without Twisted's log context layers.
_private.SHORT_DISPATCH_TYPES.add(_End)


class Relay:
    """
    Both legs of one pass-through session, after startup (see the module).

    @ivar running: the relay owns the sockets.
    @ivar tail: the last six bytes the server sent (L{atReady}).
    """

    def __init__(self, reactor: Any, stats: ConnectionStats, tail: bytes) -> None:
        self.reactor = reactor
        self.stats = stats
        self.tail = tail
        self.running = False
        self.ends: tuple[_End, ...] = ()

    def start(self, client: tuple[Any, Any, Any], server: tuple[Any, Any, Any]) -> None:
        """Take the sockets from the transports: C{(leg, socket, SSL.Connection or None)} each."""
        one = _End(self, *client, fromServer=False)
        other = _End(self, *server, fromServer=True)
        one.peer, other.peer = other, one
        self.ends = (one, other)
        self.running = True
        reactor = self.reactor
        for end in self.ends:
            transport = end.leg.transport
            reactor.removeReader(transport)
            reactor.removeWriter(transport)
            end.leg.handBack = self.stop
        for end in self.ends:
            reactor.addReader(end)
        # A record the TLS protocol had only part of goes on from the BIO.
        for end in self.ends:
            if end.ssl is not None and self.running and not end.stalled:
                end.decrypt()

    def atReady(self) -> bool:
        """As L{Pump.atReady<pgtls_twisted.proxy._pump.Pump.atReady>}."""
        tail = self.tail
        return len(tail) == 6 and tail[:5] == _READY_HEADER and tail[5:] in (b"I", b"T", b"E")

    def stop(self) -> None:
        """Hand both sockets back to their transports (see the module)."""
        if not self.running:
            return
        self.running = False
        reactor = self.reactor
        for end in self.ends:
            reactor.removeReader(end)
            reactor.removeWriter(end)
        for end in self.ends:
            leg = end.leg
            leg.handBack = None
            transport = leg.transport
            if end.out:
                data = bytes(end.out)
                end.out.clear()
                transport.write(data)
            if transport.connected:
                transport.startReading()

    def tlsEnded(self, end: _End, error: int) -> None:
        """C{SSL_read} or C{SSL_write} failed on C{end}: its TLS protocol takes it from here."""
        handOverTLSEnd(self.stop, end.leg, error)
