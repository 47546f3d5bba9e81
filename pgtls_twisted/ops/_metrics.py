# -*- test-case-name: tests.test_metrics,tests.test_workers -*-
"""
What pgtls counts, for Prometheus and for the admin console's C{SHOW STATS}.

Two kinds of figures, kept apart on purpose:

 - B{events} (a client accepted, a handshake, a transaction) are counted
   where they happen, in plain Python integers, or in C{prometheus_client}
   histograms for the rare ones (handshakes, backend connects): one
   dictionary update or one C{observe()} per event, and never anything per
   received chunk. The per-transaction histograms of the pools (wait,
   query, transaction) are L{PlainHistogram}s, a list of bucket counts
   and a sum, exported at scrape time: C{prometheus_client}'s
   C{observe()}, with its lock and its loop over the buckets, cost more
   than the rest of a transaction's bookkeeping;
 - B{state} (clients connected, server connections by state, bytes so far)
   is not counted at all: L{Metrics.collect} reads it from the live objects
   when someone scrapes. A gauge that is computed cannot drift, and the
   byte pump stays free of metric calls (the byte counts are the ones the
   close log line reports anyway).

Every series carries a C{worker} label, so that with C{workers = N} the
supervisor can merge the workers' output into one page
(L{pgtls_twisted.app._workers}).

Scrapes are served by C{prometheus_client.twisted.MetricsResource}, which
renders in the reactor's thread pool; L{Metrics.collect} therefore takes
its snapshot of live objects in the reactor thread
(C{blockingCallFromThread}), never from the pool thread.
"""

from __future__ import annotations

import os
from bisect import bisect_left
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import prometheus_client
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString
from twisted.internet.interfaces import IReactorTime

from pgtls_twisted.proxy._leg import Phase
from pgtls_twisted.proxy._stats import ConnectionStats

# No "_created" series: they double the page for nothing a dashboard uses.
prometheus_client.disable_created_metrics()

if TYPE_CHECKING:
    from pgtls_twisted.proxy._route import Route

#: Client refusals, by the reason label they carry.
REFUSALS = (
    "tls_required",
    "handshake_failure",
    "client_certificate",
    "limit",
    "protocol",
    "startup_timeout",
    "shutdown",
    "admin_denied",
    "login_limit",
    "proxy_protocol",
)

#: The most databases one route labels its series and C{SHOW STATS} rows
#: with; the rest share L{OTHER_DATABASES}. Series exist only for logged-in
#: clients, and a dropped pool frees its label, but a route in front of
#: many databases must still not grow the page without bound.
MAX_DATABASE_LABELS = 100
#: The label of databases beyond L{MAX_DATABASE_LABELS}.
OTHER_DATABASES = "(other)"

#: The pool timeouts, by the label they carry (L{pgtls_twisted.pool._timeouts}).
POOL_TIMEOUTS = ("client_idle_timeout", "idle_transaction_timeout", "query_timeout")

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_DURATION_BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300)


def backend_failure_reason(message: str) -> str:
    """A short label for a L{pgtls_twisted.proxy._backend.BackendError} message."""
    text = message.lower()
    for needle, label in (
        ("connection refused", "refused"),
        ("timeout", "timeout"),
        ("translate", "dns"),
        ("verification failed", "tls_verify"),
        ("handshake failed", "tls_handshake"),
        ("ssl request", "tls_unavailable"),
        ("does not support ssl", "tls_unavailable"),
        ("authentication", "login"),
        ("password", "login"),
    ):
        if needle in text:
            return label
    return "other"


class PlainHistogram:
    """
    A Prometheus histogram counted with plain Python (see the module):
    C{observe} is one C{bisect} and two additions; L{family} exports it.

    @ivar counts: observations per bucket (not cumulative), the last one
        above every bound.
    """

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        # Prometheus buckets are "less than or equal": bisect_left.
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.total += seconds

    def addTo(self, family: HistogramMetricFamily, labels: list[str]) -> None:
        """Add this histogram's series (cumulative buckets, sum) to C{family}."""
        cumulative, buckets = 0, []
        for bound, count in zip(self.bounds, self.counts, strict=False):
            cumulative += count
            buckets.append((floatToGoString(bound), cumulative))
        buckets.append(("+Inf", cumulative + self.counts[-1]))
        family.add_metric(labels, buckets, self.total)


#: The per-transaction histograms of the pools: attribute of
#: L{PoolFigures}, metric name, help text, bounds.
POOL_HISTOGRAMS = (
    ("_wait", "pgtls_pool_wait_seconds", "How long clients waited for a server connection"),
    (
        "_query",
        "pgtls_pool_query_seconds",
        "Query duration (Query or Sync to ReadyForQuery) on pooled connections",
    ),
    (
        "_transaction",
        "pgtls_pool_transaction_seconds",
        "Transaction duration on pooled connections",
    ),
)


class PoolFigures:
    """What a pooled session records, bound to its (route, database) once."""

    __slots__ = ("row", "timeouts", "_wait", "_query", "_transaction", "_pins")

    def __init__(
        self,
        row: list[int],
        wait: Any,
        query: Any,
        transaction: Any,
        timeouts: dict[str, int],
        pins: dict[str, int],
    ) -> None:
        #: [xact_count, query_count, xact_us, query_us, wait_us], shared with SHOW STATS
        self.row = row
        #: pool timeouts fired, by L{POOL_TIMEOUTS} label
        self.timeouts = timeouts
        self._wait, self._query, self._transaction = wait, query, transaction
        self._pins = pins

    def pinned(self, kind: str) -> None:
        """A client was pinned to its server connection, for this kind of reason."""
        self._pins[kind] += 1

    def waited(self, seconds: float) -> None:
        if seconds < 0:
            seconds = 0.0  # see _clamped
        self.row[4] += int(seconds * 1e6)
        self._wait.observe(seconds)

    def queryDone(self, seconds: float) -> None:
        if seconds < 0:
            seconds = 0.0
        row = self.row
        row[1] += 1
        row[3] += int(seconds * 1e6)
        self._query.observe(seconds)

    def transactionDone(self, seconds: float) -> None:
        if seconds < 0:
            seconds = 0.0
        row = self.row
        row[0] += 1
        row[2] += int(seconds * 1e6)
        self._transaction.observe(seconds)

    def timedOut(self, timeout: str) -> None:
        self.timeouts[timeout] += 1


class RouteStats:
    """
    The counters of one route, in one process, since it started: what
    C{SHOW STATS} shows per (route, database) and what the Prometheus
    counters report.
    """

    def __init__(self) -> None:
        self.accepted = 0
        self.refused: dict[str, int] = defaultdict(int)
        self.tls: dict[tuple[str, str], int] = defaultdict(int)
        self.backendFailures: dict[str, int] = defaultdict(int)
        self.cancels: dict[str, int] = defaultdict(int)
        self.logins: dict[str, int] = defaultdict(int)
        #: per database: [bytes from clients, bytes to clients] of closed connections
        self.closedBytes: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        #: per database: [xact_count, query_count, xact_us, query_us, wait_us]
        self.databases: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0, 0])
        #: per database: pool timeouts fired, by L{POOL_TIMEOUTS} label
        self.timeouts: dict[str, dict[str, int]] = defaultdict(
            lambda: dict.fromkeys(POOL_TIMEOUTS, 0)
        )
        #: per database: clients pinned, by kind of reason
        self.pins: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))


class Metrics:
    """
    One process's figures.

    @ivar worker: this process's worker number (C{"0"} without workers).
    @ivar registry: a registry of its own (not C{prometheus_client}'s
        global one), so several proxies can live in one process (tests,
        embedding) without clashing.
    @ivar routes: callable returning every live L{Route} of the process,
        including retired ones that still have sessions.
    @ivar started: when the process started, by its clock.
    """

    def __init__(self, worker: int = 0, *, clock: IReactorTime) -> None:
        """@param clock: the process's reactor, which tells the time."""
        self.worker = str(worker)
        self.started = clock.seconds()
        self.stats: dict[str, RouteStats] = defaultdict(RouteStats)
        self.routes: Callable[[], Iterable[Route]] = lambda: ()
        self.inReactor: Callable[[Callable[[], Any]], Any] = lambda f: f()
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ["route", "worker"]
        self.handshake = Histogram(
            "pgtls_tls_handshake_seconds",
            "Client TLS handshake duration",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.backendConnect = Histogram(
            "pgtls_backend_connect_seconds",
            "Backend connect, encryption negotiation and TLS handshake",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_Snapshot(self))
        self._pooled: dict[tuple[str, str], PoolFigures] = {}
        #: per route: the databases that have a label of their own
        self._labels: dict[str, set[str]] = defaultdict(set)

    # -- events ------------------------------------------------------------------

    def accepted(self, route: str) -> None:
        self.stats[route].accepted += 1

    def refused(self, route: str, reason: str) -> None:
        self.stats[route].refused[reason] += 1

    def handshakeDone(self, route: str, seconds: float, version: str, cipher: str) -> None:
        self.stats[route].tls[(version, cipher)] += 1
        self.handshake.labels(route, self.worker).observe(_clamped(seconds))

    def backendConnected(self, route: str, seconds: float) -> None:
        self.backendConnect.labels(route, self.worker).observe(_clamped(seconds))

    def backendFailed(self, route: str, message: str) -> None:
        self.stats[route].backendFailures[backend_failure_reason(message)] += 1

    def cancelRequest(self, route: str, outcome: str) -> None:
        self.stats[route].cancels[outcome] += 1

    def pooledLogin(self, route: str, answer: str) -> None:
        """A pooled client's login was answered by C{"server"}, C{"cache"} or C{"cache_refused"}."""
        self.stats[route].logins[answer] += 1

    def databaseLabel(self, route: str, database: str) -> str:
        """
        The C{database} label (and C{SHOW STATS} row) for a logged-in
        client's database: its own name while the route has fewer than
        L{MAX_DATABASE_LABELS}, else L{OTHER_DATABASES}. Only ever asked for
        clients that have logged in: a name an unauthenticated client made
        up never becomes a label.
        """
        labels = self._labels[route]
        if database in labels:
            return database
        if len(labels) < MAX_DATABASE_LABELS:
            labels.add(database)
            return database
        return OTHER_DATABASES

    def clientClosed(self, route: str, database: str | None, stats: ConnectionStats) -> None:
        """Keep the bytes of a closing client (any bytes mean it had logged in)."""
        if stats.bytes_in or stats.bytes_out:
            row = self.stats[route].closedBytes[self.databaseLabel(route, database or "")]
            row[0] += stats.bytes_in
            row[1] += stats.bytes_out

    def pooled(self, route: str, database: str) -> PoolFigures:
        """
        The figures of one pool, looked up once per session (after its
        login): a transaction then costs two list updates and two
        C{observe()} calls, not label lookups.
        """
        database = self.databaseLabel(route, database)
        key = (route, database)
        figures = self._pooled.get(key)
        if figures is None:
            figures = self._pooled[key] = PoolFigures(
                self.stats[route].databases[database],
                PlainHistogram(_LATENCY_BUCKETS),
                PlainHistogram(_DURATION_BUCKETS),
                PlainHistogram(_DURATION_BUCKETS),
                self.stats[route].timeouts[database],
                self.stats[route].pins[database],
            )
        return figures

    def poolDropped(self, route: str, database: str) -> None:
        """
        A pool nobody used for C{idle_timeout} was dropped: so are its
        series, its C{SHOW STATS} row and its label (Prometheus takes the
        counters' restart, should it come back, as a reset).
        """
        if database not in self._labels[route]:
            return  # it shares "(other)", which stays
        self._labels[route].discard(database)
        self._pooled.pop((route, database), None)
        stats = self.stats[route]
        stats.databases.pop(database, None)
        stats.closedBytes.pop(database, None)
        stats.timeouts.pop(database, None)
        stats.pins.pop(database, None)

    # -- state ---------------------------------------------------------------------

    def trafficByDatabase(self, route: str) -> dict[str, tuple[int, int]]:
        """Bytes client to server and back per database, closed and live connections together."""
        totals = {db: list(row) for db, row in self.stats[route].closedBytes.items()}
        for r in self.routes():
            if r.name == route:
                for client in r.clients:
                    if client.reached is not Phase.READY or client.startup is None:
                        continue  # not logged in: names nothing yet
                    label = self.databaseLabel(route, client.startup.database)
                    row = totals.setdefault(label, [0, 0])
                    row[0] += client.stats.bytes_in
                    row[1] += client.stats.bytes_out
        return {db: (row[0], row[1]) for db, row in totals.items()}

    def traffic(self, route: str) -> tuple[int, int]:
        """Bytes client to server and back on C{route}."""
        rows = self.trafficByDatabase(route).values()
        return sum(r[0] for r in rows), sum(r[1] for r in rows)

    def text(self) -> bytes:
        """The exposition format, as C{/metrics} serves it (from the reactor thread)."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class _Snapshot:
    """The counters and gauges computed at scrape time (see the module docstring)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        return iter(self._metrics.inReactor(self._families))

    def _families(self) -> list[Metric]:
        m = self._metrics
        w = m.worker
        routes = list(m.routes())
        names = sorted({r.name for r in routes} | set(m.stats))

        def counter(name: str, doc: str, labels: list[str]) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, labels=[*labels, "worker"])

        def gauge(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=[*labels, "worker"])

        accepted = counter(
            "pgtls_client_connections_accepted", "Client connections accepted", ["route"]
        )
        active = gauge("pgtls_client_connections_active", "Client connections open now", ["route"])
        refused = counter(
            "pgtls_client_connections_refused",
            "Client connections refused, by reason",
            ["route", "reason"],
        )
        tls = counter(
            "pgtls_tls_handshakes",
            "Completed client TLS handshakes",
            ["route", "protocol", "cipher"],
        )
        failures = counter(
            "pgtls_backend_connect_failures",
            "Failed backend connections, by reason",
            ["route", "reason"],
        )
        received = counter(
            "pgtls_client_received_bytes", "Bytes received from clients (after TLS)", ["route"]
        )
        sent = counter("pgtls_client_sent_bytes", "Bytes sent to clients (before TLS)", ["route"])
        logins = counter(
            "pgtls_pool_logins",
            "Pooled clients' logins, by who answered: the server (over a temporary"
            " connection), or pgtls from its login cache (identity = client)",
            ["route", "answer"],
        )
        cancels = counter(
            "pgtls_cancel_requests", "Cancel requests, by outcome", ["route", "outcome"]
        )
        servers = gauge(
            "pgtls_pool_server_connections",
            "Pooled server connections, by state (active, idle, used, login)",
            ["route", "database", "state"],
        )
        waiting = gauge(
            "pgtls_pool_clients_waiting",
            "Clients waiting for a server connection",
            ["route", "database"],
        )
        pooledClients = gauge(
            "pgtls_pool_clients", "Logged-in clients of a pool", ["route", "database"]
        )
        timeouts = counter(
            "pgtls_pool_timeouts",
            "Pool timeouts fired, by timeout (a query_timeout once, at its cancel)",
            ["route", "database", "timeout"],
        )
        pinned = counter(
            "pgtls_pool_pinned_clients",
            "Transaction-pool clients pinned to their server connection, by reason",
            ["route", "database", "reason"],
        )
        for name in names:
            s = m.stats[name]
            accepted.add_metric([name, w], s.accepted)
            active.add_metric([name, w], sum(len(r.clients) for r in routes if r.name == name))
            for reason in REFUSALS:
                refused.add_metric([name, reason, w], s.refused.get(reason, 0))
            for (version, cipher), count in sorted(s.tls.items()):
                tls.add_metric([name, version, cipher, w], count)
            for reason, count in sorted(s.backendFailures.items()):
                failures.add_metric([name, reason, w], count)
            into, out = m.traffic(name)
            received.add_metric([name, w], into)
            sent.add_metric([name, w], out)
            for answer in ("server", "cache", "cache_refused"):
                logins.add_metric([name, answer, w], s.logins.get(answer, 0))
            for outcome, count in sorted(s.cancels.items()):
                cancels.add_metric([name, outcome, w], count)
            for database, fired in sorted(s.timeouts.items()):
                for timeout, count in fired.items():
                    timeouts.add_metric([name, database, timeout, w], count)
            for database, kinds in sorted(s.pins.items()):
                for kind, count in sorted(kinds.items()):
                    pinned.add_metric([name, database, kind, w], count)
        for route in routes:
            if route.pools is None:
                continue
            # The series are per database: its users' pools are summed.
            totals: dict[str, Counter[str]] = {}
            for pool in route.pools.pools.values():
                total = totals.setdefault(pool.database, Counter())
                total.update(pool_states(pool))
                total["waiting"] += len(pool.waiters)
                total["sessions"] += pool.sessions
            for database, counts in sorted(totals.items()):
                for state in ("active", "idle", "used", "login"):
                    servers.add_metric([route.name, database, state, w], counts[state])
                waiting.add_metric([route.name, database, w], counts["waiting"])
                pooledClients.add_metric([route.name, database, w], counts["sessions"])
        rss = gauge("pgtls_process_resident_memory_bytes", "Resident memory of the process", [])
        rss.add_metric([w], resident_memory())
        up = gauge("pgtls_process_start_time_seconds", "When the process started", [])
        up.add_metric([w], m.started)
        histograms = []
        for attribute, name, doc in POOL_HISTOGRAMS:
            family = HistogramMetricFamily(name, doc, labels=["route", "database", "worker"])
            for (route, database), figures in sorted(m._pooled.items()):
                getattr(figures, attribute).addTo(family, [route, database, w])
            histograms.append(family)
        return [
            accepted, active, refused, tls, failures, received, sent, cancels, logins,
            servers, waiting, pooledClients, timeouts, pinned, rss, up, *histograms,
        ]  # fmt: skip


def _clamped(seconds: float) -> float:
    """
    A duration as recorded: durations are differences of the injected
    clock's readings (the reactor's, wall-clock time), and a step of the
    system clock backwards must not record a negative one (Prometheus
    sums and C{SHOW STATS} totals would then go down).
    """
    return seconds if seconds > 0 else 0.0


def pool_states(pool: Any) -> dict[str, int]:
    """
    Server connections of a pool by PgBouncer's state names: C{active}
    (held by a client), C{idle} (never handed out yet), C{used} (idle
    after serving a client; PgBouncer would check these before reuse,
    pgtls does not), C{login} (being opened).
    """
    used = sum(1 for server in pool.idle if server.uses)
    return {
        "active": len(pool.busy),
        "idle": len(pool.idle) - used,
        "used": used,
        "login": pool.connecting,
    }


def sorted_pools(pools: Iterable[Any]) -> list[Any]:
    """A route's pools by database, then user (C{SHOW POOLS}, C{SHOW SERVERS})."""
    return sorted(pools, key=lambda pool: (pool.database, pool.user))


def resident_memory() -> int:
    """This process's resident set size in bytes (0 where /proc is missing)."""
    try:
        with open(f"/proc/{os.getpid()}/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")
