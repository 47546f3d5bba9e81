# -*- test-case-name: tests.test_proxy,tests.test_admin,tests.test_pooling -*-
"""
Which session a startup packet opens: the one place that knows every
kind (L{pgtls_twisted.proxy._interfaces.SessionStarter}). Routes are
given it by L{pgtls_twisted.app._service.ProxyService}, so the proxy layer
never imports the pool or the admin console above it.
"""

from __future__ import annotations

from typing import Any

from pgtls_twisted.ops._console import AdminSession
from pgtls_twisted.pool._session import PooledSession
from pgtls_twisted.protocol._wire import StartupMessage
from pgtls_twisted.proxy._session import Session


class SessionStarter:
    """
    @param process: the L{ProxyService}, whose current configuration says
        which database name opens the admin console.
    """

    def __init__(self, process: Any) -> None:
        self._process = process

    def console(self, startup: StartupMessage) -> bool:
        admin = self._process.config.admin
        return admin is not None and startup.database == admin.database

    def start(self, route: Any, client: Any, startup: StartupMessage) -> None:
        admin = self._process.config.admin
        if admin is not None and startup.database == admin.database:
            AdminSession(route, client, startup, admin).start()
        elif route.pools is not None:
            PooledSession(route, client, startup).start()
        else:
            Session(route, client, startup).start()
