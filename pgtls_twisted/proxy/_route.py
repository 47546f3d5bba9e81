# -*- test-case-name: tests.test_proxy -*-
"""
A route: one listener, one backend, and the state they share at run time
(TLS contexts, live clients, limits, the login gate). L{Route.factory} is
what a listening port serves.

A route builds nothing it does not own: which session a startup packet
opens (pass-through, pooled, the admin console), the pools and the metrics
recorder are given to it by the service layer
(L{pgtls_twisted.app._service}), so this module depends on the client leg
and the backend connector only.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from twisted.internet.protocol import Factory
from twisted.logger import Logger

from pgtls_twisted.protocol._parameters import replication_kind
from pgtls_twisted.proxy._backend import BackendConnector, EndpointFactory
from pgtls_twisted.proxy._cancel import CancelRegistry
from pgtls_twisted.proxy._derivation import DerivationThreads
from pgtls_twisted.proxy._frontend import ClientProtocol
from pgtls_twisted.proxy._leg import Phase
from pgtls_twisted.proxy._logins import LoginGate
from pgtls_twisted.tls import _private
from pgtls_twisted.tls._contexts import ServerTLS, TLSConfigError
from pgtls_twisted.tls._lean import Corker, TLSLayer

if TYPE_CHECKING:
    from pgtls_twisted.config import RouteConfig
    from pgtls_twisted.protocol._wire import StartupMessage
    from pgtls_twisted.proxy._interfaces import MetricsRecorder, ProcessHooks, SessionStarter


class Route:
    """
    @ivar clients: the open client connections of this route.
    @ivar cancels: the process-wide registry of minted cancel keys.
    @ivar metrics: where events are counted.
    @ivar backend: how this route reaches its server.
    @ivar process: what the route tells the process it runs in (shutdown
        state, an emptied retired route), or C{None} (a route on its own).
    @ivar starter: which session a startup packet opens.
    @ivar pools: the route's pools (C{[proxy.pool]}), or C{None}.
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
        metrics: MetricsRecorder,
        process: ProcessHooks | None = None,
        *,
        starter: SessionStarter | None = None,
        pools: Callable[[Route], Any] | None = None,
        connectionIds: Iterator[int] | None = None,
        endpoints: EndpointFactory | None = None,
        derivations: DerivationThreads | None = None,
    ) -> None:
        """
        @param pools: makes the route's pool manager (given the route),
            for a route with C{[proxy.pool]}.
        @param connectionIds: the process's connection numbers (unique
            across workers); by default 1, 2, 3, ...
        @param endpoints: where backend connections come from (see
            L{BackendConnector}); by default TCP on C{reactor}.
        @param derivations: the process's SCRAM derivation threads; by
            default the route's own.
        """
        self.config = config
        self.name = config.name
        self.reactor = reactor
        self.clock = reactor
        self.cancels = cancels
        self.metrics = metrics
        self.process = process
        self.starter = starter
        self._connectionIds = connectionIds if connectionIds is not None else itertools.count(1)
        self.paused = False
        self.retired = False
        self.port: Any = None
        self._held: list[tuple[ClientProtocol, StartupMessage]] = []
        #: Reaps the pools of a retired route that still has sessions.
        self.reaper: Any = None
        if config.listener.proxy_protocol and not _private.verdict().proxyHeader:
            raise TLSConfigError(
                f'route "{config.name}": listener.proxy_protocol = true, but the installed'
                " Twisted lacks the PROXY protocol parsers pgtls uses (see the warning)"
            )
        self.serverTLS = ServerTLS(config.listener)
        # Both legs' TLS share one corker: a client's chunk and the write it
        # causes on the server leg leave together (see tls/_lean.py).
        corker = Corker()
        self.clientTLS = TLSLayer(self.serverTLS, False, reactor, corker=corker)
        self.backend = BackendConnector(
            config.name,
            config.backend,
            reactor,
            metrics,
            endpoints=endpoints,
            derivations=derivations,
            corker=corker,
        )
        self.clients: set[ClientProtocol] = set()
        listener = config.listener
        #: Who may be logging in now (see L{pgtls_twisted.proxy._logins}).
        self.logins = LoginGate(
            listener.max_logins, listener.max_logins_per_address, listener.max_clients
        )
        self.pools: Any = pools(self) if pools is not None and config.pool is not None else None

    def factory(self) -> Factory:
        return _RouteFactory(self)

    def nextConnectionId(self) -> int:
        return next(self._connectionIds)

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
        # No refusal for a drain: the listener closed when it began, so
        # this connection was accepted before; refusing it now would drop
        # a client that a balancer can no longer send elsewhere. It is
        # served as the sessions open at that moment are (until it ends,
        # or the deadline; in transaction mode, its first transaction).
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

    def startSession(self, client: ClientProtocol, startup: StartupMessage) -> None:
        starter = self.starter
        assert starter is not None, "a route that serves clients needs a session starter"
        if starter.console(startup):
            starter.start(self, client, startup)
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
        starter.start(self, client, startup)

    def _replicationRefusal(self, startup: StartupMessage) -> tuple[str, str, str] | None:
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
            draining = self.process is not None and self.process.draining
            for client, startup in held:
                if client.phase is not Phase.AUTHENTICATING:  # closing, or gone
                    continue
                if draining:
                    # Resumed during a shutdown: no new session starts.
                    client.fail("57P03", "pgtls: the proxy is shutting down")
                    continue
                client.startLoginClock()
                assert self.starter is not None
                self.starter.start(self, client, startup)

    def reloadCertificates(self, force: bool = False) -> bool:
        """Re-read changed certificate files (all of them with C{force})."""
        listener = self.serverTLS.reload(force)
        backend = self.backend.creator.reload(force)
        return listener or backend


class _RouteFactory(Factory):
    noisy = False

    def __init__(self, route: Route) -> None:
        self.route = route

    def buildProtocol(self, addr: object) -> ClientProtocol:
        return ClientProtocol(self.route)
