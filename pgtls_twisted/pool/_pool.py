# -*- test-case-name: tests.test_pool -*-
"""
Pools of server connections, one per (service user, database), as in the
pooling seed (a client's queries run on connections that logged in as the
service user, shared by every client of the route and database), or one per
(user, database) whose connections log in as that user.

This module is the bookkeeping only (no protocol): who holds which
connection, who waits (fairly, in order, with a deadline), and which idle
or over-age connection to close. Opening a connection is a callable it is
given, so its rules can be tested with a L{twisted.internet.task.Clock}
and fake connections. Limits shared by several pools (per database, per
user) are L{pgtls_twisted.pool._limits}'s: a pool that has joined them asks
them, instead of deciding alone, when it may open a connection.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.logger import Logger

from pgtls_twisted.protocol._prepared import ServerStatements
from pgtls_twisted.protocol._txstate import canonicalParameter, trackedParameters

if TYPE_CHECKING:
    from pgtls_twisted.pool._limits import Limit, Limits

#: After a failed attempt to open a connection, how long before the next
#: one for the clients still waiting.
RETRY_DELAY = 0.5

#: Numbers the waiting clients of every pool of the process in the order
#: they started waiting: shared limits serve them in that order.
_ARRIVALS = itertools.count()


class PoolTimeout(Exception):
    """No server connection became available within C{acquire_timeout}."""


@dataclass(eq=False)
class PooledServer:
    """
    One server connection of a pool.

    @ivar leg: the L{pgtls_twisted.proxy._backend.ServerProtocol}.
    @ivar parameters: the server's current ParameterStatus values.
    @ivar backendKey: the server's real cancel key (never shown to clients).
    @ivar cancels: cancel requests in flight against it: while any are, it
        is handed to no one, so a late cancel cannot hit another client's
        query (PgBouncer's cancel race).
    @ivar dirty: it must not be reused (its state is unknown): closed when
        released.
    @ivar statements: the named prepared statements pgtls made on it
        (transaction mode).
    @ivar tracked: the tracked ones of its L{parameters}, by canonical
        name (L{setParameter} keeps both), for a cheap comparison with a
        client's at every attach.
    @ivar spare: what was known of its stream when it was last given back
        clean (an L{Attachment<pgtls_twisted.pool._attachment.Attachment>}),
        for the next client to take over instead of making a new one.
    """

    leg: Any
    created: float
    parameters: dict[str, str] = field(default_factory=dict)
    backendKey: tuple[int, bytes] | None = None
    lastUsed: float = 0.0
    cancels: int = 0
    dirty: bool = False
    holder: Any = None
    uses: int = 0
    statements: ServerStatements = field(default_factory=ServerStatements)
    tracked: dict[str, str] = field(default_factory=dict)
    spare: Any = None

    def __post_init__(self) -> None:
        self.tracked = trackedParameters(self.parameters)

    def setParameter(self, name: str, value: str) -> None:
        """A ParameterStatus from the server."""
        self.parameters[name] = value
        canonical = canonicalParameter(name)
        if canonical is not None:
            self.tracked[canonical] = value

    def close(self) -> None:
        self.leg.close()


@dataclass(eq=False)
class _Waiter:
    deferred: defer.Deferred[PooledServer]
    timer: Any = None
    since: float = 0.0
    #: Its place in the queue of all pools (see L{_ARRIVALS}).
    seq: int = field(default_factory=lambda: next(_ARRIVALS))


class Pool:
    """
    @ivar idle: connections nobody holds, most recently used last (reused
        first, so the rest can age out).
    @ivar busy: connections held by a client.
    @ivar user: the role its connections log in as (C{SHOW POOLS}).
    @ivar database: their database.
    @ivar limits: the shared limits it counts against (set by
        L{Limits.join}); none, and C{group} C{None}, for a pool that only
        has its own C{maxSize}.
    """

    _log = Logger()

    def __init__(
        self,
        name: str,
        connect: Callable[[], defer.Deferred[PooledServer]],
        clock: Any,
        *,
        maxSize: int,
        minSize: int = 0,
        acquireTimeout: float = 30.0,
        idleTimeout: float = 1800.0,
        maxLifetime: float = 3600.0,
        user: str = "",
        database: str = "",
    ) -> None:
        self.name = name
        self.user = user
        self.database = database
        self._connect = connect
        self._clock = clock
        self.maxSize = maxSize
        self.minSize = minSize
        self.acquireTimeout = acquireTimeout
        self.idleTimeout = idleTimeout
        self.maxLifetime = maxLifetime
        self.idle: list[PooledServer] = []
        self.busy: set[PooledServer] = set()
        self.connecting = 0
        self.waiters: deque[_Waiter] = deque()
        self.lastUsed = clock.seconds()
        self.closed = False
        #: While paused (admin C{PAUSE}), nobody is handed a connection:
        #: clients queue (their C{acquireTimeout} still runs) until L{resume}.
        self.paused = False
        self._retry: Any = None
        #: Logged-in client sessions using this pool (holding a server or not).
        self.sessions = 0
        self.limits: tuple[Limit, ...] = ()
        self.group: Limits | None = None
        #: After a failed open, shared limits give it no slot until then
        #: (its waiters are retried by C{_retry}).
        self.quietUntil = 0.0

    @property
    def size(self) -> int:
        return len(self.idle) + len(self.busy) + self.connecting

    def takeIdle(self) -> PooledServer | None:
        """
        L{acquire}'s common case without a Deferred: an idle connection,
        if one is there and nobody queues before this client; else C{None}
        (and the client calls L{acquire}).
        """
        self.lastUsed = self._clock.seconds()
        if self.idle and not self.waiters and not self.paused:
            return self._take(self.idle.pop())
        return None

    def acquire(self) -> defer.Deferred[PooledServer]:
        """
        A connection for one client: an idle one, a new one while the pool
        is below C{maxSize}, or the next one released, in order of asking;
        failing with L{PoolTimeout} after C{acquireTimeout}. Cancelling the
        Deferred (a client that leaves) removes it from the queue.
        """
        server = self.takeIdle()
        if server is not None:
            return defer.succeed(server)
        waiter = _Waiter(defer.Deferred(lambda d: self._forget(waiter)), since=self.lastUsed)
        waiter.timer = self._clock.callLater(self.acquireTimeout, self._expire, waiter)
        self.waiters.append(waiter)
        if not self.paused:
            self._grow()
        return waiter.deferred

    def longestWait(self) -> float:
        """Seconds the first client in the queue has waited (0 when nobody waits)."""
        if not self.waiters:
            return 0.0
        return max(0.0, self._clock.seconds() - self.waiters[0].since)

    def pause(self) -> None:
        """Hand out no connection until L{resume} (those held stay held)."""
        self.paused = True

    def resume(self) -> None:
        """Serve the clients that queued while paused."""
        self.paused = False
        while self.idle and self.waiters:
            self._offer(self.idle.pop())
        self._grow()

    def release(self, server: PooledServer) -> None:
        """A client is done with C{server}: give it to the next waiter, or keep it idle."""
        self.busy.discard(server)
        server.holder = None
        now = self._clock.seconds()
        server.lastUsed = now
        self.lastUsed = now
        if server.cancels:
            # Not reusable until the cancel has landed; see cancelDone.
            self.busy.add(server)
            return
        if server.dirty or self.closed or now - server.created >= self.maxLifetime:
            self._drop(server)
            self._grow()
            return
        if self.group is not None and not self.paused and self.group.owedElsewhere(self):
            # A client of another pool has waited longer for the slot this
            # connection holds: the slot goes to it (see _limits).
            self._drop(server)
            self.group.settle()
            return
        self._offer(server)

    def cancelDone(self, server: PooledServer) -> None:
        """A cancel against C{server} has been delivered (or failed)."""
        server.cancels -= 1
        if server.cancels == 0 and server.holder is None and server in self.busy:
            self.release(server)

    def lost(self, server: PooledServer) -> None:
        """C{server}'s connection is gone; a waiter may get a new one."""
        if server in self.idle:
            self.idle.remove(server)
        self.busy.discard(server)
        self._grow()

    def reap(self) -> None:
        """Close idle connections past C{idleTimeout} or C{maxLifetime}, down to C{minSize}."""
        now = self._clock.seconds()
        for server in list(self.idle):
            if self.size <= self.minSize:
                break
            if (
                now - server.lastUsed >= self.idleTimeout
                or now - server.created >= self.maxLifetime
            ):
                self.idle.remove(server)
                self._drop(server)
        self._grow()

    @property
    def unused(self) -> bool:
        """
        No session uses it, nothing is held, awaited or opening, and nothing
        was used for C{idleTimeout}.
        """
        return (
            not self.busy
            and not self.waiters
            and not self.connecting
            and not self.sessions
            and self._clock.seconds() - self.lastUsed >= self.idleTimeout
        )

    def close(self) -> None:
        """Close every idle connection now and every busy one when released."""
        self.closed = True
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        for server in self.idle:
            self._drop(server)
        self.idle.clear()
        while self.waiters:
            waiter = self.waiters.popleft()
            waiter.timer.cancel()
            waiter.deferred.errback(PoolTimeout(f'pool "{self.name}" is closing'))

    # -- for shared limits (L{pgtls_twisted.pool._limits}) --------------------------

    def firstInLine(self) -> _Waiter | None:
        """
        The longest-waiting client no connection being opened is for (the
        first C{connecting} waiters get those), if the pool may open one for
        it now as far as its own state goes (not closed, paused, backing off
        after a failure, or at C{maxSize}).
        """
        if len(self.waiters) <= self.connecting or not self.mayOpen():
            return None
        return self.waiters[self.connecting]

    def mayOpen(self) -> bool:
        """Its own state lets it open a connection (the shared limits aside)."""
        return (
            not self.closed
            and not self.paused
            and self.size < self.maxSize
            and self._clock.seconds() >= self.quietUntil
        )

    def openOne(self) -> None:
        """Open a connection (the caller has checked every limit)."""
        self.connecting += 1
        self._connect().addCallbacks(self._opened, self._openFailed)

    def evict(self, server: PooledServer) -> None:
        """Close the idle C{server}, whose slot another pool needs."""
        self.idle.remove(server)
        self._drop(server)

    # -- internals ---------------------------------------------------------------

    def _take(self, server: PooledServer) -> PooledServer:
        self.busy.add(server)
        server.uses += 1
        return server

    def _offer(self, server: PooledServer) -> None:
        if self.waiters and not self.paused:
            waiter = self.waiters.popleft()
            waiter.timer.cancel()
            waiter.deferred.callback(self._take(server))
        else:
            self.idle.append(server)
            if self.group is not None and self.group.blocked:
                # Another pool may need this slot: idle connections go first.
                self.group.settle()

    def _drop(self, server: PooledServer) -> None:
        self.busy.discard(server)
        server.close()

    def _grow(self) -> None:
        """Open connections for waiters (and up to C{minSize}) within C{maxSize}."""
        if self.closed:
            return
        if self.group is not None:
            self.group.settle()
            return
        wanted = max(len(self.waiters) - self.connecting, self.minSize - self.size)
        while wanted > 0 and self.size < self.maxSize:
            wanted -= 1
            self.openOne()

    def _opened(self, server: PooledServer) -> None:
        self.connecting -= 1
        if self.closed:
            server.close()
            if self.group is not None:
                self.group.settle()
            return
        self._offer(server)

    def _openFailed(self, failure: Any) -> None:
        self.connecting -= 1
        self.quietUntil = self._clock.seconds() + RETRY_DELAY
        self._log.warn(
            "pool {pool}: could not open a server connection: {error}",
            pool=self.name,
            error=failure.getErrorMessage(),
        )
        # The client waiting longest learns why (with the server's own
        # error when it refused the service user), instead of timing out;
        # the others keep waiting, and the pool tries again shortly, so
        # they are served as soon as the server is back.
        if self.waiters:
            waiter = self.waiters.popleft()
            waiter.timer.cancel()
            waiter.deferred.errback(failure)
        if self.waiters and self._retry is None:
            self._retry = self._clock.callLater(RETRY_DELAY, self._retryGrow)
        if self.group is not None:
            # The slot it held may serve another pool meanwhile.
            self.group.settle()

    def _retryGrow(self) -> None:
        self._retry = None
        self._grow()

    def _expire(self, waiter: _Waiter) -> None:
        if waiter in self.waiters:
            self.waiters.remove(waiter)
            full = "".join(f"; {limit} reached" for limit in self.limits if limit.full)
            waiter.deferred.errback(
                PoolTimeout(
                    f'no server connection available in pool "{self.name}"'
                    f" within {self.acquireTimeout:g}s{full}"
                )
            )

    def _forget(self, waiter: _Waiter) -> None:
        if waiter in self.waiters:
            self.waiters.remove(waiter)
            if waiter.timer.active():
                waiter.timer.cancel()
