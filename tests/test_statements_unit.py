"""
Unit tests of L{pgtls_twisted.pool._statements.StatementGuard}: one
transaction-pooled client's stream, as the splitter reports it, rewritten
for the attached server, with the pins and refusals it causes.
"""

from __future__ import annotations

import struct

import pytest

from pgtls_twisted.config import PoolConfig
from pgtls_twisted.pool._pool import PooledServer
from pgtls_twisted.pool._statements import CLIENT_PEEK, INSPECT_LIMIT, StatementGuard, pinKind
from pgtls_twisted.protocol._framing import MessageSplitter
from pgtls_twisted.protocol._prepared import parseMessage, serverName
from pgtls_twisted.protocol._txstate import CLIENT_WATCH, TransactionTracker
from pgtls_twisted.protocol._wire import ProtocolViolation


def msg(mtype: bytes, body: bytes = b"") -> bytes:
    return mtype + struct.pack("!I", len(body) + 4) + body


def parse(name: bytes, sql: bytes, *types: int) -> bytes:
    return msg(
        b"P", name + b"\0" + sql + b"\0" + struct.pack(f"!H{len(types)}I", len(types), *types)
    )


def query(sql: bytes) -> bytes:
    return msg(b"Q", sql + b"\0")


BIND = msg(b"B", b"\0s1\0\0\0\0\0\0\0")
EXECUTE = msg(b"E", b"\0\0\0\0\0")
SYNC = msg(b"S")


class Harness:
    def __init__(self, **pool: object) -> None:
        self.pins: list[str] = []
        self.guard = StatementGuard(PoolConfig(service_user="u", **pool), self.pins.append)
        self.server = PooledServer(leg=None, created=0.0)
        self.relay = self.guard.relayFor(self.server)
        self.tracker = TransactionTracker()
        self.splitter = MessageSplitter(CLIENT_WATCH, peek=CLIENT_PEEK)

    def send(self, data: bytes) -> bytes:
        out, events = self.splitter.feed(data)
        return self.guard.forward(out, events, self.tracker, self.relay)


def test_named_statement_is_renamed_and_unnamed_passes() -> None:
    h = Harness()
    unnamed = parse(b"", b"SELECT 1") + msg(b"B", b"\0\0\0\0\0\0\0\0") + EXECUTE + SYNC
    assert h.send(unnamed) == unnamed
    target = serverName(b"SELECT $1\0" + struct.pack("!HI", 1, 23))
    out = h.send(parse(b"s1", b"SELECT $1", 23) + BIND + EXECUTE + SYNC)
    assert out == (
        parseMessage(target, b"SELECT $1\0" + struct.pack("!HI", 1, 23))
        + msg(b"B", b"\0" + target + b"\0\0\0\0\0\0\0")
        + EXECUTE
        + SYNC
    )
    assert h.pins == []


def test_messages_cut_across_chunks_are_rewritten_whole() -> None:
    h = Harness()
    data = parse(b"s1", b"SELECT 1") + BIND + SYNC
    out = b"".join(h.send(data[i : i + 3]) for i in range(0, len(data), 3))
    assert b"s1" not in out and out.count(b"pgtls_") == 2


def test_session_state_pins_once() -> None:
    h = Harness()
    h.send(query(b"SET app.tenant_id = 'A'"))
    h.send(query(b"LISTEN x"))
    assert h.guard.pinned == "SET app.tenant_id" and h.pins == ["SET app.tenant_id"]
    assert pinKind(h.pins[0]) == "SET"


def test_refusal_replaces_the_statement() -> None:
    h = Harness(pinning="refuse")
    out = h.send(query(b"SET app.tenant_id = 'A'"))
    assert out.startswith(b"Q") and b"0A000" in out and b"RAISE" in out
    assert h.guard.pinned is None
    # A Parse keeps its name and parameters; unspecified types become text.
    out = h.send(parse(b"", b"SELECT set_config($1, $2, false)", 0, 25) + SYNC)
    body = out[5 : 1 + struct.unpack("!I", out[1:5])[0]]
    assert body.startswith(b"\0DO ") and body.endswith(struct.pack("!HII", 2, 25, 25))


def test_what_cannot_be_read_pins() -> None:
    h = Harness()
    big = query(b"SELECT '" + b"x" * INSPECT_LIMIT + b"'")
    out = h.send(big)
    assert out == big[: len(out)]  # forwarded unread as it streams
    assert h.guard.pinned == "statement too long for pgtls to read"
    h = Harness()
    h.send(msg(b"F", b"\0\0\0\x01\0\0\0\0\0\0"))
    assert h.guard.pinned == "function call"


def test_feature_off_pins_named_parse() -> None:
    h = Harness(max_prepared_statements=0)
    assert h.relay is None
    data = parse(b"s1", b"SELECT 1") + SYNC
    assert h.send(data) == data
    assert h.guard.pinned.startswith("named prepared statement")


def test_long_names_pass_and_pin() -> None:
    h = Harness()
    data = parse(b"n" * 600, b"SELECT 1") + SYNC
    assert h.send(data) == data
    assert h.guard.pinned == "prepared statement too long to map"


def test_malformed_parse() -> None:
    h = Harness()
    with pytest.raises(ProtocolViolation):
        h.send(msg(b"P", b"no-terminator"))


def test_discard_all_forgets_statements() -> None:
    h = Harness()
    h.send(parse(b"s1", b"SELECT 1") + SYNC)
    assert h.guard.statements and len(h.server.statements)
    h.send(query(b"DISCARD ALL"))
    assert not h.guard.statements and not len(h.server.statements)
    assert h.guard.pinned is None


def test_evictions_are_closes_and_a_sync() -> None:
    h = Harness(max_prepared_statements=1)
    h.send(parse(b"a", b"SELECT 1") + parse(b"b", b"SELECT 2") + SYNC)
    closes = h.guard.evictions(h.server)
    assert closes.startswith(b"C") and b"Spgtls_" in closes and closes.endswith(SYNC)
    assert h.guard.evictions(h.server) is None


def test_refused_parse_with_lying_type_count() -> None:
    """A hostile parameter count is a protocol violation, not a crash."""
    h = Harness(pinning="refuse")
    with pytest.raises(ProtocolViolation):
        h.send(msg(b"P", b"\0LISTEN x\0\x00\x05\0\0\0\x17"))


def test_deallocate_makes_the_list_unknown() -> None:
    """It may close a statement other clients share: the list is rebuilt before the next one."""
    h = Harness()
    h.send(query(b'DEALLOCATE U&"\\0070gtls_0123"'))
    assert h.server.statements.unknown and h.guard.pinned is None


def test_quoting_hazards_pin() -> None:
    h = Harness()
    h.guard.checkParameters({"client_encoding": "SJIS"})
    assert h.guard.pinned == "client_encoding SJIS"
    h = Harness()
    h.guard.checkParameters({"client_encoding": "UTF8", "standard_conforming_strings": "on"})
    assert h.guard.pinned is None


def test_caps_on_what_a_client_keeps() -> None:
    h = Harness()
    big = b"SELECT '" + b"x" * (64 * 1024) + b"'"
    data = parse(b"big", big) + SYNC
    assert h.send(data) == data
    assert h.guard.pinned == "prepared statement too long to map"


def test_refused_parse_declares_the_parameters_it_uses() -> None:
    h = Harness(pinning="refuse")
    out = h.send(parse(b"", b"SELECT set_config('app.x', $2, false)"))
    assert out.endswith(struct.pack("!HII", 2, 25, 25))
