"""
C{listener.proxy_protocol} (issue 15, item 1) with the suite's PostgreSQL
and real clients behind a test load balancer (L{support.proxyheader}): a
v1 or v2 PROXY header before an SSLRequest, a direct-TLS ClientHello and
a CancelRequest; the client address it names is what the log, SHOW
CLIENTS and the per-address login limit use, and a v2 LOCAL header (a
health check) keeps the balancer's. Refused, and logged: a connection from
an untrusted address (header or not), a trusted one without a header, and
an invalid header. The configuration requires C{proxy_trusted}.
"""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
import pytest_twisted
from support.admin import show
from support.dsn import admin_dsn, client_dsn
from support.proxy import route, running
from support.proxyheader import Forwarder, v1_header, v2_header
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher

from pgtls_twisted.config import ConfigError
from pgtls_twisted.config._load import parse_config
from pgtls_twisted.protocol import _wire as wire
from pgtls_twisted.testing.cluster import SCRAM_USER
from pgtls_twisted.testing.pki import PKI

CLIENT = ("203.0.113.7", 5555)


def _route(pki: PKI, cluster: Any, **listener: Any) -> dict[str, Any]:
    return route(
        pki,
        cluster,
        listener={"proxy_protocol": True, "proxy_trusted": ["127.0.0.1/32"], **listener},
    )


class _Lines:
    """pgtls's log lines during a test."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __enter__(self) -> _Lines:
        globalLogPublisher.addObserver(self._observe)
        return self

    def __exit__(self, *exc: object) -> None:
        globalLogPublisher.removeObserver(self._observe)

    def _observe(self, event: dict[str, Any]) -> None:
        self.lines.append(formatEvent(event))

    def having(self, text: str) -> list[str]:
        return [line for line in self.lines if text in line]


def _query(dsn: str, sql: str) -> Any:
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        return conn.execute(sql).fetchone()


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("negotiation", ["postgres", "direct"])
@pytest_twisted.ensureDeferred
async def test_a_header_names_the_client(
    pki: PKI, pg_tls: Any, tmp_path: Path, version: str, negotiation: str
) -> None:
    """Before an SSLRequest or a direct-TLS ClientHello, v1 or v2: the session works and is the client's."""
    async with running(
        tmp_path,
        [_route(pki, pg_tls)],
        admin={"auth": "backend", "users": [SCRAM_USER]},
    ) as proxy:
        build = v1_header if version == "v1" else v2_header
        balancer = Forwarder(proxy.port(), lambda _: build(CLIENT, ("127.0.0.1", proxy.port())))
        try:
            with _Lines() as log:
                dsn = client_dsn(balancer.port, pki, sslnegotiation=negotiation)
                assert await deferToThread(_query, dsn, "SELECT 1") == (1,)
                [opened] = log.having("open peer=203.0.113.7:5555")
                assert "via=127.0.0.1:" in opened
                # The console's own connection comes through the balancer too.
                _, rows = await show(admin_dsn(balancer.port, pki), "CLIENTS")
                assert {r["addr"] for r in rows} == {CLIENT[0]}, rows
                assert {r["port"] for r in rows} == {str(CLIENT[1])}, rows
        finally:
            balancer.close()


@pytest_twisted.ensureDeferred
async def test_a_cancel_request_after_a_header(pki: PKI, pg_tls: Any, tmp_path: Path) -> None:
    """
    A CancelRequest that follows a PROXY header (a new connection through
    the balancer, as libpq's cancel makes one) cancels the session's query.
    The request is sent raw, with the key pgtls minted for the session
    (psycopg's C{cancel()} holds the GIL while libpq's PQcancel waits, so
    it would freeze this in-process balancer and proxy; libpq's own cancels
    behind a balancer are in L{tests.test_cluster}, through psql and
    C{cancel_safe()}).
    """
    async with running(tmp_path, [_route(pki, pg_tls)]) as proxy:
        balancer = Forwarder(proxy.port(), lambda _: v2_header(CLIENT, ("127.0.0.1", 5432)))
        conn = await deferToThread(
            psycopg.connect, client_dsn(balancer.port, pki), autocommit=True, connect_timeout=10
        )
        try:
            pid = conn.info.backend_pid
            [(minted, _)] = proxy.route().cancels._entries[pid]
            # The client leg is still the TCP transport's: the relay takes
            # the session over as without a header.
            [client] = proxy.route().clients
            for _ in range(100):
                if client.session.relay is not None:
                    break
                await deferLater(reactor, 0.02, lambda: None)
            assert client.session.relay is not None and client.peer == "203.0.113.7:5555"
            sleeping = deferToThread(conn.execute, "SELECT pg_sleep(20)")
            await deferLater(reactor, 0.5, lambda: None)

            def cancel() -> bytes:
                port = proxy.port()
                with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                    s.sendall(v1_header(CLIENT, ("127.0.0.1", port)))
                    s.sendall(wire.CancelRequest(pid, minted).encode())
                    return s.recv(100)

            started = time.monotonic()
            assert await deferToThread(cancel) == b""
            with pytest.raises(psycopg.errors.QueryCanceled):
                await sleeping
            assert time.monotonic() - started < 10
        finally:
            await deferToThread(conn.close)
            balancer.close()


@pytest_twisted.ensureDeferred
async def test_a_local_header_keeps_the_balancers_address(
    pki: PKI, pg_tls: Any, tmp_path: Path
) -> None:
    async with running(tmp_path, [_route(pki, pg_tls)]) as proxy:
        balancer = Forwarder(proxy.port(), lambda _: v2_header(None))
        try:
            with _Lines() as log:
                assert await deferToThread(_query, client_dsn(balancer.port, pki), "SELECT 2") == (
                    2,
                )
                [opened] = log.having(" open peer=127.0.0.1:")
                assert "via=127.0.0.1:" in opened
        finally:
            balancer.close()


def _refused(port: int, source: str, first: bytes) -> bytes:
    """(Blocking.) Connect from C{source}, send C{first}, return what pgtls sends before closing."""
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    except ConnectionResetError:
        return b"(reset)"  # dropped before the connect even returned
    with s:
        try:
            s.sendall(first)
            got = b""
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    return got
                got += chunk
        except ConnectionResetError:
            return b"(reset)"


@pytest.mark.parametrize(
    "source, first, reason",
    [
        ("127.0.0.2", v1_header(CLIENT, ("127.0.0.1", 1)) + wire.SSL_REQUEST, "proxy_trusted"),
        ("127.0.0.2", wire.SSL_REQUEST, "proxy_trusted"),
        ("127.0.0.1", wire.SSL_REQUEST, "no PROXY protocol header"),
        ("127.0.0.1", b"PROXY TCP4 not-an-address\r\n", "invalid PROXY protocol header"),
        ("127.0.0.1", b"PROXY " + b"x" * 200, "invalid PROXY protocol header"),
        (
            "127.0.0.1",
            v2_header(None)[:12] + bytes([0x21, 0x11]) + struct.pack("!H", 4) + b"\0" * 4,
            "invalid PROXY protocol header",
        ),
    ],
    ids=[
        "untrusted-with-header",
        "untrusted-without",
        "no-header",
        "bad-v1",
        "long-v1",
        "short-v2",
    ],
)
@pytest_twisted.ensureDeferred
async def test_refused_and_logged(
    pki: PKI, pg_tls: Any, tmp_path: Path, source: str, first: bytes, reason: str
) -> None:
    """Dropped at once, nothing answered (there is no channel yet), one log line, one refusal counted."""
    async with running(tmp_path, [_route(pki, pg_tls)]) as proxy:
        with _Lines() as log:
            got = await deferToThread(_refused, proxy.port(), source, first)
            assert got in (b"", b"(reset)"), got
            [line] = log.having(" dropped peer=")
            assert reason in line, line
        stats = proxy.route().metrics.stats[proxy.route().name]
        assert stats.refused["proxy_protocol"] == 1


@pytest_twisted.ensureDeferred
async def test_the_login_limit_counts_the_headers_address(
    pki: PKI, pg_tls: Any, tmp_path: Path
) -> None:
    """
    With max_logins_per_address = 1, a second connection claiming the same
    client waits, unread; one claiming another client is served at once.
    """
    table = _route(pki, pg_tls, max_logins_per_address=1, login_timeout="3s")
    async with running(tmp_path, [table]) as proxy:
        port = proxy.port()

        def opened(client: tuple[str, int]) -> socket.socket:
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(v1_header(client, ("127.0.0.1", port)) + wire.SSL_REQUEST)
            return s

        def scenario() -> tuple[bytes, bytes]:
            first = opened(("198.51.100.1", 1000))
            assert first.recv(1) == b"S"  # holds its login slot from here
            same = opened(("198.51.100.1", 1001))
            other = opened(("198.51.100.2", 1000))
            try:
                answered = other.recv(1)
                # The same client address waits, unread, for a slot (until
                # its login_timeout, 3 s, then 53300 and a close).
                same.settimeout(1.0)
                try:
                    waited = same.recv(1)
                except TimeoutError:
                    waited = b"(still waiting)"
                return answered, waited
            finally:
                for s in (first, same, other):
                    s.close()

        answered, waited = await deferToThread(scenario)
        assert answered == b"S"
        assert waited == b"(still waiting)"


def test_proxy_protocol_requires_proxy_trusted(pki: PKI, pg_tls: Any, tmp_path: Path) -> None:
    table = route(pki, pg_tls, listener={"proxy_protocol": True})
    with pytest.raises(ConfigError) as caught:
        parse_config({"proxy": [table]}, base_dir=tmp_path)
    assert "proxy_trusted: required when proxy_protocol = true" in str(caught.value)
    table = route(pki, pg_tls, listener={"proxy_trusted": ["10.0.0.1/8"]})
    with pytest.raises(ConfigError) as caught:
        parse_config({"proxy": [table]}, base_dir=tmp_path)
    assert "has host bits set" in str(caught.value)
