"""
Unit tests of the pool's bookkeeping (L{pgtls_twisted.pool._pool}) with a fake
clock and fake connections: fairness, limits, deadlines, cancel guard,
reaping.
"""

from __future__ import annotations

from typing import Any

import pytest
from support.poolfakes import Opener
from support.unit import result
from twisted.internet import defer
from twisted.internet.task import Clock

from pgtls_twisted.pool._pool import Pool, PooledServer, PoolTimeout


@pytest.fixture
def clock() -> Clock:
    return Clock()


def make(clock: Clock, **kw: Any) -> tuple[Pool, Opener]:
    opener = Opener(clock)
    options = {"maxSize": 2, "acquireTimeout": 5.0, "idleTimeout": 60.0, "maxLifetime": 600.0}
    options.update(kw)
    return Pool("app/db", opener, clock, **options), opener


def test_opens_up_to_max_size_then_queues_in_order(clock: Clock) -> None:
    pool, opener = make(clock)
    a, b, c, d = (pool.acquire() for _ in range(4))
    assert pool.connecting == 2 and len(opener.pending) == 2
    opener.finish(2)
    first, second = result(a), result(b)
    assert not c.called and not d.called
    pool.release(second)
    assert result(c) is second
    pool.release(first)
    assert result(d) is first
    assert pool.size == 2


def test_idle_connection_is_reused_without_opening(clock: Clock) -> None:
    pool, opener = make(clock)
    d = pool.acquire()
    opener.finish()
    server = result(d)
    pool.release(server)
    assert pool.idle == [server]
    assert result(pool.acquire()) is server
    assert len(opener.opened) == 1


def test_acquire_timeout(clock: Clock) -> None:
    pool, opener = make(clock, maxSize=1)
    held = pool.acquire()
    opener.finish()
    result(held)
    waiting = pool.acquire()
    clock.advance(4.9)
    assert not waiting.called
    clock.advance(0.2)
    failure = result(waiting)
    assert failure.check(PoolTimeout)
    assert 'pool "app/db"' in str(failure.value)
    assert not pool.waiters


def test_client_leaving_the_queue_is_removed(clock: Clock) -> None:
    pool, opener = make(clock, maxSize=1)
    held = result(_opened(pool, opener))
    leaving = pool.acquire()
    staying = pool.acquire()
    leaving.cancel()
    result(leaving)  # CancelledError, consumed
    assert len(pool.waiters) == 1
    pool.release(held)
    assert result(staying) is held


def _opened(pool: Pool, opener: Opener) -> defer.Deferred[PooledServer]:
    d = pool.acquire()
    opener.finish()
    return d


def test_server_with_cancel_in_flight_goes_to_nobody(clock: Clock) -> None:
    pool, opener = make(clock, maxSize=1)
    server = result(_opened(pool, opener))
    waiting = pool.acquire()
    server.cancels += 1
    pool.release(server)
    assert not waiting.called, "handed over with a cancel in flight"
    pool.cancelDone(server)
    assert result(waiting) is server


def test_dirty_and_old_connections_are_closed_on_release(clock: Clock) -> None:
    pool, opener = make(clock, maxSize=1, maxLifetime=100.0)
    server = result(_opened(pool, opener))
    server.dirty = True
    waiting = pool.acquire()
    pool.release(server)
    assert server.leg.closed
    assert len(opener.pending) == 1, "a replacement is opened for the waiter"
    opener.finish()
    fresh = result(waiting)
    clock.advance(101)
    pool.release(fresh)
    assert fresh.leg.closed and pool.size == 0


def test_reap_idle_and_keep_min_size(clock: Clock) -> None:
    pool, opener = make(clock, maxSize=3, minSize=1, idleTimeout=10.0)
    servers = [pool.acquire() for _ in range(3)]
    opener.finish(3)
    for d in servers:
        pool.release(result(d))
    clock.advance(11)
    pool.reap()
    assert pool.size == 1
    assert sum(s.leg.closed for s in opener.opened) == 2
    assert not pool.unused or pool.size == 1


def test_min_size_is_opened_by_reap(clock: Clock) -> None:
    pool, opener = make(clock, maxSize=3, minSize=2)
    pool.reap()
    assert pool.connecting == 2


def test_open_failure_reaches_the_longest_waiter(clock: Clock) -> None:
    pool, opener = make(clock, maxSize=1)
    d = pool.acquire()
    opener.fail()
    assert result(d).check(RuntimeError)
    assert pool.size == 0 and not pool.waiters


def test_lost_connection_makes_room(clock: Clock) -> None:
    pool, opener = make(clock, maxSize=1)
    server = result(_opened(pool, opener))
    waiting = pool.acquire()
    pool.lost(server)
    assert len(opener.pending) == 1
    opener.finish()
    assert result(waiting) is not server


def test_unused_pool(clock: Clock) -> None:
    pool, opener = make(clock, idleTimeout=10.0)
    server = result(_opened(pool, opener))
    pool.release(server)
    assert not pool.unused
    clock.advance(11)
    pool.reap()
    assert pool.size == 0 and pool.unused
