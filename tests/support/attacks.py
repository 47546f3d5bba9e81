"""
Shared by the attack tests (test_attacks, test_attacks_startup): a proxy
with the backends they stand behind it, what a normal client does, and the
checks they make on what an attacker got.

Two kinds of backend stand behind the proxy there:

 - a I{recorder} (L{FakeBackend} relaying to the real C{pg_tls} cluster,
   with C{backend.tls = "disable"} so it sees plaintext): attacks on the
   client leg must leave it untouched, and the normal client that follows
   must reach it, which proves the recorder would have seen an attack that
   got through;
 - a I{scripted} fake that attacks the proxy's backend leg, on a route
   named C{evil}, next to a normal route C{app} to the real cluster.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psycopg
from twisted.internet.threads import deferToThread

from pgtls_twisted.protocol import _wire as wire
from pgtls_twisted.testing.cluster import SCRAM_USER
from support.dsn import client_dsn
from support.fakebackend import FakeBackend
from support.proxy import RunningProxy, route
from support.proxy import running as shared_running
from support.rawclient import (
    connect,
    read_until_close,
    request_tls,
    tls_wrap,
)
from support.waiting import sleep


@asynccontextmanager
async def running(
    tmp_path: Path, routes: list[dict[str, Any]], *fakes: FakeBackend
) -> AsyncIterator[RunningProxy]:
    """The proxy for C{routes}; on exit it and C{fakes} are stopped."""
    try:
        async with shared_running(tmp_path, routes) as proxy:
            yield proxy
    finally:
        for fake in fakes:
            await fake.stop()


@asynccontextmanager
async def recorded(
    pki: Any, cluster: Any, tmp_path: Path, **listener: Any
) -> AsyncIterator[tuple[RunningProxy, FakeBackend]]:
    """
    One route C{app} whose backend is a recorder relaying (in plaintext,
    C{backend.tls = "disable"}) to C{cluster}.
    """
    recorder = FakeBackend(relay_to=(cluster.host, cluster.port)).start()
    async with running(tmp_path, [route(pki, recorder, listener=listener)], recorder) as proxy:
        yield proxy, recorder


def normal_login(proxy: RunningProxy, pki: Any, name: str | None = None) -> tuple[Any, ...]:
    """What a well-behaved user does: psycopg, verify-full, SCRAM."""
    dsn = client_dsn(proxy, pki, name, connect_timeout=5)
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT current_user, 41 + 1").fetchone()
    assert row is not None
    return tuple(row)


async def assert_still_serves(
    proxy: RunningProxy,
    pki: Any,
    recorder: FakeBackend | None = None,
    name: str | None = None,
    *,
    all_gone: bool = True,
) -> None:
    """
    A normal client logs in and queries; if C{recorder} is the route's
    backend, it saw exactly that one more connection, starting with that
    client's StartupMessage (so it would have seen an attack's bytes too).
    With C{all_gone}, the route then forgets every client promptly: the
    attacker's connection too.
    """
    before = len(recorder.connections) if recorder is not None else 0
    assert await deferToThread(normal_login, proxy, pki, name) == (SCRAM_USER, 42)
    if recorder is not None:
        await recorder.settle()
        assert len(recorder.connections) == before + 1
        parsed = wire.parse_startup_packet(recorder.connections[-1].received)
        assert parsed is not None
        startup = parsed[0]
        assert isinstance(startup, wire.StartupMessage)
        assert startup.user == SCRAM_USER
    if all_gone:
        await wait_no_clients(proxy, name)


async def wait_no_clients(
    proxy: RunningProxy, name: str | None = None, timeout: float = 3.0
) -> float:
    """
    Wait until the route has forgotten every client connection; return how
    long that took.
    """
    start = time.monotonic()
    clients = proxy.route(name).clients
    while clients:
        waited = time.monotonic() - start
        assert waited < timeout, f"clients still open after {waited:.1f}s: " + ", ".join(
            str(c.stats.reason) for c in clients
        )
        await sleep(0.02)
    return time.monotonic() - start


async def assert_untouched(recorder: FakeBackend) -> None:
    """Nothing connected to the backend (given a moment to try)."""
    await sleep(0.1)
    assert recorder.connections == []
    assert recorder.received == b""


def only_fatal(data: bytes) -> dict[str, str]:
    """
    C{data}, all the client received until the close, is exactly one FATAL
    ErrorResponse: nothing before it (no C{S}, no C{N}) and nothing after.
    """
    assert data[:1] == b"E", f"expected an ErrorResponse, got {data[:64]!r}"
    (length,) = struct.unpack_from("!I", data, 1)
    assert len(data) == 1 + length, f"bytes besides one ErrorResponse: {data!r}"
    fields = wire.parse_error_fields(data[5:])
    assert fields.get("S") == "FATAL" and fields.get("V") == "FATAL", fields
    return fields


def code_and_message(fields: dict[str, str]) -> tuple[str | None, str | None]:
    return fields.get("C"), fields.get("M")


def assert_tls_failure_bytes(data: bytes) -> None:
    """A failed handshake: no bytes at all, or TLS alert records only."""
    pos = 0
    while pos < len(data):
        assert data[pos] == 0x15, f"not a TLS alert at offset {pos}: {data!r}"
        (length,) = struct.unpack_from("!H", data, pos + 3)
        pos += 5 + length
    assert pos == len(data), data


def send_and_collect(port: int, payload: bytes, *, shut_write: bool = False) -> bytes:
    """Send C{payload} in one write and return everything until the close."""
    with connect(port) as sock:
        sock.sendall(payload)
        if shut_write:
            sock.shutdown(socket.SHUT_WR)
        return read_until_close(sock)


def tls_then(port: int, ca: Path, payload: bytes, *, direct: bool = False) -> bytes:
    """
    TLS (after an SSLRequest, or direct with ALPN C{postgresql}), then
    C{payload} inside it; everything received inside TLS until the close.
    """
    with connect(port) as raw:
        if direct:
            sock = tls_wrap(raw, ca, alpn=["postgresql"])
        else:
            sock = request_tls(raw, ca)
        with sock:
            sock.sendall(payload)
            return read_until_close(sock)
