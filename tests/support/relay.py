"""
A TCP relay that is slow to open connections, on the test's reactor.

Put between pgtls and a backend, it makes every new backend connection take
C{delay} seconds longer to establish; once both ends are up, bytes are piped
as they come, with flow control both ways. That widens the windows that open
while pgtls connects to the backend (a forwarded CancelRequest, a pool
growing) from a few milliseconds to whatever a test needs.

Setting L{SlowRelay.upstream_delay} also delays every chunk sent to the
backend on connections accepted from then on (and only those), as a slow
network path for new connections would: established connections keep
their speed.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import protocol


class _Pipe(protocol.Protocol):
    peer: _Pipe | None = None

    def dataReceived(self, data: bytes) -> None:
        assert self.peer is not None
        self.peer.transport.write(data)

    def connectionLost(self, reason: Any = None) -> None:
        peer, self.peer = self.peer, None
        if peer is not None:
            peer.peer = None
            peer.transport.loseConnection()


class _Upstream(_Pipe):
    def connectionMade(self) -> None:
        downstream = self.factory.downstream
        if downstream.transport.disconnected:
            self.transport.loseConnection()
            return
        self.peer, downstream.peer = downstream, self
        if downstream.early:
            early, downstream.early = downstream.early, b""
            downstream.dataReceived(early)
        self.transport.registerProducer(downstream.transport, True)
        downstream.transport.registerProducer(self.transport, True)
        downstream.transport.resumeProducing()


class _UpstreamFactory(protocol.ClientFactory):
    protocol = _Upstream
    noisy = False

    def __init__(self, downstream: _Downstream) -> None:
        self.downstream = downstream

    def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
        self.downstream.transport.loseConnection()


class _Downstream(_Pipe):
    def connectionMade(self) -> None:
        relay: SlowRelay = self.factory.relay
        relay.accepted += 1
        self.upstreamDelay = relay.upstream_delay
        #: Read despite the pause: an epoll event of the same poll for an
        #: earlier socket whose descriptor number this one reuses is
        #: dispatched to this one (Twisted's epoll reactor). Sent on connect.
        self.early = b""
        self.transport.pauseProducing()
        relay.reactor.callLater(relay.delay, self._connect)

    def dataReceived(self, data: bytes) -> None:
        if self.peer is None:
            self.early += data
            return
        if not self.upstreamDelay:
            super().dataReceived(data)
            return
        relay: SlowRelay = self.factory.relay
        relay.reactor.callLater(self.upstreamDelay, self._late, data)

    def _late(self, data: bytes) -> None:
        if self.peer is not None:
            self.peer.transport.write(data)

    def connectionLost(self, reason: Any = None) -> None:
        if self.upstreamDelay and self.peer is not None:
            # The close travels behind the delayed bytes, as a FIN would.
            relay: SlowRelay = self.factory.relay
            relay.reactor.callLater(self.upstreamDelay, super().connectionLost, reason)
            return
        super().connectionLost(reason)

    def _connect(self) -> None:
        relay: SlowRelay = self.factory.relay
        if self.transport.disconnected:
            return
        relay.reactor.connectTCP(relay.host, relay.port, _UpstreamFactory(self))


class SlowRelay:
    """
    Listen on 127.0.0.1 (an ephemeral port) and relay to C{host:port},
    C{delay} seconds after each connection is accepted.

    @ivar accepted: how many connections were accepted so far.
    @ivar upstream_delay: seconds each chunk to the backend is held, on
        connections accepted while it is set.
    """

    def __init__(self, reactor: Any, host: str, port: int, delay: float) -> None:
        self.reactor = reactor
        self.host = host
        self.port = port
        self.delay = delay
        self.accepted = 0
        self.upstream_delay = 0.0
        factory = protocol.Factory.forProtocol(_Downstream)
        factory.noisy = False
        factory.relay = self  # type: ignore[attr-defined]
        self.listening = reactor.listenTCP(0, factory, interface="127.0.0.1")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.listening.getHost().port}"

    def stop(self) -> Any:
        return self.listening.stopListening()
