# -*- test-case-name: tests.test_prepared,tests.test_pinning -*-
"""
What a transaction-pooled client's statements do to the server connection
it is given: the named prepared statements pgtls renames
(L{pgtls_twisted.protocol._prepared}), and the session state that pins the
client to its connection (L{pgtls_twisted.protocol._sessionstate}).

Only the client-to-server messages that can matter are read: Query and
Parse (their text), Bind, Describe and Close (a statement name), and
FunctionCall. The splitter peeks at them (L{CLIENT_PEEK}); everything else
stays framed by its header only, and the server's answers are read only
for ParseComplete and CloseComplete, which L{StatementRelay} may swallow.

Where pgtls cannot be sure what a message does (a statement too long to
read, a function call, a statement name too long to map), it pins: the
client keeps its server connection, which is reset before anyone else has
it. Pinning is never wrong, only costly; guessing wrong would leak one
client's session into another's.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

from twisted.logger import Logger

from pgtls_twisted.protocol._prepared import (
    BIND_PEEK,
    MAX_NAME,
    NAME_PEEK,
    ClientStatements,
    StatementRelay,
)
from pgtls_twisted.protocol._refusal import refusal
from pgtls_twisted.protocol._sessionstate import classify
from pgtls_twisted.protocol._wire import ProtocolViolation

if TYPE_CHECKING:
    from pgtls_twisted.config import PoolConfig
    from pgtls_twisted.pool._pool import PooledServer
    from pgtls_twisted.protocol._txstate import TransactionTracker

_QUERY = ord("Q")
_PARSE = ord("P")
_BIND = ord("B")
_DESCRIBE = ord("D")
_CLOSE = ord("C")
_FUNCTION_CALL = ord("F")

#: The longest Query or Parse body read whole. Longer ones go on unread,
#: and pin the client: what they do cannot be known.
INSPECT_LIMIT = 1 << 20

#: The client splitter's peeks in transaction mode.
CLIENT_PEEK = {
    b"Q": INSPECT_LIMIT,
    b"P": INSPECT_LIMIT,
    b"B": BIND_PEEK,
    b"D": NAME_PEEK,
    b"C": NAME_PEEK,
}

#: The server types a relay reads: ParseComplete and CloseComplete.
RELAY_WATCH = frozenset(b"13")

_TEXT_OID = 25
_OID = struct.Struct("!I")


def _header(mtype: bytes, body: bytes) -> bytes:
    return mtype + struct.pack("!I", len(body) + 4) + body


def _refusedParse(body: bytes, sql: str) -> bytes:
    """
    C{body}'s Parse with C{sql} as its text, its parameter types kept
    except unspecified ones made C{text}: the refusal names no parameter,
    and an unspecified type nothing refers to is an error of its own.

    @raise ProtocolViolation: the parameter types do not fill the body.
    """
    name, _, rest = body.partition(b"\0")
    _, _, types = rest.partition(b"\0")
    count = struct.unpack_from("!H", types)[0] if len(types) >= 2 else 0
    if len(types) != 2 + 4 * count:
        raise ProtocolViolation("malformed Parse message")
    oids = [_OID.unpack_from(types, 2 + 4 * i)[0] for i in range(count)]
    packed = struct.pack("!H", count) + b"".join(_OID.pack(oid or _TEXT_OID) for oid in oids)
    return name + b"\0" + sql.encode() + b"\0" + packed


class StatementGuard:
    """
    One transaction-pooled client's statements: their names on the
    servers, and whether the client is pinned.

    @ivar statements: the client's named prepared statements.
    @ivar pinned: why the client keeps its server connection until it
        leaves, or C{None}.
    """

    _log = Logger()

    def __init__(self, config: PoolConfig, onPin: Callable[[str], None]) -> None:
        self.limit = config.max_prepared_statements
        self.refuse = config.pinning == "refuse"
        self.statements = ClientStatements()
        self.pinned: str | None = None
        self._onPin = onPin

    def relayFor(self, server: PooledServer) -> StatementRelay | None:
        """The relay for a server connection being attached, or C{None} (feature off)."""
        if not self.limit:
            return None
        return StatementRelay(self.statements, server.statements)

    def evictions(self, server: PooledServer) -> list[str]:
        """The statements to run on C{server} before it serves this client: LRU closes."""
        return [f'DEALLOCATE "{name.decode()}"' for name in server.statements.evict(self.limit)]

    def pin(self, reason: str) -> None:
        if self.pinned is None:
            self.pinned = reason
            self._onPin(reason)

    # -- the client's stream ---------------------------------------------------------

    def forward(
        self,
        out: bytes,
        events: list[tuple[int, int, int, bytes]],
        tracker: TransactionTracker,
        relay: StatementRelay | None,
    ) -> bytes:
        """
        What to send the server for one chunk of the client's stream, and
        feed C{tracker} its messages, in order.

        @raise ProtocolViolation: a malformed Parse.
        """
        pieces: list[bytes] = []
        pos = 0
        for offset, mtype, length, peek in events:
            replaced: tuple[bytes, int] | None = None
            if mtype == _QUERY or mtype == _PARSE:
                replaced = self._statement(mtype, length, peek, tracker, relay)
            elif relay is not None and (mtype == _BIND or mtype == _DESCRIBE or mtype == _CLOSE):
                tag = tracker.answered + tracker.pendingSyncs
                if mtype == _BIND:
                    replaced = relay.bind(peek, length, tag)
                elif len(peek) == length - 4:
                    if mtype == _DESCRIBE:
                        replaced = relay.describe(peek, tag)
                    else:
                        replaced = relay.close(peek, tag)
            elif mtype == _FUNCTION_CALL:
                self.pin("function call")
            tracker.clientMessage(mtype)
            if replaced is not None:
                pieces.append(out[pos:offset])
                pieces.append(replaced[0])
                pos = offset + 5 + replaced[1]
        if not pieces:
            return out
        pieces.append(out[pos:])
        return b"".join(pieces)

    def _statement(
        self,
        mtype: int,
        length: int,
        peek: bytes,
        tracker: TransactionTracker,
        relay: StatementRelay | None,
    ) -> tuple[bytes, int] | None:
        if len(peek) != length - 4:
            self.pin("statement too long for pgtls to read")
            return None
        if mtype == _QUERY:
            name, text = b"", peek[:-1]
        else:
            name, sep, rest = peek.partition(b"\0")
            text, sep2, _ = rest.partition(b"\0")
            if not sep or not sep2:
                raise ProtocolViolation("malformed Parse message")
        sql = text.decode("latin-1")
        verdict = classify(sql)
        body = peek
        replaced: tuple[bytes, int] | None = None
        if relay is not None and b"pgtls_" in text and b"deallocate" in text.lower():
            # Closes a statement pgtls made, which other clients use too:
            # the connection is reset (and pgtls's list of its statements
            # cleared) before anyone else has it.
            self.pin("DEALLOCATE of a statement pgtls prepared")
        if verdict.pin is not None and self.pinned is None:
            if self.refuse:
                sql = refusal(verdict.pin, sql)
                if mtype == _QUERY:
                    return _header(b"Q", sql.encode() + b"\0"), len(peek)
                body = _refusedParse(peek, sql)
                replaced = _header(b"P", body), len(peek)
            else:
                self.pin(verdict.pin)
        if verdict.deallocates and relay is not None:
            relay.forgetAll()
        if mtype == _QUERY or not name:
            return replaced
        if relay is None:
            self.pin("named prepared statement (pool.max_prepared_statements = 0)")
            return replaced
        if len(name) > MAX_NAME:
            self.pin("prepared statement name too long to map")
            return replaced
        rewritten = relay.parse(body, tracker.answered + tracker.pendingSyncs)
        if rewritten is None:
            return replaced
        return rewritten[0], len(peek)


#: Reasons whose words after the first name what was set (a parameter):
#: counted in metrics under their first words only, so labels stay few.
_FIXED_KINDS = (
    "SET ROLE",
    "RESET ROLE",
    "SET SESSION AUTHORIZATION",
    "RESET SESSION AUTHORIZATION",
    "RESET ALL",
)


def pinKind(reason: str) -> str:
    """The metrics label of a pin C{reason}: a small, fixed set of values."""
    for kind in _FIXED_KINDS:
        if reason.startswith(kind):
            return kind
    word = reason.split(" ", 1)[0]
    if word in ("SET", "RESET"):
        return word
    return reason
