# -*- test-case-name: tests.test_querylog -*-
"""
The pooling seed's query log (C{[proxy.pool] log_queries}): one structured
event per Query, and per extended-protocol batch of Parse messages, with
the client, the user, the route and database, the statement text, and the
duration once its result is complete (at its ReadyForQuery).

Statement texts come from the splitter's peek of Query and Parse bodies
(at most L{PEEK} bytes each, longer texts are cut), so logging adds no
parsing of whole messages. Bind messages, which carry parameter values,
are never looked at.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from .logs import Logger

#: How much of a statement's text is logged.
PEEK = 2048

_QUERY, _PARSE, _SYNC, _FUNCTION_CALL = (ord(c) for c in "QPSF")


class QueryLog:
    """
    Follows one client's requests; every Query, Sync and FunctionCall gets
    one ReadyForQuery, in order, so a FIFO pairs texts with completions.
    """

    _log = Logger()

    def __init__(self, clock: Any, **fields: Any) -> None:
        self._clock = clock
        self._fields = fields
        self._pending: deque[tuple[str, list[str], float] | None] = deque()
        self._batch: list[str] = []

    def clientMessage(self, mtype: int, length: int, peek: bytes) -> None:
        if mtype == _QUERY:
            whole = length - 4 <= len(peek)
            self._pending.append(
                ("query", [_text(peek.rstrip(b"\0"), not whole)], self._clock.seconds())
            )
        elif mtype == _PARSE:
            # Parse: statement name, NUL, query text, NUL, parameter types.
            _, _, rest = peek.partition(b"\0")
            text, nul, _ = rest.partition(b"\0")
            self._batch.append(_text(text, not nul))
        elif mtype == _SYNC:
            batch, self._batch = self._batch, []
            self._pending.append(("parse", batch, self._clock.seconds()) if batch else None)
        elif mtype == _FUNCTION_CALL:
            self._pending.append(None)

    def readyForQuery(self) -> None:
        if not self._pending:
            return
        entry = self._pending.popleft()
        if entry is None:
            return
        kind, texts, started = entry
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


def _text(raw: bytes, cut: bool) -> str:
    text = raw.decode("utf-8", "replace")
    return text + "..." if cut else text
