# -*- test-case-name: tests.test_unit_peers,tests.test_cluster -*-
"""
Passing CancelRequests to the other instances of a cluster.

libpq sends a CancelRequest on a new connection, and a load balancer in
front of several pgtls instances may send that connection to any of
them. Every key an instance mints carries its C{[cluster] instance}
(L{pgtls_twisted.proxy._cancel}), so the instance that receives a request
for a session it does not have can tell whose it is, and
L{PeerCancels} passes it to that instance's listener (C{[cluster]
peers}) as an ordinary CancelRequest, the way PgBouncer's peering does.
The owner applies it as one of its own (passing it to the right worker
if need be); an unknown or forged key is dropped there, without a reply,
as everywhere.

When the listener the request came on expects a PROXY header, so does
the peer's (the instances share one configuration), and the request is
sent behind a version 2 header that names the original client, so the
peer's log and per-address rules see the client. The peer's
C{proxy_trusted} must then include the instances' own addresses.

A request goes to the instance its key names, which never passes it on
again: the key names that instance itself. Only a misconfigured cluster
(two instances with one number, or a peers list in the wrong order)
could send it round; so an instance also remembers, for L{MEMORY}
seconds, the requests it passed on, and drops one that comes back with a
warning that points at the configuration. That memory holds keyed
digests, not keys, and at most L{MEMORY_SIZE} of them.
"""

from __future__ import annotations

import hashlib
import ipaddress
import secrets
from typing import Any

from twisted.internet import endpoints
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from pgtls_twisted.config import ClusterConfig, parse_address
from pgtls_twisted.protocol import _proxyheader
from pgtls_twisted.protocol import _wire as wire

__all__ = ["MEMORY", "MEMORY_SIZE", "PeerCancels"]

#: How long a request passed to a peer is remembered, in seconds.
MEMORY = 10.0
#: The most requests remembered at once (the oldest are forgotten first).
MEMORY_SIZE = 65536
#: How long connecting to a peer may take.
CONNECT_TIMEOUT = 5.0
#: How long the peer may take to close the connection (it does once it
#: has acted on the request) before this end closes it.
CLOSE_WAIT = 10.0


class PeerCancels:
    """
    Passes CancelRequests whose keys name another instance to it; set as
    L{pgtls_twisted.proxy._cancel.CancelRegistry.toPeer}.

    @ivar cluster: this instance's C{[cluster]}, which says where each
        instance listens (a reload replaces it).
    """

    _log = Logger()

    def __init__(self, reactor: Any, cluster: ClusterConfig) -> None:
        self.reactor = reactor
        self.cluster = cluster
        self._salt = secrets.token_bytes(16)
        #: Digest of a request passed on, to when it may be passed on again.
        self._passed: dict[bytes, float] = {}

    def __call__(
        self, home: int, request: wire.CancelRequest, conn: int, via: Any, client: Any
    ) -> None:
        """
        Pass C{request}, which arrived on connection C{conn} of route
        C{via} from C{client}, to instance C{home}.
        """
        address = self.cluster.peer(home)
        if address is None:
            self._log.info(
                "conn={conn} cancel request for instance {home}, which [cluster] peers"
                " does not list, ignored",
                conn=conn,
                home=home,
            )
            self._count(via, "ignored")
            return
        if not self._remember(request):
            self._log.warn(
                "conn={conn} cancel request for instance {home} came back within {memory:g} s"
                " of being passed on: not passed on again (do the instances have distinct"
                " [cluster] instance numbers and the same peers list?)",
                conn=conn,
                home=home,
                memory=MEMORY,
            )
            self._count(via, "ignored")
            return
        self._log.info(
            "conn={conn} cancel request passed to instance {home} at {address}",
            conn=conn,
            home=home,
            address=address,
        )
        self._count(via, "peer")
        expectsHeader = via is not None and via.config.listener.proxy_protocol
        self._send(home, address, request, client if expectsHeader else _NO_HEADER)

    def _count(self, via: Any, outcome: str) -> None:
        if via is not None:
            via.metrics.cancelRequest(via.name, outcome)

    def _remember(self, request: wire.CancelRequest) -> bool:
        """
        Note that C{request} is passed on now; C{False} if it already was
        within L{MEMORY} seconds.
        """
        now = self.reactor.seconds()
        passed = self._passed
        # Insertion order is expiry order: forget from the front.
        while passed:
            oldest, expiry = next(iter(passed.items()))
            if expiry > now and len(passed) < MEMORY_SIZE:
                break
            del passed[oldest]
        digest = hashlib.blake2b(request.encode(), key=self._salt, digest_size=16).digest()
        if digest in passed:
            return False
        passed[digest] = now + MEMORY
        return True

    def _send(self, home: int, address: str, request: wire.CancelRequest, client: Any) -> None:
        host, port = parse_address(address)
        payload = request.encode()
        factory = Factory.forProtocol(_PassOn)
        factory.clock = self.reactor  # type: ignore[attr-defined]
        factory.payload = payload  # type: ignore[attr-defined]
        factory.client = client  # type: ignore[attr-defined]
        d = _endpoint(self.reactor, host, port).connect(factory)

        def failed(failure: Any) -> None:
            self._log.warn(
                "could not pass a cancel request to instance {home} at {address}: {error}",
                home=home,
                address=address,
                error=failure.getErrorMessage(),
            )

        d.addErrback(failed)


#: Stands for "send no PROXY header" (the client's address may be None).
_NO_HEADER = object()


def _endpoint(reactor: Any, host: str, port: int) -> Any:
    """A TCP endpoint; a name is resolved by Twisted's resolver (a Service name, say)."""
    try:
        version = ipaddress.ip_address(host).version
    except ValueError:
        return endpoints.HostnameEndpoint(reactor, host, port, timeout=CONNECT_TIMEOUT)
    if version == 4:
        return endpoints.TCP4ClientEndpoint(reactor, host, port, timeout=CONNECT_TIMEOUT)
    return endpoints.TCP6ClientEndpoint(reactor, host, port, timeout=CONNECT_TIMEOUT)


class _PassOn(Protocol):
    """
    One request to a peer: the header if any, the request, then wait for
    the peer to close (it has acted), at most L{CLOSE_WAIT} seconds.
    """

    factory: Any
    _timer: Any = None

    def connectionMade(self) -> None:
        factory = self.factory
        self.transport.write(_header(factory.client, self.transport) + factory.payload)
        self._timer = factory.clock.callLater(CLOSE_WAIT, self.transport.abortConnection)

    def dataReceived(self, data: bytes) -> None:
        """A peer answers a CancelRequest with nothing; anything else is ignored."""

    def connectionLost(self, reason: Any = None) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()


def _header(client: Any, transport: Any) -> bytes:
    """
    The PROXY header to send first: none, one naming C{client}, or a LOCAL
    one when the client's address is not an IP address and port.
    """
    if client is _NO_HEADER:
        return b""
    host, port = getattr(client, "host", None), getattr(client, "port", None)
    if isinstance(host, str) and isinstance(port, int):
        peer = transport.getPeer()
        try:
            return _proxyheader.proxy_header((host, port), (peer.host, peer.port))
        except ValueError:
            pass
    return _proxyheader.local_header()
