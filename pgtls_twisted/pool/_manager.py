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
from twisted.python.failure import Failure

from pgtls_twisted.pool._logincache import LoginCache
from pgtls_twisted.pool._pool import Pool, PooledServer
from pgtls_twisted.pool._serverlogin import ServerLogin, ServerLoginError
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
        #: By database (the service user's) or by (user, database): never
        #: a joined string, which two different pairs could spell alike.
        self.pools: dict[str | tuple[str, str], Pool] = {}
        #: What the server accepted of each client's password
        #: (C{identity = "client"}).
        self.logins = LoginCache(route.clock, self.config.auth_cache_ttl)

    def poolFor(self, database: str, user: str | None = None) -> Pool:
        """
        The pool of C{database}: the service user's, or (C{identity =
        "client"}) C{user}'s own.
        """
        key: str | tuple[str, str] = database if user is None else (user, database)
        pool = self.pools.get(key)
        if pool is None:
            config = self.config
            pool = Pool(
                f"{config.service_user if user is None else user}/{database}",
                lambda: self._open(database, user),
                self.route.clock,
                maxSize=config.max_size,
                minSize=config.min_size,
                acquireTimeout=config.acquire_timeout,
                idleTimeout=config.idle_timeout,
                maxLifetime=config.max_lifetime,
            )
            pool.paused = self.route.paused
            self.pools[key] = pool
        return pool

    def each(self) -> list[tuple[str, str, Pool]]:
        """C{(user, database, pool)} for every pool, sorted: what SHOW and metrics list."""
        rows = []
        for key, pool in self.pools.items():
            if isinstance(key, tuple):
                rows.append((key[0], key[1], pool))
            else:
                rows.append((self.config.service_user or "", key, pool))
        return sorted(rows, key=lambda row: (row[1], row[0]))

    def _open(self, database: str, user: str | None) -> defer.Deferred[PooledServer]:
        """A new server connection, logged in as the service user or as C{user}."""
        config = self.config
        clock = self.route.clock
        key: str | tuple[str, str] = database if user is None else (user, database)
        if user is None:
            role, secret = config.service_user, config.service_password
        else:
            role, secret = user, self.logins.secret(user, database)

        def login(leg: Any) -> defer.Deferred[PooledServer]:
            attempt = ServerLogin(leg, role, database, secret, {"application_name": "pgtls"})

            def ready(result: Any) -> PooledServer:
                now = clock.seconds()
                server = PooledServer(leg, now, dict(result.parameters), result.backendKey, now)
                # Until a client holds it, the pool watches it: one that
                # dies while idle must leave the pool, not be handed out.
                pool = self.pools.get(key)
                leg.deliver = discard
                leg.onLost = (lambda reason: pool.lost(server)) if pool is not None else None
                return server

            return attempt.done.addCallback(ready)

        opened = self.route.backend.connect().addCallback(login)
        if user is not None:
            opened.addErrback(self._refused, user)
        return opened

    def _refused(self, failure: Failure, user: str) -> Failure:
        """
        The server refused what pgtls kept of C{user}'s password (it
        changed, or the role went): forget it, so the next login of the
        user goes to the server again, and tell the waiting client so.
        """
        error = failure.value
        if isinstance(error, ServerLoginError) and error.sqlstate.startswith("28"):
            if self.logins.evict(user):
                self._log.info(
                    "pool {user}: the server refused the cached login; keys forgotten", user=user
                )
            return Failure(
                ServerLoginError(
                    "28P01",
                    f"{error.message} (the server refused the login pgtls kept for user"
                    f' "{user}"; log in again)',
                    error.fields,
                )
            )
        return failure

    def reap(self) -> None:
        """Close idle and over-age connections; forget pools nobody uses."""
        self.logins.prune({key for key in self.pools if isinstance(key, tuple)})
        for key, pool in list(self.pools.items()):
            pool.reap()
            if pool.size == 0 and pool.unused:
                del self.pools[key]
                database = key if isinstance(key, str) else key[1]
                if not self.route.retired and not any(
                    (k if isinstance(k, str) else k[1]) == database for k in self.pools
                ):
                    # (A retired route's successor of the same name may
                    # still be using these series.)
                    self.route.metrics.poolDropped(self.route.name, database)

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()
        self.pools.clear()
