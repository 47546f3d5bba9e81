# -*- test-case-name: tests.test_proxy -*-
"""
A route: one listener, one backend, and the state they share at run time
(TLS contexts, live clients, limits). L{Route.factory} is what a listening
port serves.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.protocol import Factory

from .cancel import CancelRegistry
from .frontend import ClientProtocol
from .logs import Logger
from .tlsconfig import BackendTLS, ServerTLS
from .tlswrap import TLSLayer

if TYPE_CHECKING:
    from .config import RouteConfig


class Route:
    """
    @ivar clients: the open client connections of this route.
    @ivar cancels: the process-wide registry of minted cancel keys.
    """

    _log = Logger()

    def __init__(self, config: RouteConfig, reactor: Any, cancels: CancelRegistry) -> None:
        self.config = config
        self.name = config.name
        self.reactor = reactor
        self.clock = reactor
        self.cancels = cancels
        self.serverTLS = ServerTLS(config.listener)
        self.clientTLS = TLSLayer(self.serverTLS, False, reactor)
        self.backendCreator = BackendTLS(config.backend)
        self.backendTLS = TLSLayer(self.backendCreator, True, reactor)
        self.clients: set[ClientProtocol] = set()
        self.pools: Any = None
        if config.pool is not None:
            from .pooled import PoolManager

            self.pools = PoolManager(self)

    def factory(self) -> Factory:
        return _RouteFactory(self)

    def clientOpened(self, client: ClientProtocol) -> None:
        self.clients.add(client)

    def clientClosed(self, client: ClientProtocol) -> None:
        self.clients.discard(client)

    def admission(self, client: ClientProtocol) -> tuple[str, str] | None:
        """Whether a client that has sent its StartupMessage may go on."""
        limit = self.config.listener.max_clients
        if len(self.clients) > limit:
            return (
                "53300",
                f'pgtls: sorry, too many clients already on route "{self.name}" (max_clients = {limit})',
            )
        return None

    def startSession(self, client: ClientProtocol, startup: Any) -> None:
        if self.pools is not None:
            from .pooled import PooledSession

            PooledSession(self, client, startup).start()
        else:
            from .session import Session

            Session(self, client, startup).start()

    def reloadCertificates(self, force: bool = False) -> bool:
        """Re-read changed certificate files (all of them with C{force})."""
        listener = self.serverTLS.reload(force)
        backend = self.backendCreator.reload(force)
        return listener or backend


class _RouteFactory(Factory):
    noisy = False

    def __init__(self, route: Route) -> None:
        self.route = route

    def buildProtocol(self, addr: object) -> ClientProtocol:
        return ClientProtocol(self.route)
