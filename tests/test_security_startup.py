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
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
import pytest_twisted
from support.dsn import client_dsn
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
from support.waiting import sleep
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from pgtls_twisted.protocol import _wire as wire
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


# ---------------------------------------------------------------------------
# Item 4: clients that have not logged in cannot exhaust the route or server

FLOODER = "127.0.0.2"


def _flood_socket(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.bind((FLOODER, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def _answer(sock: socket.socket, timeout: float = 0.5) -> bytes:
    """Whatever the proxy sent on C{sock} within C{timeout} (b"" if nothing)."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1 << 16)
    except TimeoutError:
        return b""
    except ConnectionResetError:
        return b""


def _scram_login(proxy: Any, pki: Any) -> tuple[str, int]:
    with psycopg.connect(client_dsn(proxy, pki)) as conn:
        row = conn.execute("select current_user, 41 + 1").fetchone()
    return row[0], row[1]


@pytest_twisted.ensureDeferred
async def test_idle_flood_from_one_address_locks_nobody_out(pki, pg_tls, tmp_path):
    """
    Forty idle sockets from 127.0.0.2 on a route of max_clients = 30: before
    the fix they took every client slot until startup_timeout, and a
    well-behaved client from 127.0.0.1 got "too many clients". Now sixteen
    of them hold login slots and the rest wait in line, unread, without
    counting as clients; the well-behaved client logs in and works, and
    at login_timeout the waiting ones get 53300.
    """
    listener = {"max_clients": 30, "login_timeout": "3s"}
    async with running(tmp_path, [route(pki, pg_tls, listener=listener)]) as proxy:
        port = proxy.port()
        flood = await deferToThread(lambda: [_flood_socket(port) for _ in range(40)])
        try:
            await sleep(0.2)
            gate = proxy.route().logins
            assert (gate.active, gate.waiting) == (16, 24)
            assert await deferToThread(_scram_login, proxy, pki) == ("scram_user", 42)
            # At login_timeout every flood socket is gone: the waiting ones
            # with 53300, unless a slot freed at that very moment let them
            # in first (then they are dropped as idle ones are).
            answers = await deferToThread(lambda: [_answer(s, timeout=6) for s in flood])
            for data in answers:
                if data:
                    fields = _fatal(data)
                    assert fields["C"] == "53300"
                    assert "max_logins_per_address = 16" in fields["M"]
            await sleep(0.2)
            assert (gate.active, gate.waiting) == (0, 0)
        finally:
            for sock in flood:
                sock.close()


def _stalled_logins(port: int, ca: Any, count: int) -> tuple[list[socket.socket], int]:
    """
    (Blocking.) C{count} connections from the flooder that get as far as
    the password request and stop there; how many were kept waiting
    (their SSLRequest not even answered).
    """
    from support.rawclient import startup_message

    held, waiting = [], 0
    for _ in range(count):
        raw = _flood_socket(port)
        raw.sendall(SSL_REQUEST)
        held.append(raw)
        if _answer(raw, timeout=0.3) != b"S":
            waiting += 1
            continue
        sock = tls_wrap(raw, ca)
        sock.sendall(startup_message("scram_user", "postgres"))
        held.append(sock)
    return held, waiting


@pytest_twisted.ensureDeferred
async def test_stalled_logins_do_not_use_up_the_server(pki, pg_tls, tmp_path):
    """
    Each login in progress holds a backend connection: from one address,
    at most max_logins_per_address of them reach the server (before the
    fix: every one), and a client from another address still logs in.
    """
    recorder = FakeBackend(relay_to=(pg_tls.host, pg_tls.port)).start()
    try:
        async with running(tmp_path, [route(pki, recorder)]) as proxy:
            held, waiting = await deferToThread(_stalled_logins, proxy.port(), pki.cert("ca"), 30)
            try:
                await sleep(0.5)  # the backend legs open
                assert waiting == 30 - 16
                assert len(recorder.connections) == 16
                assert await deferToThread(_scram_login, proxy, pki) == ("scram_user", 42)
                assert len(recorder.connections) == 17
            finally:
                for sock in held:
                    sock.close()
    finally:
        await recorder.stop()


@pytest_twisted.ensureDeferred
async def test_login_timeout_is_shorter_than_startup_timeout(pki, pg_tls, tmp_path):
    listener = {"login_timeout": "1s", "startup_timeout": "60s"}
    async with running(tmp_path, [route(pki, pg_tls, listener=listener)]) as proxy:

        def idle(port: int) -> float:
            started = time.monotonic()
            with connect(port) as sock:
                read_until_close(sock, timeout=10)
            return time.monotonic() - started

        waited = await deferToThread(idle, proxy.port())
        assert 0.9 < waited < 5


@pytest_twisted.ensureDeferred
async def test_a_login_waits_for_a_free_slot(pki, pg_tls, tmp_path):
    """
    max_logins = 1: one idle socket holds the only slot; a real client
    waits (unread) and logs in as soon as the slot is free.
    """
    async with running(tmp_path, [route(pki, pg_tls, listener={"max_logins": 1})]) as proxy:
        holder = await deferToThread(_flood_socket, proxy.port())
        reactor.callLater(0.5, holder.close)
        started = time.monotonic()
        assert await deferToThread(_scram_login, proxy, pki) == ("scram_user", 42)
        assert time.monotonic() - started >= 0.4


def _held_login(port: int, ca: Any) -> socket.socket:
    """(Blocking.) A client whose startup packet is held by a paused route."""
    from support.rawclient import request_tls, startup_message

    sock = request_tls(connect(port), ca)
    sock.sendall(startup_message("scram_user", "postgres"))
    return sock


@pytest_twisted.ensureDeferred
async def test_a_login_still_waiting_at_login_timeout_gets_53300(pki, pg_tls, tmp_path):
    """
    max_logins = 1, held by a client that a PAUSE keeps (its login clock
    stopped): the next connection waits, unread, and at its login_timeout
    gets FATAL 53300 naming the limit.
    """
    listener = {"max_logins": 1, "login_timeout": "1s"}
    async with running(tmp_path, [route(pki, pg_tls, listener=listener)]) as proxy:
        proxy.service.setPaused(None, True)
        held = await deferToThread(_held_login, proxy.port(), pki.cert("ca"))
        try:
            await sleep(0.2)
            assert proxy.route().logins.active == 1

            def late(port: int) -> tuple[bytes, float]:
                started = time.monotonic()
                with connect(port) as sock:
                    return read_until_close(sock, timeout=10), time.monotonic() - started

            data, waited = await deferToThread(late, proxy.port())
            fields = _fatal(data)
            assert fields["C"] == "53300"
            assert "listener.max_logins = 1" in fields["M"]
            assert 0.9 < waited < 5
        finally:
            held.close()
