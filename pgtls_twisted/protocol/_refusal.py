# -*- test-case-name: tests.test_sessionstate -*-
"""
The statement pgtls sends instead of a text it refuses, so that the server
itself raises the error.

With C{pool.pinning = "refuse"}, a client whose statement would create
session state in a transaction pool (L{pgtls_twisted.protocol._sessionstate})
gets an error instead of a pinned server connection. pgtls does not
synthesise that error: it sends the server a C{DO} block that raises it, in
place of the refused text, so the error, and whatever else the server sends
(ReadyForQuery, the state of a transaction block), comes in its right place
in the protocol stream. That holds for a simple Query, and for a Parse of
a statement without parameters: a C{DO} block takes none, so a Bind that
supplies some would fail first (08P01), and such a Parse needs another
answer.

Pure Python, no Twisted.
"""

from __future__ import annotations

from pgtls_twisted.protocol._redact import redact
from pgtls_twisted.protocol._sessionstate import _printable
from pgtls_twisted.protocol._txstate import quoteLiteral

#: What a refused client is advised to do instead.
HINT = (
    "Keep session state inside a transaction (SET LOCAL, set_config(..., true),"
    ' pg_advisory_xact_lock, ON COMMIT DROP), or use a pool with pool.mode = "session".'
)
#: How much of a reason or a statement a refusal quotes.
_QUOTED_LIMIT = 200


def refusal(reason: str, statement: str | None = None) -> str:
    """
    The statement pgtls sends instead of a text it refuses
    (C{pool.pinning = "refuse"}): a C{DO} block that makes the server
    raise SQLSTATE 0A000 where the refused text's answer belongs, so pgtls
    synthesises no response. The message names C{reason} (a
    L{pgtls_twisted.protocol._sessionstate.Verdict.pin}); the detail quotes C{statement}'s start, passwords
    redacted. ASCII only (other characters become C{?}) and every literal
    quoted by L{quoteLiteral}: the same in any client encoding and
    whatever C{standard_conforming_strings} is. Never raises.
    """
    message = (
        f"pgtls: {_printable(reason, _QUOTED_LIMIT)} would pin the client to one server"
        ' connection in transaction pooling, and pool.pinning = "refuse"'
    )
    options = [
        "ERRCODE = '0A000'",
        f"MESSAGE = {quoteLiteral(message)}",
        f"HINT = {quoteLiteral(HINT)}",
    ]
    if statement:
        shown = " ".join(redact(statement[: _QUOTED_LIMIT * 4]).split())
        options.append(f"DETAIL = {quoteLiteral('Statement: ' + _printable(shown, _QUOTED_LIMIT))}")
    body = f"BEGIN RAISE EXCEPTION USING {', '.join(options)}; END"
    tag, n = "$pgtls$", 0
    while tag in body:
        n += 1
        tag = f"$pgtls{n}$"
    return f"DO {tag}{body}{tag}"
