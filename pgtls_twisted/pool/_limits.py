# -*- test-case-name: tests.test_pool_limits -*-
"""
Limits shared by several pools of a route, as PgBouncer's keys of the same
names: C{max_db_connections} (server connections to one database, across
the pools of its users) and C{max_user_connections} (of one user, across
its databases). A pool's own C{max_size} stays its own
(L{pgtls_twisted.pool._pool.Pool.maxSize}).

A pool may open a connection only while its own size and every limit it
counts against allow; connections being opened count. Everything else
follows from three rules:

  1. B{One queue, kept by the pools.} Each waiting client stays in its own
     pool's queue, numbered in the order it started waiting, across all
     pools (L{pgtls_twisted.pool._pool._ARRIVALS}). Whenever a slot may have
     freed (a connection closed, lost, reaped or failed to open; a pool
     resumed) or a client starts waiting, L{Limits.settle} takes the pools
     whose first client without a connection on its way is waiting, in the
     order of those clients' numbers, and opens a connection for the first
     one that every limit allows; then looks again. So a client blocked by
     a shared limit is served before any later client of another pool
     blocked by the same limit, whichever pool the slot freed in. This is
     one FIFO queue per limit, without keeping one: a client that leaves or
     times out is simply gone from its pool's queue, so the order cannot go
     stale, and C{acquire_timeout} stays each client's own. A slot that the
     oldest client cannot use (another of its limits is full) goes to the
     next that can: no slot stays empty while someone could use it.

  2. B{Idle connections go first.} When a full limit blocks a pool whose
     clients wait, and other pools that count against every limit blocking
     it have idle connections, the least recently used of those is closed
     so that it can open (as PgBouncer closes other pools' idle
     connections). A connection that goes idle while a pool is blocked is
     such a candidate at once. Connections kept for another pool's
     C{min_size} are candidates too: a waiting client comes first, and the
     reaper opens them again when there is room.

  3. B{No pool keeps a slot it owes.} A connection released in a pool whose
     own clients wait normally goes to the next of them; but if a client of
     another pool, blocked only by limits this pool shares, has waited
     longer, the connection is closed instead and its slot goes to that
     client. Without this, a busy user could keep every connection to a
     database for ever while another user's clients time out.

The limits are counted from the pools' sizes, not kept as counters, so a
lost, reaped or failed connection can never leak a slot.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


class LimitedPool(Protocol):
    """
    What the limits need of a L{pgtls_twisted.pool._pool.Pool} (which
    imports this module, not the other way round).
    """

    limits: tuple[Limit, ...]
    group: Limits | None
    idle: list[Any]
    waiters: Sequence[Any]
    minSize: int

    @property
    def size(self) -> int: ...

    def firstInLine(self) -> Any: ...

    def mayOpen(self) -> bool: ...

    def openOne(self) -> None: ...

    def evict(self, server: Any) -> None: ...


@dataclass(eq=False)
class Limit:
    """
    One shared limit: at most C{maximum} connections, open or being
    opened, across C{pools}.

    @ivar key: the configuration key (C{max_db_connections}, ...).
    @ivar scope: what it limits, as the client would read it
        (C{database "app"}).
    """

    key: str
    scope: str
    maximum: int
    pools: list[LimitedPool] = field(default_factory=list)

    @property
    def used(self) -> int:
        return sum(pool.size for pool in self.pools)

    @property
    def full(self) -> bool:
        return self.used >= self.maximum

    def __str__(self) -> str:
        return f"{self.key} ({self.maximum}) of {self.scope}"


class Limits:
    """
    The shared limits of one route's pools, and the rules above.

    @ivar pools: the pools that joined, in the order they did.
    @ivar blocked: pools that a full limit kept from opening, as of the
        last L{settle} (a hint: whoever uses it checks again).
    """

    def __init__(self, perDatabase: int = 0, perUser: int = 0) -> None:
        """
        @param perDatabase: C{max_db_connections}; 0 is no limit.
        @param perUser: C{max_user_connections}; 0 is no limit.
        """
        self.perDatabase = perDatabase
        self.perUser = perUser
        self.pools: list[LimitedPool] = []
        self.blocked: list[LimitedPool] = []
        self._limits: dict[tuple[str, str], Limit] = {}
        self._settling = False
        self._again = False

    def join(self, pool: LimitedPool, database: str, user: str) -> None:
        """C{pool}'s connections (to C{database}, as C{user}) count from now on."""
        limits = []
        for key, scope, maximum in (
            ("max_db_connections", f'database "{database}"', self.perDatabase),
            ("max_user_connections", f'user "{user}"', self.perUser),
        ):
            if maximum:
                limit = self._limits.get((key, scope))
                if limit is None:
                    limit = self._limits[key, scope] = Limit(key, scope, maximum)
                limit.pools.append(pool)
                limits.append(limit)
        pool.limits = tuple(limits)
        pool.group = self
        self.pools.append(pool)

    def leave(self, pool: LimitedPool) -> None:
        """Forget C{pool} (dropped with nothing open: it frees no slot)."""
        for limit in pool.limits:
            limit.pools.remove(pool)
            if not limit.pools:
                del self._limits[limit.key, limit.scope]
        self.pools.remove(pool)
        if pool in self.blocked:
            self.blocked.remove(pool)
        pool.limits = ()
        pool.group = None

    def settle(self) -> None:
        """
        Open what the rules allow: connections for waiting clients in the
        order they came (closing other pools' idle connections where that is
        what blocks them), then up to each pool's C{minSize}.

        Re-entrant calls (a connection handed out synchronously, whose
        client gives it back at once) only ask the running one to look again.
        """
        if self._settling:
            self._again = True
            return
        self._settling = True
        try:
            self._again = True
            while self._again:
                self._again = False
                self._serveWaiters()
                self._fillMinimum()
        finally:
            self._settling = False

    def owedElsewhere(self, pool: LimitedPool) -> bool:
        """
        Should a connection C{pool} releases (no longer counted in its
        size) be closed rather than given to its own next client (rule 3)?
        Only when its own clients wait (else it goes idle, and rule 2
        applies).
        """
        if not pool.waiters or not self.blocked:
            return False
        mine = pool.waiters[0].seq
        for other in self.blocked:
            first = other.firstInLine() if other is not pool else None
            if first is None or first.seq > mine:
                continue
            blocking = [
                limit
                for limit in other.limits
                if limit.used + (limit in pool.limits) >= limit.maximum
            ]
            if blocking and all(limit in pool.limits for limit in blocking):
                return True
        return False

    # -- internals ---------------------------------------------------------------

    def _serveWaiters(self) -> None:
        while True:
            waiting = []
            for pool in self.pools:
                first = pool.firstInLine()
                if first is not None:
                    waiting.append((first.seq, pool))
            waiting.sort(key=lambda entry: entry[0])
            blocked = []
            for _, pool in waiting:
                blocking = [limit for limit in pool.limits if limit.full]
                if not blocking:
                    pool.openOne()
                    break
                victim = self._victim(pool, blocking)
                if victim is not None:
                    owner, server = victim
                    owner.evict(server)
                    break
                blocked.append(pool)
            else:
                self.blocked = blocked
                return

    def _victim(self, pool: LimitedPool, blocking: list[Limit]) -> tuple[LimitedPool, Any] | None:
        """The least recently used idle connection whose closing frees every C{blocking} limit."""
        best: tuple[LimitedPool, Any] | None = None
        for other in blocking[0].pools:
            if other is pool or not all(limit in other.limits for limit in blocking):
                continue
            for server in other.idle:
                if best is None or server.lastUsed < best[1].lastUsed:
                    best = (other, server)
        return best

    def _fillMinimum(self) -> None:
        for pool in self.pools:
            while (
                pool.size < pool.minSize
                and pool.mayOpen()
                and not any(limit.full for limit in pool.limits)
            ):
                pool.openOne()
