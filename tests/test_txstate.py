"""
Pool-mode protocol groundwork: the transaction and parameter trackers
(L{pgtls_twisted.protocol._txstate}).

The transaction tracker is driven through the protocol scenarios a
transaction pooler meets, fuzzed with whole exchanges, and once through
real byte streams cut by the splitter (test_framing). The parameter
tracker follows the startup parameters and the server's ParameterStatus
reports, and writes the SET statements that give a server connection a
client's parameters, quoted so that no value can inject SQL.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from support.fuzz import FUZZ

from pgtls_twisted.protocol._framing import MessageSplitter
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
from pgtls_twisted.protocol._wire import message as msg

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
