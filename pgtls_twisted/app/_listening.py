# -*- test-case-name: tests.test_reload,tests.test_metrics -*-
"""
Services that own a listening socket: the base of route listeners and of
the metrics endpoint, a route's listener, and how every listener binds
(C{SO_REUSEPORT}).
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger

from pgtls_twisted.proxy._route import Route


class ListeningService(Service):
    """
    A service that owns one listening port.

    Like L{twisted.application.internet.TCPServer}, it binds in
    C{privilegedStartService} (so C{twistd} can bind before dropping
    privileges), but it keeps the listening port public: tests and
    embedders bind port 0 and need to know what they got.

    @ivar port: the L{IListeningPort} while running.
    """

    port: Any = None

    def privilegedStartService(self) -> None:
        self._listen()
        super().privilegedStartService()

    def startService(self) -> None:
        self._listen()
        super().startService()

    def _listen(self) -> None:
        if self.port is None:
            self.port = self._bind()

    def _bind(self) -> Any:
        """Start listening; return the port."""
        raise NotImplementedError

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        port, self.port = self.port, None
        if port is None:
            return defer.succeed(None)
        return defer.maybeDeferred(port.stopListening)


def listen_reuseport(reactor: Any, host: str, port: int, factory: Any, backlog: int = 128) -> Any:
    """
    Listen on C{host:port} with C{SO_REUSEPORT}: Twisted's C{listenTCP}
    has no such option (twisted#9101), so the socket is made here and
    adopted (C{adoptStreamPort} dups it; ours is closed).
    """
    from twisted.internet.error import CannotListenError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
        return reactor.adoptStreamPort(sock.fileno(), family, factory)
    except OSError as e:
        raise CannotListenError(host, port, e) from None
    finally:
        sock.close()


class RouteService(ListeningService):
    """
    Listens for one route.

    It binds with C{SO_REUSEPORT}, so that every worker process has a
    listening socket of its own on the same port, and a new pgtls can
    start on the ports of one that is draining (a deploy that drops no
    session). The kernel only lets processes of the same user share a
    port.
    """

    _log = Logger()

    def __init__(self, route: Route, reactor: Any) -> None:
        self.route = route
        self.name = route.name
        self._reactor = reactor

    def _bind(self) -> Any:
        listener = self.route.config.listener
        port = listen_reuseport(self._reactor, listener.host, listener.port, self.route.factory())
        self.route.port = port
        address = port.getHost()
        backend = self.route.config.backend
        self._log.info(
            "route={route} listening on {host}:{port} -> backend {backend} (backend.tls={mode})",
            route=self.name,
            host=address.host,
            port=address.port,
            backend=f"{backend.host}:{backend.port}",
            mode=backend.tls,
        )
        return port

    def serve(self, route: Route) -> None:
        """Hand new connections on the same socket to C{route} (a reload)."""
        old, self.route = self.route, route
        self.name = route.name
        old.port = None
        route.port = self.port
        if self.port is not None:
            self.port.factory = route.factory()

    def stopService(self) -> defer.Deferred[None]:
        self.route.port = None
        if self.port is not None:
            accept_queued(self.port)
        return super().stopService()


#: More than any accept queue holds (Linux caps a listen backlog at
#: C{net.core.somaxconn}, 4096 by default).
_ACCEPT_ALL = 65536


def accept_queued(port: Any) -> None:
    """
    Accept every connection the kernel has completed on C{port} (a
    listening Twisted TCP port about to stop listening), then shut its
    socket down so that it completes no more.

    Twisted closes a port on the reactor's next turn, and Linux resets the
    connections still in the accept queue of a listening socket it closes:
    connections whose connect had succeeded, which a load balancer has
    already handed a client (and so cannot retry elsewhere). A connect
    after the shutdown is refused, which a balancer retries on another
    instance (HAProxy's C{retries} with C{option redispatch}). What this
    accepts is served as the sessions open when the drain began.
    """
    if not getattr(port, "connected", False) or getattr(port, "disconnecting", False):
        return
    # doRead accepts up to numberAccepts (Twisted adapts it to the traffic:
    # as few as one), and stops early when the queue is empty.
    port.numberAccepts = max(port.numberAccepts, _ACCEPT_ALL)
    port.doRead()
    try:
        port.socket.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # not connected (never was, or already shut): nothing queued either
