"""
Unit tests of the pool manager (L{pgtls_twisted.pool._manager}) with a fake
route: pools per database (service user) and per (user, database), the
limits they share, how a user's pool gets what it logs in with
(C{loginFor}), and what C{SHOW POOLS}, C{SHOW SERVERS} and the metrics show
of per-user pools.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from support.unit import result
from twisted.internet import defer
from twisted.internet.task import Clock

from pgtls_twisted.config import PoolConfig
from pgtls_twisted.ops._commands import AdminCommands
from pgtls_twisted.ops._metrics import Metrics
from pgtls_twisted.pool._manager import Credentials, NoCredentials, PoolManager
from pgtls_twisted.pool._pool import PooledServer
from pgtls_twisted.pool._serverlogin import LoginResult, ServerLoginError


class FakeLeg:
    transport = None
    connectedAt = 0.0
    tlsInfo = None

    def __init__(self) -> None:
        self.closed = False
        self.deliver: Any = None
        self.onLost: Any = None

    def close(self) -> None:
        self.closed = True


class FakeBackend:
    def __init__(self) -> None:
        self.connects = 0

    def connect(self) -> defer.Deferred[FakeLeg]:
        self.connects += 1
        return defer.succeed(FakeLeg())


class FakeLogin:
    def __init__(self, pid: int) -> None:
        self.done: defer.Deferred[LoginResult] = defer.Deferred()
        self.done.callback(LoginResult({"server_version": "17"}, (pid, b"k")))


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def poolDropped(self, route: str, database: str) -> None:
        self.calls.append(("poolDropped", route, database))


def fake_route(**pool: Any) -> SimpleNamespace:
    config = PoolConfig(service_user="svc", service_password="svc-pw", **pool)
    return SimpleNamespace(
        name="r",
        config=SimpleNamespace(pool=config),
        clock=Clock(),
        paused=False,
        retired=False,
        backend=FakeBackend(),
        metrics=Recorder(),
        clients=[],
    )


class Logins:
    """Stands in for L{PoolManager._serverLogin}: records who logged in with what."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Credentials]] = []

    def __call__(self, leg: Any, user: str, database: str, credentials: Credentials) -> FakeLogin:
        self.calls.append((user, database, credentials))
        return FakeLogin(1000 + len(self.calls))


def manager_for(**pool: Any) -> tuple[PoolManager, Logins]:
    manager = PoolManager(fake_route(**pool))
    logins = Logins()
    manager._serverLogin = logins  # type: ignore[method-assign]
    return manager, logins


def test_service_user_pools_are_per_database() -> None:
    manager, logins = manager_for()
    pool = manager.poolFor("app")
    assert manager.poolFor("app") is pool and manager.poolFor("app", None) is pool
    assert manager.pools == {"app": pool}
    assert (pool.name, pool.user, pool.database) == ("svc/app", "svc", "app")
    assert manager.limits is None and pool.group is None
    server = result(pool.acquire())
    assert isinstance(server, PooledServer) and server.backendKey == (1001, b"k")
    assert logins.calls == [("svc", "app", Credentials("svc-pw"))]


def test_user_pools_are_per_user_and_database() -> None:
    manager, logins = manager_for()
    manager.loginFor = lambda user, database: Credentials(f"{user}-pw")
    alice = manager.poolFor("app", "alice")
    assert manager.poolFor("app", "alice") is alice
    bob = manager.poolFor("app", "bob")
    reports = manager.poolFor("reports", "alice")
    assert len({id(alice), id(bob), id(reports)}) == 3
    assert manager.pools == {
        ("alice", "app"): alice,
        ("bob", "app"): bob,
        ("alice", "reports"): reports,
    }
    assert (alice.name, alice.user, alice.database) == ("alice/app", "alice", "app")
    result(alice.acquire())
    result(reports.acquire())
    assert logins.calls == [
        ("alice", "app", Credentials("alice-pw")),
        ("alice", "reports", Credentials("alice-pw")),
    ]


def test_credentials_are_passed_through_with_their_keys() -> None:
    """What the login cache kept (SCRAM keys) travels as the credential itself."""
    manager, logins = manager_for()
    keys = object()
    manager.loginFor = lambda user, database: defer.succeed(Credentials(keys))
    result(manager.poolFor("app", "alice").acquire())
    [(_, _, given)] = logins.calls
    assert given.password is keys


def test_user_pool_without_login_for_refuses_clearly() -> None:
    manager, logins = manager_for()
    failure = result(manager.poolFor("app", "alice").acquire())
    assert failure.check(NoCredentials) and failure.check(ServerLoginError)
    assert failure.value.sqlstate == "28000"
    assert failure.value.message == 'pgtls has no credentials to log in as "alice"'
    assert manager.route.backend.connects == 0 and not logins.calls


def test_refusal_by_login_for_reaches_the_client_before_any_connection() -> None:
    manager, logins = manager_for()

    def refuse(user: str, database: str) -> Credentials:
        raise ServerLoginError("28P01", f'password authentication failed for user "{user}"')

    manager.loginFor = refuse
    failure = result(manager.poolFor("app", "alice").acquire())
    assert failure.value.sqlstate == "28P01"
    assert manager.route.backend.connects == 0 and not logins.calls


def test_idle_connection_that_dies_leaves_its_user_pool() -> None:
    manager, _ = manager_for()
    manager.loginFor = lambda user, database: (None, None)
    pool = manager.poolFor("app", "alice")
    server = result(pool.acquire())
    pool.release(server)
    assert pool.idle == [server]
    server.leg.onLost(None)
    assert pool.idle == [] and pool.size == 0


def test_limits_are_shared_by_the_managers_pools() -> None:
    manager, _ = manager_for(max_db_connections=2, max_user_connections=3)
    manager.loginFor = lambda user, database: (None, None)
    assert manager.limits is not None
    alice = manager.poolFor("app", "alice")
    bob = manager.poolFor("app", "bob")
    reports = manager.poolFor("reports", "alice")
    assert [str(limit) for limit in alice.limits] == [
        'max_db_connections (2) of database "app"',
        'max_user_connections (3) of user "alice"',
    ]
    assert alice.limits[0] is bob.limits[0] and alice.limits[1] is reports.limits[1]
    result(alice.acquire()), result(alice.acquire())
    assert not bob.acquire().called
    service = manager_for(max_user_connections=1)[0]
    [limit] = service.poolFor("app").limits
    assert limit is service.poolFor("reports").limits[0], "the service user's limit"


def test_reap_drops_user_pools_and_a_databases_series_with_the_last() -> None:
    manager, _ = manager_for(idle_timeout=10.0, max_db_connections=5)
    manager.loginFor = lambda user, database: (None, None)
    clock = manager.route.clock
    alice = manager.poolFor("app", "alice")
    bob = manager.poolFor("app", "bob")
    alice.release(result(alice.acquire()))
    clock.advance(5)
    bob.release(result(bob.acquire()))
    clock.advance(6)
    manager.reap()
    assert manager.pools == {("bob", "app"): bob}
    assert manager.limits is not None and manager.limits.pools == [bob]
    assert manager.route.metrics.calls == [], "Bob's pool still uses the series"
    clock.advance(5)
    manager.reap()
    assert manager.pools == {}
    assert manager.route.metrics.calls == [("poolDropped", "r", "app")]


def test_show_pools_and_servers_show_each_pools_user() -> None:
    manager, _ = manager_for(max_size=1)
    manager.loginFor = lambda user, database: (None, None)
    route = manager.route
    route.pools = manager
    bob = manager.poolFor("app", "bob")
    alice = manager.poolFor("app", "alice")
    result(alice.acquire())
    result(bob.acquire())
    bob.acquire()  # waits: Bob's pool is at its max_size
    process = SimpleNamespace(liveRoutes=lambda: [route], reactor=route.clock)
    commands = AdminCommands(process)  # type: ignore[arg-type]
    pools = commands.show_pools()
    names = [name for name, _ in pools.columns]
    rows = [dict(zip(names, row, strict=True)) for row in pools.rows]
    assert [(r["database"], r["user"], r["sv_active"], r["cl_waiting"]) for r in rows] == [
        ("app", "alice", 1, 0),
        ("app", "bob", 1, 1),
    ]
    servers = commands.show_servers()
    names = [name for name, _ in servers.columns]
    rows = [dict(zip(names, row, strict=True)) for row in servers.rows]
    assert [(r["user"], r["database"], r["remote_pid"]) for r in rows] == [
        ("alice", "app", 1001),
        ("bob", "app", 1002),
    ]


def test_metrics_sum_a_databases_user_pools() -> None:
    manager, _ = manager_for(max_size=1)
    manager.loginFor = lambda user, database: (None, None)
    route = manager.route
    route.pools = manager
    result(manager.poolFor("app", "alice").acquire())
    bob = manager.poolFor("app", "bob")
    result(bob.acquire())
    bob.acquire()
    result(manager.poolFor("reports", "bob").acquire())
    metrics = Metrics(clock=route.clock)
    metrics.routes = lambda: [route]
    text = metrics.text().decode()
    assert (
        'pgtls_pool_server_connections{database="app",route="r",state="active",worker="0"} 2.0'
        in text
    )
    assert (
        'pgtls_pool_server_connections{database="reports",route="r",state="active",worker="0"} 1.0'
        in text
    )
    assert 'pgtls_pool_clients_waiting{database="app",route="r",worker="0"} 1.0' in text
