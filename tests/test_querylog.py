"""Unit tests of the pooled query log (pgtls_twisted.pool._querylog)."""

from __future__ import annotations

from twisted.internet.task import Clock

from pgtls_twisted.pool._querylog import PEEK, QueryLog


def statements(events):
    return [(e["kind"], e["statement"], e["duration_ms"]) for e in events if "statement" in e]


def test_query_and_parse_batches_pair_with_ready_for_query(events) -> None:
    clock = Clock()
    log = QueryLog(clock, conn=1, client="127.0.0.1:1", user="u", route="r", database="d")
    body = b"SELECT 1\0"
    log.clientMessage(ord("Q"), 4 + len(body), body)
    parse = b"stmt\0SELECT $1\0\0\0"
    log.clientMessage(ord("P"), 4 + len(parse), parse)
    log.clientMessage(ord("B"), 20, b"")  # Bind: never looked at
    log.clientMessage(ord("S"), 4, b"")
    log.clientMessage(ord("S"), 4, b"")  # a Sync with no Parse
    clock.advance(0.25)
    log.readyForQuery()
    clock.advance(0.25)
    log.readyForQuery()
    log.readyForQuery()
    assert statements(events) == [("query", "SELECT 1", 250.0), ("parse", "SELECT $1", 500.0)]
    assert events[0]["user"] == "u" and events[0]["client"] == "127.0.0.1:1"


def test_long_statements_are_cut(events) -> None:
    log = QueryLog(Clock(), conn=1, client="c", user="u", route="r", database="d")
    text = b"SELECT '" + b"x" * (PEEK * 2) + b"'\0"
    log.clientMessage(ord("Q"), 4 + len(text), text[:PEEK])
    log.readyForQuery()
    [(_, statement, _)] = statements(events)
    assert statement.endswith("...") and len(statement) == PEEK + 3
