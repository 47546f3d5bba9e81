# -*- test-case-name: tests.test_pooling,tests.test_security_pools -*-
"""
The pools of one route: one per database (as the service user) or one per
(user, database) (as that user), created when a client of that database has
logged in, dropped when nobody used it for C{idle_timeout}; the limits they
share (L{pgtls_twisted.pool._limits}); and how a pooled server connection is
opened (a backend connection, then pgtls's own login as the pool's user).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from pgtls_twisted.pool._limits import Limits
from pgtls_twisted.pool._logincache import LoginCache, Secret
from pgtls_twisted.pool._pool import Pool, PooledServer
from pgtls_twisted.pool._serverlogin import ServerLogin, ServerLoginError
from pgtls_twisted.proxy._leg import discard

if TYPE_CHECKING:
    from pgtls_twisted.proxy._interfaces import SessionHost


class Credentials(NamedTuple):
    """
    What a user's pooled connections log in with, from
    L{PoolManager.loginFor}: the password, or what the login cache kept of
    one (L{pgtls_twisted.pool._logincache.Secret}: SCRAM keys or an MD5
    hash), or C{None} for C{trust} or certificate authentication.
    """

    password: str | Secret | None


class NoCredentials(ServerLoginError):
    """pgtls has no way to log in as a pool's user: its client is refused."""


#: A user's pool key: (user, database). A service-user pool's is its database.
PoolKey = str | tuple[str, str]


class PoolManager:
    """
    The pools of one route, created on first use and dropped when empty and
    idle: one per database whose connections log in as the route's service
    user, or one per (user, database) whose connections log in as the user.

    @ivar pools: the pools by key: the database for a service-user pool (as
        ever), C{(user, database)} for a user's.
    @ivar limits: C{max_db_connections} and C{max_user_connections}, shared
        by every pool of the route; C{None} when both are 0 (no limit), so
        each pool has only its own C{max_size}.
    @ivar loginFor: how a user's pool logs in, given (user, database):
        L{Credentials} (or a Deferred firing with them); raising, or failing,
        refuses the client waiting longest with that error (a
        L{ServerLoginError}'s SQLSTATE and message reach it). Service-user
        pools do not use it.
    """

    _log = Logger()

    def __init__(self, route: SessionHost) -> None:
        self.route = route
        self.config = route.config.pool
        self.pools: dict[PoolKey, Pool] = {}
        config = self.config
        self.limits: Limits | None = None
        if config.max_db_connections or config.max_user_connections:
            self.limits = Limits(config.max_db_connections, config.max_user_connections)
        self.loginFor: Callable[[str, str], Credentials | defer.Deferred[Credentials]] | None = None
        #: What the server accepted of each client's password
        #: (C{identity = "client"}): what users' pools log in with.
        self.logins = LoginCache(route.clock, config.auth_cache_ttl)
        if config.identity == "client":
            self.loginFor = self._cached

    def poolFor(self, database: str, user: str | None = None) -> Pool:
        """
        The pool of C{database} whose connections log in as C{user}, or as
        the service user when C{user} is C{None}.
        """
        key: PoolKey = database if user is None else (user, database)
        pool = self.pools.get(key)
        if pool is None:
            config = self.config
            role = config.service_user if user is None else user
            pool = Pool(
                f"{role}/{database}",
                lambda: self._open(database, user),
                self.route.clock,
                maxSize=config.max_size,
                minSize=config.min_size,
                acquireTimeout=config.acquire_timeout,
                idleTimeout=config.idle_timeout,
                maxLifetime=config.max_lifetime,
                user=role,
                database=database,
            )
            pool.paused = self.route.paused
            if self.limits is not None:
                self.limits.join(pool, database, role)
            self.pools[key] = pool
        return pool

    def _cached(self, user: str, database: str) -> Credentials:
        """A user's pool logs in with what its last server-checked login left."""
        return Credentials(self.logins.secret(user, database))

    def _refused(self, failure: Failure, user: str) -> Failure:
        """
        The server refused what pgtls kept of C{user}'s password (it
        changed, or the role went): forget it, so the next login of the
        user goes to the server again, and tell the waiting client so.
        """
        error = failure.value
        if (
            isinstance(error, ServerLoginError)
            and not isinstance(error, NoCredentials)
            and error.sqlstate.startswith("28")
        ):
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

    def _open(self, database: str, user: str | None = None) -> defer.Deferred[PooledServer]:
        """
        A new server connection of C{database}, logged in as C{user} with
        what L{loginFor} gives (asked before any backend connection is
        made), or as the service user when C{user} is C{None}.
        """
        config = self.config
        clock = self.route.clock
        key: PoolKey = database if user is None else (user, database)
        if user is None:
            role = config.service_user
            credentials: defer.Deferred[Credentials] = defer.succeed(
                Credentials(config.service_password)
            )
        elif self.loginFor is None:
            return defer.fail(
                NoCredentials("28000", f'pgtls has no credentials to log in as "{user}"')
            )
        else:
            role = user
            credentials = defer.maybeDeferred(self.loginFor, user, database)

        def login(leg: Any, given: Credentials) -> defer.Deferred[PooledServer]:
            def ready(result: Any) -> PooledServer:
                now = clock.seconds()
                server = PooledServer(leg, now, dict(result.parameters), result.backendKey, now)
                # Until a client holds it, the pool watches it: one that
                # dies while idle must leave the pool, not be handed out.
                pool = self.pools.get(key)
                leg.deliver = discard
                leg.onLost = (lambda reason: pool.lost(server)) if pool is not None else None
                return server

            return self._serverLogin(leg, role, database, given).done.addCallback(ready)

        def connect(given: Credentials) -> defer.Deferred[PooledServer]:
            return self.route.backend.connect().addCallback(login, given)

        opened = credentials.addCallback(connect)
        if user is not None:
            opened.addErrback(self._refused, user)
        return opened

    def _serverLogin(
        self, leg: Any, user: str, database: str, credentials: Credentials
    ) -> ServerLogin:
        """pgtls's login on the ready backend C{leg}, as C{user} with C{credentials}."""
        return ServerLogin(
            leg,
            user,
            database,
            credentials.password,
            {"application_name": "pgtls"},
        )

    def reap(self) -> None:
        """Close idle and over-age connections; forget pools nobody uses."""
        self.logins.prune({key for key in self.pools if isinstance(key, tuple)})
        for key, pool in list(self.pools.items()):
            pool.reap()
            if pool.size == 0 and pool.unused:
                del self.pools[key]
                if self.limits is not None:
                    self.limits.leave(pool)
                database = pool.database
                if not self.route.retired and all(
                    other.database != database for other in self.pools.values()
                ):
                    # (A retired route's successor of the same name may
                    # still be using these series; a database's series
                    # stay while another user's pool of it is left.)
                    self.route.metrics.poolDropped(self.route.name, database)

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()
        self.pools.clear()
