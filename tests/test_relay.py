"""
The relay (L{pgtls_twisted.proxy._relay}) with the suite's PostgreSQL, TLS
on both legs: it takes a pass-through session over after its startup;
64 MiB of COPY reach a client that reads slowly, through flow control,
with each leg holding at most one read; a large COPY goes the other way;
a client's TLS 1.3 KeyUpdate (with a reply requested) is answered; and
without the private names it needs, sessions keep the byte pump.

The relay's own flow control, TLS calls and hand-back on socket pairs:
C{test_relay_unit.py}.
"""

from __future__ import annotations

import io
import subprocess
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
import pytest_twisted
from support.proxy import route, running
from twisted.internet import reactor
from twisted.internet.task import LoopingCall, deferLater
from twisted.internet.threads import blockingCallFromThread, deferToThread
from twisted.logger import Logger, formatEvent

from pgtls_twisted.protocol import _wire as wire
from pgtls_twisted.proxy import _relay
from pgtls_twisted.proxy._relay import READ_SIZE
from pgtls_twisted.testing.cluster import SCRAM_PASSWORD, SCRAM_USER
from pgtls_twisted.testing.pki import PKI
from pgtls_twisted.tls import _private
from pgtls_twisted.tls._private import RELAY, RELIED_ON, Verdict

MiB = 1024 * 1024
COPY_OUT = "COPY (SELECT repeat('x', 1048576) FROM generate_series(1, 64)) TO STDOUT"


def _dsn(proxy: Any, pki: PKI) -> str:
    return proxy.dsn(  # type: ignore[no-any-return]
        user=SCRAM_USER, password=SCRAM_PASSWORD, sslmode="verify-full", sslrootcert=pki.cert("ca")
    )


async def _relayOf(proxy: Any) -> Any:
    """The relay of the route's one session, once it has taken over."""
    [client] = proxy.route().clients
    for _ in range(100):
        if client.session.relay is not None:
            return client.session.relay
        await deferLater(reactor, 0.02)
    raise AssertionError("no relay took the session over")


def _copyOutSlowly(conn: psycopg.Connection[Any], query: str = COPY_OUT) -> int:
    """C{query}'s COPY out, read after a second's pause: the bytes read."""
    size = 0
    with conn.cursor().copy(query) as copy:
        for block in copy:
            if not size:
                time.sleep(1)
            size += len(block)
    return size


def _copyIn(conn: psycopg.Connection[Any], size: int) -> int:
    conn.execute("CREATE TEMP TABLE relay_in (line text)")
    line = b"y" * 1023 + b"\n"
    with conn.cursor().copy("COPY relay_in FROM STDIN") as copy:
        for _ in range(size // len(line)):
            copy.write(line)
    row = conn.execute("SELECT sum(length(line) + 1) FROM relay_in").fetchone()
    assert row is not None
    return int(row[0])


@pytest_twisted.ensureDeferred
async def test_large_copies_through_the_relay_with_a_slow_reader(
    pki: PKI, pg_tls: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stalls: list[bool] = []
    stall = _relay._End.stall
    monkeypatch.setattr(
        _relay._End, "stall", lambda end: (stalls.append(end.fromServer), stall(end))
    )
    async with running(tmp_path, [route(pki, pg_tls)]) as proxy:
        conn = await deferToThread(psycopg.connect, _dsn(proxy, pki), connect_timeout=10)
        try:
            relay = await _relayOf(proxy)
            held = [0]

            def sample() -> None:
                held[0] = max(held[0], *(len(end.out) for end in relay.ends))

            sampler = LoopingCall(sample)
            sampler.start(0.005)
            try:
                assert await deferToThread(_copyOutSlowly, conn) == 64 * (MiB + 1)
                assert True in stalls, "the server leg was never held back"
                stalls.clear()
                assert await deferToThread(_copyIn, conn, 32 * MiB) == 32 * MiB
            finally:
                sampler.stop()
            assert relay.running
            assert 0 < held[0] <= READ_SIZE + 1024
            assert relay.stats.bytes_out > 64 * MiB and relay.stats.bytes_in > 32 * MiB
            assert await deferToThread(lambda: conn.execute("SELECT 1").fetchall()) == [(1,)]
            assert relay.atReady()
        finally:
            await deferToThread(conn.close)


@pytest_twisted.ensureDeferred
async def test_without_its_private_names_the_session_keeps_the_pump(
    pki: PKI, pg_tls: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gone = Verdict(missing=tuple(r for r in RELIED_ON if r.feature == RELAY))
    assert not gone.relay and gone.leanTLS
    events: list[Any] = []
    gone.warn(Logger(observer=events.append))
    [event] = events
    assert "the byte pump (for the direct relay)" in formatEvent(event)
    assert "OpenSSL._util.lib.SSL_read" in formatEvent(event)
    monkeypatch.setattr(_private, "verdict", lambda: gone)
    async with running(tmp_path, [route(pki, pg_tls)]) as proxy:
        conn = await deferToThread(psycopg.connect, _dsn(proxy, pki), connect_timeout=10)
        try:
            [client] = proxy.route().clients
            rows = await deferToThread(lambda: conn.execute("SELECT 2").fetchall())
            assert rows == [(2,)]
            await deferLater(reactor, 0.2)
            assert client.session.relay is None and client.session.pump is not None
            assert client.stats.bytes_out > 0
        finally:
            await deferToThread(conn.close)


def _keyUpdate(port: int, ca: Path, relayRunning: Any, warmUp: bool = False) -> bytes:
    """
    C{openssl s_client} logs in (SCRAM: pgtls asks for the password), sends
    a KeyUpdate asking for a reply (its C{K} command) once the relay runs,
    then a query; its output, with every TLS message (C{-msg}).

    @param warmUp: send a query first (a pooled client's legs go direct at
        its first transaction).
    """
    proc = subprocess.Popen(
        [
            "openssl", "s_client", "-starttls", "postgres", "-tls1_3", "-msg",
            "-connect", f"127.0.0.1:{port}", "-CAfile", str(ca),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    assert proc.stdin is not None
    try:

        def send(data: bytes, wait: float) -> None:
            assert proc.stdin is not None
            try:
                proc.stdin.write(data)
                proc.stdin.flush()
            except BrokenPipeError:
                return  # s_client is gone: its output says why
            time.sleep(wait)

        send(wire.encode_startup_message({"user": SCRAM_USER, "database": "postgres"}), 1.0)
        send(wire.message(b"p", SCRAM_PASSWORD.encode() + b"\0"), 1.0)
        if warmUp:
            send(wire.message(b"S", b"") + wire.message(b"Q", b"SELECT 1\0"), 1.0)
        for _ in range(50):
            if blockingCallFromThread(reactor, relayRunning):
                break
            time.sleep(0.1)
        else:
            raise AssertionError("no relay took the session over")
        send(b"K\n", 1.0)
        # After a Sync: a chunk that begins with "Q" is s_client's quit command.
        query = wire.message(b"Q", b"SELECT 'relay' || '-keyupdate-ok'\0")
        send(wire.message(b"S", b"") + query, 1.0)
        stillRunning = blockingCallFromThread(reactor, relayRunning)
        send(wire.message(b"X", b""), 0.5)
        out, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert stillRunning, out[-3000:]
    return out


@pytest_twisted.ensureDeferred
async def test_key_update_through_the_relay(pki: PKI, pg_tls: Any, tmp_path: Path) -> None:
    async with running(tmp_path, [route(pki, pg_tls)]) as proxy:

        def relayRunning() -> bool:
            clients = list(proxy.route().clients)
            return bool(
                clients
                and clients[0].session is not None
                and clients[0].session.relay is not None
                and clients[0].session.relay.running
            )

        out = await deferToThread(_keyUpdate, proxy.port(), pki.cert("ca"), relayRunning)
    assertKeyUpdateAnswered(out)


def assertKeyUpdateAnswered(out: bytes) -> None:
    """C{openssl s_client}'s KeyUpdate, pgtls's reply, then the answer to the query sent after it."""
    after = io.BytesIO(out.split(b"KEYUPDATE", 1)[1]).read()
    assert b">>> TLS 1.3, Handshake [length 0005], KeyUpdate" in after, out[-3000:]
    assert b"<<< TLS 1.3, Handshake [length 0005], KeyUpdate" in after, out[-3000:]
    assert b"relay-keyupdate-ok" in after, out[-3000:]


@pytest_twisted.ensureDeferred
async def test_shutdown_deadline_tells_a_relayed_session_57P01(
    pki: PKI, pg_tls: Any, tmp_path: Path
) -> None:
    """
    The deadline's C{terminate} hands the sockets back and, the server's
    last message being a ReadyForQuery, tells the client 57P01; the
    traffic figures count what the relay carried.
    """
    async with running(tmp_path, [route(pki, pg_tls)]) as proxy:
        conn = await deferToThread(psycopg.connect, _dsn(proxy, pki), connect_timeout=10)
        try:
            relay = await _relayOf(proxy)
            [client] = proxy.route().clients
            before = (client.stats.bytes_in, client.stats.bytes_out)
            rows = await deferToThread(lambda: conn.execute("SELECT 3").fetchall())
            assert rows == [(3,)]
            assert client.stats.bytes_in > before[0] and client.stats.bytes_out > before[1]
            assert client.session.phase.value == "pumping" and relay.atReady()
            client.terminate()
            assert not relay.running
            with pytest.raises(psycopg.errors.AdminShutdown):
                await deferToThread(lambda: conn.execute("SELECT 4").fetchall())
            assert client.stats.reason is not None and "57P01" in client.stats.reason
        finally:
            await deferToThread(conn.close)
