"""
Direct legs (L{pgtls_twisted.proxy._direct}) with the suite's PostgreSQL,
TLS on both legs: a pooled session's client leg and its server legs are
taken from Twisted's transports once logged in, in both pool modes; many
clients share one server connection through them; a slow reader holds the
server back with one read's worth in memory; a client's TLS 1.3 KeyUpdate
is answered; a server connection that dies while idle in the pool is
noticed; the shutdown deadline's 57P01 still arrives; and without the
private names they need, pooled sessions keep Twisted's path.

Their own flow control and hand-back on socket pairs:
C{test_direct_unit.py}.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
import pytest
import pytest_twisted
from support.dsn import app_dsn
from support.pooling import admin, pooled_route
from support.proxy import running
from test_relay import _copyOutSlowly, _keyUpdate, assertKeyUpdateAnswered
from twisted.internet import reactor
from twisted.internet.task import LoopingCall, deferLater
from twisted.internet.threads import deferToThread

from pgtls_twisted.pool._attachment import Attachment
from pgtls_twisted.pool._pool import Pool
from pgtls_twisted.proxy import _direct
from pgtls_twisted.proxy._direct import DirectLeg
from pgtls_twisted.proxy._relay import READ_SIZE
from pgtls_twisted.testing.cluster import POOL_USER
from pgtls_twisted.testing.pki import PKI
from pgtls_twisted.tls import _private
from pgtls_twisted.tls._private import RELAY, RELIED_ON, Verdict

MiB = 1024 * 1024
COPY_OUT = "COPY (SELECT repeat('x', 1048576) FROM generate_series(1, 32)) TO STDOUT"


def _connect(proxy: Any, pki: PKI, **extra: Any) -> psycopg.Connection[Any]:
    conn = psycopg.connect(app_dsn(proxy, pki, **extra), autocommit=True, connect_timeout=10)
    conn.prepare_threshold = None
    return conn


async def _until(check: Any, what: str) -> None:
    for _ in range(100):
        if check():
            return
        await deferLater(reactor, 0.02)
    raise AssertionError(what)


def _serverLegs(proxy: Any) -> list[Any]:
    return [
        server.leg
        for pool in proxy.route().pools.pools.values()
        for server in (*pool.idle, *pool.busy)
    ]


@pytest.mark.parametrize("mode", ["transaction", "session"])
@pytest_twisted.ensureDeferred
async def test_pooled_legs_go_direct_and_carry_every_transaction(
    pki: PKI, pg_tls: Any, tmp_path: Path, mode: str
) -> None:
    """
    Three clients on one server connection (transaction mode) or each on
    its own (session mode), 60 transactions each: every leg ends up
    direct, and the answers are right.
    """
    size = 1 if mode == "transaction" else 3
    async with running(tmp_path, [pooled_route(pki, pg_tls, mode, max_size=size)]) as proxy:
        conns = [await deferToThread(_connect, proxy, pki) for _ in range(3)]
        try:

            def work(conn: psycopg.Connection[Any], n: int) -> list[Any]:
                got = []
                for i in range(60):
                    with conn.transaction():
                        got.append(
                            conn.execute(
                                "SELECT %s::int * 2, current_user", (n * 100 + i,)
                            ).fetchone()
                        )
                return got

            results = await deferToThread(lambda: [work(c, n) for n, c in enumerate(conns)])
            for n, got in enumerate(results):
                assert got == [(2 * (n * 100 + i), POOL_USER) for i in range(60)]
            clients = list(proxy.route().clients)
            await _until(
                lambda: (
                    all(c.direct is not None for c in clients)
                    and all(leg.direct is not None for leg in _serverLegs(proxy))
                ),
                "not every leg went direct",
            )
            assert len(_serverLegs(proxy)) == size
            for client in clients:
                assert client.out is client.direct and isinstance(client.direct, DirectLeg)
            # And they keep working once direct.
            assert await deferToThread(lambda: [work(c, n) for n, c in enumerate(conns)]) == results
        finally:
            for conn in conns:
                await deferToThread(conn.close)


@pytest_twisted.ensureDeferred
async def test_attach_and_detach_make_nothing_new(
    pki: PKI, pg_tls: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    Per transaction, a client takes the idle server connection without a
    Deferred and with the Attachment the last client left clean: 3 clients
    x 40 transactions on one connection make no new Attachment after the
    first, and never queue.
    """
    made: list[Any] = []
    queued: list[Any] = []
    original = Attachment.__init__
    monkeypatch.setattr(
        Attachment, "__init__", lambda self, *a, **k: (made.append(1), original(self, *a, **k))[1]
    )
    acquire = Pool.acquire
    monkeypatch.setattr(Pool, "acquire", lambda self: (queued.append(1), acquire(self))[1])
    async with running(tmp_path, [pooled_route(pki, pg_tls, max_size=1)]) as proxy:
        conns = [await deferToThread(_connect, proxy, pki) for _ in range(3)]
        try:
            for conn in conns:
                assert await deferToThread(lambda c=conn: c.execute("SELECT 1").fetchall()) == [
                    (1,)
                ]
            made.clear()
            queued.clear()

            def work() -> None:
                for _ in range(40):
                    for conn in conns:
                        assert conn.execute("SELECT 2").fetchall() == [(2,)]

            await deferToThread(work)
            assert made == [] and queued == []
        finally:
            for conn in conns:
                await deferToThread(conn.close)


@pytest_twisted.ensureDeferred
async def test_slow_reader_holds_the_server_back(pki: PKI, pg_tls: Any, tmp_path: Path) -> None:
    """32 MiB to a client that starts reading late: each direct leg holds at most about one read."""
    async with running(tmp_path, [pooled_route(pki, pg_tls, max_size=1)]) as proxy:
        conn = await deferToThread(_connect, proxy, pki)
        try:
            assert await deferToThread(lambda: conn.execute("SELECT 1").fetchall()) == [(1,)]
            [client] = proxy.route().clients
            await _until(
                lambda: (
                    client.direct is not None
                    and all(leg.direct is not None for leg in _serverLegs(proxy))
                ),
                "legs not direct",
            )
            [serverLeg] = _serverLegs(proxy)
            held = [0]
            paused = [False]

            def sample() -> None:
                held[0] = max(held[0], len(client.direct.out))
                if serverLeg.direct is not None:
                    held[0] = max(held[0], len(serverLeg.direct.out))
                paused[0] = paused[0] or serverLeg.readingPaused

            sampler = LoopingCall(sample)
            sampler.start(0.005)
            try:
                assert await deferToThread(_copyOutSlowly, conn, COPY_OUT) == 32 * (MiB + 1)
            finally:
                sampler.stop()
            assert paused[0], "the server leg was never held back"
            assert 0 < held[0] <= 2 * READ_SIZE + 4096, held[0]
            assert client.direct is not None
            assert await deferToThread(lambda: conn.execute("SELECT 2").fetchall()) == [(2,)]
        finally:
            await deferToThread(conn.close)


@pytest_twisted.ensureDeferred
async def test_key_update_through_a_direct_client_leg(
    pki: PKI, pg_tls: Any, tmp_path: Path
) -> None:
    table = pooled_route(pki, pg_tls)
    # s_client logs in as the SCRAM user with the password pgtls asks for.
    async with running(tmp_path, [table]) as proxy:

        def direct() -> bool:
            clients = list(proxy.route().clients)
            return bool(clients and clients[0].direct is not None)

        out = await deferToThread(_keyUpdate, proxy.port(), pki.cert("ca"), direct, True)
    assertKeyUpdateAnswered(out)


@pytest_twisted.ensureDeferred
async def test_server_connection_dying_idle_in_the_pool_is_noticed(
    pki: PKI, pg_tls: Any, tmp_path: Path
) -> None:
    async with running(tmp_path, [pooled_route(pki, pg_tls, max_size=1)]) as proxy:
        conn = await deferToThread(_connect, proxy, pki)
        try:
            first = await deferToThread(
                lambda: conn.execute("SELECT pg_backend_pid()").fetchone()[0]
            )
            await _until(
                lambda: (
                    all(leg.direct is not None for leg in _serverLegs(proxy)) and _serverLegs(proxy)
                ),
                "server leg not direct",
            )

            def kill() -> None:
                with admin(pg_tls) as su:
                    su.execute("SELECT pg_terminate_backend(%s)", (first,))

            await deferToThread(kill)
            await _until(lambda: not _serverLegs(proxy), "the dead connection is still pooled")
            second = await deferToThread(
                lambda: conn.execute("SELECT pg_backend_pid()").fetchone()[0]
            )
            assert second != first
        finally:
            await deferToThread(conn.close)


@pytest_twisted.ensureDeferred
async def test_shutdown_deadline_tells_a_direct_session_57P01(
    pki: PKI, pg_tls: Any, tmp_path: Path
) -> None:
    async with running(tmp_path, [pooled_route(pki, pg_tls, "session")]) as proxy:
        conn = await deferToThread(_connect, proxy, pki)
        try:
            assert await deferToThread(lambda: conn.execute("SELECT 3").fetchall()) == [(3,)]
            [client] = proxy.route().clients
            await _until(lambda: client.direct is not None, "client leg not direct")
            direct = client.direct
            client.terminate()
            assert not direct.running and client.direct is None
            with pytest.raises(psycopg.errors.AdminShutdown):
                await deferToThread(lambda: conn.execute("SELECT 4").fetchall())
            assert client.stats.reason is not None and "57P01" in client.stats.reason
        finally:
            await deferToThread(conn.close)


@pytest_twisted.ensureDeferred
async def test_without_the_private_names_pooled_legs_stay_on_twisted(
    pki: PKI, pg_tls: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gone = Verdict(missing=tuple(r for r in RELIED_ON if r.feature == RELAY))
    monkeypatch.setattr(_private, "verdict", lambda: gone)
    async with running(tmp_path, [pooled_route(pki, pg_tls)]) as proxy:
        conn = await deferToThread(_connect, proxy, pki)
        try:
            for _ in range(3):
                rows = await deferToThread(lambda: conn.execute("SELECT 5").fetchall())
                assert rows == [(5,)]
            await deferLater(reactor, 0.2)
            [client] = proxy.route().clients
            assert client.direct is None
            assert all(leg.direct is None for leg in _serverLegs(proxy))
            assert client.adoptTries == _direct.ADOPT_TRIES
        finally:
            await deferToThread(conn.close)
