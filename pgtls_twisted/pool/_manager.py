# -*- test-case-name: tests.test_pooling,tests.test_security_pools -*-
"""
The pools of one route: one per database, created when a client of that
database has logged in, dropped when nobody used it for C{idle_timeout};
and how a pooled server connection is opened (a backend connection, then
pgtls's own login as the service user).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.logger import Logger

from pgtls_twisted.pool._pool import Pool, PooledServer
from pgtls_twisted.pool._serverlogin import ServerLogin
from pgtls_twisted.proxy._leg import discard

if TYPE_CHECKING:
    from pgtls_twisted.proxy._interfaces import SessionHost


class PoolManager:
    """
    The pools of one route, one per database (the service user is the
    route's), created on first use and dropped when empty and idle.
    """

    _log = Logger()

    def __init__(self, route: SessionHost) -> None:
        self.route = route
        self.config = route.config.pool
        self.pools: dict[str, Pool] = {}

    def poolFor(self, database: str) -> Pool:
        pool = self.pools.get(database)
        if pool is None:
            config = self.config
            pool = Pool(
                f"{config.service_user}/{database}",
                lambda: self._open(database),
                self.route.clock,
                maxSize=config.max_size,
                minSize=config.min_size,
                acquireTimeout=config.acquire_timeout,
                idleTimeout=config.idle_timeout,
                maxLifetime=config.max_lifetime,
            )
            pool.paused = self.route.paused
            self.pools[database] = pool
        return pool

    def _open(self, database: str) -> defer.Deferred[PooledServer]:
        """A new server connection, logged in as the service user."""
        config = self.config
        clock = self.route.clock

        def login(leg: Any) -> defer.Deferred[PooledServer]:
            attempt = ServerLogin(
                leg,
                config.service_user,
                database,
                config.service_password,
                {"application_name": "pgtls"},
            )

            def ready(result: Any) -> PooledServer:
                now = clock.seconds()
                server = PooledServer(leg, now, dict(result.parameters), result.backendKey, now)
                # Until a client holds it, the pool watches it: one that
                # dies while idle must leave the pool, not be handed out.
                pool = self.pools.get(database)
                leg.deliver = discard
                leg.onLost = (lambda reason: pool.lost(server)) if pool is not None else None
                return server

            return attempt.done.addCallback(ready)

        return self.route.backend.connect().addCallback(login)

    def reap(self) -> None:
        """Close idle and over-age connections; forget pools nobody uses."""
        for database, pool in list(self.pools.items()):
            pool.reap()
            if pool.size == 0 and pool.unused:
                del self.pools[database]
                if not self.route.retired:
                    # (A retired route's successor of the same name may
                    # still be using these series.)
                    self.route.metrics.poolDropped(self.route.name, database)

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()
        self.pools.clear()
