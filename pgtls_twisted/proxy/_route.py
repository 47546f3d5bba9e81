# -*- test-case-name: tests.test_proxy -*-
"""
A route: one listener, one backend, and the state they share at run time
(TLS contexts, live clients, limits). L{Route.factory} is what a listening
port serves.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.protocol import Factory
from twisted.logger import Logger

from pgtls_twisted.ops._metrics import Metrics
from pgtls_twisted.proxy._cancel import CancelRegistry
from pgtls_twisted.proxy._frontend import ClientProtocol
from pgtls_twisted.proxy._logins import LoginGate
from pgtls_twisted.tls._contexts import BackendTLS, ServerTLS
from pgtls_twisted.tls._lean import TLSLayer

if TYPE_CHECKING:
    from pgtls_twisted.config import RouteConfig


class Route:
    """
    @ivar clients: the open client connections of this route.
    @ivar cancels: the process-wide registry of minted cancel keys.
    @ivar metrics: the process-wide L{Metrics}.
    @ivar process: the L{pgtls_twisted.app._service.ProxyService} it belongs to
        (admin console, shutdown state), or C{None} for a route used on
        its own (unit tests).
    @ivar paused: admin C{PAUSE}: new sessions wait (their startup
        deadline still runs) and pools hand out no connection.
    @ivar retired: removed or replaced by a reload: it serves the sessions
        it has and accepts no more.
    """

    _log = Logger()

    def __init__(
        self,
        config: RouteConfig,
        reactor: Any,
        cancels: CancelRegistry,
        metrics: Metrics | None = None,
        process: Any = None,
    ) -> None:
        self.config = config
        self.name = config.name
        self.reactor = reactor
        self.clock = reactor
        self.cancels = cancels
        self.metrics = metrics if metrics is not None else Metrics()
        self.process = process
        self.paused = False
        self.retired = False
        self.port: Any = None
        self._held: list[tuple[ClientProtocol, Any]] = []
        #: Reaps the pools of a retired route that still has sessions.
        self.reaper: Any = None
        self.serverTLS = ServerTLS(config.listener)
        self.clientTLS = TLSLayer(self.serverTLS, False, reactor)
        self.backendCreator = BackendTLS(config.backend)
        self.backendTLS = TLSLayer(self.backendCreator, True, reactor)
        self.clients: set[ClientProtocol] = set()
        listener = config.listener
        #: Who may be logging in now (see L{pgtls_twisted.proxy._logins}).
        self.logins = LoginGate(
            listener.max_logins, listener.max_logins_per_address, listener.max_clients
        )
        self.pools: Any = None
        if config.pool is not None:
            from pgtls_twisted.pool._session import PoolManager

            self.pools = PoolManager(self)

    def factory(self) -> Factory:
        return _RouteFactory(self)

    def clientOpened(self, client: ClientProtocol) -> None:
        self.clients.add(client)

    def clientClosed(self, client: ClientProtocol) -> None:
        self.clients.discard(client)
        if self._held:
            self._held = [(c, s) for c, s in self._held if c is not client]
        database = client.startup.database if client.startup is not None else None
        self.metrics.clientClosed(self.name, database, client.stats)
        if not self.clients and self.process is not None:
            self.process.routeEmpty(self)

    def listeningPort(self) -> int | None:
        """The port this route listens on now (C{None} when not listening)."""
        return self.port.getHost().port if self.port is not None else None

    def admission(self, client: ClientProtocol) -> tuple[str, str, str] | None:
        """
        Whether a client that has sent its StartupMessage may go on: the
        SQLSTATE, message and metrics reason of a refusal, or C{None}.
        """
        if self.process is not None and self.process.draining:
            return ("57P03", "pgtls: the proxy is shutting down", "shutdown")
        limit = self.config.listener.max_clients
        # Connections still waiting for a login slot are not clients yet
        # (they are bounded by the gate): a flood of them from one address
        # must not lock everyone else out.
        if len(self.clients) - self.logins.waiting > limit:
            return (
                "53300",
                f'pgtls: sorry, too many clients already on route "{self.name}" (max_clients = {limit})',
                "limit",
            )
        return None

    def startSession(self, client: ClientProtocol, startup: Any) -> None:
        admin = self.process.config.admin if self.process is not None else None
        if admin is not None and startup.database == admin.database:
            from pgtls_twisted.ops._console import AdminSession

            AdminSession(self, client, startup, admin).start()
            return
        if self.pools is not None:
            refusal = self._replicationRefusal(startup)
            if refusal is not None:
                client.refused("protocol")
                client.fail(*refusal)
                return
        if self.paused:
            # Held until RESUME: the client's own login time stops meanwhile
            # (startup_timeout still runs).
            client.stopLoginClock()
            self._held.append((client, startup))
            return
        self._start(client, startup)

    def _replicationRefusal(self, startup: Any) -> tuple[str, str, str] | None:
        """
        A pooled route cannot serve a replication connection: the client
        would log in as a walsender on the temporary login connection and
        then be given an ordinary pooled session of the service user, which
        speaks neither replication protocol. Refused before any backend is
        contacted; values PostgreSQL reads as "off" are no replication.

        @return: the SQLSTATE, message and detail of the refusal, or C{None}.
        """
        value = startup.parameters.get("replication")
        try:
            kind = replication_kind(value)
        except ValueError:
            return (
                "22023",
                f'invalid value for parameter "replication": "{value}"',
                'Valid values are: "false", 0, "true", 1, "database".',
            )
        if kind is None:
            return None
        return (
            "08P01",
            "pgtls: replication connections cannot be pooled",
            f'Route "{self.name}" pools server connections; replication needs a'
            " pass-through route (one without [proxy.pool]).",
        )

    def setPaused(self, paused: bool) -> None:
        """Admin C{PAUSE}/C{RESUME}: hold new sessions and pool hand-outs, or let them go."""
        self.paused = paused
        if self.pools is not None:
            for pool in self.pools.pools.values():
                if paused:
                    pool.pause()
                else:
                    pool.resume()
        if not paused:
            held, self._held = self._held, []
            for client, startup in held:
                if client.connected and not client._closing:
                    client.startLoginClock()
                    self._start(client, startup)

    def _start(self, client: ClientProtocol, startup: Any) -> None:
        if self.pools is not None:
            from pgtls_twisted.pool._session import PooledSession

            PooledSession(self, client, startup).start()
        else:
            from pgtls_twisted.proxy._session import Session

            Session(self, client, startup).start()

    def reloadCertificates(self, force: bool = False) -> bool:
        """Re-read changed certificate files (all of them with C{force})."""
        listener = self.serverTLS.reload(force)
        backend = self.backendCreator.reload(force)
        return listener or backend


def _parse_bool(text: str) -> bool | None:
    """
    PostgreSQL's C{parse_bool}: C{true}, C{false}, C{yes}, C{no} or any
    prefix of them, C{on} and C{off} (at least two letters), C{1} and
    C{0}, in any ASCII letter case; C{None} for anything else.
    """
    if not text.isascii():
        return None
    word = text.lower()
    for whole, value in (("true", True), ("false", False), ("yes", True), ("no", False)):
        if word and whole.startswith(word):
            return value
    if len(word) >= 2:
        if "on".startswith(word):
            return True
        if "off".startswith(word):
            return False
    return {"1": True, "0": False}.get(word)


def replication_kind(value: str | None) -> str | None:
    """
    What the C{replication} startup parameter asks for, read as PostgreSQL
    reads it (C{ProcessStartupPacket}): exactly C{"database"} is logical
    replication, a true boolean physical replication, a false one (or no
    parameter) none.

    @return: C{"logical"}, C{"physical"} or C{None}.
    @raise ValueError: a value PostgreSQL refuses (FATAL 22023).
    """
    if value is None:
        return None
    if value == "database":
        return "logical"
    enabled = _parse_bool(value)
    if enabled is None:
        raise ValueError(value)
    return "physical" if enabled else None


class _RouteFactory(Factory):
    noisy = False

    def __init__(self, route: Route) -> None:
        self.route = route

    def buildProtocol(self, addr: object) -> ClientProtocol:
        return ClientProtocol(self.route)
