"""
Fakes for the pool's bookkeeping (L{pgtls_twisted.pool._pool}): server
connections that only record being closed, and an opener whose connections
open (or fail) only when the test says so.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.task import Clock

from pgtls_twisted.pool._pool import PooledServer


class FakeLeg:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


class Opener:
    """One pool's connections: they open only when the test says so."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.pending: list[defer.Deferred[PooledServer]] = []
        self.opened: list[PooledServer] = []

    def __call__(self) -> defer.Deferred[PooledServer]:
        d: defer.Deferred[PooledServer] = defer.Deferred()
        self.pending.append(d)
        return d

    def finish(self, n: int = 1) -> None:
        for _ in range(n):
            server = PooledServer(FakeLeg(), created=self.clock.seconds())
            self.opened.append(server)
            self.pending.pop(0).callback(server)

    def fail(self) -> None:
        self.pending.pop(0).errback(RuntimeError("refused"))
