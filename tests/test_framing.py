"""
Pool-mode protocol groundwork: header-only framing
(L{pgtls_twisted.protocol._framing}).

The splitter is fuzzed: whatever the chunking, it must forward exactly the
bytes it was fed, in order, report exactly the original message boundaries,
and never keep more than an incomplete header of its own. The trackers the
splitter feeds are tested in test_txstate.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st
from support.fuzz import FUZZ

from pgtls_twisted.protocol._framing import HEADER_SIZE, MessageSplitter
from pgtls_twisted.protocol._txstate import (
    CLIENT_WATCH,
)
from pgtls_twisted.protocol._wire import ProtocolViolation
from pgtls_twisted.protocol._wire import message as msg


def header(mtype: bytes, length: int) -> bytes:
    return mtype + struct.pack("!I", length)


# ---------------------------------------------------------------------------
# MessageSplitter


class TestSplitter:
    def test_wholeChunkIsReturnedUncopied(self) -> None:
        """A chunk of whole messages comes back as the very same object."""
        data = msg(b"D", b"row") + msg(b"C", b"SELECT 1\0") + msg(b"Z", b"I")
        splitter = MessageSplitter(watch=b"CZ", peek={b"Z": 1})
        out, events = splitter.feed(data)
        assert out is data
        assert events == [(8, ord("C"), 13, b""), (22, ord("Z"), 5, b"I")]
        assert splitter.atBoundary
        assert splitter.buffered == 0

    def test_watchNoneReportsEverything(self) -> None:
        data = msg(b"D", b"x") + msg(b"I")
        _, events = MessageSplitter().feed(data)
        assert [(t, n) for _, t, n, _ in events] == [(ord("D"), 5), (ord("I"), 4)]

    def test_emptyChunk(self) -> None:
        splitter = MessageSplitter()
        assert splitter.feed(b"") == (b"", [])
        assert splitter.atBoundary

    def test_headerSplitAcrossChunks(self) -> None:
        """
        The bytes of an incomplete header are held back, then returned at
        the front of the next call, once the header can be reported.
        """
        first = msg(b"D", b"abc")
        second = msg(b"Z", b"I")
        data = first + second
        splitter = MessageSplitter(peek={b"Z": 1})
        out1, events1 = splitter.feed(data[: len(first) + 3])
        assert out1 == first
        assert [e[1] for e in events1] == [ord("D")]
        assert splitter.buffered == 3
        assert not splitter.atBoundary
        out2, events2 = splitter.feed(data[len(first) + 3 :])
        assert out2 == second
        assert events2 == [(0, ord("Z"), 5, b"I")]
        assert splitter.atBoundary

    def test_peekHeldUntilComplete(self) -> None:
        """ReadyForQuery is reported only with its status byte."""
        splitter = MessageSplitter(watch=b"Z", peek={b"Z": 1})
        z = msg(b"Z", b"T")
        out, events = splitter.feed(z[:5])
        assert (out, events) == (b"", [])
        assert splitter.buffered == 5 == splitter.maxBuffered
        out, events = splitter.feed(z[5:])
        assert out == z
        assert events == [(0, ord("Z"), 5, b"T")]

    def test_peekShorterThanSize(self) -> None:
        """A peek never reaches past the message's own body."""
        data = msg(b"S", b"a\0b\0") + msg(b"Z", b"I")
        splitter = MessageSplitter(peek={b"S": 100, b"Z": 1})
        out, events = splitter.feed(data)
        assert out is data
        assert events == [(0, ord("S"), 8, b"a\0b\0"), (9, ord("Z"), 5, b"I")]

    def test_hugeMessageStreams(self) -> None:
        """
        A 1 GiB DataRow is reported once, at its header, and its body passes
        through as it comes, chunk by chunk, without being buffered.
        """
        length = 1 << 30
        splitter = MessageSplitter(watch=b"DZ", peek={b"Z": 1})
        out, events = splitter.feed(header(b"D", length) + b"x" * 11)
        assert events == [(0, ord("D"), length, b"")]
        assert len(out) == 16
        remaining = length - 4 - 11
        assert splitter.continuing == (ord("D"), remaining)
        piece = b"y" * (1 << 20)
        while remaining > len(piece):
            out, events = splitter.feed(piece)
            assert out is piece
            assert events == []
            assert splitter.buffered == 0
            remaining -= len(piece)
            assert splitter.continuing == (ord("D"), remaining)
        tail = b"z" * remaining + msg(b"C", b"SELECT 1\0") + msg(b"Z", b"I")
        out, events = splitter.feed(tail)
        assert out is tail
        assert events == [(remaining + 14, ord("Z"), 5, b"I")]
        assert splitter.continuing is None
        assert splitter.atBoundary

    def test_continuingEndsExactlyAtChunkEnd(self) -> None:
        splitter = MessageSplitter()
        splitter.feed(header(b"d", 14))
        assert splitter.continuing == (ord("d"), 10)
        splitter.feed(b"0123456789")
        assert splitter.atBoundary
        assert splitter.continuing is None

    @pytest.mark.parametrize("length", [0, 1, 2, 3])
    def test_impossibleLengths(self, length: int) -> None:
        with pytest.raises(ProtocolViolation, match="invalid message length"):
            MessageSplitter().feed(header(b"Q", length))

    @pytest.mark.parametrize("length", [0, 3])
    def test_impossibleLengthInSplitHeader(self, length: int) -> None:
        """The length is judged when the header completes, in a later chunk."""
        splitter = MessageSplitter()
        data = msg(b"D", b"ok") + header(b"Q", length)
        out, _ = splitter.feed(data[:9])
        assert out == data[:7]
        with pytest.raises(ProtocolViolation):
            splitter.feed(data[9:])

    def test_impossibleLengthAfterLongMessage(self) -> None:
        """A hostile length right after a streamed body is still caught."""
        splitter = MessageSplitter()
        splitter.feed(header(b"d", 1004))
        with pytest.raises(ProtocolViolation):
            splitter.feed(b"x" * 1000 + header(b"c", 2))

    def test_lengthAboveSignedInt32(self) -> None:
        """PostgreSQL reads the length as signed: 2**31 and up are invalid."""
        with pytest.raises(ProtocolViolation):
            MessageSplitter().feed(header(b"D", 0x80000000))

    def test_maxLength(self) -> None:
        splitter = MessageSplitter(maxLength=100)
        splitter.feed(header(b"D", 100))
        with pytest.raises(ProtocolViolation):
            MessageSplitter(maxLength=100).feed(header(b"D", 101))

    def test_badArguments(self) -> None:
        with pytest.raises(ValueError):
            MessageSplitter(watch=[b"ZZ"])
        with pytest.raises(ValueError):
            MessageSplitter(watch=[256])
        with pytest.raises(ValueError):
            MessageSplitter(peek={b"Z": -1})
        with pytest.raises(ValueError):
            MessageSplitter(maxLength=3)

    def test_cutAtTerminate(self) -> None:
        """
        The event offsets let a pooler withhold one message: here the
        client's Terminate, which must not reach a pooled server.
        """
        data = msg(b"Q", b"COMMIT\0") + msg(b"X")
        out, events = MessageSplitter(watch=CLIENT_WATCH).feed(data)
        cut = next(off for off, t, _, _ in events if t == ord("X"))
        assert out[:cut] == msg(b"Q", b"COMMIT\0")


_TYPES = st.sampled_from(list(b"DCZTSEHGdcIAN"))


@st.composite
def streams(draw: st.DrawFn) -> tuple[list[tuple[int, bytes]], list[int]]:
    """Messages (type, body), and cut points in their concatenation."""
    messages = draw(
        st.lists(
            st.tuples(
                _TYPES,
                st.one_of(
                    st.binary(max_size=12),
                    st.integers(min_value=0, max_value=5000).map(lambda n: b"b" * n),
                ),
            ),
            max_size=30,
        )
    )
    total = sum(5 + len(body) for _, body in messages)
    cuts = draw(st.lists(st.integers(min_value=0, max_value=total), max_size=40))
    return messages, sorted(cuts)


def chunked(data: bytes, cuts: list[int]) -> Iterator[bytes]:
    start = 0
    for cut in cuts + [len(data)]:
        yield data[start:cut]
        start = cut


@FUZZ
@given(streams(), st.sampled_from([None, b"Z", b"ZCS"]), st.booleans())
def test_splitterFuzz(
    stream: tuple[list[tuple[int, bytes]], list[int]], watch: bytes | None, peeking: bool
) -> None:
    """
    Any chunking: the bytes come out exactly as they went in, every watched
    message is reported once at its original offset, and the splitter
    never holds more than an incomplete header (plus a peek).
    """
    messages, cuts = stream
    data = b"".join(bytes([t]) + struct.pack("!I", 4 + len(b)) + b for t, b in messages)
    peek = {b"Z": 1, b"S": 3} if peeking else None
    splitter = MessageSplitter(watch=watch, peek=peek)
    watched = set(watch if watch is not None else range(256))
    if peek:
        watched |= {ord("Z"), ord("S")}
    forwarded = bytearray()
    reported = []
    fed = 0
    for chunk in chunked(data, cuts):
        out, events = splitter.feed(chunk)
        for offset, mtype, length, body in events:
            # A message is reported once its header is here and forwarded.
            assert offset + HEADER_SIZE <= len(out)
            assert out[offset] == mtype
            reported.append((len(forwarded) + offset, mtype, length, body))
        forwarded += out
        assert splitter.buffered <= splitter.maxBuffered
        assert splitter.buffered <= (HEADER_SIZE - 1 + (3 if peeking else 0))
        # Nothing is lost or invented: what is not forwarded yet is held.
        fed += len(chunk)
        assert len(forwarded) + splitter.buffered == fed
        assert data.startswith(forwarded)
    assert bytes(forwarded) == data
    assert splitter.atBoundary
    expected = []
    offset = 0
    for t, body in messages:
        if t in watched:
            size = {ord("Z"): 1, ord("S"): 3}.get(t, 0) if peeking else 0
            expected.append((offset, t, 4 + len(body), body[:size]))
        offset += 5 + len(body)
    assert reported == expected


@FUZZ
@given(st.binary(max_size=200), st.lists(st.integers(min_value=0, max_value=200), max_size=10))
def test_splitterGarbage(data: bytes, cuts: list[int]) -> None:
    """Arbitrary bytes: forwarded as a prefix of the input, or rejected."""
    cuts = sorted(c for c in cuts if c <= len(data))
    splitter = MessageSplitter(peek={b"Z": 1})
    forwarded = b""
    try:
        for chunk in chunked(data, cuts):
            out, _ = splitter.feed(chunk)
            forwarded += out
            assert splitter.buffered <= splitter.maxBuffered
    except ProtocolViolation:
        return
    assert data.startswith(forwarded)
    assert len(data) - len(forwarded) == splitter.buffered
