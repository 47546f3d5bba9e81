"""
Pool-mode protocol groundwork: header-only framing
(L{pgtls_twisted.protocol._framing}) and the transaction and parameter trackers
(L{pgtls_twisted.protocol._txstate}).

The splitter is fuzzed: whatever the chunking, it must forward exactly the
bytes it was fed, in order, report exactly the original message boundaries,
and never keep more than an incomplete header of its own. The tracker is
driven through the protocol scenarios a transaction pooler meets, and once
through real byte streams cut by the splitter.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgtls_twisted.protocol import _wire as wire
from pgtls_twisted.protocol._framing import HEADER_SIZE, MessageSplitter
from pgtls_twisted.protocol._txstate import (
    CLIENT_WATCH,
    PARAMETER_STATUS_PEEK,
    SERVER_PEEK,
    SERVER_WATCH,
    ParameterTracker,
    TransactionTracker,
    parameterStatusFromPeek,
    quoteLiteral,
)
from pgtls_twisted.protocol._wire import ProtocolViolation

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def msg(mtype: bytes, body: bytes = b"") -> bytes:
    return wire.message(mtype, body)


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


# ---------------------------------------------------------------------------
# TransactionTracker


class Session:
    """Drive a tracker with readable scripts of message types."""

    def __init__(self) -> None:
        self.tracker = TransactionTracker()

    def client(self, types: str) -> Session:
        for t in types:
            self.tracker.clientMessage(t.encode())
        return self

    def server(self, types: str) -> Session:
        """Server types; C{Z} is followed by its status letter: C{"CZI"}."""
        it = iter(types)
        for t in it:
            if t == "Z":
                self.tracker.serverMessage(b"Z", next(it).encode())
            else:
                self.tracker.serverMessage(t.encode())
        return self

    @property
    def idle(self) -> bool:
        return self.tracker.idle


class TestTransactionTracker:
    def test_freshTrackerIsIdle(self) -> None:
        tracker = TransactionTracker()
        assert tracker.idle
        assert tracker.transactionStatus == "I"
        assert tracker.pendingSyncs == 0
        assert tracker.inCopy is None
        assert tracker.pinned is None

    def test_simpleQueryInAndOutOfTransaction(self) -> None:
        s = Session().client("Q")
        assert not s.idle and s.tracker.pendingSyncs == 1
        s.server("CZT")
        assert not s.idle and s.tracker.transactionStatus == "T"
        s.client("Q").server("TDDC")
        assert not s.idle
        s.server("ZT")
        assert not s.idle and s.tracker.pendingSyncs == 0
        s.client("Q").server("C")
        assert not s.idle
        s.server("ZI")
        assert s.idle and s.tracker.transactionStatus == "I"

    def test_autocommitQuery(self) -> None:
        s = Session().client("Q").server("TDC")
        assert not s.idle
        s.server("ZI")
        assert s.idle

    def test_errorInTransaction(self) -> None:
        s = Session().client("Q").server("CZT").client("Q").server("E")
        assert not s.idle
        s.server("ZE")
        assert s.tracker.transactionStatus == "E"
        assert not s.idle
        s.client("Q").server("CZI")
        assert s.idle

    def test_errorOutsideTransaction(self) -> None:
        assert Session().client("Q").server("EZI").idle

    def test_pipelinedExtendedBatch(self) -> None:
        """Parse/Bind/Execute three times, then one Sync: one ReadyForQuery."""
        s = Session()
        for _ in range(3):
            s.client("PBE")
            assert not s.idle and s.tracker.batchOpen and s.tracker.pendingSyncs == 0
        s.client("S")
        assert not s.idle and not s.tracker.batchOpen and s.tracker.pendingSyncs == 1
        s.server("12C12C12C")
        assert not s.idle
        s.server("ZI")
        assert s.idle

    def test_extendedErrorStillAnswersSync(self) -> None:
        """After an error the server skips to the Sync, and answers it."""
        s = Session().client("PBDES").server("E")
        assert not s.idle
        s.server("ZI")
        assert s.idle

    def test_parseFlushWithoutSync(self) -> None:
        """Flush delivers results, but the batch stays open until Sync."""
        s = Session().client("PH").server("1")
        assert not s.idle and s.tracker.batchOpen and s.tracker.pendingSyncs == 0
        s.client("BEH").server("2C")
        assert not s.idle
        s.client("S").server("ZI")
        assert s.idle

    def test_closeWithoutSyncKeepsConnection(self) -> None:
        assert not Session().client("C").idle

    def test_copyInSimpleQueryCopyDone(self) -> None:
        s = Session().client("Q").server("G")
        assert s.tracker.inCopy == "in" and not s.idle
        s.client("dddd")
        assert not s.idle
        s.client("c")
        assert s.tracker.inCopy == "in" and not s.idle
        s.server("C")
        assert s.tracker.inCopy is None and not s.idle
        s.server("ZI")
        assert s.idle and s.tracker.pinned is None

    def test_copyInSimpleQueryCopyFail(self) -> None:
        s = Session().client("Q").server("G").client("ddf")
        assert not s.idle
        s.server("E")
        assert s.tracker.inCopy is None and not s.idle
        s.server("ZI")
        assert s.idle and s.tracker.pinned is None

    def test_copyInServerErrorWhileClientStillSending(self) -> None:
        """
        The server fails the copy and is ready again, but the client, not
        having noticed, still streams CopyData: the connection stays until
        the client ends its side, so its stray messages go to this server,
        which ignores them.
        """
        s = Session().client("Q").server("G").client("dd").server("EZI")
        assert s.tracker.inCopy == "in"
        assert not s.idle
        s.client("dd")
        assert not s.idle
        s.client("c")
        assert s.idle and s.tracker.pinned is None

    def test_copyInSyncDuringSimpleCopyIgnored(self) -> None:
        """Sync and Flush inside COPY FROM STDIN are ignored by the server."""
        s = Session().client("Q").server("G").client("dSdHdc")
        assert s.tracker.pendingSyncs == 1
        s.server("CZI")
        assert s.idle and s.tracker.pinned is None

    def test_twoCopiesInOneQuery(self) -> None:
        s = Session().client("Q").server("G").client("dc").server("CG")
        assert s.tracker.inCopy == "in"
        s.client("dc").server("C")
        assert not s.idle
        s.server("ZI")
        assert s.idle

    def test_copyOut(self) -> None:
        s = Session().client("Q").server("H")
        assert s.tracker.inCopy == "out" and not s.idle
        s.server("ddd")
        assert s.tracker.inCopy == "out"
        s.server("c")
        assert s.tracker.inCopy is None and not s.idle
        s.server("C")
        assert not s.idle
        s.server("ZI")
        assert s.idle

    def test_copyOutError(self) -> None:
        s = Session().client("Q").server("HddE")
        assert s.tracker.inCopy is None
        s.server("ZI")
        assert s.idle

    def test_extendedCopyOut(self) -> None:
        s = Session().client("PBDES").server("12nHddcC")
        assert not s.idle
        s.server("ZI")
        assert s.idle

    def test_extendedCopyInLibpq(self) -> None:
        """
        libpq's PQexecParams("COPY ... FROM STDIN"): Parse, Bind, Describe,
        Execute, Sync go out together; the server ignores that Sync in copy
        mode; libpq sends CopyDone and a second Sync, which is answered.
        Exactly one ReadyForQuery comes, and the connection is idle after it.
        """
        s = Session().client("PBDES")
        assert s.tracker.pendingSyncs == 1
        s.server("12nG")
        assert s.tracker.pendingSyncs == 0
        assert s.tracker.inCopy == "in" and not s.idle
        s.client("ddd")
        assert not s.idle
        s.client("cS")
        assert s.tracker.pendingSyncs == 1 and not s.idle
        s.server("C")
        assert not s.idle
        s.server("ZI")
        assert s.idle and s.tracker.pinned is None and s.tracker.pendingSyncs == 0

    def test_extendedCopyInWithFlush(self) -> None:
        """A driver that flushes instead of syncing before the copy."""
        s = Session().client("PBEH").server("12G").client("ddc")
        assert not s.idle
        s.client("S").server("C")
        assert not s.idle
        s.server("ZI")
        assert s.idle

    def test_extendedCopyInTransaction(self) -> None:
        s = Session().client("PBDES").server("12nG").client("dcS").server("CZT")
        assert s.tracker.transactionStatus == "T" and not s.idle

    def test_extendedCopyInErrorAfterIgnoredSyncPins(self) -> None:
        """
        A failed extended COPY after a Sync was sent with it: whether the
        server read that Sync before the error (and ignored it) or after
        (and answers it) cannot be told, so the connection is pinned.
        """
        s = Session().client("PBDES").server("12nG").client("ddfS").server("E")
        assert s.tracker.pinned is not None
        s.server("ZI")
        assert not s.idle

    def test_extendedCopyInErrorWithoutSyncIsExact(self) -> None:
        s = Session().client("PBEH").server("12G").client("d").server("E")
        assert s.tracker.pinned is None
        s.client("dcS").server("ZI")
        assert s.idle

    def test_queryDuringCopyInPins(self) -> None:
        """The server would abort the copy and swallow the Query."""
        s = Session().client("Q").server("G").client("dQ")
        assert s.tracker.pinned is not None
        assert not s.idle

    def test_queryPipelinedBehindCopyPins(self) -> None:
        s = Session().client("QQ").server("G")
        assert s.tracker.pinned is not None

    def test_copyDoneBeforeServerAnnouncedPins(self) -> None:
        """An unusual client that sends its data before CopyInResponse."""
        s = Session().client("Qdc").server("GC")
        assert s.tracker.pinned is not None

    def test_copyBoth(self) -> None:
        s = Session().client("Q").server("W")
        assert s.tracker.inCopy == "both"
        s.server("dd").client("d")
        s.server("c")
        assert s.tracker.inCopy == "both"
        s.client("c")
        assert s.tracker.inCopy is None
        s.server("CZI")
        assert s.idle

    def test_emptyQuery(self) -> None:
        s = Session().client("Q").server("I")
        assert not s.idle
        s.server("ZI")
        assert s.idle

    def test_asyncMessagesNeverChangeIdle(self) -> None:
        s = Session()
        s.server("ANS")
        assert s.idle
        s.client("Q").server("ANS")
        assert not s.idle
        s.server("CZI").server("A")
        assert s.idle

    def test_twoQueriesPipelined(self) -> None:
        s = Session().client("QQ")
        assert s.tracker.pendingSyncs == 2
        s.server("CZI")
        assert not s.idle and s.tracker.pendingSyncs == 1
        s.server("CZI")
        assert s.idle

    def test_functionCall(self) -> None:
        s = Session().client("F").server("V")
        assert not s.idle
        s.server("ZI")
        assert s.idle

    def test_terminate(self) -> None:
        s = Session().client("X")
        assert s.tracker.terminated
        assert s.idle
        t = Session().client("Q").server("CZT").client("X")
        assert t.tracker.terminated and not t.idle

    def test_unexpectedReadyForQueryPins(self) -> None:
        s = Session().server("ZI")
        assert s.tracker.pinned is not None
        assert not s.idle

    def test_invalidStatus(self) -> None:
        tracker = TransactionTracker()
        tracker.clientMessage(b"Q")
        for status in (b"X", b"", None, b"II"):
            with pytest.raises(ProtocolViolation):
                tracker.serverMessage(b"Z", status)
        tracker.serverMessage(ord("Z"), "I")
        assert tracker.idle

    def test_unknownClientTypePins(self) -> None:
        s = Session().client("p")
        assert s.tracker.pinned is not None

    def test_queryInsideOpenBatchPins(self) -> None:
        s = Session().client("PBQ")
        assert s.tracker.pinned is not None

    def test_strayCopyMessagesIgnored(self) -> None:
        """Outside COPY the server ignores CopyData/CopyDone/CopyFail."""
        assert Session().client("dcf").idle

    def test_intTypes(self) -> None:
        tracker = TransactionTracker()
        tracker.clientMessage(ord("Q"))
        tracker.serverMessage(ord("Z"), b"I")
        assert tracker.idle


@st.composite
def exchanges(draw: st.DrawFn) -> tuple[list[tuple[str, str]], str]:
    """
    One well-formed exchange a client and server may have, as alternating
    steps (C{("c" | "s", types)}, a server C{Z} followed by its status), and
    the transaction status it ends in. Asynchronous messages are sprinkled
    into the server's steps.
    """
    status = draw(st.sampled_from("ITE"))
    rows = "D" * draw(st.integers(min_value=0, max_value=3))
    k = draw(st.integers(min_value=1, max_value=4))
    kind = draw(
        st.sampled_from(
            [
                "simple",
                "empty",
                "error",
                "extended",
                "pipeline",
                "copyIn",
                "copyFail",
                "copyInError",
                "copyOut",
                "extendedCopyIn",
                "extendedCopyOut",
                "function",
            ]
        )
    )
    steps: list[tuple[str, str]] = {
        "simple": [("c", "Q"), ("s", f"T{rows}CZ{status}")],
        "empty": [("c", "Q"), ("s", f"IZ{status}")],
        "error": [("c", "Q"), ("s", f"EZ{status}")],
        "extended": [("c", "PBE" * k + "S"), ("s", f"12{rows}C" * k + f"Z{status}")],
        "pipeline": [("c", "Q" * k), ("s", "CZT" * (k - 1) + f"CZ{status}")],
        "copyIn": [("c", "Q"), ("s", "G"), ("c", "d" * k + "c"), ("s", f"CZ{status}")],
        "copyFail": [("c", "Q"), ("s", "G"), ("c", "d" * k + "f"), ("s", f"EZ{status}")],
        "copyInError": [("c", "Q"), ("s", "G"), ("c", "d"), ("s", f"EZ{status}"), ("c", "dc")],
        "copyOut": [("c", "Q"), ("s", "H" + "d" * k + f"cCZ{status}")],
        "extendedCopyIn": [
            ("c", "PBDES"),
            ("s", "12nG"),
            ("c", "d" * k + "cS"),
            ("s", f"CZ{status}"),
        ],
        "extendedCopyOut": [("c", "PBDES"), ("s", "12nH" + "d" * k + f"cCZ{status}")],
        "function": [("c", "F"), ("s", f"VZ{status}")],
    }[kind]
    noisy = []
    for side, types in steps:
        if side == "s":
            types = "".join(t + draw(st.sampled_from(["", "N", "A", "S"])) for t in types)
            # Async messages never come between a Z and its status letter.
            types = types.replace("ZN", "NZ").replace("ZA", "AZ").replace("ZS", "SZ")
        noisy.append((side, types))
    return noisy, status


@FUZZ
@given(st.lists(exchanges(), min_size=1, max_size=8))
def test_trackerIdleOnlyBetweenExchanges(script: list[tuple[list[tuple[str, str]], str]]) -> None:
    """
    Through any sequence of well-formed exchanges, the connection is idle
    exactly at the end of one that leaves no transaction open, and never in
    the middle of one.
    """
    s = Session()
    for steps, status in script:
        for i, (side, types) in enumerate(steps):
            if side == "c":
                s.client(types)
            else:
                s.server(types)
            if i < len(steps) - 1:
                assert not s.idle, (steps, i)
        assert s.tracker.pinned is None
        assert s.tracker.pendingSyncs == 0
        assert s.tracker.inCopy is None
        assert s.idle == (status == "I")


def run(script: list[tuple[str, bytes]], chunk: int) -> tuple[TransactionTracker, list[bool]]:
    """
    Push real byte streams through splitters into a tracker, in the order
    of C{script} (C{("client" | "server", bytes)} steps, each cut into
    C{chunk}-byte pieces); return the tracker and L{idle} after each piece.
    """
    tracker = TransactionTracker()
    cs = MessageSplitter(watch=CLIENT_WATCH)
    ss = MessageSplitter(watch=SERVER_WATCH, peek=SERVER_PEEK)
    states = []
    for side, data in script:
        for i in range(0, len(data), chunk):
            if side == "client":
                for _, t, _, _ in cs.feed(data[i : i + chunk])[1]:
                    tracker.clientMessage(t)
            else:
                for _, t, _, peek in ss.feed(data[i : i + chunk])[1]:
                    tracker.serverMessage(t, peek or None)
            states.append(tracker.idle and cs.atBoundary)
    return tracker, states


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64, 1 << 16])
def test_trackerThroughSplitters(chunk: int) -> None:
    """A transaction with a pipeline and a COPY, cut at any chunk size."""
    script = [
        (
            "client",
            msg(b"Q", b"BEGIN\0")
            + msg(b"P", b"\0SELECT 1\0\0\0")
            + msg(b"B", b"\0\0\0\0\0\0\0\0")
            + msg(b"E", b"\0\0\0\0\0")
            + msg(b"S")
            + msg(b"Q", b"COPY t FROM STDIN\0"),
        ),
        (
            "server",
            msg(b"C", b"BEGIN\0")
            + msg(b"Z", b"T")
            + msg(b"1")
            + msg(b"2")
            + msg(b"D", b"\0\1\0\0\0\1" + b"1")
            + msg(b"C", b"SELECT 1\0")
            + msg(b"N", b"SWARNING\0\0")
            + msg(b"Z", b"T")
            + msg(b"G", b"\0\0\0"),
        ),
        ("client", msg(b"d", b"1\n" * 1000) + msg(b"c") + msg(b"Q", b"COMMIT\0")),
        (
            "server",
            msg(b"C", b"COPY 1000\0")
            + msg(b"Z", b"T")
            + msg(b"S", b"TimeZone\0UTC\0")
            + msg(b"C", b"COMMIT\0")
            + msg(b"Z", b"I"),
        ),
    ]
    tracker, states = run(script, chunk)
    assert states[-1] is True
    assert not any(states[:-1])
    assert tracker.pinned is None
    assert tracker.pendingSyncs == 0


# ---------------------------------------------------------------------------
# ParameterTracker


def unquote(literal: str) -> str:
    """Read back a literal as PostgreSQL would (the forms quoteLiteral makes)."""
    escape = literal.startswith("E'")
    body = literal[2:-1] if escape else literal[1:-1]
    assert literal.endswith("'")
    out = []
    i = 0
    while i < len(body):
        ch = body[i]
        if ch == "'":
            # Inside the literal a quote can only appear doubled.
            assert body[i + 1] == "'"
            out.append("'")
            i += 2
        elif ch == "\\" and escape:
            assert body[i + 1] == "\\"
            out.append("\\")
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


class TestParameterTracker:
    def test_startupNamesAreCaseInsensitive(self) -> None:
        tracker = ParameterTracker(
            {
                "user": "alice",
                "database": "db",
                "datestyle": "ISO, DMY",
                "TIMEZONE": "Europe/Paris",
                "Application_Name": "psql",
                "search_path": "evil",
            }
        )
        assert tracker.values == {
            "DateStyle": "ISO, DMY",
            "TimeZone": "Europe/Paris",
            "application_name": "psql",
        }

    def test_nonAsciiNamesAreNotTracked(self) -> None:
        tracker = ParameterTracker({"TimeZon\u0435": "UTC"})  # Cyrillic e
        assert tracker.values == {}
        assert not tracker.serverReported("applicat\u0130on_name", "x")

    def test_serverReportsOverrideStartup(self) -> None:
        tracker = ParameterTracker({"datestyle": "iso"})
        assert tracker.serverReported("DateStyle", "ISO, MDY")
        assert not tracker.serverReported("server_version", "18.0")
        assert tracker.values == {"DateStyle": "ISO, MDY"}

    def test_differences(self) -> None:
        tracker = ParameterTracker({"TimeZone": "Europe/Paris", "application_name": "app"})
        tracker.serverReported("client_encoding", "UTF8")
        server = {"timezone": "UTC", "client_encoding": "UTF8", "DateStyle": "ISO, MDY"}
        assert tracker.differences(server) == {
            "TimeZone": "Europe/Paris",
            "application_name": "app",
        }
        same = {"TimeZone": "Europe/Paris", "application_name": "app", "client_encoding": "UTF8"}
        assert tracker.differences(same) == {}

    def test_applyTimeZone(self) -> None:
        sql = ParameterTracker.applySQL({"TimeZone": "Europe/Paris"})
        assert sql == "SET TimeZone = 'Europe/Paris';"

    def test_applyHostileApplicationName(self) -> None:
        hostile = "x'; DROP TABLE t; --"
        sql = ParameterTracker.applySQL({"application_name": hostile})
        assert sql == "SET application_name = 'x''; DROP TABLE t; --';"
        prefix = "SET application_name = "
        assert unquote(sql[len(prefix) : -1]) == hostile

    def test_applySeveral(self) -> None:
        diff = ParameterTracker({"DateStyle": "ISO, MDY", "IntervalStyle": "iso_8601"}).values
        assert (
            ParameterTracker.applySQL(diff)
            == "SET DateStyle = 'ISO, MDY'; SET IntervalStyle = 'iso_8601';"
        )
        assert ParameterTracker.applySQL({}) == ""

    def test_applyBackslash(self) -> None:
        """E'' form: the same meaning whatever standard_conforming_strings is."""
        sql = ParameterTracker.applySQL({"application_name": "a\\'b"})
        assert sql == "SET application_name = E'a\\\\''b';"

    def test_applyRejectsNul(self) -> None:
        with pytest.raises(ValueError):
            ParameterTracker.applySQL({"application_name": "a\0b"})

    @pytest.mark.parametrize("name", ["search_path", "TimeZone = 'x'; --", "role", ""])
    def test_applyRejectsUntrackedNames(self, name: str) -> None:
        with pytest.raises(ValueError):
            ParameterTracker.applySQL({name: "x"})

    def test_applyNormalisesNameSpelling(self) -> None:
        assert ParameterTracker.applySQL({"timezone": "UTC"}) == "SET TimeZone = 'UTC';"

    @FUZZ
    @given(st.text().filter(lambda s: "\0" not in s))
    def test_quoteLiteralRoundTrip(self, value: str) -> None:
        literal = quoteLiteral(value)
        assert unquote(literal) == value

    def test_parameterStatusFromPeek(self) -> None:
        body = b"TimeZone\0Europe/Paris\0"
        assert parameterStatusFromPeek(4 + len(body), body) == ("TimeZone", "Europe/Paris")
        # A body longer than the peek is never half-read.
        assert parameterStatusFromPeek(4 + len(body) + 10, body) is None
        assert parameterStatusFromPeek(4 + 3, b"ab\0") is None

    def test_parameterStatusThroughSplitter(self) -> None:
        long = msg(b"S", b"search_path\0" + b"x" * PARAMETER_STATUS_PEEK + b"\0")
        short = msg(b"S", b"application_name\0app\0")
        splitter = MessageSplitter(watch=SERVER_WATCH, peek=SERVER_PEEK)
        _, events = splitter.feed(long + short)
        decoded = [parameterStatusFromPeek(length, peek) for _, _, length, peek in events]
        assert decoded == [None, ("application_name", "app")]
