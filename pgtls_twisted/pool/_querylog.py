# -*- test-case-name: tests.test_querylog,tests.test_security_logs -*-
"""
The pooling seed's query log (C{[proxy.pool] log_queries}): one structured
event per Query, and per extended-protocol batch of Parse messages, with
the client, the user, the route and database, the statement text, and the
duration once its result is complete (at its ReadyForQuery).

Statement texts come from the splitter's peek of Query and Parse bodies
(at most L{PEEK} bytes each, longer texts are cut), so logging adds no
parsing of whole messages. Bind messages, which carry parameter values,
are never looked at. Passwords written in a statement's text are replaced
by L{pgtls_twisted.protocol._redact.MARKER} before the text is kept
(L{pgtls_twisted.protocol._redact}).

What is kept per client is bounded whatever the client sends: at most
L{MAX_HELD} texts wait for their ReadyForQuery (a client may pipeline
without end, or send Parse after Parse and never Sync). A text beyond
that is logged at once, untimed, so the log stays complete; requests with
nothing to log are counted, not stored.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from twisted.logger import Logger

from pgtls_twisted.protocol._redact import redact

#: How much of a statement's text is logged.
PEEK = 2048

#: How many statement texts of one client may wait for their ReadyForQuery
#: (so at most C{MAX_HELD * PEEK} bytes of text).
MAX_HELD = 64

_QUERY, _PARSE, _SYNC, _FUNCTION_CALL = (ord(c) for c in "QPSF")

#: A request whose completion is logged: C{(kind, texts, started)}.
_Entry = tuple[str, list[str], float]


class QueryLog:
    """
    Follows one client's requests; every Query, Sync and FunctionCall gets
    one ReadyForQuery, in order, so a FIFO pairs texts with completions.

    @ivar _pending: per request still to complete, in order: an L{_Entry},
        or an int counting consecutive requests with nothing to log. Every
        entry holds a text and two counts are never next to each other, so
        it has at most C{2 * MAX_HELD + 1} items.
    @ivar _held: how many texts L{_pending} and L{_batch} hold.
    """

    _log = Logger()

    def __init__(self, clock: Any, **fields: Any) -> None:
        self._clock = clock
        self._fields = fields
        self._pending: deque[_Entry | int] = deque()
        self._batch: list[str] = []
        self._held = 0

    def clientMessage(self, mtype: int, length: int, peek: bytes) -> None:
        # The splitter may peek further than this log shows (a transaction
        # pool inspects whole statements).
        peek = peek[:PEEK]
        if mtype == _QUERY:
            whole = length - 4 <= len(peek)
            text = _text(peek.rstrip(b"\0"), not whole)
            if self._hold("query", text):
                self._pending.append(("query", [text], self._clock.seconds()))
            else:
                self._nothingToLog()
        elif mtype == _PARSE:
            # Parse: statement name, NUL, query text, NUL, parameter types.
            _, _, rest = peek.partition(b"\0")
            text, nul, _ = rest.partition(b"\0")
            statement = _text(text, not nul)
            if self._hold("parse", statement):
                self._batch.append(statement)
        elif mtype == _SYNC:
            batch, self._batch = self._batch, []
            if batch:
                self._pending.append(("parse", batch, self._clock.seconds()))
            else:
                self._nothingToLog()
        elif mtype == _FUNCTION_CALL:
            self._nothingToLog()

    def readyForQuery(self) -> None:
        if not self._pending:
            return
        entry = self._pending[0]
        if isinstance(entry, int):
            if entry > 1:
                self._pending[0] = entry - 1
            else:
                self._pending.popleft()
            return
        self._pending.popleft()
        kind, texts, started = entry
        self._held -= len(texts)
        duration = (self._clock.seconds() - started) * 1000
        for text in texts:
            self._log.info(
                "conn={conn} {kind} client={client} user={user} route={route} database={database} "
                "duration={duration_ms:.3f}ms statement={statement}",
                kind=kind,
                duration_ms=duration,
                statement=text,
                **self._fields,
            )

    def _hold(self, kind: str, text: str) -> bool:
        """
        Whether C{text} may wait for its ReadyForQuery; if not (L{MAX_HELD}
        texts already wait), it is logged now, with no duration.
        """
        if self._held < MAX_HELD:
            self._held += 1
            return True
        self._log.info(
            "conn={conn} {kind} client={client} user={user} route={route} database={database} "
            "duration=untimed statement={statement}",
            kind=kind,
            duration_ms=None,
            statement=text,
            **self._fields,
        )
        return False

    def _nothingToLog(self) -> None:
        """One more request whose ReadyForQuery logs nothing: counted, not stored."""
        pending = self._pending
        if pending and isinstance(pending[-1], int):
            pending[-1] += 1
        else:
            pending.append(1)


def _text(raw: bytes, cut: bool) -> str:
    text = redact(raw.decode("utf-8", "replace"))
    return text + "..." if cut else text
