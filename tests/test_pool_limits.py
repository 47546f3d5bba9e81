"""
Unit tests of the limits shared by pools (L{pgtls_twisted.pool._limits}):
C{max_db_connections} and C{max_user_connections} across pools, eviction of
other pools' idle connections, one fair queue across pools, deadlines, lost
connections and reaping; with a fake clock and openers that finish when the
test says so.
"""

from __future__ import annotations

from typing import Any

import pytest
from support.poolfakes import FakeLeg, Opener
from support.unit import result
from twisted.internet import defer
from twisted.internet.task import Clock

from pgtls_twisted.pool._limits import Limits
from pgtls_twisted.pool._pool import RETRY_DELAY, Pool, PooledServer, PoolTimeout


class Scene:
    """Pools of one route sharing L{Limits}."""

    def __init__(self, clock: Clock, perDatabase: int = 0, perUser: int = 0) -> None:
        self.clock = clock
        self.limits = Limits(perDatabase, perUser)

    def pool(self, user: str, database: str, **kw: Any) -> tuple[Pool, Opener]:
        opener = Opener(self.clock)
        options = {"maxSize": 5, "acquireTimeout": 5.0, "idleTimeout": 60.0, "maxLifetime": 600.0}
        options.update(kw)
        pool = Pool(
            f"{user}/{database}", opener, self.clock, user=user, database=database, **options
        )
        self.limits.join(pool, database, user)
        return pool, opener

    def held(self, pool: Pool, opener: Opener, n: int = 1) -> list[PooledServer]:
        """C{n} connections of C{pool}, opened and held."""
        ds = [pool.acquire() for _ in range(n)]
        opener.finish(n)
        return [result(d) for d in ds]


@pytest.fixture
def clock() -> Clock:
    return Clock()


# -- the limits -----------------------------------------------------------------


def test_database_limit_counts_every_users_pool(clock: Clock) -> None:
    scene = Scene(clock, perDatabase=3)
    alice, aliceOpens = scene.pool("alice", "app")
    bob, bobOpens = scene.pool("bob", "app")
    other, otherOpens = scene.pool("bob", "other")
    scene.held(alice, aliceOpens, 2)
    scene.held(bob, bobOpens, 1)
    waiting = bob.acquire()
    assert not bobOpens.pending, "the database's third connection is its last"
    assert scene.limits.blocked == [bob]
    scene.held(other, otherOpens, 3)  # another database: not counted
    assert not waiting.called


def test_connections_being_opened_count(clock: Clock) -> None:
    scene = Scene(clock, perDatabase=2)
    alice, aliceOpens = scene.pool("alice", "app")
    bob, bobOpens = scene.pool("bob", "app")
    alice.acquire(), alice.acquire()
    bob.acquire()
    assert len(aliceOpens.pending) == 2 and not bobOpens.pending


def test_user_limit_counts_every_database(clock: Clock) -> None:
    scene = Scene(clock, perUser=2)
    app, appOpens = scene.pool("alice", "app")
    reports, reportsOpens = scene.pool("alice", "reports")
    bob, bobOpens = scene.pool("bob", "reports")
    scene.held(app, appOpens, 2)
    reports.acquire()
    assert not reportsOpens.pending
    scene.held(bob, bobOpens, 2)  # another user: not counted


def test_max_size_stays_per_pool(clock: Clock) -> None:
    scene = Scene(clock, perDatabase=10, perUser=10)
    alice, aliceOpens = scene.pool("alice", "app", maxSize=1)
    scene.held(alice, aliceOpens, 1)
    alice.acquire()
    assert not aliceOpens.pending
    assert scene.limits.blocked == [], "its own max_size holds it, not a shared limit"


def test_no_limit_is_zero(clock: Clock) -> None:
    scene = Scene(clock)
    alice, aliceOpens = scene.pool("alice", "app")
    assert alice.limits == ()
    scene.held(alice, aliceOpens, 5)


def test_min_size_is_opened_only_within_the_limits(clock: Clock) -> None:
    scene = Scene(clock, perDatabase=3)
    alice, aliceOpens = scene.pool("alice", "app", minSize=2)
    bob, bobOpens = scene.pool("bob", "app", minSize=2)
    alice.reap()
    bob.reap()
    assert len(aliceOpens.pending) == 2 and len(bobOpens.pending) == 1
    bobOpens.finish()
    aliceOpens.finish(2)
    bob.reap()
    assert not bobOpens.pending, "min_size takes no slot that is not free"


# -- other pools' idle connections go first ---------------------------------------


def test_idle_connection_of_another_pool_is_closed_for_a_waiting_client(clock: Clock) -> None:
    scene = Scene(clock, perDatabase=2)
    alice, aliceOpens = scene.pool("alice", "app")
    bob, bobOpens = scene.pool("bob", "app")
    first, second = scene.held(alice, aliceOpens, 2)
    alice.release(first)
    waiting = bob.acquire()
    assert first.leg.closed and alice.idle == []
    assert len(bobOpens.pending) == 1
    bobOpens.finish()
    assert result(waiting) is bobOpens.opened[0]
    assert not second.leg.closed


def test_connection_going_idle_is_closed_for_a_blocked_pool(clock: Clock) -> None:
    scene = Scene(clock, perDatabase=1)
    alice, aliceOpens = scene.pool("alice", "app")
    bob, bobOpens = scene.pool("bob", "app")
    [server] = scene.held(alice, aliceOpens)
    waiting = bob.acquire()
    assert not bobOpens.pending
    alice.release(server)
    assert server.leg.closed and len(bobOpens.pending) == 1
    bobOpens.finish()
    assert result(waiting) is bobOpens.opened[0]


def test_least_recently_used_idle_connection_is_closed_first(clock: Clock) -> None:
    scene = Scene(clock, perDatabase=3)
    alice, aliceOpens = scene.pool("alice", "app")
    bob, bobOpens = scene.pool("bob", "app")
    carol, carolOpens = scene.pool("carol", "app")
    a1, a2 = scene.held(alice, aliceOpens, 2)
    [b1] = scene.held(bob, bobOpens)
    clock.advance(1)
    alice.release(a1)
    clock.advance(1)
    bob.release(b1)
    clock.advance(1)
    alice.release(a2)
    carol.acquire()
    assert [a1.leg.closed, b1.leg.closed, a2.leg.closed] == [True, False, False]
    carol.acquire()
    assert [b1.leg.closed, a2.leg.closed] == [True, False]
    assert len(carolOpens.pending) == 2


def test_only_idle_connections_that_free_every_blocking_limit_are_closed(clock: Clock) -> None:
    scene = Scene(clock, perDatabase=2, perUser=2)
    aliceApp, aliceAppOpens = scene.pool("alice", "app")
    bobReports, bobReportsOpens = scene.pool("bob", "reports")
    aliceReports, aliceReportsOpens = scene.pool("alice", "reports")
    aliceHeld, aliceIdle = scene.held(aliceApp, aliceAppOpens, 2)
    bobHeld, bobIdle = scene.held(bobReports, bobReportsOpens, 2)
    aliceApp.release(aliceIdle)
    bobReports.release(bobIdle)
    waiting = aliceReports.acquire()
    # Alice's own limit and the database's are both full: closing either
    # idle connection alone would not let her pool open.
    assert not aliceIdle.leg.closed and not bobIdle.leg.closed
    assert not aliceReportsOpens.pending
    aliceApp.lost(aliceHeld)
    # Now only the database's limit blocks: Bob's idle connection goes.
    assert bobIdle.leg.closed and not aliceIdle.leg.closed
    assert len(aliceReportsOpens.pending) == 1
    aliceReportsOpens.finish()
    assert result(waiting) is aliceReportsOpens.opened[0]


# -- one queue across pools --------------------------------------------------------


def test_freed_slot_goes_to_the_client_that_waited_longest(clock: Clock) -> None:
    scene = Scene(clock, perDatabase=1)
    alice, aliceOpens = scene.pool("alice", "app")
    bob, bobOpens = scene.pool("bob", "app")
    carol, carolOpens = scene.pool("carol", "app")
    [server] = scene.held(alice, aliceOpens)
    bobWaits = bob.acquire()
    carolWaits = carol.acquire()
    alice.lost(server)
    assert len(bobOpens.pending) == 1 and not carolOpens.pending
    bobOpens.finish()
    bob.release(result(bobWaits))  # goes idle: closed for Carol
    assert bobOpens.opened[0].leg.closed and len(carolOpens.pending) == 1
    carolOpens.finish()
    assert result(carolWaits) is carolOpens.opened[0]


def test_released_connection_is_closed_for_an_older_client_of_another_pool(clock: Clock) -> None:
    scene = Scene(clock, perDatabase=1)
    alice, aliceOpens = scene.pool("alice", "app")
    bob, bobOpens = scene.pool("bob", "app")
    [server] = scene.held(alice, aliceOpens)
    bobWaits = bob.acquire()
    aliceWaits = alice.acquire()  # after Bob's
    alice.release(server)
    assert server.leg.closed, "Alice's later client does not keep the slot"
    assert not aliceWaits.called and len(bobOpens.pending) == 1
    bobOpens.finish()
    bob.release(result(bobWaits))
    aliceOpens.finish()
    assert result(aliceWaits) is aliceOpens.opened[1]


def test_released_connection_stays_with_its_pool_when_its_client_came_first(
    clock: Clock,
) -> None:
    scene = Scene(clock, perDatabase=1)
    alice, aliceOpens = scene.pool("alice", "app")
    bob, bobOpens = scene.pool("bob", "app")
    [server] = scene.held(alice, aliceOpens)
    aliceWaits = alice.acquire()
    bobWaits = bob.acquire()
    alice.release(server)
    assert result(aliceWaits) is server and not server.leg.closed
    assert not bobWaits.called and not bobOpens.pending


def test_released_connection_stays_when_the_older_client_is_blocked_elsewhere(
    clock: Clock,
) -> None:
    scene = Scene(clock, perUser=1)
    aliceApp, aliceAppOpens = scene.pool("alice", "app")
    aliceReports, aliceReportsOpens = scene.pool("alice", "reports")
    bobApp, bobAppOpens = scene.pool("bob", "app")
    scene.held(aliceApp, aliceAppOpens)
    [bobServer] = scene.held(bobApp, bobAppOpens)
    aliceWaits = aliceReports.acquire()  # blocked by Alice's own limit
    bobWaits = bobApp.acquire()
    bobApp.release(bobServer)
    assert result(bobWaits) is bobServer, "closing it would not help Alice"
    assert not aliceWaits.called


def test_slot_the_oldest_client_cannot_use_goes_to_the_next(clock: Clock) -> None:
    scene = Scene(clock, perDatabase=2, perUser=2)
    aliceApp, aliceAppOpens = scene.pool("alice", "app")
    aliceReports, aliceReportsOpens = scene.pool("alice", "reports")
    bobApp, bobAppOpens = scene.pool("bob", "app")
    carolApp, carolAppOpens = scene.pool("carol", "app")
    scene.held(aliceReports, aliceReportsOpens, 2)  # Alice's limit is full
    scene.held(carolApp, carolAppOpens)
    [bobServer] = scene.held(bobApp, bobAppOpens)  # and database "app"'s
    aliceWaits = aliceApp.acquire()
    carolWaits = carolApp.acquire()
    assert not aliceAppOpens.pending and not carolAppOpens.pending
    bobApp.lost(bobServer)
    # Alice waited longer, but her own limit still blocks her.
    assert not aliceAppOpens.pending and len(carolAppOpens.pending) == 1
    carolAppOpens.finish()
    assert result(carolWaits) is carolAppOpens.opened[1]
    assert not aliceWaits.called


def test_open_failure_frees_the_slot_for_another_pool(clock: Clock) -> None:
    scene = Scene(clock, perDatabase=1)
    alice, aliceOpens = scene.pool("alice", "app")
    bob, bobOpens = scene.pool("bob", "app")
    aliceFirst = alice.acquire()
    aliceSecond = alice.acquire()
    bobWaits = bob.acquire()
    assert len(aliceOpens.pending) == 1 and not bobOpens.pending
    aliceOpens.fail()
    assert result(aliceFirst).check(RuntimeError)
    # Alice's pool backs off; the slot serves Bob meanwhile.
    assert len(bobOpens.pending) == 1 and not aliceOpens.pending
    bobOpens.finish()
    bob.release(result(bobWaits))
    assert not aliceOpens.pending, "still backing off"
    clock.advance(RETRY_DELAY)
    assert len(aliceOpens.pending) == 1
    aliceOpens.finish()
    assert result(aliceSecond) is aliceOpens.opened[0]


# -- deadlines, lost connections, reaping --------------------------------------------


def test_blocked_client_times_out_naming_the_limit(clock: Clock) -> None:
    scene = Scene(clock, perDatabase=1)
    alice, aliceOpens = scene.pool("alice", "app")
    bob, bobOpens = scene.pool("bob", "app", acquireTimeout=2.0)
    [server] = scene.held(alice, aliceOpens)
    early = bob.acquire()
    clock.advance(1)
    late = bob.acquire()
    clock.advance(1)
    failure = result(early)
    assert failure.check(PoolTimeout)
    assert str(failure.value) == (
        'no server connection available in pool "bob/app" within 2s;'
        ' max_db_connections (1) of database "app" reached'
    )
    assert not late.called
    alice.release(server)
    bobOpens.finish()
    assert result(late) is bobOpens.opened[0]


def test_client_that_left_gives_its_turn_to_the_next(clock: Clock) -> None:
    scene = Scene(clock, perDatabase=1)
    alice, aliceOpens = scene.pool("alice", "app")
    bob, bobOpens = scene.pool("bob", "app")
    carol, carolOpens = scene.pool("carol", "app")
    [server] = scene.held(alice, aliceOpens)
    leaving = bob.acquire()
    carolWaits = carol.acquire()
    leaving.cancel()
    result(leaving)
    alice.release(server)
    assert not bobOpens.pending and len(carolOpens.pending) == 1
    carolOpens.finish()
    assert result(carolWaits) is carolOpens.opened[0]


def test_lost_connection_frees_its_slot(clock: Clock) -> None:
    scene = Scene(clock, perUser=2)
    app, appOpens = scene.pool("alice", "app")
    reports, reportsOpens = scene.pool("alice", "reports")
    first, _ = scene.held(app, appOpens, 2)
    waiting = reports.acquire()
    assert not reportsOpens.pending
    app.lost(first)
    assert len(reportsOpens.pending) == 1
    reportsOpens.finish()
    assert result(waiting) is reportsOpens.opened[0]


def test_dirty_connection_frees_its_slot(clock: Clock) -> None:
    scene = Scene(clock, perDatabase=1)
    alice, aliceOpens = scene.pool("alice", "app")
    bob, bobOpens = scene.pool("bob", "app")
    [server] = scene.held(alice, aliceOpens)
    waiting = bob.acquire()
    server.dirty = True
    alice.release(server)
    assert server.leg.closed and len(bobOpens.pending) == 1
    bobOpens.finish()
    assert result(waiting) is bobOpens.opened[0]


def test_reap_frees_slots_and_refills_min_size_within_limits(clock: Clock) -> None:
    scene = Scene(clock, perDatabase=2)
    alice, aliceOpens = scene.pool("alice", "app", idleTimeout=10.0)
    for server in scene.held(alice, aliceOpens, 2):
        alice.release(server)
    bob, bobOpens = scene.pool("bob", "app", minSize=1)
    bob.reap()
    assert not bobOpens.pending, "min_size closes nobody's idle connection"
    clock.advance(11)
    alice.reap()
    assert alice.size == 0 and all(s.leg.closed for s in aliceOpens.opened)
    assert len(bobOpens.pending) == 1


def test_dropped_pool_leaves_its_limits(clock: Clock) -> None:
    scene = Scene(clock, perDatabase=2, perUser=2)
    alice, _ = scene.pool("alice", "app")
    bob, _ = scene.pool("bob", "app")
    [database, user] = alice.limits
    scene.limits.leave(alice)
    assert alice.limits == () and alice.group is None
    assert database.pools == [bob] and alice not in user.pools
    assert scene.limits.pools == [bob]
    scene.limits.leave(bob)
    assert not scene.limits._limits


# -- pausing and re-entrance ----------------------------------------------------------


def test_paused_pools_open_nothing_until_resumed(clock: Clock) -> None:
    scene = Scene(clock, perDatabase=1)
    alice, aliceOpens = scene.pool("alice", "app")
    bob, bobOpens = scene.pool("bob", "app")
    [server] = scene.held(alice, aliceOpens)
    alice.pause()
    bob.pause()
    waiting = bob.acquire()
    alice.release(server)
    assert not bobOpens.pending
    bob.resume()
    assert server.leg.closed and len(bobOpens.pending) == 1
    bobOpens.finish()
    assert result(waiting) is bobOpens.opened[0]


def test_connections_handed_out_synchronously(clock: Clock) -> None:
    """An opener that succeeds at once, and clients that give back at once."""
    limits = Limits(perDatabase=2)
    pools = []
    opened: list[PooledServer] = []

    def opener() -> defer.Deferred[PooledServer]:
        server = PooledServer(FakeLeg(), created=clock.seconds())
        opened.append(server)
        return defer.succeed(server)

    for user in ("alice", "bob", "carol"):
        pool = Pool(f"{user}/app", opener, clock, maxSize=5, user=user, database="app")
        limits.join(pool, "app", user)
        pools.append(pool)
    served = []
    for _ in range(3):
        for pool in pools:
            d = pool.acquire()
            d.addCallback(
                lambda server, pool=pool: (served.append(pool.user), pool.release(server))
            )
    assert served == ["alice", "bob", "carol"] * 3
    assert sum(pool.size for pool in pools) <= 2
    assert all(not pool.waiters for pool in pools)
