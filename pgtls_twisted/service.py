# -*- test-case-name: tests.test_service -*-
"""
Services: what C{twist pgtls}, C{twistd pgtls} and embedding applications
run. L{make_service} builds a L{MultiService} with one L{RouteService}
(listener plus certificate refresh) per configured route.
"""

from __future__ import annotations

from typing import Any

from twisted.application.internet import TimerService
from twisted.application.service import MultiService, Service
from twisted.internet import defer

from .cancel import CancelRegistry
from .config import Config
from .logs import Logger
from .route import Route


class RouteService(Service):
    """
    Listens for one route.

    Like L{twisted.application.internet.TCPServer}, it binds in
    C{privilegedStartService} (so C{twistd} can bind before dropping
    privileges), but it keeps the listening port public: tests and
    embedders bind port 0 and need to know what they got.

    @ivar port: the L{IListeningPort} while running.
    """

    _log = Logger()

    def __init__(self, route: Route, reactor: Any) -> None:
        self.route = route
        self.name = route.name
        self._reactor = reactor
        self.port: Any = None

    def privilegedStartService(self) -> None:
        self._listen()
        super().privilegedStartService()

    def startService(self) -> None:
        self._listen()
        super().startService()

    def _listen(self) -> None:
        if self.port is not None:
            return
        listener = self.route.config.listener
        self.port = self._reactor.listenTCP(
            listener.port, self.route.factory(), interface=listener.host
        )
        address = self.port.getHost()
        backend = self.route.config.backend
        self._log.info(
            "route={route} listening on {host}:{port} -> backend {backend} (backend.tls={mode})",
            route=self.name,
            host=address.host,
            port=address.port,
            backend=f"{backend.host}:{backend.port}",
            mode=backend.tls,
        )

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        if self.route.pools is not None:
            self.route.pools.close()
        port, self.port = self.port, None
        if port is None:
            return defer.succeed(None)
        return defer.maybeDeferred(port.stopListening)


_log = Logger()


def make_service(config: Config, reactor: Any = None) -> MultiService:
    """
    Build the service tree for C{config}: one L{RouteService} and one
    certificate-refresh timer per route. TLS contexts are built here, so a
    certificate that cannot be used fails before anything binds.

    @param reactor: defaults to the global reactor, imported only now so
        that embedding applications and C{twist --reactor} choose it first.
    """
    if reactor is None:
        from twisted.internet import reactor as _reactor

        reactor = _reactor
    top = MultiService()
    cancels = CancelRegistry()
    top.cancels = cancels  # type: ignore[attr-defined]
    for routeConfig in config.routes:
        route = Route(routeConfig, reactor, cancels)
        service = RouteService(route, reactor)
        service.setServiceParent(top)
        refresh = TimerService(routeConfig.listener.cert_refresh_interval, route.reloadCertificates)
        refresh.clock = reactor
        refresh.setServiceParent(top)
        if route.pools is not None:
            pool = routeConfig.pool
            if pool.password_source == "literal":
                _log.warn(
                    "route={route}: pool.service_password is written in the configuration file; "
                    "prefer service_password_file or service_password_env",
                    route=route.name,
                )
            interval = max(0.5, min(30.0, pool.idle_timeout / 4))
            reaper = TimerService(interval, route.pools.reap)
            reaper.clock = reactor
            reaper.setServiceParent(top)
    return top


def route_services(top: MultiService) -> list[RouteService]:
    """The route services of a tree built by L{make_service}, in order."""
    return [s for s in top if isinstance(s, RouteService)]


def reload_certificates(top: MultiService) -> None:
    """Re-read every route's certificate, key, CA and CRL files now."""
    for service in route_services(top):
        service.route.reloadCertificates(force=True)
