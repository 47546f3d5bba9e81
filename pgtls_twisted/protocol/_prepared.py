# -*- test-case-name: tests.test_prepared_unit -*-
"""
Named prepared statements in transaction pooling: the client's names, the
server connections' names, and the rewriting between them. Pure: no I/O.

A client that prepares a named statement (Parse with a name) and uses it
later (Bind, Describe) expects the statement to be on its server. In
transaction pooling its next transaction may run on another server
connection, where the name means nothing, or where another client prepared
the same name with another query (psycopg's C{_pg3_0} is every psycopg
client's first statement). So, as PgBouncer 1.21+ does:

 - a client's statement is registered under the client's name in its
   L{ClientStatements}, and goes to the server under a name pgtls derives
   from the query text and parameter types (L{serverName}), so identical
   statements from different clients are one statement on each server
   connection;
 - each server connection's L{ServerStatements} says which of those names it
   has, least recently used first;
 - before a Bind or Describe of a statement the attached server lacks,
   pgtls sends the Parse first (I{injects} it) and swallows its
   ParseComplete;
 - a client's Close of a statement forgets the client's name; the server's
   copy stays, for the next client, until the LRU limit closes it.

The server answers every Parse with one ParseComplete and every Close with
one CloseComplete, in order, unless an error earlier in the same batch
(up to the next Sync) made it skip them. L{StatementRelay} keeps one queue
per answer type, each entry tagged with the batch it belongs to (the index
of the request whose ReadyForQuery ends the batch, counted as
L{pgtls_twisted.protocol._txstate.TransactionTracker.answered} counts
them), and on an ErrorResponse drops the entries of the failing batch: the
server skipped them, so the client's registrations they carried never
happened and the server names they would have created do not exist.

Nothing is ever made up in the server-to-client stream: every answer the
client sees is the server's own, in the server's order. Where the client
needs an answer pgtls has no message for (ParseComplete for a statement
the server already has, CloseComplete for a name pgtls only forgets), the
server is given a harmless message that produces it: a Parse of an empty
statement under L{NOOP} (closed again at once, that CloseComplete
swallowed), or a Close of L{NOOP}, which never exists (closing a name that
does not exist is not an error).
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict, deque
from dataclasses import dataclass

from pgtls_twisted.protocol._wire import ProtocolViolation

#: Every server-side name pgtls makes starts with this.
PREFIX = b"pgtls_"

#: A statement name that never exists on a server when a client message
#: arrives: pgtls creates it only in a Parse immediately followed by its
#: Close.
NOOP = b"pgtls_noop"

#: Client statement names longer than this are not mapped (PostgreSQL's
#: own are cut at 63 bytes; drivers use short ones). Such a Parse goes to
#: the server as it is, and the client is pinned.
MAX_NAME = 512

#: How many body bytes of a Bind to look at: the portal and statement names.
BIND_PEEK = 2 * MAX_NAME + 2

#: How many body bytes of a Describe or Close: the kind byte and a name.
NAME_PEEK = MAX_NAME + 2

_HEADER = struct.Struct("!cI")

# What to do with an answer (ParseComplete or CloseComplete), and with the
# entry's registration when the server skips the message instead.
#: The client's own Parse, forwarded: confirm its registration.
_CLIENT = 0
#: A Parse pgtls sent for a statement the server lacked: swallow.
_INJECTED = 1
#: A client's Parse of a statement the server already had, sent as a Parse
#: of L{NOOP}: the answer is the client's.
_ALREADY = 2
#: The Close of L{NOOP} after an L{_ALREADY} Parse: swallow.
_NOOP_CLOSE = 3
#: A client's Close of a statement, sent as a Close of L{NOOP}: the answer
#: is the client's; if skipped, the client still has the statement.
_CLIENT_CLOSE = 4
#: A client's Parse under a name it already has: that statement's own
#: Parse again, which the server refuses (42P05) in the right place;
#: nothing to register.
_DUPLICATE = 5
#: A client's Parse or Close that goes to the server as it is (an unnamed
#: statement, a portal): its answer is the client's. Every Parse and Close
#: the server is sent has an entry, so that answers pair with messages one
#: to one.
_PASS = 6

_SWALLOWED = frozenset({_INJECTED, _NOOP_CLOSE})


def serverName(rest: bytes) -> bytes:
    """
    The server-side name of a statement: a digest of the Parse body after
    the name (query text, then parameter types), so that the same query
    with the same declared types is one statement, and any difference is
    another.
    """
    return PREFIX + hashlib.blake2b(rest, digest_size=16).hexdigest().encode()


def _cstring(body: bytes, start: int) -> tuple[bytes, int] | None:
    end = body.find(b"\0", start)
    if end < 0:
        return None
    return body[start:end], end + 1


def _message(mtype: bytes, body: bytes) -> bytes:
    return _HEADER.pack(mtype, len(body) + 4) + body


def parseMessage(name: bytes, rest: bytes) -> bytes:
    """A Parse of C{rest} (query, NUL, parameter types) under C{name}."""
    return _message(b"P", name + b"\0" + rest)


def closeStatement(name: bytes) -> bytes:
    """A Close of the statement C{name}."""
    return _message(b"C", b"S" + name + b"\0")


#: A Parse of an empty statement under L{NOOP}, then its Close.
NOOP_PARSE = parseMessage(NOOP, b"\0\0\0")
NOOP_CLOSE = closeStatement(NOOP)


@dataclass(slots=True)
class Statement:
    """
    A client's statement.

    @ivar server: its server-side name.
    @ivar parse: the Parse message that prepares it under that name.
    """

    server: bytes
    parse: bytes


class ClientStatements(dict[bytes, Statement]):
    """A client's statements, by the client's names; outlives attachments."""


class ServerStatements:
    """
    The statements one server connection has (or will have once the Parse
    on its way is done), least recently used first.
    """

    __slots__ = ("_names", "unknown")

    def __init__(self) -> None:
        self._names: OrderedDict[bytes, None] = OrderedDict()
        #: What the connection has is no longer known (a client's
        #: DEALLOCATE, an answer that contradicted this list): it is
        #: emptied, and so is this list, before its next client.
        self.unknown = False

    def __contains__(self, name: bytes) -> bool:
        return name in self._names

    def __len__(self) -> int:
        return len(self._names)

    def add(self, name: bytes) -> None:
        self._names[name] = None
        self._names.move_to_end(name)

    def touch(self, name: bytes) -> None:
        self._names.move_to_end(name)

    def discard(self, name: bytes) -> None:
        self._names.pop(name, None)

    def clear(self) -> None:
        self._names.clear()
        self.unknown = False

    def evict(self, limit: int) -> list[bytes]:
        """Forget the least recently used names beyond C{limit}, and return them."""
        excess = len(self._names) - limit
        out = []
        for _ in range(max(excess, 0)):
            name, _ = self._names.popitem(last=False)
            out.append(name)
        return out


class StatementRelay:
    """
    The rewriting of one client's extended-query messages for the server
    connection attached to it now, and the bookkeeping of that server's
    answers.

    Each rewriting method takes the message's body (or, for Bind, its
    first L{BIND_PEEK} bytes) and the batch C{tag} it belongs to, and
    returns C{None} when the message goes on unchanged, or
    C{(replacement, consumed)}: send C{replacement} instead of the
    message's header and its first C{consumed} body bytes.
    """

    __slots__ = ("client", "server", "_parses", "_closes")

    def __init__(self, client: ClientStatements, server: ServerStatements) -> None:
        self.client = client
        self.server = server
        # (tag, action, client name, statement), one per Parse / Close sent.
        self._parses: deque[tuple[int, int, bytes, Statement | None]] = deque()
        self._closes: deque[tuple[int, int, bytes, Statement | None]] = deque()

    @property
    def settled(self) -> bool:
        """No answer is owed to any Parse or Close this relay sent."""
        return not self._parses and not self._closes

    # -- client to server ----------------------------------------------------------

    def _ensure(self, stmt: Statement, tag: int, out: list[bytes]) -> None:
        """Inject C{stmt}'s Parse unless the server has (or is getting) it."""
        if stmt.server in self.server:
            self.server.touch(stmt.server)
            return
        self.server.add(stmt.server)
        self._parses.append((tag, _INJECTED, b"", stmt))
        out.append(stmt.parse)

    def parse(self, body: bytes, tag: int) -> tuple[bytes, int] | None:
        """
        A client's complete Parse body.

        @raise ProtocolViolation: a body without its two strings.
        """
        found = _cstring(body, 0)
        if found is None or _cstring(body, found[1]) is None:
            raise ProtocolViolation("malformed Parse message")
        name, start = found
        if not name:
            self.passParse(tag)
            return None
        rest = body[start:]
        out: list[bytes] = []
        existing = self.client.get(name)
        if existing is not None:
            # PostgreSQL refuses a name already in use (42P05): let the
            # server say so, where the client expects the answer, by
            # preparing the existing statement's own text under its own
            # name again. (Never another text under a name derived from
            # this one: that name is shared with other clients.)
            self._ensure(existing, tag, out)
            self._parses.append((tag, _DUPLICATE, name, existing))
            out.append(existing.parse)
            return b"".join(out), len(body)
        target = serverName(rest)
        stmt = Statement(target, parseMessage(target, rest))
        self.client[name] = stmt
        if target in self.server:
            self.server.touch(target)
            self._parses.append((tag, _ALREADY, name, stmt))
            self._closes.append((tag, _NOOP_CLOSE, b"", None))
            return NOOP_PARSE + NOOP_CLOSE, len(body)
        self.server.add(target)
        self._parses.append((tag, _CLIENT, name, stmt))
        return stmt.parse, len(body)

    def bind(self, peek: bytes, length: int, tag: int) -> tuple[bytes, int] | None:
        """
        A client's Bind: C{peek} is its first body bytes, C{length} its
        length field. Only the statement name is replaced; the parameters
        stream on unread.
        """
        portal = _cstring(peek, 0)
        if portal is None:
            return None
        found = _cstring(peek, portal[1])
        if found is None or not found[0]:
            return None
        name, end = found
        stmt = self.client.get(name)
        if stmt is None:
            return None
        out: list[bytes] = []
        self._ensure(stmt, tag, out)
        prefix = peek[: portal[1]] + stmt.server + b"\0"
        out.append(_HEADER.pack(b"B", length - end + len(prefix)) + prefix)
        return b"".join(out), end

    def describe(self, body: bytes, tag: int) -> tuple[bytes, int] | None:
        """A client's Describe body: a statement's name is replaced."""
        if body[:1] != b"S" or body[-1:] != b"\0":
            return None
        stmt = self.client.get(body[1:-1])
        if stmt is None:
            return None
        out: list[bytes] = []
        self._ensure(stmt, tag, out)
        out.append(_message(b"D", b"S" + stmt.server + b"\0"))
        return b"".join(out), len(body)

    def close(self, body: bytes, tag: int) -> tuple[bytes, int] | None:
        """
        A client's Close body: a statement's name is forgotten (the server
        keeps the statement) and the server closes L{NOOP} instead, which
        answers CloseComplete in the right place.
        """
        if body[:1] != b"S" or body[-1:] != b"\0":
            self.passClose(tag)
            return None
        name = body[1:-1]
        stmt = self.client.pop(name, None)
        if stmt is None:
            self.passClose(tag)
            if name.startswith(PREFIX):
                # Another client's shared statement (the names can be
                # worked out): not the client's to close.
                return NOOP_CLOSE, len(body)
            return None
        self._closes.append((tag, _CLIENT_CLOSE, name, stmt))
        return NOOP_CLOSE, len(body)

    def passParse(self, tag: int) -> None:
        """A Parse goes to the server unchanged: its answer is the client's."""
        self._parses.append((tag, _PASS, b"", None))

    def passClose(self, tag: int) -> None:
        """A Close goes to the server unchanged (or as L{NOOP}): its answer is the client's."""
        self._closes.append((tag, _PASS, b"", None))

    def forgetAll(self) -> None:
        """
        The client ran C{DISCARD ALL} or C{DEALLOCATE ALL}: the server
        drops every prepared statement, and the client's names are gone
        too, as on a server of its own.
        """
        self.client.clear()
        self.server.clear()
        # Whether it runs is not known yet (it may fail, or be skipped).
        self.server.unknown = True

    # -- server to client ----------------------------------------------------------

    def parseComplete(self) -> bool | None:
        """
        A ParseComplete arrived: C{True} if it must be swallowed; C{None}
        if no Parse was owed one (pgtls's account of the stream is wrong:
        the connection must not serve anyone else).
        """
        if not self._parses:
            return None
        _, action, name, stmt = self._parses.popleft()
        if action == _DUPLICATE and stmt is not None:
            # The name's first Parse was skipped after all (an error
            # earlier in its batch), so this one created the statement:
            # the server has it, under the name its text gives, and the
            # client's name means it. (PostgreSQL would have given the
            # name the new text; pgtls cannot, without putting another
            # text under a shared name.)
            self.server.add(stmt.server)
            self.client.setdefault(name, stmt)
        return action in _SWALLOWED

    def closeComplete(self) -> bool | None:
        """A CloseComplete arrived: as L{parseComplete}."""
        if not self._closes:
            return None
        return self._closes.popleft()[1] in _SWALLOWED

    def error(self, batch: int) -> None:
        """
        An ErrorResponse while the request C{batch} is the oldest
        unanswered: the server skips the rest of that batch, so its
        pending entries never get an answer.
        """
        self._skip(batch)

    def ready(self, answered: int) -> None:
        """A ReadyForQuery: the batches before the C{answered}th are over."""
        if self._parses or self._closes:
            self._skip(answered - 1)

    def _skip(self, last: int) -> None:
        for queue in (self._parses, self._closes):
            while queue and queue[0][0] <= last:
                _, action, name, stmt = queue.popleft()
                self._skipped(action, name, stmt)

    def _skipped(self, action: int, name: bytes, stmt: Statement | None) -> None:
        if stmt is None:
            return
        if action == _CLIENT:
            self.server.discard(stmt.server)
            if self.client.get(name) is stmt:
                del self.client[name]
        elif action == _INJECTED:
            self.server.discard(stmt.server)
        elif action == _ALREADY:
            if self.client.get(name) is stmt:
                del self.client[name]
        elif action == _CLIENT_CLOSE:
            self.client.setdefault(name, stmt)
        # (_DUPLICATE: the server refused or skipped it; nothing changed.)
