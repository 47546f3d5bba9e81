# -*- test-case-name: tests.test_txstate -*-
"""
When may a pooled server connection be given back, and what must be
re-applied on the next one? Pure state machines, no I/O.

In transaction pooling a server connection serves a client only while that
client needs it: from its first request until the server is quiet again
with no transaction open. L{TransactionTracker} decides "quiet" from the
message types flowing both ways (as L{pgtls_twisted.protocol._framing.MessageSplitter}
reports them); L{ParameterTracker} remembers the session parameters the
client expects, so that a different server connection can be brought in
line before it serves this client.

The tracker's mistakes are not symmetric. Believing the server still owes an
answer when it does not only keeps a server connection attached to a client
for longer than needed. Believing it owes none when it still owes one hands
that answer to the next client: a desynchronised protocol stream and a leak
of one client's results into another's session. So wherever the server's
behaviour cannot be known from the message types alone, the tracker gives
up and pins (L{TransactionTracker.pinned}): the connection stays with this
client and is closed, never reused, when the client leaves.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from functools import lru_cache

from pgtls_twisted.protocol._wire import ProtocolViolation, parse_parameter_status

# Frontend message types, as the ints MessageSplitter reports.
_QUERY = ord("Q")
_PARSE = ord("P")
_BIND = ord("B")
_DESCRIBE = ord("D")
_EXECUTE = ord("E")
_CLOSE = ord("C")
_SYNC = ord("S")
_FLUSH = ord("H")
_FUNCTION_CALL = ord("F")
_COPY_DATA = ord("d")
_COPY_DONE = ord("c")
_COPY_FAIL = ord("f")
_TERMINATE = ord("X")

_EXTENDED = frozenset((_PARSE, _BIND, _DESCRIBE, _EXECUTE, _CLOSE))

# Backend message types.
_READY_FOR_QUERY = ord("Z")
_COPY_IN_RESPONSE = ord("G")
_COPY_OUT_RESPONSE = ord("H")
_COPY_BOTH_RESPONSE = ord("W")
_COMMAND_COMPLETE = ord("C")
_ERROR_RESPONSE = ord("E")

#: ReadyForQuery's status, as the splitter's peek (bytes) or as text.
_STATUSES: dict[bytes | str, str] = {b"I": "I", b"T": "T", b"E": "E", "I": "I", "T": "T", "E": "E"}

#: The frontend types L{TransactionTracker.clientMessage} needs: all of them
#: but CopyData, which never changes the state and is by far the most
#: frequent during COPY FROM STDIN. Unknown types must be seen too: the
#: server closes the connection on them.
CLIENT_WATCH = frozenset(range(256)) - {_COPY_DATA}

#: The backend types L{TransactionTracker.serverMessage} acts on. Every
#: other backend message (DataRow, RowDescription, ParseComplete, Notice,
#: Notification, ParameterStatus, ...) leaves the state unchanged, so the
#: splitter need not report it.
SERVER_WATCH = frozenset(b"ZGHWcCE")

#: How many body bytes of a ParameterStatus to peek at, for
#: L{ParameterTracker}. The tracked values are short (application_name is
#: cut to 63 bytes by the server, a time zone name to 255), so a body this
#: long always holds the whole of a tracked parameter's message.
PARAMETER_STATUS_PEEK = 1024

#: Peek sizes for a server-side splitter: ReadyForQuery's status byte, and
#: ParameterStatus bodies for L{ParameterTracker}.
SERVER_PEEK = {b"Z": 1, b"S": PARAMETER_STATUS_PEEK}


def _code(mtype: int | bytes) -> int:
    return mtype if isinstance(mtype, int) else mtype[0]


class TransactionTracker:
    """
    Follow one server connection's protocol state while a client uses it.

    Feed it every frontend message type the client sends, in order, I{before}
    forwarding the bytes (L{clientMessage}), and the backend types in
    L{SERVER_WATCH} the server sends, in order (L{serverMessage}). Client
    bytes must reach the tracker before the server can answer them, or an
    answer could arrive for a request the tracker has not counted yet.

    The rules, and the protocol facts behind them:

     - Every Query, Sync and FunctionCall is answered by exactly one
       ReadyForQuery, in order; those requests are queued in
       L{pendingSyncs} and each ReadyForQuery removes the oldest. Pipelined
       requests (several sent before any answer) therefore keep the
       connection until the last one's ReadyForQuery.
     - ReadyForQuery's status byte is the transaction status: C{I} outside a
       transaction block, C{T} inside one, C{E} inside a failed one. Only
       C{I} lets the connection go: any other state lives in that server
       session and must stay with the client that created it.
     - Parse, Bind, Describe, Execute, Close and Flush open an extended-query
       batch that only a Sync closes. Until then the server holds results
       it has not flushed, an unnamed statement or portal and possibly an
       implicit transaction: the connection stays. After an error the server
       discards messages up to the Sync, but still answers that Sync, so an
       error changes no count.
     - COPY: the server announces it with CopyInResponse (G),
       CopyOutResponse (H) or CopyBothResponse (W); nothing is idle until
       both halves are over. COPY FROM STDIN ends on the client's CopyDone
       (the server then confirms with CommandComplete) or CopyFail (the
       server answers ErrorResponse), or early on a server ErrorResponse,
       after which the client may still send CopyData until it notices;
       the server drops those. COPY TO STDOUT ends on the server's CopyDone
       or ErrorResponse.
     - While in COPY FROM STDIN the server I{ignores} Sync and Flush (libpq
       sends a Sync right after the Execute of every extended-protocol
       statement, not knowing it is a COPY, and another after CopyDone). So
       when the copy starts, the Syncs already sent after the statement that
       started it are taken off the queue, and Syncs sent during the copy
       are not queued. If the copy then ends with CommandComplete, the
       server did read those Syncs in copy mode: exact. If it ends with an
       ErrorResponse, whether the error came before or after the server read
       them is unknowable, and so is the number of ReadyForQuery still
       owed: the connection is pinned.
     - A non-COPY message sent during COPY FROM STDIN makes the server
       abort the copy and swallow that message: pinned, because a swallowed
       Query never gets its ReadyForQuery.
     - A Query or FunctionCall inside an unfinished extended batch is
       discarded if an earlier message of the batch failed: pinned.
     - NoticeResponse, NotificationResponse and ParameterStatus are
       asynchronous and may come at any time, also while idle: they never
       change anything here.
     - Terminate ends the session: L{terminated}. A pooler does not forward
       it to a pooled server; it gives the server back if L{idle}, and
       closes it otherwise.
     - A frontend type the server does not know, or a ReadyForQuery nobody
       asked for, means the server closes or the tracker's model is wrong:
       pinned.

    @ivar transactionStatus: C{"I"}, C{"T"} or C{"E"}, from the last
        ReadyForQuery.
    @ivar terminated: the client sent Terminate.
    @ivar pinned: C{None}, or why this server connection can no longer be
        given back: it must stay with this client and be closed afterwards.
    @ivar answered: how many ReadyForQuery have arrived: with
        L{pendingSyncs}, the index of each request in the stream, which
        L{pgtls_twisted.protocol._prepared.StatementRelay} tags its entries
        with.
    """

    __slots__ = (
        "transactionStatus",
        "answered",
        "terminated",
        "pinned",
        "_expected",
        "_batchOpen",
        "_copyMode",
        "_clientCopying",
        "_serverCopying",
        "_ignoredSyncs",
    )

    def __init__(self) -> None:
        """Start from a server connection that has just said ReadyForQuery('I')."""
        self.transactionStatus = "I"
        self.answered = 0
        self.terminated = False
        self.pinned: str | None = None
        # One entry (Q, S or F) per request still owed a ReadyForQuery.
        self._expected: deque[int] = deque()
        self._batchOpen = False
        self._copyMode: str | None = None
        self._clientCopying = False
        self._serverCopying = False
        self._ignoredSyncs = 0

    def restart(self) -> None:
        """
        Start counting again for the next client of a connection left idle
        (L{idle}): what L{__init__} would give, without new objects.
        """
        assert not self._expected and self.transactionStatus == "I"
        self.answered = 0
        self.terminated = False
        self.pinned = None
        self._batchOpen = False
        self._copyMode = None
        self._clientCopying = False
        self._serverCopying = False
        self._ignoredSyncs = 0

    # -- answers -----------------------------------------------------------------

    @property
    def idle(self) -> bool:
        """
        May the server connection be given to another client now?

        Also check that the client's stream is at a message boundary
        (L{pgtls_twisted.protocol._framing.MessageSplitter.atBoundary}): part of a
        message already forwarded binds the server to this client too.
        """
        return (
            not self._expected
            and self.transactionStatus == "I"
            and not self._batchOpen
            and not self._clientCopying
            and not self._serverCopying
            and self.pinned is None
        )

    @property
    def pendingSyncs(self) -> int:
        """Requests (Query, Sync, FunctionCall) still owed a ReadyForQuery."""
        return len(self._expected)

    @property
    def inCopy(self) -> str | None:
        """C{"in"}, C{"out"} or C{"both"} while a COPY is in progress, else C{None}."""
        if self._clientCopying or self._serverCopying:
            return self._copyMode
        return None

    @property
    def batchOpen(self) -> bool:
        """Extended-query messages were sent that no Sync has closed yet."""
        return self._batchOpen

    # -- input -------------------------------------------------------------------

    def _pin(self, reason: str) -> None:
        if self.pinned is None:
            self.pinned = reason

    def clientMessage(self, mtype: int | bytes) -> None:
        """The client sent a message of this type (an int, or one byte)."""
        t = mtype if type(mtype) is int else _code(mtype)
        copyingIn = self._clientCopying and self._serverCopying and self._copyMode == "in"
        if t == _SYNC:
            if copyingIn:
                self._ignoredSyncs += 1
            else:
                self._expected.append(t)
                self._batchOpen = False
        elif t in _EXTENDED:
            if self._clientCopying:
                self._clientLeavesCopy(copyingIn, "extended-query")
            self._batchOpen = True
        elif t == _QUERY or t == _FUNCTION_CALL:
            if self._clientCopying:
                self._clientLeavesCopy(copyingIn, "Query or FunctionCall")
            if self._batchOpen:
                self._pin("Query or FunctionCall inside an unfinished extended-query batch")
            self._expected.append(t)
        elif t == _FLUSH:
            if not copyingIn:
                self._batchOpen = True
        elif t == _COPY_DONE or t == _COPY_FAIL:
            # Outside COPY the server ignores both: nothing to do then.
            self._clientCopying = False
        elif t == _COPY_DATA:
            pass
        elif t == _TERMINATE:
            self.terminated = True
        else:
            self._pin(f"unknown frontend message type {t:#04x}: the server closes on it")

    def _clientLeavesCopy(self, copyingIn: bool, what: str) -> None:
        self._clientCopying = False
        if copyingIn:
            self._pin(f"{what} message during COPY FROM STDIN")

    def serverMessage(self, mtype: int | bytes, status: bytes | str | None = None) -> None:
        """
        The server sent a message of this type.

        @param status: for ReadyForQuery, its status byte (the splitter's
            one-byte peek); ignored for other types.
        @raise ProtocolViolation: a ReadyForQuery without a valid status.
        """
        t = mtype if type(mtype) is int else _code(mtype)
        # The two types every statement brings come first: this is per
        # message on the pooler's hot path.
        if t == _COMMAND_COMPLETE:
            if self._serverCopying and self._copyMode == "in":
                if self._clientCopying:
                    self._pin("COPY FROM STDIN completed before the client's CopyDone")
                # The server read the CopyDone in copy mode, so it read every
                # Sync sent before it in copy mode too, and ignored them.
                self._serverCopying = False
                self._ignoredSyncs = 0
        elif t == _READY_FOR_QUERY:
            self._readyForQuery(status)
        elif t == _ERROR_RESPONSE:
            if self._serverCopying:
                self._serverCopying = False
                if self._copyMode == "in" and self._ignoredSyncs:
                    self._pin(
                        "error during COPY FROM STDIN: unknown whether the server "
                        "ignored the Syncs sent with it"
                    )
        elif t == _COPY_IN_RESPONSE:
            self._copyInStarts()
        elif t == _COPY_OUT_RESPONSE:
            self._copyStarts("out", client=False)
        elif t == _COPY_BOTH_RESPONSE:
            self._copyStarts("both", client=True)
        elif t == _COPY_DONE:
            if self._copyMode in ("out", "both"):
                self._serverCopying = False

    def _readyForQuery(self, status: bytes | str | None) -> None:
        value = None if status is None else _STATUSES.get(status)
        if value is None:
            raise ProtocolViolation(f"invalid ReadyForQuery status {status!r}")
        self.transactionStatus = value
        self.answered += 1
        if self._serverCopying:
            self._pin("ReadyForQuery during COPY")
            self._serverCopying = False
        self._ignoredSyncs = 0
        if self._expected:
            self._expected.popleft()
        else:
            self._pin("ReadyForQuery that no request asked for")

    def _copyStarts(self, mode: str, client: bool) -> None:
        if self._serverCopying:
            self._pin("a COPY started while another was in progress")
        self._copyMode = mode
        self._serverCopying = True
        self._clientCopying = client

    def _copyInStarts(self) -> None:
        self._copyStarts("in", client=True)
        expected = self._expected
        if not expected:
            # Started by an Execute of the open batch: nothing sent after
            # it has been counted yet.
            return
        head = expected[0]
        if head == _FUNCTION_CALL:
            self._pin("COPY started by a FunctionCall")
            return
        # Everything queued after the statement that started the copy was
        # sent before the server could announce it, so the server reads it
        # in copy mode. For a Query that is what follows the Query; for an
        # extended batch it includes the batch's own Sync.
        kept: deque[int] = deque()
        if head == _QUERY:
            kept.append(expected.popleft())
        else:
            # The batch's Sync is ignored: the batch stays open on the
            # server until the next Sync, which libpq sends after CopyDone.
            self._batchOpen = True
        for t in expected:
            if t == _SYNC:
                self._ignoredSyncs += 1
            else:
                self._pin("Query or FunctionCall pipelined behind COPY FROM STDIN")
                kept.append(t)
        self._expected = kept


# ---------------------------------------------------------------------------
# Session parameters

#: The parameters re-applied when a client moves to another server
#: connection: those the server reports with ParameterStatus (GUC_REPORT),
#: that clients commonly set and depend on for parsing results, as
#: PgBouncer tracks by default. Spelled as PostgreSQL reports them.
TRACKED_PARAMETERS = (
    "client_encoding",
    "DateStyle",
    "TimeZone",
    "IntervalStyle",
    "standard_conforming_strings",
    "application_name",
)

_CANONICAL = {name.lower(): name for name in TRACKED_PARAMETERS}


def trackedParameters(serverParams: Mapping[str, str]) -> dict[str, str]:
    """The tracked parameters among a server's ParameterStatus values, by canonical name."""
    tracked: dict[str, str] = {}
    for name, value in serverParams.items():
        canonical = canonicalParameter(name)
        if canonical is not None:
            tracked[canonical] = value
    return tracked


@lru_cache(maxsize=1024)
def canonicalParameter(name: str) -> str | None:
    """
    The tracked parameter C{name} designates, spelled as in
    L{TRACKED_PARAMETERS}, or C{None}.

    PostgreSQL compares GUC names case-insensitively, in ASCII only; a name
    with any non-ASCII character designates no tracked parameter (Python's
    Unicode lowering would map e.g. the Kelvin sign to C{k}).

    Memoised (bounded): a transaction pooler asks this for every parameter
    of a server connection each time it attaches one (a dozen names, the
    same ones every time), and a cache hit is one C call.
    """
    if not name.isascii():
        return None
    return _CANONICAL.get(name.lower())


def quoteLiteral(value: str) -> str:
    """
    A SQL string literal for C{value}, as PostgreSQL's C{quote_literal}
    builds it: single quotes doubled, and when a backslash is present the
    C{E''} form with backslashes doubled, so the literal means the same
    whatever C{standard_conforming_strings} is on the server.

    @raise ValueError: C{value} contains NUL, which no PostgreSQL string can
        hold (and which would end the Query message's text early).
    """
    if "\0" in value:
        raise ValueError("a parameter value cannot contain NUL")
    quoted = value.replace("'", "''")
    if "\\" in value:
        return "E'" + quoted.replace("\\", "\\\\") + "'"
    return "'" + quoted + "'"


def parameterStatusFromPeek(length: int, peek: bytes) -> tuple[str, str] | None:
    """
    Decode a ParameterStatus from a splitter event's C{length} and C{peek}.

    @return: C{(name, value)}, or C{None} when the peek did not hold the
        whole body (a value longer than L{PARAMETER_STATUS_PEEK}, which no
        tracked parameter can have): a cut value must never be recorded,
        or the pooler would re-apply a wrong one.
    """
    if len(peek) != length - 4 or peek.count(b"\0") < 2:
        return None
    return parse_parameter_status(peek)


class ParameterTracker:
    """
    The session parameters one client expects, whichever server serves it.

    Two sources, the later winning: the client's startup packet (what it
    asked for), then every ParameterStatus the server sent while this client
    was attached (the server's own, normalised spelling of the same values,
    and any change the client made with SET, or the rollback of one). The
    startup values matter only until the first ParameterStatus for that
    name, which the server sends during startup for all of them.

    Feed L{serverReported} the ParameterStatus messages of the server
    connection while it serves this client, including those caused by the
    pooler's own C{SET} statements: afterwards L{differences} compares
    normalised values with normalised values, and finds nothing to do.
    """

    def __init__(self, startup: Mapping[str, str] | None = None) -> None:
        """
        @param startup: the startup packet's parameters
            (L{pgtls_twisted.protocol._wire.StartupMessage.parameters}); untracked
            names are ignored, tracked ones matched case-insensitively.
        """
        self._values: dict[str, str] = {}
        for name, value in (startup or {}).items():
            canonical = canonicalParameter(name)
            if canonical is not None:
                self._values[canonical] = value

    @property
    def values(self) -> dict[str, str]:
        """The values the client expects, by canonical name (a copy)."""
        return dict(self._values)

    def serverReported(self, name: str, value: str) -> bool:
        """
        Record a ParameterStatus seen while this client was attached.

        @return: whether C{name} is a tracked parameter.
        """
        canonical = canonicalParameter(name)
        if canonical is None:
            return False
        self._values[canonical] = value
        return True

    def differences(self, serverParams: Mapping[str, str]) -> dict[str, str]:
        """
        What must be set on a server connection before it serves this
        client.

        @param serverParams: that connection's current values, from the
            ParameterStatus messages it sent (names in any case).
        @return: C{{canonical name: value}} for every tracked parameter whose
            value the client expects and the server does not have (or has
            not reported).
        """
        return self.differencesFrom(trackedParameters(serverParams))

    def differencesFrom(self, tracked: Mapping[str, str]) -> dict[str, str]:
        """
        L{differences}, given the server's tracked parameters by canonical
        name already (L{trackedParameters}, kept up to date by the pool):
        what a transaction pooler asks at every attach, at the cost of one
        comprehension over the client's few values.
        """
        return {name: value for name, value in self._values.items() if tracked.get(name) != value}

    @staticmethod
    def applySQL(diff: Mapping[str, str]) -> str:
        """
        The statements that apply C{diff}, for one simple Query.

        Names come only from L{TRACKED_PARAMETERS} (written from that
        constant, never from C{diff}); values are always quoted literals.
        The statements run as one implicit transaction, so either all
        apply or, on an error, none does.

        The pooler must encode the text in the I{target} connection's
        current client_encoding: PostgreSQL converts a whole Query message
        on receipt, before any C{SET client_encoding} in it runs.

        @raise ValueError: an untracked name, or a value containing NUL.
        """
        statements = []
        for name, value in diff.items():
            canonical = canonicalParameter(name)
            if canonical is None:
                raise ValueError(f"not a tracked parameter: {name!r}")
            statements.append(f"SET {canonical} = {quoteLiteral(value)};")
        return " ".join(statements)
