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
    closeStatement,
)
from pgtls_twisted.protocol._refusal import refusal
from pgtls_twisted.protocol._sessionstate import classify
from pgtls_twisted.protocol._sqllex import PARAM, tokens
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

#: Named statements pgtls maps, per client, and the longest text it maps:
#: what it keeps of a client's statements is bounded (a client beyond
#: either is pinned, and its further statements go to the server as they
#: are).
MAX_STATEMENTS = 1000
MAX_MAPPED_TEXT = 64 * 1024

#: The server types a relay reads: ParseComplete and CloseComplete.
RELAY_WATCH = frozenset(b"13")

#: Client encodings in which the second byte of a character may be 0x5C.
_BACKSLASH_ENCODINGS = frozenset(
    {"SJIS", "SHIFT_JIS_2004", "BIG5", "GBK", "GB18030", "UHC", "JOHAB"}
)

_TEXT_OID = 25
_SYNC = b"S\0\0\0\x04"
_OID = struct.Struct("!I")


def _highestParameter(sql: str) -> int:
    """
    The highest C{$n} a statement refers to (0 for none, at most 65535),
    as the lexer reads it. The digits are the client's: a run longer than
    any number below the cap never reaches C{int()}, which refuses more
    than 4300 digits (ValueError) and takes quadratic time below that.
    """
    highest = 0
    for token in tokens(sql):
        if token.kind == PARAM:
            digits = token.text(sql)[1:].lstrip("0")
            highest = max(highest, int(digits or "0") if len(digits) <= 5 else 65535)
    return min(highest, 65535)


def _header(mtype: bytes, body: bytes) -> bytes:
    return mtype + struct.pack("!I", len(body) + 4) + body


def _refusedParse(body: bytes, sql: str, text: bytes) -> bytes:
    """
    C{body}'s Parse with C{sql} as its text, its parameter types kept
    except unspecified ones made C{text}, and as many as the refused
    C{text} refers to (C{$n}): the refusal names no parameter, and an
    unspecified type nothing refers to is an error of its own, while a Bind
    must find as many parameters as the client's statement had.

    @raise ProtocolViolation: the parameter types do not fill the body.
    """
    name, _, rest = body.partition(b"\0")
    _, _, types = rest.partition(b"\0")
    count = struct.unpack_from("!H", types)[0] if len(types) >= 2 else 0
    if len(types) != 2 + 4 * count:
        raise ProtocolViolation("malformed Parse message")
    oids = [_OID.unpack_from(types, 2 + 4 * i)[0] for i in range(count)]
    oids += [0] * (_highestParameter(text.decode("latin-1")) - count)
    count = len(oids)
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

    def evictions(self, server: PooledServer) -> bytes | None:
        """
        What C{server} is sent before it serves this client: a Close of
        each least recently used statement beyond the limit, and a Sync
        (a Close never fails, unlike a DEALLOCATE of a name the server
        might not have), or C{None}.
        """
        names = server.statements.evict(self.limit)
        if not names:
            return None
        return b"".join(closeStatement(name) for name in names) + _SYNC

    def checkParameters(self, values: dict[str, str]) -> None:
        """
        Pin a client whose statements pgtls's lexer may read otherwise than
        the server: with C{standard_conforming_strings} off, backslashes
        escape quotes in plain literals; in a client encoding whose
        multi-byte characters can end in the byte of a backslash (SJIS,
        BIG5, GBK, ...), an C{E''} literal's end moves. Either way a
        statement could hide from it.

        @param values: the session parameters the client has now.
        """
        if self.pinned is not None:
            return
        if values.get("standard_conforming_strings") == "off":
            self.pin("standard_conforming_strings = off")
        elif values.get("client_encoding", "").upper() in _BACKSLASH_ENCODINGS:
            self.pin(f"client_encoding {values['client_encoding']}")

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
            elif mtype == _FUNCTION_CALL:
                self.pin("function call")
            elif relay is None:
                pass
            elif mtype == _BIND:
                # The unnamed portal of the unnamed statement, the common
                # case, names nothing to rename.
                if peek[:2] != b"\0\0":
                    replaced = relay.bind(peek, length, tracker.answered + tracker.pendingSyncs)
            elif mtype == _DESCRIBE:
                if peek[:1] == b"S" and len(peek) == length - 4:
                    replaced = relay.describe(peek, tracker.answered + tracker.pendingSyncs)
            elif mtype == _CLOSE:
                # Every Close is paired with its answer, renamed or not.
                tag = tracker.answered + tracker.pendingSyncs
                if len(peek) == length - 4:
                    replaced = relay.close(peek, tag)
                else:
                    relay.passClose(tag)
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
        """
        A Query or Parse: classified, and (a Parse) renamed. Every Parse
        the server is sent passes through the relay, renamed or not, so
        that its answer is paired with it.
        """
        tag = tracker.answered + tracker.pendingSyncs
        if len(peek) != length - 4:
            self.pin("statement too long for pgtls to read")
            if mtype == _PARSE and relay is not None:
                relay.passParse(tag)
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
        if relay is not None and b"deallocate" in text.lower():
            # It may close statements pgtls made, which other clients
            # share (their names can be worked out, and quoted in ways no
            # search here would follow): what the connection has is no
            # longer known; it is cleared before its next client.
            relay.server.unknown = True
        if verdict.pin is not None and self.pinned is None:
            if self.refuse:
                sql = refusal(verdict.pin, sql)
                if mtype == _QUERY:
                    return _header(b"Q", sql.encode() + b"\0"), len(peek)
                body = _refusedParse(peek, sql, text)
                replaced = _header(b"P", body), len(peek)
            else:
                self.pin(verdict.pin)
        if verdict.deallocates and relay is not None:
            relay.forgetAll()
        if mtype == _QUERY:
            return replaced
        if relay is None:
            if name:
                self.pin("named prepared statement (pool.max_prepared_statements = 0)")
            return replaced
        if not name:
            # Unnamed: goes as it is (already checked whole, above), its
            # answer the client's.
            relay.passParse(tag)
            return replaced
        if len(name) > MAX_NAME or len(text) > MAX_MAPPED_TEXT:
            self.pin("prepared statement too long to map")
            relay.passParse(tag)
            return replaced
        if name not in self.statements and len(self.statements) >= MAX_STATEMENTS:
            self.pin(f"more than {MAX_STATEMENTS} prepared statements")
            relay.passParse(tag)
            return replaced
        rewritten = relay.parse(body, tag)
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
