# -*- test-case-name: tests.test_pooling,tests.test_unit_pooled -*-
"""
The pooler's own statements on a pooled server connection: the tracked
parameters restored before a client is served, the statements closed
beyond C{max_prepared_statements}, the ROLLBACK and reset after a client
leaves. Their answers are read and swallowed here, never shown to a client.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from twisted.logger import Logger

from pgtls_twisted.protocol import _wire as wire
from pgtls_twisted.proxy._leg import discard

if TYPE_CHECKING:
    from pgtls_twisted.pool._pool import PooledServer

_log = Logger()


def runInternal(
    server: PooledServer,
    sql: str | bytes,
    then: Callable[[], None],
    broken: Callable[[str], None],
    label: dict[str, object],
) -> None:
    """
    Run C{sql} on C{server} as one simple Query (or C{bytes}: extended-query
    messages that end with one Sync), swallowing its answers,
    then call C{then}. A failure is logged (with C{label}'s fields, C{conn}
    and C{pool}) and marks the connection dirty (closed on release); the
    caller goes on. A reply that breaks the protocol marks it dirty too,
    and calls C{broken} with the reason instead of C{then}.
    """
    reader = wire.MessageReader()
    failed: list[str] = []

    def answer(data: bytes) -> None:
        reader.feed(data)
        while True:
            try:
                msg = reader.next()
            except wire.ProtocolViolation as e:
                server.dirty = True
                server.leg.deliver = discard
                broken(e.message)
                return
            if msg is None:
                return
            mtype, body = msg
            if mtype == b"E":
                failed.append(wire.parse_error_fields(body).get("M", "error"))
            elif mtype == b"S":
                name, value = wire.parse_parameter_status(body)
                server.setParameter(name, value)
            elif mtype == b"Z":
                server.leg.deliver = discard
                if failed:
                    server.dirty = True
                    _log.warn(
                        "conn={conn} pool={pool}: {sql!r} failed: {error}",
                        sql=sql,
                        error=failed[0],
                        **label,
                    )
                then()
                rest = reader.drain()
                if rest:
                    # Asynchronous messages right behind our answer.
                    server.leg.deliver(rest)
                return

    server.leg.deliver = answer
    if isinstance(sql, bytes):
        server.leg.out.write(sql)
    else:
        server.leg.out.write(wire.message(b"Q", sql.encode() + b"\0"))


def runEach(
    statements: list[str | bytes],
    server: PooledServer,
    then: Callable[[], None],
    broken: Callable[[str], None],
    label: dict[str, object],
) -> None:
    """
    Run C{statements} one Query each, then call C{then}. Not joined into
    one: a Query of several statements is one implicit transaction, in
    which C{DISCARD ALL} (and any other statement that refuses a
    transaction block) always fails, so the connection would be closed
    instead of reset. After a failure (the connection is then dirty and
    will be closed) the rest are skipped.
    """
    if not statements or server.dirty:
        then()
        return
    first, rest = statements[0], statements[1:]
    runInternal(server, first, lambda: runEach(rest, server, then, broken, label), broken, label)


def resetStatements(reset: str, server: PooledServer, pinned: bool) -> list[str]:
    """
    What makes C{server} clean again after a session-mode client, or a
    pinned transaction-mode one: C{reset} (the route's C{reset_query}), and
    for a pinned client the removal of every prepared statement, which
    pgtls then forgets (C{DISCARD ALL} does both). A pinned client's
    connection with no C{reset_query} to clean it is marked dirty (closed)
    instead.
    """
    if not reset:
        if pinned:
            server.dirty = True
        return []
    # First, no statement timeout the client set: under it the reset
    # itself could be cancelled, or (PostgreSQL checks for the timeout
    # late) the next client's first statement after it.
    statements = ["RESET statement_timeout", reset]
    if pinned:
        server.statements.clear()
        if "discard all" not in " ".join(reset.lower().split()):
            statements.append("DEALLOCATE ALL")
    return statements
