# -*- test-case-name: tests.test_metrics -*-
"""
Serving C{/metrics} over HTTP with twisted.web and prometheus_client's
own Twisted resource, and C{/health} for a load balancer's checks.

C{/health} answers C{200 ok} while the process takes new clients and
C{503 draining} from the moment a graceful shutdown begins (SIGTERM, or
a supervisor's SIGTERM passed to its workers), so that a balancer stops
sending new clients before the listeners close, while the sessions
already open finish (issue 15: rolling deploys).

C{prometheus_client.twisted.MetricsResource} renders in the reactor's
thread pool and imports the global reactor when first imported, which is
why this module is imported only when C{[metrics]} is configured. The
collectors it calls take their snapshot of live objects in the reactor
thread (see L{pgtls_twisted.ops._metrics}).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from pgtls_twisted.app._listening import ListeningService
from pgtls_twisted.config import MetricsConfig


class Health(Resource):
    """C{/health}: 200 while C{healthy()}, else 503 (see the module). Plain text, no caching."""

    isLeaf = True

    def __init__(self, healthy: Callable[[], bool]) -> None:
        super().__init__()
        self._healthy = healthy

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        if self._healthy():
            return b"ok\n"
        request.setResponseCode(503)
        return b"draining\n"

    render_HEAD = render_GET


class MetricsService(ListeningService):
    """
    HTTP C{/metrics} for C{registry} on C{config.bind_address}, and
    C{/health} (L{Health}) as C{healthy} says.
    """

    _log = Logger()

    def __init__(
        self,
        config: MetricsConfig,
        registry: Any,
        reactor: Any,
        healthy: Callable[[], bool] = lambda: True,
    ) -> None:
        self.config = config
        self.registry = registry
        self.reactor = reactor
        self.healthy = healthy

    def _bind(self) -> Any:
        from prometheus_client.twisted import MetricsResource

        root = Resource()
        root.putChild(b"metrics", MetricsResource(registry=self.registry))
        root.putChild(b"health", Health(self.healthy))
        site = Site(root)
        site.noisy = False
        site.log = lambda request: None  # scrapes are not worth a log line each
        port = self.reactor.listenTCP(self.config.port, site, interface=self.config.host)
        address = port.getHost()
        self._log.info(
            "metrics on http://{host}:{port}/metrics", host=address.host, port=address.port
        )
        return port
