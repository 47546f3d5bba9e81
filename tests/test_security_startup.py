"""
Issue 10, items 1 and 4: the startup packet has one meaning, and clients
that have not logged in cannot take a route or a server away from those
that have.

Against the real C{pg_tls} cluster, with raw-socket attackers (no real
client misbehaves on purpose) and psycopg as the well-behaved client.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest_twisted
from support.fakebackend import FakeBackend
from support.proxy import route, running
from support.rawclient import (
    SSL_REQUEST,
    connect,
    read_message,
    read_until_close,
    recv_exact,
    tls_wrap,
)
from twisted.internet.threads import deferToThread

from pgtls_twisted import wire
from pgtls_twisted.testing.cluster import CERT_USER, TRUST_USER


def _startup(*pairs: str) -> bytes:
    """A StartupMessage with exactly these name/value strings, repeats included."""
    body = b"".join(p.encode() + b"\0" for p in pairs) + b"\0"
    return struct.pack("!II", 8 + len(body), wire.PROTOCOL_3_0) + body


def _fatal(data: bytes) -> dict[str, str]:
    """The fields of the ErrorResponse that C{data} starts with."""
    assert data[:1] == b"E", data[:60]
    (length,) = struct.unpack_from("!I", data, 1)
    return wire.parse_error_fields(data[5 : 1 + length])


@asynccontextmanager
async def recorded(
    pki: Any, cluster: Any, tmp_path: Any, listener: dict[str, Any]
) -> AsyncIterator[tuple[Any, FakeBackend]]:
    """
    One route whose backend is a recorder relaying (in plaintext) to
    C{cluster}: what an attack gets through, the recorder sees.
    """
    recorder = FakeBackend(relay_to=(cluster.host, cluster.port)).start()
    try:
        async with running(tmp_path, [route(pki, recorder, listener=listener)]) as proxy:
            yield proxy, recorder
    finally:
        await recorder.stop()


# ---------------------------------------------------------------------------
# Item 1: repeated startup parameters


@pytest_twisted.ensureDeferred
async def test_repeated_user_cannot_bypass_cert_user_match(pki, pg_tls, tmp_path):
    """
    A certificate for C{cert_user}, and a startup packet naming
    C{cert_user} first and C{trust_user} second: the proxy checked the
    first, PostgreSQL logs in the last (trusted) one. Before the fix this
    was a session as C{trust_user}; now it is FATAL 08P01 naming the
    parameter, and the backend is never contacted.
    """
    listener = {"mtls": True, "client_ca": str(pki.cert("client_ca")), "cert_user_match": True}

    def attack(port: int) -> bytes:
        with connect(port) as raw:
            raw.sendall(SSL_REQUEST)
            assert recv_exact(raw, 1) == b"S"
            cert = {"cert": pki.cert("client"), "key": pki.key("client")}
            with tls_wrap(raw, pki.cert("ca"), **cert) as sock:
                sock.sendall(
                    _startup("user", CERT_USER, "database", "postgres", "user", TRUST_USER)
                )
                return read_until_close(sock)

    async with recorded(pki, pg_tls, tmp_path, listener) as (proxy, recorder):
        data = await deferToThread(attack, proxy.port())
        await recorder.settle()
    fields = _fatal(data)
    assert (fields["S"], fields["C"]) == ("FATAL", "08P01")
    assert fields["M"] == 'duplicate startup parameter "user"'
    assert recorder.connections == []


@pytest_twisted.ensureDeferred
async def test_repeated_database_is_refused(pki, pg_tls, tmp_path):
    """The same for C{database} (pool keys, the admin console's name)."""

    def attack(port: int) -> bytes:
        with connect(port) as raw:
            raw.sendall(SSL_REQUEST)
            assert recv_exact(raw, 1) == b"S"
            with tls_wrap(raw, pki.cert("ca")) as sock:
                sock.sendall(
                    _startup("user", TRUST_USER, "database", "pgtls", "database", "postgres")
                )
                return read_until_close(sock)

    async with recorded(pki, pg_tls, tmp_path, {}) as (proxy, recorder):
        data = await deferToThread(attack, proxy.port())
        await recorder.settle()
    assert recorder.connections == []
    fields = _fatal(data)
    assert (fields["C"], fields["M"]) == ("08P01", 'duplicate startup parameter "database"')


def _read_messages(sock: socket.socket) -> list[tuple[bytes, bytes]]:
    messages = []
    while True:
        mtype, body = read_message(sock)
        messages.append((mtype, body))
        if mtype in (b"Z", b"E"):
            return messages
