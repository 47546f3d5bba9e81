"""
Attacks on, and mistakes of, the renaming of named prepared statements in
transaction pooling, from a review of issue 12, as raw protocol messages
against a real pooled route: every answer must pair with its own message,
no client may change or close a statement another client shares, and what
pgtls believes a connection holds must never drift from what it holds.
Each test failed on the code before the fix.
"""

from __future__ import annotations

import struct
from typing import Any

import pytest_twisted
from support import rawclient
from support.pooling import pooled_route, raw_login
from support.proxy import start_proxy
from support.waiting import in_thread

from pgtls_twisted.protocol import _wire as wire
from pgtls_twisted.protocol._prepared import serverName
from pgtls_twisted.testing.cluster import (
    APP_DB,
    MD5_PASSWORD,
    MD5_USER,
    SCRAM_PASSWORD,
    SCRAM_USER,
)


def P(name: bytes, sql: bytes, types: tuple[int, ...] = ()) -> bytes:
    return wire.message(
        b"P", name + b"\0" + sql + b"\0" + struct.pack(f"!H{len(types)}I", len(types), *types)
    )


def B(portal: bytes, stmt: bytes, params: tuple[bytes, ...] = ()) -> bytes:
    body = portal + b"\0" + stmt + b"\0" + struct.pack("!HH", 0, len(params))
    for param in params:
        body += struct.pack("!i", len(param)) + param
    return wire.message(b"B", body + struct.pack("!H", 0))


def E() -> bytes:
    return wire.message(b"E", b"\0" + struct.pack("!I", 0))


def C(kind: bytes, name: bytes) -> bytes:
    return wire.message(b"C", kind + name + b"\0")


S = wire.message(b"S")


def Q(sql: bytes) -> bytes:
    return wire.message(b"Q", sql + b"\0")


Q1 = b"SELECT $1::int + 1"
Q2 = b"SELECT $1::int * 1000"


def answers(sock: Any, readies: int = 1) -> list[Any]:
    """The messages up to the C{readies}-th ReadyForQuery, briefly."""
    out: list[Any] = []
    while readies:
        mtype, body = rawclient.read_message(sock)
        if mtype == b"E":
            out.append(("E", wire.parse_error_fields(body).get("C")))
        elif mtype == b"D":
            (size,) = struct.unpack_from("!i", body, 2)
            out.append(("D", body[6 : 6 + size].decode("latin-1") if size >= 0 else None))
        else:
            out.append(mtype.decode())
        if mtype == b"Z":
            readies -= 1
    return out


def login_as(proxy: Any, pki: Any, user: str, password: str) -> Any:
    tls = rawclient.request_tls(rawclient.connect(proxy.port()), pki.cert("ca"))
    tls.sendall(rawclient.startup_message(user, APP_DB))
    while True:
        mtype, body = rawclient.read_message(tls)
        if mtype == b"R":
            code = wire.auth_code(body)
            if code == wire.AUTH_CLEARTEXT_PASSWORD:
                tls.sendall(rawclient.password_message(password))
            elif code == wire.AUTH_MD5_PASSWORD:
                tls.sendall(
                    rawclient.password_message(rawclient.md5_password(user, password, body[4:8]))
                )
            elif code != wire.AUTH_OK:
                raise AssertionError(f"authentication request {code}")
        elif mtype == b"E":
            raise rawclient.ServerError(wire.parse_error_fields(body))
        elif mtype == b"Z":
            return tls


async def scenario(pki: Any, pg_tls: Any, tmp_path: Any, run: Any, **pool: Any) -> Any:
    proxy = start_proxy([pooled_route(pki, pg_tls, max_size=1, **pool)], tmp_path)
    try:
        return await in_thread(run, proxy, timeout=60)
    finally:
        await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_another_users_statement_cannot_be_replaced(pki, pg_tls, tmp_path):
    """
    An unnamed Parse's answer must not confirm a named Parse the server
    skipped; a repeated name must not put another text under a shared name.
    """

    def run(proxy: Any) -> tuple[list[Any], list[Any]]:
        attacker = login_as(proxy, pki, MD5_USER, MD5_PASSWORD)
        attacker.sendall(
            P(b"", b"SELECT 1")
            + B(b"", b"")
            + E()
            + P(b"", b"SELECT 1/0")
            + B(b"", b"")
            + P(b"s1", Q1)
            + S
            + P(b"s1", Q2)
            + S
        )
        seen = answers(attacker, 2)
        victim = login_as(proxy, pki, SCRAM_USER, SCRAM_PASSWORD)
        victim.sendall(P(b"v1", Q1) + B(b"", b"v1", (b"5",)) + E() + S)
        return seen, answers(victim)

    attacker, victim = await scenario(pki, pg_tls, tmp_path, run)
    # What PostgreSQL itself answers: the failed batch skips s1, so the
    # second Parse of s1 succeeds.
    assert attacker == ["1", "2", ("D", "1"), "C", "1", ("E", "22012"), "Z", "1", "Z"]
    assert victim == ["1", "2", ("D", "6"), "C", "Z"]


@pytest_twisted.ensureDeferred
async def test_a_pipeline_with_an_error_leaves_no_phantom(pki, pg_tls, tmp_path):
    """Unnamed statements and an error before a named Parse, as pgjdbc batches send them."""
    text = b"SELECT $1::int * 3"

    def run(proxy: Any) -> list[list[Any]]:
        a = raw_login(proxy, pki)
        a.sendall(
            P(b"", b"SELECT 42")
            + B(b"", b"")
            + E()
            + P(b"", b"SELECT 1/$1::int")
            + B(b"", b"", (b"0",))
            + E()
            + P(b"_pg3_0", text)
            + B(b"", b"_pg3_0", (b"5",))
            + E()
            + S
        )
        first = answers(a)
        out = [first]
        for value in (b"7", b"8"):
            other = raw_login(proxy, pki)
            other.sendall(P(b"_pg3_0", text) + B(b"", b"_pg3_0", (value,)) + E() + S)
            out.append(answers(other))
            other.close()
        return out

    first, second, third = await scenario(pki, pg_tls, tmp_path, run)
    # (PostgreSQL plans an unnamed statement at Bind, and folds 1/0 there.)
    assert first == ["1", "2", ("D", "42"), "C", "1", ("E", "22012"), "Z"]
    assert second == ["1", "2", ("D", "21"), "C", "Z"]
    assert third == ["1", "2", ("D", "24"), "C", "Z"]


@pytest_twisted.ensureDeferred
async def test_injected_parse_answer_is_swallowed_in_its_own_batch(pki, pg_tls, tmp_path):
    def run(proxy: Any) -> list[Any]:
        a = raw_login(proxy, pki)
        a.sendall(P(b"s1", Q1) + S)
        answers(a)
        a.close()
        # s1 is on the connection; a second client's own statement is
        # injected after a failing unnamed batch.
        b = raw_login(proxy, pki)
        b.sendall(P(b"s1", Q1) + S)
        answers(b)
        b.sendall(Q(b"DISCARD ALL"))
        answers(b)
        b.sendall(P(b"s1", Q1) + S)
        answers(b)
        b.sendall(
            P(b"", b"SELECT 1/$1::int")
            + B(b"", b"", (b"0",))
            + E()
            + S
            + B(b"", b"s1", (b"1",))
            + E()
            + S
        )
        return answers(b, 2)

    seen = await scenario(pki, pg_tls, tmp_path, run)
    assert seen == ["1", ("E", "22012"), "Z", "2", ("D", "2"), "C", "Z"]


@pytest_twisted.ensureDeferred
async def test_a_client_cannot_close_a_shared_statement(pki, pg_tls, tmp_path):
    shared = serverName(Q1 + b"\0" + struct.pack("!H", 0))

    def run(proxy: Any) -> tuple[list[Any], list[Any], list[Any]]:
        victim = raw_login(proxy, pki)
        victim.sendall(P(b"v1", Q1) + B(b"", b"v1", (b"5",)) + E() + S)
        answers(victim)
        attacker = raw_login(proxy, pki)
        attacker.sendall(C(b"S", shared) + S)
        closed = answers(attacker)
        victim.sendall(B(b"", b"v1", (b"5",)) + E() + S)
        again = answers(victim)
        newcomer = raw_login(proxy, pki)
        newcomer.sendall(P(b"x", Q1) + B(b"", b"x", (b"7",)) + E() + S)
        return closed, again, answers(newcomer)

    closed, again, newcomer = await scenario(pki, pg_tls, tmp_path, run)
    assert closed == ["3", "Z"]  # answered, as closing a missing name is
    assert again == ["2", ("D", "6"), "C", "Z"]
    assert newcomer == ["1", "2", ("D", "8"), "C", "Z"]


@pytest_twisted.ensureDeferred
async def test_a_failed_discard_all_leaves_the_list_true(pki, pg_tls, tmp_path):
    def run(proxy: Any) -> list[Any]:
        victim = raw_login(proxy, pki)
        victim.sendall(P(b"v1", Q1) + B(b"", b"v1", (b"5",)) + E() + S)
        answers(victim)
        attacker = raw_login(proxy, pki)
        attacker.sendall(Q(b"SELECT 1/0; DISCARD ALL"))
        answers(attacker)
        attacker.sendall(Q(b"DEALLOCATE ALL"))
        answers(attacker)
        attacker.close()
        newcomer = raw_login(proxy, pki)
        newcomer.sendall(P(b"x", Q1) + B(b"", b"x", (b"7",)) + E() + S)
        return answers(newcomer)

    assert await scenario(pki, pg_tls, tmp_path, run) == ["1", "2", ("D", "8"), "C", "Z"]


@pytest_twisted.ensureDeferred
async def test_eviction_cannot_undo_the_next_clients_settings(pki, pg_tls, tmp_path):
    """A statement closed behind pgtls's back must not make the restore of parameters fail."""
    shared = serverName(Q1 + b"\0" + struct.pack("!H", 0))

    def run(proxy: Any) -> list[Any]:
        a = raw_login(proxy, pki)
        a.sendall(P(b"a1", Q1) + S)
        answers(a)
        a.sendall(Q(b'DEALLOCATE "' + shared + b'"') + P(b"a2", Q2) + S)
        answers(a, 2)
        a.close()
        c = raw_login(proxy, pki, TimeZone="Asia/Tokyo")
        c.sendall(Q(b"SHOW TimeZone"))
        return answers(c)

    seen = await scenario(pki, pg_tls, tmp_path, run, max_prepared_statements=1)
    assert ("D", "Asia/Tokyo") in seen, seen


@pytest_twisted.ensureDeferred
async def test_sjis_cannot_hide_a_set(pki, pg_tls, tmp_path):
    """In SJIS 0x95 0x5C is one character: the server's literal does not end where a latin-1 reading says."""

    def run(proxy: Any) -> list[Any]:
        a = raw_login(proxy, pki, client_encoding="SJIS")
        a.sendall(Q(b"SELECT E'\x95\\'; SET app.tenant_id = 'A'; SELECT '--'"))
        answers(a)
        a.close()
        other = raw_login(proxy, pki)
        other.sendall(Q(b"SELECT current_setting('app.tenant_id', true)"))
        return answers(other)

    seen = await scenario(pki, pg_tls, tmp_path, run)
    assert ("D", "A") not in seen, seen


@pytest_twisted.ensureDeferred
async def test_refused_parse_keeps_its_undeclared_parameters(pki, pg_tls, tmp_path):
    def run(proxy: Any) -> list[Any]:
        a = raw_login(proxy, pki)
        a.sendall(
            P(b"s", b"SELECT set_config('app.x', $1, false)") + B(b"", b"s", (b"A",)) + E() + S
        )
        return answers(a)

    seen = await scenario(pki, pg_tls, tmp_path, run, pinning="refuse")
    assert seen == ["1", "2", ("E", "0A000"), "Z"]
