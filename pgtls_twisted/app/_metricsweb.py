# -*- test-case-name: tests.test_metrics -*-
"""
Serving C{/metrics} over HTTP with twisted.web and prometheus_client's
own Twisted resource.

C{prometheus_client.twisted.MetricsResource} renders in the reactor's
thread pool and imports the global reactor when first imported, which is
why this module is imported only when C{[metrics]} is configured. The
collectors it calls take their snapshot of live objects in the reactor
thread (see L{pgtls_twisted.ops._metrics}).
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Site

from pgtls_twisted.app._listening import ListeningService
from pgtls_twisted.config import MetricsConfig


class MetricsService(ListeningService):
    """HTTP C{/metrics} for C{registry} on C{config.bind_address}."""

    _log = Logger()

    def __init__(self, config: MetricsConfig, registry: Any, reactor: Any) -> None:
        self.config = config
        self.registry = registry
        self.reactor = reactor

    def _bind(self) -> Any:
        from prometheus_client.twisted import MetricsResource

        root = Resource()
        root.putChild(b"metrics", MetricsResource(registry=self.registry))
        site = Site(root)
        site.noisy = False
        site.log = lambda request: None  # scrapes are not worth a log line each
        port = self.reactor.listenTCP(self.config.port, site, interface=self.config.host)
        address = port.getHost()
        self._log.info(
            "metrics on http://{host}:{port}/metrics", host=address.host, port=address.port
        )
        return port
