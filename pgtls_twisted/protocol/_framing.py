# -*- test-case-name: tests.test_framing -*-
"""
Header-only framing of typed messages, for pool mode.

A pass-through session never looks at query traffic (see
L{pgtls_twisted.proxy._pump}). A pooling session must: it has to know where each
message starts to decide when a server connection may be handed to another
client (L{pgtls_twisted.protocol._txstate}), to withhold a client's Terminate from a
pooled server, and to swallow the answers to statements the pooler sends
itself. It does not need the message bodies, and copying them would make
pooling cost one more copy of every byte, so L{MessageSplitter} reads only
the 5-byte headers and hands the received chunk back for forwarding.

Unlike L{wire.MessageReader}, nothing here limits how large a message may
be, beyond what the protocol's Int32 can say: the payload is never buffered,
so a 1 GB DataRow or CopyData streams through chunk by chunk, and the peer
at the other end (a PostgreSQL server, or libpq) enforces its own limits.
A length below 4 can never be valid and is rejected as soon as it is seen.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Iterable, Mapping

from pgtls_twisted.protocol._wire import ProtocolViolation

#: The largest length field accepted. PostgreSQL reads the length as a
#: signed Int32, so anything larger is negative there and always invalid.
MAX_MESSAGE_LENGTH = 0x7FFFFFFF

#: Bytes in a typed message's header: Byte1 type, Int32 length.
HEADER_SIZE = 5

_unpackLength = struct.Struct("!I").unpack_from

#: One watched message: C{(offset, type, length, peek)}.
#:
#:  - C{offset}: where the message's type byte is in the bytes L{MessageSplitter.feed}
#:    returned with it;
#:  - C{type}: the type byte, as an int (C{ord("Z")});
#:  - C{length}: the length field (itself included, type byte excluded), so
#:    the message ends at C{offset + 1 + length}, which may be past the end
#:    of the returned bytes when the message continues in later chunks;
#:  - C{peek}: the first body bytes, for the types given a peek size
#:    (C{min(peek size, length - 4)} of them), else C{b""}.
#:
#: A plain tuple rather than a named one: one is built for every watched
#: message on the hot path, and a tuple is the cheapest object to build.
Event = tuple[int, int, int, bytes]


def _typeCode(mtype: int | bytes) -> int:
    if isinstance(mtype, int):
        if not 0 <= mtype <= 255:
            raise ValueError(f"not a message type byte: {mtype!r}")
        return mtype
    if len(mtype) != 1:
        raise ValueError(f"not a message type byte: {mtype!r}")
    return mtype[0]


def _buildTable(
    watch: Iterable[int | bytes] | None, peeks: Iterable[tuple[int | bytes, int]]
) -> tuple[list[int | None], int]:
    """C{(table, largest peek)}: table[type] is None for an unwatched type, else its peek size."""
    table: list[int | None] = [0 if watch is None else None] * 256
    if watch is not None:
        for t in watch:
            table[_typeCode(t)] = 0
    maxPeek = 0
    for t, size in peeks:
        if size < 0:
            raise ValueError("a peek size cannot be negative")
        table[_typeCode(t)] = size
        maxPeek = max(maxPeek, size)
    return table, maxPeek


@functools.lru_cache(maxsize=64)
def _cachedTable(
    watch: frozenset[int | bytes] | tuple[int | bytes, ...] | None,
    peeks: tuple[tuple[int | bytes, int], ...],
) -> tuple[list[int | None], int]:
    """
    L{_buildTable}, remembered: the tables are shared read-only between
    splitters, because a transaction pooler makes a splitter for every
    transaction, always with the same arguments, and building the
    256-entry table was most of its cost.
    """
    return _buildTable(watch, peeks)


class MessageSplitter:
    """
    Find typed-message boundaries in one direction of a connection.

    The caller's work per received chunk is one L{feed} call and one write
    of the bytes it returns (or of slices of them, cut at event offsets, when
    it must divert some messages)::

        out, events = splitter.feed(data)
        for offset, mtype, length, peek in events:
            tracker.serverMessage(mtype, peek[:1] or None)
        peer.write(out)

    What comes back is the chunk itself whenever possible; it differs only
    when a message header straddles two chunks. Then the bytes of the
    incomplete header (at most L{HEADER_SIZE} - 1, plus the peek size for a
    peeked type) are kept back and returned at the front of the next call's
    bytes, once the header is whole. Keeping them back rather than
    forwarding them is what makes every forwarded byte belong to a message
    that has already been reported: a caller that hands a server connection
    to another client between two L{feed} calls never leaves half a header
    behind on the old one. Payload bytes are never kept back: a message
    larger than the chunk is reported once, when its header arrives, and its
    body is returned as it comes (L{continuing} says how much is left).

    Only the types in C{watch} are reported, so a stream of DataRows costs
    one header decode per message and builds no Python object for them.

    @ivar maxLength: the largest length field accepted.
    """

    __slots__ = ("_table", "_held", "_need", "_remaining", "_type", "_maxHeld", "maxLength")

    def __init__(
        self,
        watch: Iterable[int | bytes] | None = None,
        peek: Mapping[int, int] | Mapping[bytes, int] | None = None,
        maxLength: int = MAX_MESSAGE_LENGTH,
    ) -> None:
        """
        @param watch: the message types to report; C{None} reports every type.
        @param peek: for some types, how many leading body bytes to report
            with the event (e.g. C{{b"Z": 1}} for ReadyForQuery's
            transaction status). Peeked types are watched. The peek bytes of
            one message may be held back until they are all here, so a peek
            size bounds what the splitter ever keeps of its own.
        @param maxLength: a larger length field raises L{ProtocolViolation}.
        """
        if maxLength < 4:
            raise ValueError("maxLength must be at least 4")
        watchKey = (
            None if watch is None else watch if isinstance(watch, frozenset) else tuple(watch)
        )
        key = (watchKey, tuple(peek.items()) if peek else ())
        table, maxPeek = _cachedTable(*key)
        self._table = table
        self._held = bytearray()
        #: How many bytes L{_held} must reach before a scan can get further.
        self._need = 0
        self._remaining = 0
        self._type = 0
        self._maxHeld = HEADER_SIZE - 1 + maxPeek
        self.maxLength = maxLength

    # -- state ---------------------------------------------------------------

    @property
    def atBoundary(self) -> bool:
        """
        C{True} when everything fed so far ends exactly at a message end.

        A pooler may detach a server from a client only at a boundary of the
        client's stream: otherwise part of a message has gone to the server,
        which waits for the rest.
        """
        return not self._held and not self._remaining

    @property
    def continuing(self) -> tuple[int, int] | None:
        """
        C{(type, bytes still to come)} while the last reported message's
        body continues past what was fed, else C{None}.
        """
        if self._remaining:
            return self._type, self._remaining
        return None

    @property
    def buffered(self) -> int:
        """How many fed bytes are held back (an incomplete header)."""
        return len(self._held)

    @property
    def maxBuffered(self) -> int:
        """The most L{buffered} can ever be, given the peek sizes."""
        return self._maxHeld

    # -- splitting -----------------------------------------------------------

    def feed(self, data: bytes) -> tuple[bytes, list[Event]]:
        """
        Split one received chunk.

        @return: C{(out, events)}: C{out} is what to forward now, in order:
            C{data} itself unless a header straddles a chunk boundary. The
            events are the watched messages whose headers end in C{out}, in
            order, with offsets into C{out}.
        @raise ProtocolViolation: a length field below 4 or above
            L{maxLength}. The splitter is then unusable, like the stream.
        """
        events: list[Event] = []
        pos = 0
        held = self._held
        if held:
            if len(held) + len(data) < self._need:
                # Still short of the header (or the peek) it waits for: the
                # bytes are kept, not scanned or copied again, so that a
                # peek sent a byte at a time costs linear time, not one
                # copy of everything held per byte.
                held += data
                return b"", events
            data = b"".join((held, data))
            self._held = bytearray()
        elif self._remaining:
            remaining = self._remaining
            if remaining >= len(data):
                self._remaining = remaining - len(data)
                return data, events
            pos = remaining
            self._remaining = 0
        n = len(data)
        limit = n - HEADER_SIZE
        table = self._table
        maxLength = self.maxLength
        unpack = _unpackLength
        append = events.append
        mtype = 0
        need = HEADER_SIZE
        while pos <= limit:
            mtype = data[pos]
            length = unpack(data, pos + 1)[0]
            if length < 4 or length > maxLength:
                raise ProtocolViolation(
                    f"invalid message length {length} for message type {chr(mtype)!r}"
                )
            size = table[mtype]
            if size is not None:
                if size:
                    end = pos + HEADER_SIZE + min(size, length - 4)
                    if end > n:
                        need = end - pos
                        break
                    append((pos, mtype, length, data[pos + HEADER_SIZE : end]))
                else:
                    append((pos, mtype, length, b""))
            pos += 1 + length
        if pos == n:
            return data, events
        if pos > n:
            self._remaining = pos - n
            self._type = mtype
            return data, events
        if pos < n:
            # (At a boundary, the empty bytearray already held stays: no
            # allocation per chunk on the hot path.)
            self._held = bytearray(data[pos:])
            self._need = need
        return data[:pos], events
