# -*- test-case-name: tests.test_pooling,tests.test_prepared -*-
"""
The server connection attached to a pooled session, and what is known of
its stream while it is: its own transaction tracker, splitter and (in
transaction mode) the renaming of the client's prepared statements.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pgtls_twisted.pool._pool import PooledServer
from pgtls_twisted.pool._statements import RELAY_WATCH
from pgtls_twisted.protocol._framing import MessageSplitter
from pgtls_twisted.protocol._prepared import StatementRelay
from pgtls_twisted.protocol._txstate import SERVER_PEEK, SERVER_WATCH, TransactionTracker

#: Enough of an ErrorResponse to see its severity and SQLSTATE fields
#: (C{SERROR}, C{VERROR}, C{C26000}: 21 bytes, more with a localized
#: severity).
_ERROR_PEEK = 64

_SERVER_PEEK = {**SERVER_PEEK, b"E": _ERROR_PEEK}
_RELAY_WATCH = SERVER_WATCH | RELAY_WATCH


def serverSplitter(relay: bool = False) -> MessageSplitter:
    return MessageSplitter(_RELAY_WATCH if relay else SERVER_WATCH, peek=_SERVER_PEEK)


@dataclass(eq=False)
class Attachment:
    """
    The server connection attached to a session now, and what is known of
    its stream since: created when the pool hands the connection over,
    dropped when it goes back (or is lost), so nothing of one connection's
    stream can be mistaken for the next one's.

    @ivar server: the pooled server connection.
    @ivar tracker: its transaction state, fed the messages of both
        directions since it was attached.
    @ivar splitter: frames what the server sends.
    @ivar saidFatal: the server sent a FATAL ErrorResponse: its closing the
        connection next is the end of the client's session, not a failure.
    @ivar relay: the renaming of the client's prepared statements for this
        server (transaction mode), or C{None}.
    @ivar renaming: its splitter watches what the renaming needs (made for
        a relay).
    """

    server: PooledServer
    tracker: TransactionTracker = field(default_factory=TransactionTracker)
    splitter: MessageSplitter = field(default_factory=serverSplitter)
    saidFatal: bool = False
    relay: StatementRelay | None = None
    renaming: bool = False

    def reuse(self, relay: StatementRelay | None) -> None:
        """
        Serve the next client: the server was given back clean (tracker
        idle, both streams at a boundary, no FATAL), so only what counts
        per client starts again.
        """
        self.tracker.restart()
        self.relay = relay


def cut(out: bytes, offsets: list[int]) -> bytes:
    """C{out} without the 5-byte messages at C{offsets}."""
    pieces = []
    pos = 0
    for offset in offsets:
        pieces.append(out[pos:offset])
        pos = offset + 5
    pieces.append(out[pos:])
    return b"".join(pieces)
