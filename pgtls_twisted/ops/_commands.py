# -*- test-case-name: tests.test_admin,tests.test_admin_control -*-
"""
The admin console's commands: SQL text in, result tables out.

This module only reads the live objects (routes, clients, pools) and calls
the process's control methods; speaking the protocol is
L{pgtls_twisted.ops._console}'s job. Column names follow PgBouncer's
(C{cl_active}, C{sv_idle}, C{total_xact_count}, ...) wherever the concept
is the same, so dashboards and exporters written for PgBouncer's console
can be pointed at pgtls; pgtls's own columns (C{route}) come last.

Nothing secret is shown: no passwords, no cancel keys (PgBouncer's
C{remote_pid} of a client is its cancel key's PID, so it is left out).
"""

from __future__ import annotations

import dataclasses
import platform
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol

from pgtls_twisted._version import __version__
from pgtls_twisted.config import Config, ConfigError, format_duration
from pgtls_twisted.ops._metrics import pool_states, sorted_pools
from pgtls_twisted.protocol import _wire as wire
from pgtls_twisted.proxy._leg import Phase

TEXT, INT = wire.TEXT_OID, wire.INT8_OID


@dataclass
class Result:
    """One command's answer: a table (maybe empty) and a command tag."""

    tag: str
    columns: list[tuple[str, int]] = field(default_factory=list)
    rows: list[list[Any]] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)
    #: For C{SHOW x}: C{x}, lower case (what workers are asked for).
    show: str = ""


class AdminError(Exception):
    """A command that failed: becomes an ERROR (not FATAL) ErrorResponse."""

    def __init__(self, sqlstate: str, message: str, detail: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message
        self.detail = detail


class Process(Protocol):
    """What the console needs from the process it runs in (L{pgtls_twisted.app._service.ProxyService})."""

    config: Config
    worker: int
    metrics: Any
    #: The process's reactor: the clock that connection times were read from.
    reactor: Any

    def liveRoutes(self) -> Iterable[Any]: ...

    def requestReload(self) -> list[str]: ...

    def requestPause(self, route: str | None, paused: bool) -> list[str]: ...

    def requestForget(self, user: str | None) -> list[str]: ...

    def requestShutdown(self) -> None: ...

    def complete(self, results: list[Result | AdminError]) -> Any:
        """The results as the client should see them (maybe a Deferred)."""


#: The first columns of C{SHOW CLIENTS} and C{SHOW SERVERS}, as in PgBouncer.
_CONNECTION_COLUMNS = [
    ("type", TEXT),
    ("user", TEXT),
    ("database", TEXT),
    ("state", TEXT),
    ("addr", TEXT),
    ("port", INT),
    ("local_addr", TEXT),
    ("local_port", INT),
    ("connect_time", TEXT),
]

HELP = [
    "SHOW ROUTES | POOLS | CLIENTS | SERVERS | STATS | CONFIG | VERSION | HELP",
    "RELOAD",
    "PAUSE [route]",
    "FORGET user | ALL",
    "RESUME [route]",
    "SHUTDOWN",
]


class AdminCommands:
    """Runs console commands against one process."""

    def __init__(self, process: Process, role: str = "admin") -> None:
        """
        @param role: the caller's: C{"admin"} may run everything,
            C{"stats"} (C{admin.stats_users}) only C{SHOW}.
        """
        self.process = process
        self.role = role

    def run(self, sql: str) -> list[Result | AdminError]:
        """
        Every statement of a simple Query, in order. Like PostgreSQL, the
        statements after a failing one are not run.
        """
        results: list[Result | AdminError] = []
        statements = [s.strip() for s in sql.split(";")]
        for statement in statements:
            if not statement:
                continue
            try:
                results.append(self.one(statement))
            except AdminError as e:
                results.append(e)
                break
        return results

    def one(self, statement: str) -> Result:
        words = statement.split()
        verb = words[0].upper()
        args = words[1:]
        if verb != "SHOW" and self.role != "admin":
            raise AdminError(
                "42501",
                f"pgtls admin console: permission denied for {verb}",
                "admin.stats_users may only use SHOW commands",
            )
        if verb == "SHOW" and len(args) == 1:
            show = getattr(self, f"show_{args[0].lower()}", None)
            if show is not None:
                result: Result = show()
                result.show = args[0].lower()
                return result
        elif verb == "RELOAD" and not args:
            return self.reload()
        elif verb in ("PAUSE", "RESUME") and len(args) <= 1:
            route = _unquote(args[0]) if args else None
            return self.pause(route, verb == "PAUSE")
        elif verb == "FORGET" and len(args) == 1:
            user = None if args[0].upper() == "ALL" else _unquote(args[0])
            return Result("FORGET", notices=self.process.requestForget(user))
        elif verb == "SHUTDOWN" and not args:
            self.process.requestShutdown()
            return Result("SHUTDOWN")
        raise AdminError(
            "42601", f"pgtls admin console: unknown command: {statement[:100]}", "try SHOW HELP"
        )

    # -- SHOW ---------------------------------------------------------------------

    def show_help(self) -> Result:
        return Result("SHOW", notices=["pgtls admin console commands: " + "; ".join(HELP)])

    def show_version(self) -> Result:
        from OpenSSL import SSL
        from OpenSSL import __version__ as pyopenssl_version

        from twisted import __version__ as twisted_version

        openssl = SSL.SSLeay_version(SSL.SSLEAY_VERSION).decode()
        text = (
            f"pgtls {__version__} (Twisted {twisted_version}, pyOpenSSL {pyopenssl_version},"
            f" {openssl}, Python {platform.python_version()})"
        )
        return Result("SHOW", [("version", TEXT)], [[text]])

    def show_routes(self) -> Result:
        columns = [
            ("name", TEXT),
            ("listen_addr", TEXT),
            ("listen_port", INT),
            ("backend", TEXT),
            ("pool_mode", TEXT),
            ("client_tls", TEXT),
            ("backend_tls", TEXT),
            ("clients", INT),
            ("max_clients", INT),
            ("paused", INT),
            ("state", TEXT),
            ("worker", INT),
        ]
        rows = []
        for route in self.process.liveRoutes():
            cfg = route.config
            port = route.listeningPort()
            rows.append(
                [
                    route.name,
                    cfg.listener.host,
                    port,
                    cfg.backend.address,
                    cfg.pool.mode if cfg.pool else "pass-through",
                    cfg.listener.tls,
                    cfg.backend.tls,
                    len(route.clients),
                    cfg.listener.max_clients,
                    int(route.paused),
                    "retired" if route.retired else "active",
                    self.process.worker,
                ]
            )
        return Result("SHOW", columns, rows)

    def show_pools(self) -> Result:
        columns = [
            ("database", TEXT),
            ("user", TEXT),
            ("cl_active", INT),
            ("cl_waiting", INT),
            ("sv_active", INT),
            ("sv_idle", INT),
            ("sv_used", INT),
            ("sv_login", INT),
            ("maxwait", INT),
            ("maxwait_us", INT),
            ("pool_mode", TEXT),
            ("paused", INT),
            ("route", TEXT),
        ]
        rows = []
        for route in self.process.liveRoutes():
            if route.pools is None:
                continue
            for pool in sorted_pools(route.pools.pools.values()):
                states = pool_states(pool)
                wait = pool.longestWait()
                rows.append(
                    [
                        pool.database,
                        pool.user,
                        max(0, pool.sessions - len(pool.waiters)),
                        len(pool.waiters),
                        states["active"],
                        states["idle"],
                        states["used"],
                        states["login"],
                        int(wait),
                        int((wait - int(wait)) * 1e6),
                        route.config.pool.mode,
                        int(pool.paused),
                        route.name,
                    ]
                )
        return Result("SHOW", columns, rows)

    def show_clients(self) -> Result:
        columns = [
            *_CONNECTION_COLUMNS,
            ("request_time", TEXT),
            ("wait", INT),
            ("wait_us", INT),
            ("tls", TEXT),
            ("application_name", TEXT),
            ("id", INT),
            ("route", TEXT),
            ("pinned", TEXT),
        ]
        rows = []
        now = self.process.reactor.seconds()
        for route in self.process.liveRoutes():
            for client in sorted(route.clients, key=lambda c: c.connId):
                startup = client.startup
                state, waitingSince = client_state(client)
                wait = now - waitingSince if waitingSince is not None else 0.0
                peer, local = _addresses(client.transport)
                if getattr(client, "peerAddress", None) is not None:
                    # What a PROXY header said, when there was one.
                    peer = _hostAndPort(client.peerAddress)
                rows.append(
                    [
                        "C",
                        startup.user if startup else None,
                        startup.database if startup else None,
                        state,
                        *peer,
                        *local,
                        _timestamp(client.connectedAt),
                        _timestamp(client.lastRequest or client.connectedAt),
                        int(wait),
                        int((wait - int(wait)) * 1e6),
                        tls_text(client.stats.client_tls),
                        startup.parameters.get("application_name", "") if startup else "",
                        client.connId,
                        route.name,
                        client_pin(client),
                    ]
                )
        return Result("SHOW", columns, rows)

    def show_servers(self) -> Result:
        columns = [
            *_CONNECTION_COLUMNS,
            ("tls", TEXT),
            ("remote_pid", INT),
            ("link", INT),
            ("route", TEXT),
        ]
        rows = []
        for route in self.process.liveRoutes():
            for user, database, state, leg, pid, link in _servers(route):
                peer, local = _addresses(leg.transport)
                rows.append(
                    [
                        "S",
                        user,
                        database,
                        state,
                        *peer,
                        *local,
                        _timestamp(leg.connectedAt),
                        tls_text(leg.tlsInfo),
                        pid,
                        link,
                        route.name,
                    ]
                )
        return Result("SHOW", columns, rows)

    def show_stats(self) -> Result:
        columns = [
            ("database", TEXT),
            ("total_xact_count", INT),
            ("total_query_count", INT),
            ("total_received", INT),
            ("total_sent", INT),
            ("total_xact_time", INT),
            ("total_query_time", INT),
            ("total_wait_time", INT),
            ("avg_xact_time", INT),
            ("avg_query_time", INT),
            ("avg_wait_time", INT),
            ("route", TEXT),
        ]
        metrics = self.process.metrics
        admin = self.process.config.admin
        console = {admin.database} if admin is not None else set()
        rows = []
        for name in sorted(metrics.stats):
            traffic = metrics.trafficByDatabase(name)
            databases = metrics.stats[name].databases
            for database in sorted((set(traffic) | set(databases)) - console):
                xacts, queries, xactUs, queryUs, waitUs = databases.get(database, [0] * 5)
                into, out = traffic.get(database, (0, 0))
                rows.append(
                    [
                        database,
                        xacts,
                        queries,
                        into,
                        out,
                        xactUs,
                        queryUs,
                        waitUs,
                        xactUs // xacts if xacts else 0,
                        queryUs // queries if queries else 0,
                        waitUs // xacts if xacts else 0,
                        name,
                    ]
                )
        return Result("SHOW", columns, rows)

    def show_config(self) -> Result:
        columns = [("key", TEXT), ("value", TEXT), ("default", TEXT), ("changeable", TEXT)]
        return Result("SHOW", columns, config_rows(self.process.config))

    # -- control ------------------------------------------------------------------

    def reload(self) -> Result:
        try:
            notes = self.process.requestReload()
        except ConfigError as e:
            raise AdminError(
                "F0000", "pgtls: configuration not reloaded: the file is invalid", str(e)
            ) from None
        return Result("RELOAD", notices=notes)

    def pause(self, route: str | None, paused: bool) -> Result:
        try:
            names = self.process.requestPause(route, paused)
        except KeyError:
            raise AdminError("42704", f'pgtls: no such route "{route}"') from None
        verb = "PAUSE" if paused else "RESUME"
        done = "paused" if paused else "resumed"
        return Result(verb, notices=[f"{done}: {', '.join(names) or 'no routes'}"])


# -- helpers ---------------------------------------------------------------------


def client_pin(client: Any) -> str:
    """Why a transaction-pooled client keeps its server connection, or C{""}."""
    stmts = getattr(client.session, "stmts", None)
    return (stmts.pinned or "") if stmts is not None else ""


def client_state(client: Any) -> tuple[str, float | None]:
    """PgBouncer's client state, and since when the client has been waiting."""
    session = client.session
    if client.reached is not Phase.READY or session is None:
        return "login", None
    since = getattr(session, "waitingSince", None)
    if since is not None:
        return "waiting", since
    return "active", None


def _servers(route: Any) -> Iterable[tuple[str, str, str, Any, int | None, int | None]]:
    """(user, database, state, leg, backend pid, client id) of each server connection."""
    if route.pools is not None:
        for pool in sorted_pools(route.pools.pools.values()):
            user, database = pool.user, pool.database
            for server in pool.busy:
                link = server.holder.client.connId if server.holder is not None else None
                pid = server.backendKey[0] if server.backendKey else None
                yield user, database, "active", server.leg, pid, link
            for server in pool.idle:
                pid = server.backendKey[0] if server.backendKey else None
                yield user, database, "used" if server.uses else "idle", server.leg, pid, None
    for client in sorted(route.clients, key=lambda c: c.connId):
        session = client.session
        server = getattr(session, "server", None)
        if server is None or client.startup is None:
            continue
        key = getattr(session, "_backendKey", None)
        yield (
            client.startup.user,
            client.startup.database,
            "active" if client.reached is Phase.READY else "login",
            server,
            key[0] if key else None,
            client.connId,
        )


def _hostAndPort(address: Any) -> tuple[str | None, int | None]:
    return getattr(address, "host", None), getattr(address, "port", None)


def _addresses(
    transport: Any,
) -> tuple[tuple[str | None, int | None], tuple[str | None, int | None]]:
    try:
        peer, host = transport.getPeer(), transport.getHost()
    except Exception:
        return (None, None), (None, None)
    return _hostAndPort(peer), _hostAndPort(host)


def tls_text(info: dict[str, Any] | None) -> str:
    """C{TLSv1.3/TLS_AES_256_GCM_SHA384}, or C{""} for plaintext."""
    if not info or not info.get("version"):
        return ""
    return f"{info['version']}/{info.get('cipher')}"


def _timestamp(when: float | None) -> str | None:
    if when is None:
        return None
    return datetime.fromtimestamp(when, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _unquote(name: str) -> str:
    if len(name) >= 2 and name[0] == name[-1] and name[0] in "\"'":
        return name[1:-1]
    return name


#: Top-level settings that only a restart changes.
RESTART_ONLY = ("workers", "log_format")


def config_rows(config: Config) -> list[list[Any]]:
    """C{SHOW CONFIG}: every setting with its default; secrets never shown."""
    rows: list[list[Any]] = []

    def add(prefix: str, obj: Any) -> None:
        for f in dataclasses.fields(obj):
            if not f.repr or f.name in ("host", "port", "routes", "path", "name"):
                continue
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value) or f.name in ("admin", "metrics", "pool"):
                continue
            default = f.default if f.default is not dataclasses.MISSING else None
            restart = f.name in RESTART_ONLY and not prefix
            rows.append(
                [
                    f"{prefix}{f.name}",
                    _setting(value),
                    _setting(default),
                    "no" if restart else "yes",
                ]
            )

    add("", config)
    for name in ("admin", "metrics"):
        section = getattr(config, name)
        if section is not None:
            add(f"{name}.", section)
    for route in config.routes:
        for name in ("listener", "backend", "pool"):
            section = getattr(route, name)
            if section is not None:
                add(f"proxy.{route.name}.{name}.", section)
    return rows


def _setting(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return format_duration(value)
    if isinstance(value, tuple):
        return ", ".join(str(v) for v in value)
    return str(value)


# -- one answer for all workers ---------------------------------------------------

#: SHOW commands whose rows every worker contributes to.
PER_WORKER = ("routes", "pools", "clients", "servers", "stats")


def merge_rows(show: str, rows: list[list[Any]]) -> list[list[Any]]:
    """
    Rows from every worker as one table: C{SHOW POOLS} and C{SHOW STATS}
    have one row per (database, route), summed, so an exporter reading
    them sees one set of counters whichever worker it lands on; the
    others are lists (clients and servers have unique ids, routes a
    worker column).
    """
    if show not in ("pools", "stats"):
        return rows
    merged: dict[tuple[Any, Any], list[Any]] = {}
    for row in rows:
        key = (row[0], row[-1])
        known = merged.get(key)
        if known is None:
            merged[key] = list(row)
        elif show == "pools":
            for i in range(2, 8):  # cl_active .. sv_login
                known[i] += row[i]
            if (row[8], row[9]) > (known[8], known[9]):  # maxwait, maxwait_us
                known[8], known[9] = row[8], row[9]
            known[11] = max(known[11], row[11])  # paused
        else:
            for i in range(1, 8):  # total_*
                known[i] += row[i]
    if show == "stats":
        for row in merged.values():
            xacts, queries = row[1], row[2]
            row[8] = row[5] // xacts if xacts else 0
            row[9] = row[6] // queries if queries else 0
            row[10] = row[7] // xacts if xacts else 0
    return list(merged.values())
