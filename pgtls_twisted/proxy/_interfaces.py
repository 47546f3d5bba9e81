"""
The seams of the proxy, as C{typing.Protocol}s.

Each part depends on what it needs of the others, named here, not on the
class that happens to provide it: the client leg needs a L{SessionHost}
(its route), a session needs its client leg and a L{BackendConnector}-like
way to the server, the route needs a L{SessionStarter} (which session a
startup packet opens: the service layer decides, with the pool and the
admin console it knows about) and a L{MetricsRecorder} (the operations
layer counts). One object wires them: L{pgtls_twisted.app._service}.

Nothing here is imported at run time by anyone but type checkers and
readers: these are structural types, as in magic-wormhole's
C{_interfaces}.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from pgtls_twisted.protocol._wire import StartupMessage
from pgtls_twisted.proxy._stats import ConnectionStats


class PoolFigures(Protocol):
    """What one pooled session records, bound to its pool's labels once."""

    def waited(self, seconds: float) -> None: ...

    def queryDone(self, seconds: float) -> None: ...

    def transactionDone(self, seconds: float) -> None: ...

    def pinned(self, kind: str) -> None: ...

    def timedOut(self, timeout: str) -> None:
        """A pool timeout fired: C{timeout} is the name of its key (C{"query_timeout"})."""


class MetricsRecorder(Protocol):
    """
    Where events are counted (L{pgtls_twisted.ops._metrics.Metrics}): one
    call per event, never per chunk; state is read from the live objects
    when scraped, so it is not here.
    """

    def accepted(self, route: str) -> None: ...

    def refused(self, route: str, reason: str) -> None: ...

    def handshakeDone(self, route: str, seconds: float, version: str, cipher: str) -> None: ...

    def backendConnected(self, route: str, seconds: float) -> None: ...

    def backendFailed(self, route: str, message: str) -> None: ...

    def cancelRequest(self, route: str, outcome: str) -> None: ...

    def pooledLogin(self, route: str, answer: str) -> None: ...

    def clientClosed(self, route: str, database: str | None, stats: ConnectionStats) -> None: ...

    def pooled(self, route: str, database: str) -> PoolFigures: ...

    def poolDropped(self, route: str, database: str) -> None: ...


#: What a session hands the cancel registry for its current server: the
#: connector to reach it, its process ID and secret key, and what to call
#: once the cancel has been delivered (or C{None}).
CancelTargetInfo = tuple[Any, int, bytes, "Callable[[], None] | None"]


class ClientSession(Protocol):
    """What a client leg asks of the session it started."""

    def drain(self) -> None:
        """The proxy is shutting down: finish what may be finished, then close."""

    def terminate(self) -> None:
        """The shutdown deadline: close now, telling the client why if possible."""

    def cancelTarget(self) -> CancelTargetInfo | None:
        """Where a cancel for this session goes now, if anywhere."""


class SessionStarter(Protocol):
    """Which session a startup packet opens (the service layer's decision)."""

    def console(self, startup: StartupMessage) -> bool:
        """Whether C{startup} opens the admin console (never held by PAUSE)."""

    def start(self, host: Any, client: Any, startup: StartupMessage) -> None:
        """Start the session for C{client} on route C{host}."""


class ProcessHooks(Protocol):
    """What a route tells, and asks, the process it runs in."""

    draining: bool

    def routeEmpty(self, route: Any) -> None:
        """The route's last client left (a retired route can go)."""


class SessionHost(Protocol):
    """
    What a client leg and its session need of their route
    (L{pgtls_twisted.proxy._route.Route}).
    """

    name: str
    config: Any
    clock: Any
    reactor: Any
    metrics: MetricsRecorder
    cancels: Any
    clientTLS: Any
    backend: Any
    logins: Any
    pools: Any
    process: Any
    paused: bool
    retired: bool

    def nextConnectionId(self) -> int: ...

    def clientOpened(self, client: Any) -> None: ...

    def clientClosed(self, client: Any) -> None: ...

    def admission(self, client: Any) -> tuple[str, str, str] | None: ...

    def startSession(self, client: Any, startup: StartupMessage) -> None: ...
