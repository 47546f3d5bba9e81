# -*- test-case-name: tests.test_proxy,tests.test_commands -*-
"""
The byte pump: after startup, a pass-through session is two streams of
bytes, copied without parsing, with flow control both ways.

This is the hot path. Each received chunk costs one call here and one
write; nothing is framed, copied or logged per message.

Flow control is portforward's mutual producer registration, with one
change: the producer registered with each side is the other leg's
L{ReadingValve<pgtls_twisted.proxy._leg.ReadingValve>}, which pauses and
resumes that leg's reading but ignores C{stopProducing}. Twisted
calls C{stopProducing} on a registered producer when the consumer's
connection is lost, which would close the other TCP connection underneath
its TLS layer (no close_notify, and no chance to tell the client why).
Teardown is L{Pump.stop}'s job instead.
"""

from __future__ import annotations

from typing import Any

from pgtls_twisted.proxy._stats import ConnectionStats

#: A ReadyForQuery message's type and length.
_READY_HEADER = b"Z\x00\x00\x00\x05"


class Pump:
    """
    Join a client leg and a server leg.

    Each leg exposes C{out} (its application-level transport: TLS or TCP),
    C{transport} (the TCP connection) and C{deliver} (where its received
    application bytes go), as L{pgtls_twisted.proxy._frontend.ClientProtocol} and
    L{pgtls_twisted.proxy._backend.ServerProtocol} do.

    @ivar stats: counts C{bytes_in} (client to server) and C{bytes_out}.
    @ivar tail: the last six bytes the server sent (L{atReady}).
    """

    def __init__(self, client: Any, server: Any, stats: ConnectionStats) -> None:
        self.client = client
        self.server = server
        self.stats = stats
        # A pump starts right after the ReadyForQuery that ended the startup.
        self.tail = _READY_HEADER + b"I"

    def atReady(self) -> bool:
        """
        Whether the last bytes the server sent ended with a ReadyForQuery,
        so the proxy may speak to the client without cutting a message (a
        shutdown's FATAL). A row whose data happens to end in the same six
        bytes would fool it; that costs one garbled goodbye on a
        connection being closed anyway, while framing every message would
        cost every chunk.
        """
        tail = self.tail
        return len(tail) == 6 and tail[:5] == _READY_HEADER and tail[5:] in (b"I", b"T", b"E")

    def start(self) -> None:
        client, server = self.client, self.server
        toServer, toClient = server.out.write, client.out.write
        stats = self.stats

        def fromClient(data: bytes) -> None:
            stats.bytes_in += len(data)
            toServer(data)

        def fromServer(data: bytes) -> None:
            stats.bytes_out += len(data)
            tail = data[-6:]
            # A ReadyForQuery may arrive split over two reads.
            self.tail = tail if len(tail) == 6 else (self.tail + tail)[-6:]
            toClient(data)

        client.deliver = fromClient
        server.deliver = fromServer
        join(client, server)
        client.resumeReading()
        server.resumeReading()


def join(client: Any, server: Any) -> None:
    """
    Flow control between two legs: each one's backlog pauses the other's
    reading. The valves are made once per pair of legs and kept on them.
    """
    toClient, toServer = server.valve, client.valve
    client.producer = toClient
    client.out.registerProducer(toClient, True)
    server.producer = toServer
    server.out.registerProducer(toServer, True)


def separate(client: Any, server: Any) -> None:
    """
    Undo L{join} (a pooled server going back to its pool), leaving both
    sockets reading: a paused one would not notice its peer closing.
    """
    for leg in (client, server):
        leg.producer = None
        leg.out.unregisterProducer()
        if leg.readingPaused:
            leg.resumeReading()
