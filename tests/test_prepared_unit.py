"""
Unit tests of L{pgtls_twisted.protocol._prepared}: the renaming of named
prepared statements between a client and the server connections it is
given, and the bookkeeping of the server's answers.
"""

from __future__ import annotations

import struct

import pytest

from pgtls_twisted.protocol._prepared import (
    NOOP_CLOSE,
    NOOP_PARSE,
    ClientStatements,
    ServerStatements,
    StatementRelay,
    closeStatement,
    parseMessage,
    serverName,
)
from pgtls_twisted.protocol._wire import ProtocolViolation


def parse_body(name: bytes, query: bytes, types: tuple[int, ...] = ()) -> bytes:
    return name + b"\0" + query + b"\0" + struct.pack(f"!H{len(types)}I", len(types), *types)


def bind_body(portal: bytes, name: bytes, params: bytes = b"\0\0\0\0\0\0") -> bytes:
    return portal + b"\0" + name + b"\0" + params


def message(mtype: bytes, body: bytes) -> bytes:
    return mtype + struct.pack("!I", len(body) + 4) + body


def relay(server: ServerStatements | None = None) -> StatementRelay:
    return StatementRelay(ClientStatements(), server if server is not None else ServerStatements())


REST = parse_body(b"", b"SELECT $1", (23,))[1:]
TARGET = serverName(REST)


def test_server_name_depends_on_text_and_types() -> None:
    assert TARGET.startswith(b"pgtls_")
    assert serverName(parse_body(b"", b"SELECT $1", (25,))[1:]) != TARGET
    assert serverName(parse_body(b"", b"SELECT $2", (23,))[1:]) != TARGET
    assert serverName(parse_body(b"x", b"SELECT $1", (23,))[2:]) == TARGET


def test_named_parse_goes_under_the_server_name() -> None:
    r = relay()
    body = parse_body(b"_pg3_0", b"SELECT $1", (23,))
    out, consumed = r.parse(body, 0)
    assert consumed == len(body)
    assert out == parseMessage(TARGET, REST)
    assert r.client[b"_pg3_0"].server == TARGET
    assert TARGET in r.server
    assert r.parseComplete() is False  # the client's own answer
    assert r.settled


def test_unnamed_parse_is_untouched() -> None:
    r = relay()
    assert r.parse(parse_body(b"", b"SELECT 1"), 0) is None
    # Its answer is owed, and is the client's.
    assert not r.settled
    assert r.parseComplete() is False
    assert r.settled


def test_every_answer_pairs_with_its_own_message() -> None:
    """An unnamed Parse's answer must not confirm a named one the server skipped."""
    r = relay()
    r.parse(parse_body(b"", b"SELECT 1"), 0)
    r.parse(parse_body(b"", b"SELECT 1/0"), 0)
    r.parse(parse_body(b"s1", b"SELECT 2"), 0)
    assert r.parseComplete() is False  # the first unnamed one
    assert r.parseComplete() is False  # the second
    r.error(0)  # its Bind failed: s1 was skipped
    assert b"s1" not in r.client and not len(r.server)
    assert r.settled


def test_an_answer_to_nothing_is_a_desync() -> None:
    r = relay()
    assert r.parseComplete() is None
    assert r.closeComplete() is None


def test_a_shared_statement_cannot_be_closed_by_name() -> None:
    r = relay()
    out, _ = r.close(b"S" + TARGET + b"\0", 0)
    assert out == NOOP_CLOSE
    assert r.closeComplete() is False  # the client's answer
    assert r.close(b"Sother\0", 0) is None
    assert r.close(b"Pportal\0", 0) is None
    assert r.closeComplete() is False and r.closeComplete() is False


def test_malformed_parse_is_a_protocol_violation() -> None:
    with pytest.raises(ProtocolViolation):
        relay().parse(b"name-without-end", 0)


def test_second_client_shares_the_statement() -> None:
    server = ServerStatements()
    first, second = relay(server), relay(server)
    first.parse(parse_body(b"a", b"SELECT $1", (23,)), 0)
    first.parseComplete()
    out, _ = second.parse(parse_body(b"_pg3_0", b"SELECT $1", (23,)), 0)
    # The server has it: an empty Parse under the no-op name answers the
    # client, and its Close is swallowed.
    assert out == NOOP_PARSE + NOOP_CLOSE
    assert second.parseComplete() is False
    assert second.closeComplete() is True
    assert second.client[b"_pg3_0"].server == TARGET
    assert len(server) == 1


def test_bind_on_a_server_without_the_statement_injects_its_parse() -> None:
    client = ClientStatements()
    r = StatementRelay(client, ServerStatements())
    r.parse(parse_body(b"s1", b"SELECT $1", (23,)), 0)
    r.parseComplete()
    # Next transaction, another server connection.
    other = StatementRelay(client, ServerStatements())
    body = bind_body(b"", b"s1", b"\0\0\0\x01\0\0\0\x011\0\0")
    out, consumed = other.bind(body, len(body) + 4, 3)
    assert consumed == len(b"\0s1\0")
    assert out.startswith(parseMessage(TARGET, REST))
    rewritten = out[len(parseMessage(TARGET, REST)) :] + body[consumed:]
    assert rewritten == message(b"B", bind_body(b"", TARGET, body[consumed:]))
    assert other.parseComplete() is True  # injected: swallowed
    # Known now: a second Bind injects nothing.
    out, _ = other.bind(body, len(body) + 4, 4)
    assert not out.startswith(b"P")


def test_bind_keeps_the_rest_streaming() -> None:
    """Only the first bytes are peeked: the new length counts the unseen rest."""
    r = relay()
    r.parse(parse_body(b"s", b"SELECT $1", (23,)), 0)
    peek = b"portal\0s\0" + b"x" * 10
    out, consumed = r.bind(peek, 4 + 1_000_000, 0)
    header = out[:5]
    assert header[:1] == b"B"
    (length,) = struct.unpack("!I", header[1:])
    assert length == 4 + 1_000_000 - consumed + len(b"portal\0") + len(TARGET) + 1


def test_unknown_names_pass_unchanged() -> None:
    r = relay()
    assert r.bind(bind_body(b"", b"nope"), 20, 0) is None
    assert r.bind(bind_body(b"", b""), 20, 0) is None
    assert r.describe(b"Snope\0", 0) is None
    assert r.describe(b"Pportal\0", 0) is None
    assert r.close(b"Snope\0", 0) is None
    assert r.close(b"Pportal\0", 0) is None


def test_describe_is_renamed() -> None:
    r = relay()
    r.parse(parse_body(b"s", b"SELECT $1", (23,)), 0)
    r.parseComplete()
    out, consumed = r.describe(b"Ss\0", 1)
    assert consumed == 3
    assert out == message(b"D", b"S" + TARGET + b"\0")


def test_close_forgets_the_client_name_and_keeps_the_server_copy() -> None:
    r = relay()
    r.parse(parse_body(b"s", b"SELECT $1", (23,)), 0)
    r.parseComplete()
    out, _ = r.close(b"Ss\0", 1)
    assert out == NOOP_CLOSE
    assert b"s" not in r.client
    assert TARGET in r.server
    assert r.closeComplete() is False  # the client's answer


def test_a_failed_parse_registers_nothing() -> None:
    r = relay()
    r.parse(parse_body(b"s", b"SELEKT", ()), 0)
    r.error(0)
    assert not r.client
    assert not len(r.server)
    assert r.settled


def test_an_error_skips_the_rest_of_its_batch_only() -> None:
    r = relay()
    r.parse(parse_body(b"a", b"SELECT 1"), 0)  # batch 0
    r.parse(parse_body(b"b", b"SELECT 2"), 0)
    r.parse(parse_body(b"c", b"SELECT 3"), 1)  # batch 1 (after a Sync)
    assert r.parseComplete() is False  # a done
    r.error(0)  # b failed (or something after it)
    assert set(r.client) == {b"a", b"c"}
    r.ready(1)
    assert r.parseComplete() is False  # c
    r.ready(2)
    assert r.settled


def test_a_failed_injection_forgets_the_server_copy() -> None:
    client = ClientStatements()
    r = StatementRelay(client, ServerStatements())
    r.parse(parse_body(b"s", b"SELECT $1", (23,)), 0)
    r.parseComplete()
    other = StatementRelay(client, ServerStatements())
    other.bind(bind_body(b"", b"s"), 20, 0)
    other.error(0)  # the table went away, say
    assert TARGET not in other.server
    assert b"s" in client  # the client still has it, as on its own server


def test_a_skipped_close_leaves_the_client_name() -> None:
    r = relay()
    r.parse(parse_body(b"s", b"SELECT 1"), 0)
    r.parseComplete()
    r.close(b"Ss\0", 1)
    r.error(1)
    assert b"s" in r.client


def test_duplicate_name_is_refused_by_the_server() -> None:
    r = relay()
    r.parse(parse_body(b"s", b"SELECT 1"), 0)
    r.parseComplete()
    first = r.client[b"s"]
    out, _ = r.parse(parse_body(b"s", b"SELECT 2"), 1)
    # The existing statement's own Parse again: the server answers 42P05
    # where the client expects it, and no other text ever goes under a
    # name derived from this one.
    assert out == first.parse
    r.error(1)
    assert r.client[b"s"] is first
    assert first.server in r.server


def test_duplicate_after_a_skipped_first_parse() -> None:
    """The first Parse of the name was skipped: the repeated one created the statement."""
    r = relay()
    r.parse(parse_body(b"s", b"SELECT 1"), 0)
    first = r.client[b"s"]
    r.parse(parse_body(b"s", b"SELECT 2"), 1)
    r.error(0)  # batch 0 failed before s was prepared
    assert b"s" not in r.client and first.server not in r.server
    assert r.parseComplete() is False  # batch 1: the repeated Parse succeeded
    assert r.client[b"s"] is first and first.server in r.server


def test_lru_eviction() -> None:
    server = ServerStatements()
    for name in (b"a", b"b", b"c"):
        server.add(name)
    server.touch(b"a")
    assert server.evict(1) == [b"b", b"c"]
    assert b"a" in server
    assert server.evict(5) == []


def test_forget_all() -> None:
    r = relay()
    r.parse(parse_body(b"s", b"SELECT 1"), 0)
    r.forgetAll()
    assert not r.client and not len(r.server)
    # Whether the DISCARD ALL runs is not known yet.
    assert r.server.unknown


def test_close_statement_message() -> None:
    assert closeStatement(b"x") == message(b"C", b"Sx\0")


def test_malformed_describe_and_close_pass_unchanged() -> None:
    """The server, not pgtls, answers a name without its terminator."""
    r = relay()
    r.parse(parse_body(b"ab", b"SELECT 1"), 0)
    assert r.describe(b"Sabc", 0) is None
    assert r.close(b"Sabc", 0) is None
    assert b"ab" in r.client
