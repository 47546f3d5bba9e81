"""
A pooled session (L{pgtls_twisted.pool._session.PooledSession}) without
sockets: the client's login on a temporary backend connection, then its
requests on server connections that a pool hands out. The pool is a
L{FakePool} that records what the session asks of it (C{("pool", ...)}
events), except in the cancel race, which needs the real
L{pgtls_twisted.pool._pool.Pool}'s bookkeeping.

The transports are named C{client}, C{login} (the temporary connection),
C{pooled} (the pooled server connection), and C{cancel}.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from support.unit import (
    Backend,
    Client,
    Event,
    FakePool,
    FakePools,
    Scene,
    answer,
    login_ok,
    pooled_server,
    query,
    unit_reactor,
)
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock

from pgtls_twisted.pool._pool import Pool, PooledServer, PoolTimeout
from pgtls_twisted.pool._session import PooledSession
from pgtls_twisted.protocol import _wire as wire
from pgtls_twisted.proxy._leg import Phase
from pgtls_twisted.testing.pki import PKI

reactor = pytest.fixture(unit_reactor, name="reactor")


def pooled_scene(
    pki: PKI, tmp_path: Path, reactor: MemoryReactorClock, mode: str, pool: Any = None
) -> Scene:
    events: list[Event] = []
    return Scene(
        pki,
        tmp_path,
        reactor,
        PooledSession,
        events=events,
        pool={"mode": mode},
        pools=FakePools(events, pool),
    )


@pytest.fixture
def scene(pki: PKI, tmp_path: Path, reactor: MemoryReactorClock) -> Scene:
    """A transaction-mode route."""
    return pooled_scene(pki, tmp_path, reactor, "transaction")


@pytest.fixture
def session_scene(pki: PKI, tmp_path: Path, reactor: MemoryReactorClock) -> Scene:
    return pooled_scene(pki, tmp_path, reactor, "session")


def login(scene: Scene, name: str = "client", **parameters: str) -> Client:
    """A client logged in (through a temporary connection); the events are cleared."""
    client = scene.start("alice", name=name)
    scene.backends.accept("login").send(login_ok(**parameters))
    scene.events.clear()
    return client


def the_pool(scene: Scene) -> FakePool:
    pool: FakePool = scene.route.pools.pools["alice"]
    return pool


def attach(scene: Scene, client: Client, sql: str = "select 1") -> tuple[PooledServer, Backend]:
    """The client sends a query and is given a pooled server connection."""
    client.send(query(sql))
    server, backend = pooled_server(scene.route, scene.backends)
    the_pool(scene).give(server)
    return server, backend


def begin(scene: Scene, client: Client) -> tuple[PooledServer, Backend]:
    """The client is given a server for a BEGIN, and is then in a transaction."""
    server, backend = attach(scene, client, "begin")
    backend.send(wire.command_complete("BEGIN") + wire.ready_for_query(b"T"))
    return server, backend


def sent_sql(backend: Backend) -> list[str]:
    return [wire.query_text(body) for body in backend.transport.framer.bodies(b"Q")]


# ---------------------------------------------------------------------------
# Login


def test_login_ends_on_the_temporary_connection(scene: Scene) -> None:
    client = scene.start("alice")
    scene.backends.accept("login").send(login_ok(client_encoding="UTF8"))

    assert scene.events == [
        ("login", "startup"),
        ("client", "R:0"),
        ("client", "S"),
        ("client", "K"),
        ("client", "Z:I"),
        ("login", "close"),
    ]
    # The pool is looked up only now, and counts the session.
    assert the_pool(scene).sessions == 1
    assert scene.metrics.named("pooled") == [("pooled", "test", "alice")]
    assert client.proto.phase is Phase.READY


def test_no_server_until_the_first_request(scene: Scene) -> None:
    client = login(scene)
    assert scene.events == []
    client.send(query("select 1"))
    assert scene.events == [("pool", "acquire")]


# ---------------------------------------------------------------------------
# Attaching and detaching


def test_transaction_mode_releases_at_idle(scene: Scene) -> None:
    client = login(scene)
    _, backend = attach(scene, client)
    backend.send(answer())
    client.send(query("select 2"))

    assert scene.events == [
        ("pool", "acquire"),
        ("pooled", "Q"),
        ("client", "T"),
        ("client", "D"),
        ("client", "C"),
        ("client", "Z:I"),
        ("pool", "release"),
        ("pool", "acquire"),
    ]
    # Detached: no flow control ties the client to that server any more.
    assert client.transport.producer is None
    assert backend.transport.producer is None


def test_transaction_mode_keeps_the_server_through_a_transaction(scene: Scene) -> None:
    client = login(scene)
    _, backend = begin(scene, client)
    client.send(query("commit"))
    backend.send(wire.command_complete("COMMIT") + wire.ready_for_query(b"I"))

    assert scene.events == [
        ("pool", "acquire"),
        ("pooled", "Q"),
        ("client", "C"),
        ("client", "Z:T"),
        ("pooled", "Q"),
        ("client", "C"),
        ("client", "Z:I"),
        ("pool", "release"),
    ]


def test_session_mode_keeps_the_server_and_resets_it_when_the_client_leaves(
    session_scene: Scene,
) -> None:
    scene = session_scene
    client = login(scene)
    _, backend = attach(scene, client)
    backend.send(answer())
    client.send(query("select 2"))
    backend.send(answer())
    client.send(wire.TERMINATE)
    backend.send(wire.command_complete("RESET") + wire.ready_for_query())
    backend.send(wire.command_complete("DISCARD ALL") + wire.ready_for_query())

    assert scene.events == [
        # Session mode: the server was asked for at login, and the login's
        # BackendKeyData and ReadyForQuery waited for it (its process ID).
        ("client", "K"),
        ("client", "Z:I"),
        ("pooled", "Q"),
        ("client", "T"),
        ("client", "D"),
        ("client", "C"),
        ("client", "Z:I"),
        ("pooled", "Q"),
        ("client", "T"),
        ("client", "D"),
        ("client", "C"),
        ("client", "Z:I"),
        # The Terminate is not forwarded: the server is reset instead (its
        # statement timeout first, so that the reset runs under none).
        ("pooled", "Q"),
        ("client", "close"),
        ("pooled", "Q"),
        ("pool", "release"),
    ]
    assert sent_sql(backend) == ["select 1", "select 2", "RESET statement_timeout", "DISCARD ALL"]
    assert the_pool(scene).sessions == 0


def test_terminate_is_never_forwarded(scene: Scene) -> None:
    client = login(scene)
    _, backend = attach(scene, client)
    backend.send(answer())
    client.send(wire.TERMINATE)

    assert scene.events[-2:] == [("pool", "release"), ("client", "close")]
    assert [t for t, _ in backend.messages] == [b"Q"]
    assert the_pool(scene).sessions == 0


def test_terminate_inside_a_transaction_rolls_back_first(scene: Scene) -> None:
    client = login(scene)
    _, backend = begin(scene, client)
    scene.events.clear()
    client.send(wire.TERMINATE)
    backend.send(wire.command_complete("ROLLBACK") + wire.ready_for_query(b"I"))

    assert scene.events == [("pooled", "Q"), ("client", "close"), ("pool", "release")]
    assert sent_sql(backend) == ["begin", "ROLLBACK"]


def test_client_leaving_mid_request_makes_the_server_dirty(scene: Scene) -> None:
    client = login(scene)
    server, backend = attach(scene, client)
    backend.send(answer()[:10])  # part of the result
    scene.events.clear()
    client.lose()

    assert scene.events == [("pool", "release dirty")]
    assert server.dirty
    # Whatever the server still sends goes nowhere.
    backend.send(answer()[10:])
    assert scene.events == [("pool", "release dirty")]


def test_client_leaving_mid_message_makes_the_server_dirty(scene: Scene) -> None:
    client = login(scene)
    server, backend = begin(scene, client)
    client.send(query("select 2")[:7])  # half a message: the server waits for the rest
    scene.events.clear()
    client.lose()
    # Not rolled back (the server would read ROLLBACK as the rest): closed.
    assert scene.events == [("pool", "release dirty")]
    assert server.dirty


def test_client_leaving_while_waiting_for_a_server(scene: Scene) -> None:
    client = login(scene)
    client.send(query("select 1"))
    client.lose()
    assert scene.events == [("pool", "acquire"), ("pool", "cancelled")]
    assert the_pool(scene).sessions == 0


def test_no_server_within_acquire_timeout_is_53300(scene: Scene) -> None:
    client = login(scene)
    client.send(query("select 1"))
    the_pool(scene).refuse(PoolTimeout('no server connection available in pool "svc/alice"'))

    assert scene.events == [("pool", "acquire"), ("client", "E:53300"), ("client", "close")]
    assert client.error()["M"] == 'pgtls: no server connection available in pool "svc/alice"'


def test_server_lost_while_attached_is_08006(scene: Scene) -> None:
    client = login(scene)
    _, backend = attach(scene, client)
    scene.events.clear()
    backend.lose()

    assert scene.events == [("pool", "lost"), ("client", "E:08006"), ("client", "close")]
    assert client.error()["M"] == 'pgtls pool "svc/alice": server connection lost'


def test_server_fatal_is_relayed_and_its_closing_adds_nothing(scene: Scene) -> None:
    client = login(scene)
    _, backend = attach(scene, client)
    scene.events.clear()
    backend.send(
        wire.error_response("57P01", "terminating connection due to administrator command")
    )
    backend.lose()

    assert scene.events == [("client", "E:57P01"), ("pool", "lost"), ("client", "close")]


def test_session_parameters_are_set_before_the_held_request(scene: Scene) -> None:
    """
    The login reported TimeZone UTC; the pooled server has another: pgtls
    sets it first, and the client sees nothing of that statement.
    """
    client = login(scene, TimeZone="UTC")
    client.send(query("select now()"))
    server, backend = pooled_server(
        scene.route, scene.backends, parameters={"TimeZone": "Europe/Paris"}
    )
    the_pool(scene).give(server)
    assert sent_sql(backend) == ["SET TimeZone = 'UTC';"]

    backend.send(
        wire.command_complete("SET")
        + wire.parameter_status("TimeZone", "UTC")
        + wire.ready_for_query()
    )
    backend.send(answer())

    assert scene.events == [
        ("pool", "acquire"),
        ("pooled", "Q"),
        ("pooled", "Q"),
        ("client", "T"),
        ("client", "D"),
        ("client", "C"),
        ("client", "Z:I"),
        ("pool", "release"),
    ]
    assert sent_sql(backend) == ["SET TimeZone = 'UTC';", "select now()"]
    assert server.parameters["TimeZone"] == "UTC"


def test_a_released_servers_late_bytes_never_reach_the_client(scene: Scene) -> None:
    client = login(scene)
    _, backend = attach(scene, client)
    backend.send(answer())
    scene.events.clear()
    backend.send(wire.notice_response("late"))
    assert scene.events == []


# ---------------------------------------------------------------------------
# Shutting down


#: A draining client's last query: forwarded, answered, the server given
#: back, and the client let go with 57P01.
_QUERY_THEN_LET_GO = [
    ("pooled", "Q"),
    ("client", "C"),
    ("client", "Z:I"),
    ("pool", "release"),
    ("client", "E:57P01"),
    ("client", "close"),
]


def test_drain_between_transactions_closes_at_once(scene: Scene) -> None:
    client = login(scene)
    _, backend = attach(scene, client)
    backend.send(wire.command_complete("SELECT 1") + wire.ready_for_query(b"I"))
    scene.events.clear()
    client.proto.drain()
    assert scene.events == [("client", "E:57P01"), ("client", "close")]


def test_drain_before_the_first_transaction_lets_it_run(scene: Scene) -> None:
    """
    A client that has logged in and had no transaction yet (its first
    query may be on its way) gets one: a client connecting for one
    transaction behind a balancer loses nothing to a rolling deploy.
    """
    client = login(scene)
    client.proto.drain()
    assert scene.events == []
    _, backend = attach(scene, client)
    backend.send(wire.command_complete("SELECT 1") + wire.ready_for_query(b"I"))
    assert scene.events == [
        ("pool", "acquire"),
        *_QUERY_THEN_LET_GO,
    ]


def test_drain_inside_a_transaction_waits_for_its_end(scene: Scene) -> None:
    client = login(scene)
    _, backend = begin(scene, client)
    scene.events.clear()
    client.proto.drain()
    assert scene.events == []
    client.send(query("commit"))
    backend.send(wire.command_complete("COMMIT") + wire.ready_for_query(b"I"))
    assert scene.events == _QUERY_THEN_LET_GO


# ---------------------------------------------------------------------------
# Cancelling


def test_cancel_goes_to_the_attached_server(scene: Scene) -> None:
    client = scene.start("alice")
    scene.backends.accept("login").send(login_ok(pid=1111, key=b"temp"))
    cancel = client.cancel_request()
    # A minted PID: the temporary login connection's is no server the
    # client's queries run on (pass-through sessions keep the backend's).
    assert cancel.pid != 1111 and cancel.key != b"temp"
    scene.events.clear()
    pool = the_pool(scene)
    client.send(query("select pg_sleep(10)"))
    server, _ = pooled_server(scene.route, scene.backends, key=(2222, b"pool"))
    pool.give(server)

    scene.connect("canceller").send(cancel.encode())
    canceller = scene.backends.accept("cancel")
    canceller.lose()  # the server acted on it

    assert scene.events == [
        ("pool", "acquire"),
        ("pooled", "Q"),
        ("canceller", "close"),
        ("cancel", "cancel"),
        ("pool", "cancelDone"),
    ]
    # The pooled server's key, not the temporary connection's.
    assert canceller.transport.framer.startup() == wire.CancelRequest(2222, b"pool")


def test_cancel_without_an_attached_server_is_ignored(scene: Scene) -> None:
    client = login(scene)
    scene.connect("canceller").send(client.cancel_request().encode())
    assert scene.backends.pending == 0
    assert scene.metrics.named("cancelRequest") == [("cancelRequest", "test", "ignored")]


def test_cancel_race_keeps_the_server_from_the_next_client(
    pki: PKI, tmp_path: Path, reactor: MemoryReactorClock
) -> None:
    """
    PgBouncer's cancel race: a cancel for client A's query is still on its
    way when A's query ends and A's server is released. Handed to client B
    now, the server would cancel B's query. It is kept out of the pool
    until the cancel has been delivered (the server closed the cancel
    connection), and only then given to B.
    """
    opened: list[Backend] = []

    def connect() -> defer.Deferred[PooledServer]:
        server, backend = pooled_server(scene.route, scene.backends)
        opened.append(backend)
        return defer.succeed(server)

    pool = Pool("svc/alice", connect, reactor, maxSize=1)
    scene = pooled_scene(pki, tmp_path, reactor, "transaction", pool)
    a, b = login(scene, "a"), login(scene, "b")
    a.send(query("select pg_sleep(10)"))
    b.send(query("select 'b'"))  # waits: the pool has one connection
    scene.connect("canceller").send(a.cancel_request().encode())
    opened[0].send(wire.error_response("57014", "canceling statement", severity="ERROR"))
    opened[0].send(wire.ready_for_query())
    assert scene.events == [
        ("pooled", "Q"),
        ("canceller", "close"),
        ("a", "E:57014"),
        ("a", "Z:I"),
    ]
    assert pool.idle == [] and len(pool.waiters) == 1

    scene.backends.accept("cancel").lose()

    assert scene.events[4:] == [("cancel", "cancel"), ("pooled", "Q")]
    assert sent_sql(opened[0]) == ["select pg_sleep(10)", "select 'b'"]
    assert len(opened) == 1


def test_a_client_leaving_while_its_parameters_are_restored_leaves_the_server_dirty(
    scene: Scene,
) -> None:
    """
    pgtls's own SET is still running when the client leaves: its answer is
    on the way, and the next client would read it as its own. Before the
    fix the server went back clean (the tracker and splitters looked idle).
    """
    client = login(scene, TimeZone="UTC")
    client.send(query("select now()"))
    server, backend = pooled_server(
        scene.route, scene.backends, parameters={"TimeZone": "Europe/Paris"}
    )
    the_pool(scene).give(server)
    assert sent_sql(backend) == ["SET TimeZone = 'UTC';"]
    client.lose()
    assert ("pool", "release dirty") in scene.events
    assert ("pool", "release") not in scene.events
    assert server.dirty
