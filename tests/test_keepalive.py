"""
C{backend.keepalives}, C{keepalives_idle} and C{tcp_user_timeout} on real
connections to the suite's PostgreSQL: the options are on every server
connection's socket as the kernel reports them, keepalives are on by
default (as libpq's and PgBouncer's), and a fake transport is left alone.
C{bench/faults} measures what they change when a server vanishes.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from support.proxy import route, running
from twisted.internet.testing import StringTransport

from pgtls_twisted.config import BackendConfig
from pgtls_twisted.proxy._backend import keep_alive
from pgtls_twisted.testing.pki import PKI


def options(server: Any) -> tuple[int, int, int]:
    """SO_KEEPALIVE, TCP_KEEPIDLE and TCP_USER_TIMEOUT of a server connection's socket."""
    sock = server.transport.getHandle()
    return (
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
    )


@pytest.mark.parametrize(
    "backend, expected",
    [
        # Keepalives on, the system's idle time (7200 s on Linux), no user timeout.
        ({}, (1, None, 0)),
        ({"keepalives_idle": "45s", "tcp_user_timeout": "2.5s"}, (1, 45, 2500)),
        ({"keepalives": False, "keepalives_idle": "45s"}, (0, None, 0)),
        ({"keepalives": False, "tcp_user_timeout": "10s"}, (0, None, 10000)),
    ],
    ids=["default", "tuned", "off", "off-with-user-timeout"],
)
@pytest_twisted.ensureDeferred
async def test_every_server_connection_has_them(
    pki: PKI, pg_tls: Any, tmp_path: Path, backend: dict[str, Any], expected: Any
) -> None:
    with socket.socket() as fresh:
        systemIdle = fresh.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE)
    async with running(tmp_path, [route(pki, pg_tls, backend=backend)]) as proxy:
        server = await proxy.route().backend.connect()
        try:
            keepalive, idle, userTimeout = options(server)
            assert (keepalive, userTimeout) == (expected[0], expected[2])
            assert idle == (expected[1] if expected[1] is not None else systemIdle)
        finally:
            server.transport.abortConnection()


def test_a_transport_without_a_socket_is_left_alone() -> None:
    """Unit tests' in-memory transports: nothing to set, nothing raised."""
    config = BackendConfig(address="db:5432", host="db", port=5432, tcp_user_timeout=3.0)
    keep_alive(StringTransport(), config)
