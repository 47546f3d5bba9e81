"""
Fuzzing the pooled framing (L{pgtls_twisted.protocol._framing.MessageSplitter})
in both directions, with the watch and peek tables a pooled session really
uses, against a reference reading of the same bytes.

tests/test_framing.py fuzzes the splitter with made-up tables; here the
tables are the pool's own: the client's in session mode, with the query log,
and in transaction mode (L{CLIENT_PEEK}, which peeks up to a MiB of a Query
or Parse), and the server's (L{serverSplitter}, with and without the
renaming of prepared statements). For any bytes cut into any chunks:

 - the splitter reports the messages the reference reading finds, at the
   same offsets, or raises L{ProtocolViolation} once an impossible length
   has arrived, and nothing else;
 - it never forwards a byte past the bad header, and never holds more than
   its L{MessageSplitter.maxBuffered};
 - a hostile length (up to 2**32 - 1) is judged on its header, and one that
   is valid but huge never makes it allocate what it claims, nor work
   more than linearly while a peek trickles in;
 - the trackers fed its events, as the session feeds them, raise nothing
   but L{ProtocolViolation}, and a ParameterStatus built by
   L{wire.parameter_status} comes back whole from its peek.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st
from support.fuzz import CUTS, FUZZ, fuzz, peak_allocation, split_at

from pgtls_twisted.pool._attachment import serverSplitter
from pgtls_twisted.pool._querylog import PEEK
from pgtls_twisted.pool._statements import CLIENT_PEEK, RELAY_WATCH
from pgtls_twisted.protocol import _wire as wire
from pgtls_twisted.protocol._framing import MAX_MESSAGE_LENGTH, MessageSplitter
from pgtls_twisted.protocol._txstate import (
    CLIENT_WATCH,
    SERVER_PEEK,
    SERVER_WATCH,
    TransactionTracker,
    parameterStatusFromPeek,
)
from pgtls_twisted.protocol._wire import ProtocolViolation

Event = tuple[int, int, int, bytes]


@dataclass(frozen=True)
class Table:
    """One way the pool frames a stream: the splitter, and what it should report."""

    make: Callable[[], MessageSplitter]
    watch: frozenset[int]
    peek: Mapping[int, int]


def _peeks(peek: Mapping[bytes, int]) -> dict[int, int]:
    return {t[0]: size for t, size in peek.items()}


#: The server's peeks, restated: L{test_the_server_tables_are_the_pools} checks them.
_SERVER_PEEKS = _peeks({**SERVER_PEEK, b"E": 64})

TABLES = {
    "client, session mode": Table(lambda: MessageSplitter(CLIENT_WATCH), CLIENT_WATCH, {}),
    "client, query log": Table(
        lambda: MessageSplitter(CLIENT_WATCH, peek={b"Q": PEEK, b"P": PEEK}),
        CLIENT_WATCH,
        _peeks({b"Q": PEEK, b"P": PEEK}),
    ),
    "client, transaction mode": Table(
        lambda: MessageSplitter(CLIENT_WATCH, peek=CLIENT_PEEK), CLIENT_WATCH, _peeks(CLIENT_PEEK)
    ),
    "server": Table(lambda: serverSplitter(False), SERVER_WATCH, _SERVER_PEEKS),
    "server, renaming": Table(
        lambda: serverSplitter(True), SERVER_WATCH | RELAY_WATCH, _SERVER_PEEKS
    ),
}


def reference(data: bytes, table: Table) -> tuple[list[Event], int, int | None]:
    """
    A plain reading of C{data}, header by header: the watched messages whose
    header and peek are all here, how many bytes a splitter may forward
    (up to a header or peek still incomplete), and where the first
    impossible length is (C{None} if none).
    """
    events: list[Event] = []
    pos = 0
    while pos + 5 <= len(data):
        mtype = data[pos]
        (length,) = struct.unpack_from("!I", data, pos + 1)
        if not 4 <= length <= MAX_MESSAGE_LENGTH:
            return events, pos, pos
        if mtype in table.watch or mtype in table.peek:
            end = pos + 5 + min(table.peek.get(mtype, 0), length - 4)
            if end > len(data):
                return events, pos, None
            events.append((pos, mtype, length, data[pos + 5 : end]))
        pos += 1 + length
    return events, min(pos, len(data)), None


def split(table: Table, chunks: list[bytes]) -> tuple[list[Event], bytes, bool]:
    """
    Feed C{chunks} to a new splitter as a session does: the events with
    offsets into the whole stream, what was forwarded, and whether it
    raised. Checks on the way what must hold after every chunk.
    """
    splitter = table.make()
    reported: list[Event] = []
    forwarded = bytearray()
    fed = 0
    for chunk in chunks:
        try:
            out, events = splitter.feed(chunk)
        except ProtocolViolation as e:
            assert e.sqlstate == "08P01" and e.message.startswith("invalid message length")
            return reported, bytes(forwarded), True
        for offset, mtype, length, peek in events:
            assert out[offset] == mtype
            reported.append((len(forwarded) + offset, mtype, length, peek))
        forwarded += out
        fed += len(chunk)
        assert splitter.buffered <= splitter.maxBuffered
        assert len(forwarded) + splitter.buffered == fed
    return reported, bytes(forwarded), False


# -- streams ---------------------------------------------------------------------------

#: Length fields no message can have, and valid ones no message should.
HOSTILE_LENGTHS = [0, 1, 3, 0x7FFFFFFF + 1, 0xFFFFFFFF, 4, 5, 0x7FFFFFFF, 1 << 20, (1 << 20) + 5]

_CLIENT_TYPES = st.sampled_from(list(b"QPBDECSHFdcfXp")) | st.integers(0, 255)
_SERVER_TYPES = st.sampled_from(list(b"ZSECGHWcD123TnNAKRstv")) | st.integers(0, 255)


def _frame(mtype: int, body: bytes) -> bytes:
    return bytes([mtype]) + struct.pack("!I", 4 + len(body)) + body


def _pieces(types: st.SearchStrategy[int]) -> st.SearchStrategy[bytes]:
    """One message, well formed or not, or bytes that are no message at all."""
    body = st.binary(max_size=40) | st.integers(0, 3000).map(lambda n: b"b" * n)
    return st.one_of(
        st.builds(_frame, types, body),
        st.builds(_frame, types, body),
        st.builds(
            lambda t, n, rest: bytes([t]) + struct.pack("!I", n) + rest,
            types,
            st.sampled_from(HOSTILE_LENGTHS),
            st.binary(max_size=16),
        ),
        st.binary(max_size=12),
    )


def streams(types: st.SearchStrategy[int]) -> st.SearchStrategy[bytes]:
    return st.lists(_pieces(types), max_size=12).map(b"".join)


CLIENT_STREAMS = streams(_CLIENT_TYPES)
SERVER_STREAMS = streams(_SERVER_TYPES)


# -- any bytes, any chunks ---------------------------------------------------------------


@fuzz(500)
@given(st.sampled_from(sorted(TABLES)), st.data(), CUTS)
def test_any_chunking_reports_what_the_reference_reads(
    name: str, data: st.DataObject, cuts: list[int]
) -> None:
    table = TABLES[name]
    client = name.startswith("client")
    stream = data.draw(CLIENT_STREAMS if client else SERVER_STREAMS, label="stream")
    expected, forwardable, bad = reference(stream, table)
    reported, forwarded, raised = split(table, split_at(stream, cuts))
    # The same reading whole: chunks never change what is read.
    assert split(table, [stream]) == (
        ([], b"", True) if bad is not None else (expected, stream[:forwardable], False)
    )
    if bad is None:
        assert not raised
        assert reported == expected
        assert forwarded == stream[:forwardable]
    else:
        # Raised once the bad header was here; what went before it may
        # have been forwarded, never a byte of it or after it.
        assert raised
        assert reported == expected[: len(reported)]
        assert stream.startswith(forwarded) and len(forwarded) <= bad
    if client:
        # Whatever the client sends, its messages only ever change the
        # tracker's state (an unknown type pins).
        tracker = TransactionTracker()
        for _, mtype, _, _ in reported:
            tracker.clientMessage(mtype)


def test_the_server_tables_are_the_pools() -> None:
    """The peeks restated here are the ones L{serverSplitter} uses."""
    for relay in (False, True):
        largest = max(_SERVER_PEEKS.values())
        assert serverSplitter(relay).maxBuffered == 4 + largest


# -- hostile lengths ---------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TABLES))
@pytest.mark.parametrize("length", [0, 3, MAX_MESSAGE_LENGTH + 1, 0xFFFFFFFF])
def test_an_impossible_length_is_refused_on_its_header(name: str, length: int) -> None:
    """Judged with the 5 header bytes alone: nothing waits for what it claims."""
    for mtype in b"QPBdZSE1X\xff":
        splitter = TABLES[name].make()
        with pytest.raises(ProtocolViolation):
            splitter.feed(bytes([mtype]) + struct.pack("!I", length))


_CHUNK = b"x" * 65536


def _trickle(splitter: MessageSplitter, header: bytes, total: int, chunk: bytes) -> None:
    splitter.feed(header)
    for _ in range(total // len(chunk)):
        splitter.feed(chunk)
        assert splitter.buffered <= splitter.maxBuffered


@pytest.mark.parametrize("name", sorted(TABLES))
@pytest.mark.parametrize("mtype", list(b"QPBDCZSEd"))
def test_a_huge_length_allocates_only_what_arrives(name: str, mtype: int) -> None:
    """
    A message claiming 2 GiB, its body streamed: the splitter holds at
    most its largest peek (a MiB, for a transaction pool's Query) and
    allocates a small multiple of that, not the claim.
    """
    splitter = TABLES[name].make()
    header = bytes([mtype]) + struct.pack("!I", MAX_MESSAGE_LENGTH)
    peak = peak_allocation(lambda: _trickle(splitter, header, 3 << 20, _CHUNK))
    assert peak < 4 * splitter.maxBuffered + 8 * len(_CHUNK), peak
    continuing = splitter.continuing
    assert continuing is not None and continuing[0] == mtype
    assert continuing[1] == MAX_MESSAGE_LENGTH - 4 - (3 << 20)


def _trickleCost(mtype: bytes, count: int) -> float:
    best = float("inf")
    for _ in range(3):
        splitter = TABLES["client, transaction mode"].make()
        splitter.feed(mtype + struct.pack("!I", MAX_MESSAGE_LENGTH))
        one = b"x"
        started = time.process_time()
        for _ in range(count):
            splitter.feed(one)
        best = min(best, time.process_time() - started)
    return best


def test_a_peek_sent_a_byte_at_a_time_costs_linear_time() -> None:
    """
    A Query claiming 2 GiB, sent a byte at a time: until the transaction
    pool's MiB of peek is here the splitter holds the bytes. Keeping them
    used to copy all of them again on every call (a client trickling a MiB
    cost seconds of CPU per connection); now a held byte costs what a byte
    of an unwatched body does.
    """
    held, streamed = _trickleCost(b"Q", 100_000), _trickleCost(b"d", 100_000)
    assert held < 4 * streamed + 0.01, (held, streamed)


# -- the trackers, fed as a session feeds them ---------------------------------------------------


_NAMES = st.text(st.characters(exclude_characters="\0", exclude_categories=("Cs",)), max_size=20)
_STATUSES = st.sampled_from([b"I", b"T", b"E"]) | st.binary(max_size=3)
_NOT_PARAMETER_STATUS = _SERVER_TYPES.filter(lambda t: t != ord("S"))


def _backendPieces() -> st.SearchStrategy[tuple[bytes, tuple[str, str] | None]]:
    """
    Backend messages, each with what the session must read from it as a
    ParameterStatus: the name and value it was built from, or C{None}
    (another type, or a value too long for the peek, which must never be
    read cut).
    """
    return st.one_of(
        st.builds(lambda s: (wire.message(b"Z", s), None), _STATUSES),
        st.builds(
            lambda n, v: (wire.parameter_status(n, v), (n, v)), _NAMES, _NAMES | st.just("x" * 900)
        ),
        st.builds(
            lambda n: (wire.parameter_status("TimeZone", "x" * n), None), st.integers(1100, 1200)
        ),
        st.builds(lambda t, b: (_frame(t, b), None), _NOT_PARAMETER_STATUS, st.binary(max_size=30)),
        st.builds(
            lambda text: (wire.error_response("XX000", text, severity="ERROR"), None), _NAMES
        ),
    )


@FUZZ
@given(st.lists(_backendPieces(), max_size=12), CUTS)
def test_server_messages_through_the_tracker(
    pieces: list[tuple[bytes, tuple[str, str] | None]], cuts: list[int]
) -> None:
    """
    As L{pgtls_twisted.pool._session.PooledSession} reads its server: the
    tracker refuses only a ReadyForQuery without a valid status, and every
    ParameterStatus short enough for the peek is read back as it was built.
    """
    stream = b"".join(raw for raw, _ in pieces)
    splitter = serverSplitter(True)
    tracker = TransactionTracker()
    reported: list[tuple[str, str]] = []
    built = [param for _, param in pieces if param is not None]
    try:
        for chunk in split_at(stream, cuts):
            _, events = splitter.feed(chunk)
            for _, mtype, length, peek in events:
                if mtype == ord("S"):
                    param = parameterStatusFromPeek(length, peek)
                    if param is not None:
                        reported.append(param)
                elif mtype not in RELAY_WATCH:
                    tracker.serverMessage(mtype, peek or None)
    except ProtocolViolation as e:
        assert e.message.startswith("invalid ReadyForQuery status"), e.message
        assert reported == built[: len(reported)]
        return
    assert reported == built
