"""
A TCP load balancer for tests of several pgtls instances, in the test's
own reactor (Twisted's port forwarder, L{twisted.protocols.portforward},
with a choice of target per connection): each connection goes to the
port L{Balancer.target} names at the time it is accepted, behind a PROXY
protocol v2 header naming the client when L{Balancer.proxy} is set (as
HAProxy's C{send-proxy-v2}).

The test decides where each connection lands, so "a cancel request that
the balancer sends to the other instance" happens every time, not half
of the time as behind a round-robin balancer. Real clients connect to it
as they would to HAProxy; but not psycopg's C{cancel()}, which holds the
GIL while libpq's PQcancel waits and so would freeze this balancer (and an
in-process pgtls): use C{cancel_safe()}, or psql's Ctrl-C from a process of
its own, for libpq's plaintext cancel.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor as _reactor
from twisted.protocols import portforward

from support.proxyheader import v2_header


class _ToInstance(portforward.ProxyClient):
    def connectionMade(self) -> None:
        if self.header:
            self.transport.write(self.header)
        super().connectionMade()


class _ToInstanceFactory(portforward.ProxyClientFactory):
    protocol = _ToInstance
    header = b""

    def buildProtocol(self, addr: Any) -> Any:
        protocol = super().buildProtocol(addr)
        protocol.header = self.header
        return protocol


class _FromClient(portforward.ProxyServer):
    clientProtocolFactory = _ToInstanceFactory

    def connectionMade(self) -> None:
        # ProxyServer's own, with the target chosen now and a header.
        self.transport.pauseProducing()
        balancer: SteeredBalancer = self.factory.balancer
        target = balancer.target
        balancer.routed.append(target)
        peer = self.transport.getPeer()
        balancer.clients.append(peer.port)
        client = self.clientProtocolFactory()
        if balancer.proxy:
            client.header = v2_header((peer.host, peer.port), ("127.0.0.1", target))
        client.setServer(self)
        balancer.reactor.connectTCP("127.0.0.1", target, client)


class SteeredBalancer:
    """
    Listens on 127.0.0.1 (L{port}); sends each connection to
    127.0.0.1:L{target}.

    @ivar routed: the target of every connection so far, in order.
    @ivar clients: the client's port of every connection so far, in order.
    """

    def __init__(self, target: int, proxy: bool = False, reactor: Any = None) -> None:
        self.target = target
        self.proxy = proxy
        self.routed: list[int] = []
        self.clients: list[int] = []
        self.reactor = reactor if reactor is not None else _reactor
        factory = portforward.ProxyFactory("127.0.0.1", target)
        factory.protocol = _FromClient
        factory.balancer = self  # type: ignore[attr-defined]
        self._port = self.reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.port: int = self._port.getHost().port

    def close(self) -> Any:
        return self._port.stopListening()
