# -*- test-case-name: tests.test_reload,tests.test_shutdown -*-
"""
Services: what C{twist pgtls}, C{twistd pgtls} and embedding applications
run.

L{make_service} builds a L{ProxyService}: one L{RouteService} (the
listener) plus certificate-refresh and pool-reaping timers per route, and
the C{/metrics} endpoint. The ProxyService is also where the process-wide
operations live, because they all act on every route at once:

 - B{reload} (L{ProxyService.reload}): a new configuration is checked in
   full (TOML, TLS files, binds) before anything changes; then added
   routes listen, removed ones stop accepting and drain, changed ones get
   a new L{Route} for new connections (a listener whose address did not
   change keeps its socket, so no connection is refused meanwhile), and
   unchanged ones are left alone apart from re-reading their certificates;
 - B{graceful shutdown} (L{ProxyService.stopService}): stop accepting at
   once, let sessions finish (transaction-mode clients at the end of their
   transaction) for up to C{shutdown_timeout}, then close the rest with
   FATAL 57P01;
 - B{pause/resume} per route (the admin console's C{PAUSE}/C{RESUME}).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

from twisted.application.internet import TimerService
from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger

from pgtls_twisted.app._listening import ListeningService, RouteService
from pgtls_twisted.app._reload import plan_reload
from pgtls_twisted.app._sessions import SessionStarter
from pgtls_twisted.config import Config, ConfigError, load_config
from pgtls_twisted.ops._logs import LogLevels
from pgtls_twisted.ops._metrics import Metrics
from pgtls_twisted.pool._manager import PoolManager
from pgtls_twisted.proxy._cancel import CancelRegistry
from pgtls_twisted.proxy._derivation import DerivationThreads
from pgtls_twisted.proxy._leg import Phase
from pgtls_twisted.proxy._peers import PeerCancels
from pgtls_twisted.proxy._route import Route
from pgtls_twisted.tls._contexts import TLSConfigError

#: After the shutdown deadline, how long closing connections get to go.
CLOSE_GRACE = 2.0
#: How often a drain checks whether every session has ended.
DRAIN_POLL = 0.25
#: How long the last FATALs and close_notify alerts get to leave before exit.
FLUSH_DELAY = 0.2


class _RouteGroup(MultiService):
    """
    A route's listener and timers, started and stopped together.

    The listener is held, not parented: a reload that changes a route
    but not its address hands the listening socket to the new group,
    and a service cannot change parents without being stopped.
    """

    def __init__(self, route: Route, listener: RouteService | None) -> None:
        super().__init__()
        self.route = route
        self.listener = listener

    def privilegedStartService(self) -> None:
        if self.listener is not None:
            self.listener.privilegedStartService()
        super().privilegedStartService()

    def startService(self) -> None:
        if self.listener is not None and not self.listener.running:
            self.listener.startService()
        super().startService()

    def stopService(self) -> defer.Deferred[None]:
        stopped = super().stopService()
        if self.listener is None or not self.listener.running:
            return stopped
        listener = defer.maybeDeferred(self.listener.stopService)
        return defer.gatherResults([stopped, listener]).addCallback(lambda _: None)


class ProxyService(MultiService):
    """
    The whole proxy of one process.

    @ivar worker: this process's worker number (0 without workers).
    @ivar draining: shutting down: no new sessions.
    @ivar groups: route name to its L{_RouteGroup}, for the current
        configuration.
    @ivar retired: routes removed or replaced by a reload that still have
        sessions.
    """

    _log = Logger()

    def __init__(
        self,
        config: Config,
        reactor: Any,
        *,
        worker: int = 0,
        serveMetrics: bool = True,
        logLevels: LogLevels | None = None,
        connectionIds: Iterator[int] | None = None,
    ) -> None:
        """
        @param logLevels: the output's C{log_level} filter, which a reload
            changes (none when embedded: the application's observers decide).
        """
        super().__init__()
        self.config = config
        self.logLevels = logLevels
        #: Numbers for client connections (the C{conn} of log lines): with
        #: workers, worker I of N numbers I+1, I+1+N, ... so ids are unique.
        self.connectionIds = connectionIds if connectionIds is not None else itertools.count(1)
        self.sessions = SessionStarter(self)
        self.reactor = reactor
        self.worker = worker
        self.draining = False
        self.cancels = CancelRegistry(worker)
        if config.cluster is not None:
            self.cancels.instance = config.cluster.instance
            self.cancels.toPeer = PeerCancels(reactor, config.cluster)
        #: Every route's SCRAM key derivations: one pool of threads.
        self.derivations = DerivationThreads(reactor)
        self.metrics = Metrics(worker, clock=reactor)
        self.metrics.routes = self.liveRoutes
        self.metrics.inReactor = self._inReactor
        self.groups: dict[str, _RouteGroup] = {}
        self.retired: set[Route] = set()
        self.shutdownRequested: Any = None
        self._stopping: defer.Deferred[None] | None = None
        self._deadline: Any = None
        self._giveUpCall: Any = None
        self._drained: defer.Deferred[None] | None = None
        self._metricsService: Service | None = None
        self._serveMetrics = serveMetrics
        for routeConfig in config.routes:
            self._addGroup(self._newRoute(routeConfig))
        self._setMetrics(config)

    # -- routes -------------------------------------------------------------------

    def liveRoutes(self) -> list[Route]:
        """Every route with a listener or with sessions, current ones first."""
        return [g.route for g in self.groups.values()] + sorted(self.retired, key=lambda r: r.name)

    def _newRoute(self, routeConfig: Any) -> Route:
        """A route (TLS contexts built now, so bad files fail here)."""
        return Route(
            routeConfig,
            self.reactor,
            self.cancels,
            self.metrics,
            self,
            starter=self.sessions,
            pools=PoolManager,
            connectionIds=self.connectionIds,
            derivations=self.derivations,
        )

    def _addGroup(self, route: Route, listener: RouteService | None = None) -> _RouteGroup:
        if listener is None:
            listener = RouteService(route, self.reactor)
        elif listener.route is not route:
            listener.serve(route)
        group = _RouteGroup(route, listener)
        group.name = route.name
        routeConfig = route.config
        refresh = TimerService(routeConfig.listener.cert_refresh_interval, route.reloadCertificates)
        refresh.clock = self.reactor
        refresh.setServiceParent(group)
        if route.pools is not None:
            pool = routeConfig.pool
            if pool.password_source == "literal":
                self._log.warn(
                    "route={route}: pool.service_password is written in the configuration file; "
                    "prefer service_password_file or service_password_env",
                    route=route.name,
                )
            interval = max(0.5, min(30.0, pool.idle_timeout / 4))
            reaper = TimerService(interval, route.pools.reap)
            reaper.clock = self.reactor
            reaper.setServiceParent(group)
        self.groups[route.name] = group
        group.setServiceParent(self)
        return group

    def _retire(self, route: Route, successor: Route | None = None) -> None:
        """
        C{route} takes no new sessions; its pools are still reaped, and
        closed once its last client leaves. Without a successor (removed,
        not changed) nothing could RESUME it, so it is resumed now.
        """
        route.retired = True
        held, route._held = route._held, []
        for client, _ in held:
            client.terminate()
        if successor is None and route.paused:
            route.setPaused(False)
        if not route.clients:
            self.routeEmpty(route)
            return
        self.retired.add(route)
        if route.pools is not None:
            interval = max(0.5, min(30.0, route.config.pool.idle_timeout / 4))
            route.reaper = LoopingCall(route.pools.reap)
            route.reaper.clock = self.reactor
            route.reaper.start(interval, now=False)

    def routeEmpty(self, route: Route) -> None:
        """Called by a route when its last client has gone."""
        if route.retired:
            self.retired.discard(route)
            if route.reaper is not None and route.reaper.running:
                route.reaper.stop()
            if route.pools is not None:
                route.pools.close()
        self._checkDrained()

    def _checkDrained(self) -> None:
        """
        Drained when every client is gone or being closed: a client that
        does not answer a close (TLS close_notify) must not hold up the
        exit for the close timeout.
        """
        if self._drained is None:
            return
        for route in self.liveRoutes():
            for client in route.clients:
                if client.phase not in (Phase.CLOSING, Phase.CLOSED):
                    return
        drained, self._drained = self._drained, None
        drained.callback(None)

    # -- reload -------------------------------------------------------------------

    def reloadFromFile(self) -> list[str]:
        """
        Re-read the configuration file (SIGHUP, admin C{RELOAD}).

        @return: what changed, one line each.
        @raise ConfigError: the file is invalid; nothing was changed.
        """
        if self.config.path is None:
            raise ConfigError("this proxy was not started from a configuration file")
        try:
            config = load_config(self.config.path)
            return self.reload(config)
        except ConfigError as e:
            for line in str(e).splitlines():
                self._log.error("reload refused, nothing changed: {problem}", problem=line)
            raise

    def reload(self, config: Config) -> list[str]:
        """
        Apply C{config}. Everything that can fail (TLS files, binding new
        listeners) is done first; if anything fails, nothing changes.

        @raise ConfigError: naming every problem.
        """
        if self.draining:
            self._log.warn("reload ignored: pgtls is shutting down")
            return ["reload ignored: pgtls is shutting down"]
        old = {g.route.name: g for g in self.groups.values()}
        plan = plan_reload({name: g.route.config for name, g in old.items()}, config.routes)
        new = {r.name: r for r in config.routes}
        built: dict[str, Route] = {}
        problems = []
        for name in plan.build:
            try:
                built[name] = self._newRoute(new[name])
            except TLSConfigError as e:
                problems.append(f'route "{name}": {e}')
        if problems:
            raise ConfigError(problems)
        # The listening socket each built route takes over (see the plan);
        # the others are bound now, before anything is touched.
        removed = {name: old[name] for name in plan.remove}
        successors = {name: old[source] for name, source in plan.takeOver.items()}
        bound: dict[str, RouteService] = {}
        for name, route in built.items():
            if name in successors:
                continue
            listener = RouteService(route, self.reactor)
            try:
                listener._listen()
            except Exception as e:
                _undo(bound, built)
                raise ConfigError(
                    [f'route "{name}": cannot listen on {route.config.listener.bind_address}: {e}']
                ) from None
            bound[name] = listener
        metrics = None
        if config.metrics != self.config.metrics:
            metrics = self._newMetricsService(config)
            try:
                if metrics is not None:
                    metrics._listen()
            except Exception as e:
                _undo(bound, built)
                assert config.metrics is not None
                raise ConfigError(
                    [f"metrics: cannot listen on {config.metrics.bind_address}: {e}"]
                ) from None
        notes = []
        handedOver = set(plan.takeOver.values())
        for name, group in removed.items():
            if name in handedOver:
                continue
            self._removeGroup(group)
            notes.append(f'route "{name}" removed: stopped listening, its sessions go on')
        for name, route in built.items():
            group = old.get(name)
            predecessor = successors.get(name)
            if predecessor is not None:
                listener = predecessor.listener
                assert listener is not None
                self._removeGroup(predecessor, successor=route)
                self._addGroup(route, listener)
            else:
                if group is not None:
                    self._removeGroup(group, successor=route)
                self._addGroup(route, bound[name])
            renamedFrom = plan.renamedFrom(name)
            if renamedFrom is not None:
                notes.append(
                    f'route "{renamedFrom}" renamed "{name}": sessions go on,'
                    " new connections use the new settings"
                )
            elif group is None:
                notes.append(
                    f'route "{name}" added: listening on {route.config.listener.bind_address}'
                )
            else:
                notes.append(f'route "{name}" changed: new connections use the new settings')
        for name, group in self.groups.items():
            if name not in built:
                group.route.reloadCertificates(force=True)
        self._applyTopLevel(config, notes, metrics)
        self.config = config
        forgotten = self.forgetLogins(None)
        if forgotten:
            notes.append(f"{forgotten} cached logins forgotten")
        for note in notes or ["no route changed; certificates re-read"]:
            self._log.info("reload: {note}", note=note)
        return notes or ["no route changed; certificates re-read"]

    def _removeGroup(self, group: _RouteGroup, successor: Route | None = None) -> None:
        """
        Stop C{group}'s timers, and its listener unless C{successor} takes
        it over; a successor also inherits the pause and the clients
        held by it.
        """
        route = group.route
        del self.groups[route.name]
        if successor is not None:
            if group.listener is not None and group.listener.route is route:
                if successor.config.listener.bind_address == route.config.listener.bind_address:
                    group.listener = None
            successor.paused = route.paused
            successor._held, route._held = route._held, []
        group.disownServiceParent()
        self._retire(route, successor)

    def _applyTopLevel(
        self, config: Config, notes: list[str], metrics: ListeningService | None
    ) -> None:
        for key in ("workers", "log_format"):
            if getattr(config, key) != getattr(self.config, key):
                notes.append(f"{key} changed: takes effect after a restart")
        self._applyCluster(config, notes)
        if config.log_level != self.config.log_level:
            if self.logLevels is not None:
                self.logLevels.setLevel(config.log_level)
            notes.append(f"log_level is now {config.log_level}")
        if config.admin != self.config.admin:
            notes.append("admin settings changed")
        if config.metrics != self.config.metrics:
            self._setMetrics(config, metrics)
            notes.append("metrics endpoint changed")

    def _applyCluster(self, config: Config, notes: list[str]) -> None:
        """
        A new peers list applies at once; the instance number is in every
        key minted so far, so joining, leaving or renumbering waits for a
        restart.
        """
        new = config.cluster
        # Against what runs, not the last file read: a reload that only
        # noted an instance change did not apply it.
        if (new.instance if new is not None else 0) != self.cancels.instance:
            notes.append("[cluster] instance changed: takes effect after a restart")
            return
        peers = self.cancels.toPeer
        if new is not None and isinstance(peers, PeerCancels) and peers.cluster != new:
            peers.cluster = new
            notes.append("[cluster] peers changed")

    # -- metrics ------------------------------------------------------------------

    def _newMetricsService(self, config: Config) -> ListeningService | None:
        if not self._serveMetrics or config.metrics is None:
            return None
        # Imported here: prometheus_client's Twisted resource imports the
        # global reactor, which must not happen before twist (or an
        # embedding application) has chosen it.
        from pgtls_twisted.app._metricsweb import MetricsService

        return MetricsService(
            config.metrics, self.metrics.registry, self.reactor, lambda: not self.draining
        )

    def _setMetrics(self, config: Config, service: ListeningService | None = None) -> None:
        """Serve C{/metrics} as C{config} says (with C{service}, if already bound)."""
        if self._metricsService is not None:
            self._metricsService.disownServiceParent()
            self._metricsService = None
        if service is None:
            service = self._newMetricsService(config)
        if service is not None:
            self._metricsService = service
            service.setServiceParent(self)

    def _inReactor(self, f: Any) -> Any:
        from twisted.python.threadable import isInIOThread

        if isInIOThread():
            return f()
        from twisted.internet.threads import blockingCallFromThread

        return blockingCallFromThread(self.reactor, f)

    # -- pause --------------------------------------------------------------------

    def setPaused(self, name: str | None, paused: bool) -> list[str]:
        """Pause or resume one route, or all (C{None}), in this process."""
        if name is not None and name not in self.groups:
            raise KeyError(name)
        names = [name] if name is not None else list(self.groups)
        # Retired routes too: their sessions may be queued in their pools.
        for route in self.liveRoutes():
            if route.name in names:
                route.setPaused(paused)
        for n in names:
            self._log.info("route={route} {what}", route=n, what="paused" if paused else "resumed")
        return names

    def metricsPort(self) -> int | None:
        """The port C{/metrics} is served on (C{None} if it is not)."""
        service = self._metricsService
        if service is None or service.port is None:
            return None
        return int(service.port.getHost().port)

    def requestReload(self) -> list[str]:
        """Admin C{RELOAD}."""
        return self.reloadFromFile()

    def requestPause(self, name: str | None, paused: bool) -> list[str]:
        """Admin C{PAUSE}/C{RESUME} (with workers, of every worker)."""
        return self.setPaused(name, paused)

    def forgetLogins(self, user: str | None) -> int:
        """
        Forget the logins pools keep (C{identity = "client"}) of C{user},
        or of everyone: their next logins go to the server again.

        @return: how many there were.
        """
        count = 0
        for route in self.liveRoutes():
            if route.pools is not None:
                logins = route.pools.logins
                count += logins.clear() if user is None else logins.evict(user)
        return count

    def requestForget(self, user: str | None) -> list[str]:
        """Admin C{FORGET user | ALL} (with workers, in every worker)."""
        count = self.forgetLogins(user)
        return [f"{count} cached logins forgotten"]

    def complete(self, results: list[Any]) -> Any:
        """Admin results are complete in one process (see L{WorkerProxy.complete})."""
        return results

    def requestShutdown(self) -> None:
        """Admin C{SHUTDOWN}: what SIGTERM does."""
        if self.shutdownRequested is not None:
            self.shutdownRequested()
        else:
            self.reactor.callLater(0, self.reactor.stop)

    # -- shutdown -----------------------------------------------------------------

    def stopService(self) -> defer.Deferred[None]:
        """Graceful: see L{shutdown}, with C{shutdown_timeout}."""
        return self.shutdown(self.config.shutdown_timeout)

    def shutdown(self, timeout: float) -> defer.Deferred[None]:
        """
        Stop accepting now; let sessions finish for up to C{timeout}
        seconds; then close the rest with FATAL 57P01 and close the pools.
        """
        if self._stopping is not None:
            if timeout == 0 and self._deadline is not None and self._deadline.active():
                self._deadline.reset(0)
            return _chain(self._stopping)
        self.draining = True
        Service.stopService(self)
        # Stop accepting now; everything else (signal handlers, metrics,
        # worker control sockets, which relay cancels) stays up while
        # sessions drain.
        accepting = [defer.maybeDeferred(g.stopService) for g in self.groups.values() if g.running]
        clients = [c for r in self.liveRoutes() for c in list(r.clients)]
        if clients:
            self._log.info(
                "shutting down: {count} connections get up to {timeout:g}s to finish",
                count=len(clients),
                timeout=timeout,
            )
        for route in self.liveRoutes():
            # Clients held by a PAUSE have no session to finish.
            held, route._held = route._held, []
            for client, _ in held:
                client.terminate()
        for client in clients:
            client.drain()
        self._drained = drained = defer.Deferred()
        poll = LoopingCall(self._checkDrained)
        poll.clock = self.reactor
        poll.start(DRAIN_POLL, now=True)
        self._deadline = self.reactor.callLater(timeout, self._terminateAll)

        def finish(_: object) -> defer.Deferred[None]:
            for call in (self._deadline, self._giveUpCall):
                if call is not None and call.active():
                    call.cancel()
            if poll.running:
                poll.stop()
            for route in self.liveRoutes():
                if route.pools is not None:
                    route.pools.close()
            rest = [
                defer.maybeDeferred(child.stopService)
                for child in reversed(list(self))
                if child.running and not isinstance(child, _RouteGroup)
            ]
            # A moment for the last goodbyes (FATAL, close_notify) to be sent.
            flushed = deferLater(self.reactor, FLUSH_DELAY, lambda: None) if clients else None
            waits = accepting + rest + ([flushed] if flushed is not None else [])
            return defer.gatherResults(waits).addCallback(lambda _: None)

        self._stopping = drained.addCallback(finish)
        return _chain(self._stopping)

    def _terminateAll(self) -> None:
        clients = [c for r in self.liveRoutes() for c in list(r.clients)]
        if not clients:
            return
        self._log.info(
            "shutdown deadline: closing {count} remaining connections (57P01)", count=len(clients)
        )
        for client in clients:
            client.terminate()
        # Closing is graceful (close_notify); give it a moment, then go.
        self._giveUpCall = self.reactor.callLater(CLOSE_GRACE, self._giveUp)

    def _giveUp(self) -> None:
        for route in self.liveRoutes():
            for client in list(route.clients):
                client.transport.abortConnection()
        if self._drained is not None:
            drained, self._drained = self._drained, None
            drained.callback(None)


def _chain(d: defer.Deferred[None]) -> defer.Deferred[None]:
    """A Deferred that fires with C{d} without taking its result from others."""
    out: defer.Deferred[None] = defer.Deferred()

    def fire(result: Any) -> Any:
        out.callback(None)
        return result

    d.addBoth(fire)
    return out


def _undo(bound: dict[str, RouteService], built: dict[str, Route]) -> None:
    """A reload that failed half way: close what it opened."""
    for listener in bound.values():
        listener.port.stopListening()
    for route in built.values():
        if route.pools is not None:
            route.pools.close()


def make_service(config: Config, reactor: Any = None, **kwargs: Any) -> ProxyService:
    """
    Build the service tree for C{config}. TLS contexts are built here, so a
    certificate that cannot be used fails before anything binds.

    @param reactor: defaults to the global reactor, imported only now so
        that embedding applications and C{twist --reactor} choose it first.
    """
    if reactor is None:
        from twisted.internet import reactor as _reactor

        reactor = _reactor
    return ProxyService(config, reactor, **kwargs)


def route_services(top: Any) -> list[RouteService]:
    """The route listeners of a tree built by L{make_service}, in order."""
    return [g.listener for g in top.groups.values()]
