"""
Running pgtls inside the test process, on the real reactor that
pytest-twisted spins, in front of the suite's real PostgreSQL clusters.

Clients are real (psycopg, psql) and blocking, so tests run them with
L{deferToThread} or as subprocesses; never call one directly from a test
that needs the proxy to answer, or the reactor (and the proxy) stops.
"""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pgtls_twisted.app._service import make_service, route_services
from pgtls_twisted.config import load_config, parse_config
from pgtls_twisted.testing.cluster import PostgresCluster
from pgtls_twisted.testing.pki import PKI
from support.dsn import dsn


def route(
    pki: PKI,
    cluster: PostgresCluster,
    *,
    name: str = "app",
    listener: dict[str, Any] | None = None,
    backend: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One [[proxy]] table: listener on an ephemeral loopback port."""
    table: dict[str, Any] = {
        "name": name,
        "listener": {
            "bind_address": "127.0.0.1:0",
            "server_cert": str(pki.cert("server")),
            "server_key": str(pki.key("server")),
        },
        "backend": {
            "address": f"{cluster.host}:{cluster.port}",
            "tls": "verify-full" if cluster.ssl else "disable",
            "server_name": "localhost",
        },
    }
    if cluster.ssl:
        table["backend"]["root_ca"] = str(pki.cert("ca"))
    table["listener"].update(listener or {})
    table["backend"].update(backend or {})
    return table


@dataclass
class RunningProxy:
    service: Any
    config: Any

    def port(self, name: str | None = None) -> int:
        for svc in route_services(self.service):
            if name is None or svc.name == name:
                return int(svc.port.getHost().port)
        raise KeyError(name)

    def route(self, name: str | None = None) -> Any:
        for svc in route_services(self.service):
            if name is None or svc.name == name:
                return svc.route
        raise KeyError(name)

    def dsn(self, name: str | None = None, **params: Any) -> str:
        """A connection string to route C{name} (L{support.dsn.dsn}) with C{params}."""
        return dsn(self.port(name), **params)

    async def stop(self) -> None:
        from twisted.internet import defer

        await defer.maybeDeferred(self.service.stopService)
        # Close whatever sessions are still open, so tests do not leak
        # connections into each other.
        for svc in route_services(self.service):
            for client in list(svc.route.clients):
                client.transport.abortConnection()


def start_proxy(routes: list[dict[str, Any]], base_dir: Path, **top: Any) -> RunningProxy:
    # Tests stop the proxy at once unless they test the drain itself.
    data = {"proxy": copy.deepcopy(routes), "shutdown_timeout": "0s", **top}
    config = parse_config(data, base_dir=base_dir)
    service = make_service(config)
    service.startService()
    return RunningProxy(service, config)


@asynccontextmanager
async def running(
    tmp_path: Path, routes: list[dict[str, Any]], **top: Any
) -> AsyncIterator[RunningProxy]:
    """The proxy for C{routes} (and top-level keys C{top}), stopped on exit."""
    proxy = start_proxy(routes, tmp_path, **top)
    try:
        yield proxy
    finally:
        await proxy.stop()


def start_from_file(path: Path, **kwargs: Any) -> RunningProxy:
    """The proxy of configuration file C{path}, started as C{twist pgtls} builds it."""
    config = load_config(path)
    service = make_service(config, **kwargs)
    service.startService()
    return RunningProxy(service, config)
