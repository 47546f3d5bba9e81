"""
Unit tests of the pool's client timeouts (L{pgtls_twisted.pool._timeouts})
with a fake clock, a fake session and a real transaction tracker: which
timeout applies when, what it does to the session, and that the timer is
one L{IDelayedCall} checked lazily rather than moved per message.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from support.logcapture import captured
from twisted.internet import defer
from twisted.internet.task import Clock

from pgtls_twisted.config._model import PoolConfig
from pgtls_twisted.ops._metrics import Metrics
from pgtls_twisted.pool._timeouts import CANCEL_GRACE, SessionTimeouts
from pgtls_twisted.protocol import _wire as wire
from pgtls_twisted.protocol._txstate import TransactionTracker
from pgtls_twisted.proxy._session import SessionPhase

Q, P, B, E, S, COPY_DONE = (ord(c) for c in "QPBESc")


class Figures:
    def __init__(self) -> None:
        self.fired: list[str] = []

    def timedOut(self, timeout: str) -> None:
        self.fired.append(timeout)


class CancelBackend:
    """Where a forwarded cancel goes: records the request, closes at once."""

    name = "app"

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.requests: list[bytes] = []

    def connect(self) -> defer.Deferred[Any]:
        server = SimpleNamespace(deliver=None, onLost=None, close=lambda: None)
        server.out = SimpleNamespace(write=lambda data: self.closing(server, data))
        return defer.succeed(server)

    def closing(self, server: Any, data: bytes) -> None:
        self.requests.append(data)
        server.onLost(None)


class FakeSession:
    """The part of a L{PooledSession} the timeouts use, attached or not."""

    def __init__(self, clock: Clock, **timeouts: float) -> None:
        self.route = SimpleNamespace(
            clock=clock, config=SimpleNamespace(pool=PoolConfig("svc", **timeouts))
        )
        self.client = SimpleNamespace(connId=7)
        self.pool = SimpleNamespace(name="db")
        self.phase = SessionPhase.IDLE
        self.attachment: Any = None
        self.backend = CancelBackend(clock)
        self.cancelsDone = 0
        self.ended: list[tuple[str, str, bool]] = []

    def attach(self) -> TransactionTracker:
        self.phase = SessionPhase.ATTACHED
        self.attachment = SimpleNamespace(tracker=TransactionTracker())
        return self.attachment.tracker

    def detach(self) -> None:
        self.phase, self.attachment = SessionPhase.IDLE, None

    def cancelTarget(self) -> Any:
        return (self.backend, 42, b"real", self.cancelDone)

    def cancelDone(self) -> None:
        self.cancelsDone += 1

    def endForTimeout(self, sqlstate: str, text: str, dirty: bool) -> None:
        self.ended.append((sqlstate, text, dirty))


@pytest.fixture
def clock() -> Clock:
    clock = Clock()
    clock.advance(1000)
    return clock


def started(clock: Clock, **timeouts: float) -> tuple[FakeSession, SessionTimeouts, Figures]:
    session, figures = FakeSession(clock, **timeouts), Figures()
    timeouts_ = SessionTimeouts.create(session, figures)
    assert timeouts_ is not None
    return session, timeouts_, figures


def send(session: FakeSession, timeouts: SessionTimeouts, *types: int) -> None:
    """The client sends messages of C{types}, as L{PooledSession._send} feeds them."""
    if session.attachment is not None:
        for t in types:
            session.attachment.tracker.clientMessage(t)
    timeouts.sent(list(types))


def answer(session: FakeSession, timeouts: SessionTimeouts, status: bytes = b"I") -> None:
    """The server's ReadyForQuery, as L{PooledSession._fromServer} handles it."""
    tracker = session.attachment.tracker
    tracker.serverMessage(ord("Z"), status)
    timeouts.ready(tracker)


def test_all_off_is_no_object(clock: Clock) -> None:
    assert SessionTimeouts.create(FakeSession(clock), Figures()) is None
    assert clock.getDelayedCalls() == []


def test_client_idle_from_login_and_from_the_last_bytes(clock: Clock) -> None:
    session, timeouts, figures = started(clock, client_idle_timeout=10)
    clock.advance(6)
    timeouts.sent([])  # part of a message: still the client talking
    clock.advance(6)
    assert session.ended == []
    with captured() as events:
        clock.advance(4)
    assert session.ended == [("57P05", "terminating connection due to idle-session timeout", False)]
    assert figures.fired == ["client_idle_timeout"]
    (line,) = [e for e in events if e.get("timeout") == "client_idle_timeout"]
    assert (line["conn"], line["pool"], line["timeout"], line["elapsed"]) == (
        7,
        "db",
        "client_idle_timeout",
        10,
    )


def test_client_idle_waits_for_the_request_and_the_transaction(clock: Clock) -> None:
    session, timeouts, figures = started(clock, client_idle_timeout=10)
    tracker = session.attach()
    send(session, timeouts, Q)
    clock.advance(30)  # a long query is not idleness
    answer(session, timeouts, b"T")
    clock.advance(30)  # nor a transaction (idle_transaction_timeout's, off here)
    send(session, timeouts, Q)
    answer(session, timeouts, b"I")
    assert tracker.idle
    session.detach()
    clock.advance(9.9)
    assert session.ended == []
    clock.advance(0.1)
    assert [e[0] for e in session.ended] == ["57P05"]
    assert figures.fired == ["client_idle_timeout"]


def test_idle_transaction(clock: Clock) -> None:
    session, timeouts, figures = started(clock, idle_transaction_timeout=5)
    session.attach()
    send(session, timeouts, Q)
    clock.advance(60)  # running, not idle; and outside a transaction nothing applies
    answer(session, timeouts, b"T")
    clock.advance(4)
    timeouts.sent([])  # the client is sending: not idle
    clock.advance(4)
    send(session, timeouts, Q)
    answer(session, timeouts, b"E")  # failed: still in a transaction
    clock.advance(4.9)
    assert session.ended == []
    with captured() as events:
        clock.advance(0.1)
    assert session.ended == [
        ("25P03", "terminating connection due to idle-in-transaction timeout", False)
    ]
    assert figures.fired == ["idle_transaction_timeout"]
    assert any(e.get("timeout") == "idle_transaction_timeout" for e in events)


def test_idle_transaction_ends_with_the_transaction(clock: Clock) -> None:
    session, timeouts, figures = started(clock, idle_transaction_timeout=5)
    session.attach()
    send(session, timeouts, Q)
    answer(session, timeouts, b"T")
    clock.advance(3)
    send(session, timeouts, Q)
    answer(session, timeouts, b"I")
    clock.advance(100)
    assert session.ended == [] and figures.fired == []
    assert clock.getDelayedCalls() == []


def test_query_cancelled_then_answered(clock: Clock) -> None:
    session, timeouts, figures = started(clock, query_timeout=2)
    session.attach()
    send(session, timeouts, P, B, E, S)
    clock.advance(1.9)
    assert session.backend.requests == []
    clock.advance(0.1)
    # The same cancel as a client's CancelRequest for the session.
    assert session.backend.requests == [wire.CancelRequest(42, b"real").encode()]
    assert session.cancelsDone == 1
    assert figures.fired == ["query_timeout"]
    clock.advance(1)
    answer(session, timeouts)  # the server's own 57014, then ReadyForQuery
    clock.advance(100)
    assert session.ended == [] and figures.fired == ["query_timeout"]
    # The next request has a clock of its own.
    send(session, timeouts, Q)
    clock.advance(2)
    assert len(session.backend.requests) == 2


def test_query_not_answered_after_the_cancel(clock: Clock) -> None:
    session, timeouts, figures = started(clock, query_timeout=2)
    session.attach()
    send(session, timeouts, Q)
    clock.advance(2)
    assert len(session.backend.requests) == 1
    timeouts.sent([])  # client bytes move no query deadline
    clock.advance(1.9)
    assert session.ended == []
    with captured() as events:
        clock.advance(0.1)
    assert session.ended == [("57014", "pgtls: query_timeout", True)]
    assert figures.fired == ["query_timeout"]  # counted once
    assert any("after the cancel" in e.get("log_format", "") for e in events)


def test_grace_is_at_most_cancel_grace(clock: Clock) -> None:
    session, timeouts, _ = started(clock, query_timeout=60)
    session.attach()
    send(session, timeouts, Q)
    clock.advance(60)
    clock.advance(CANCEL_GRACE - 0.1)
    assert session.ended == []
    clock.advance(0.1)
    assert [e[0] for e in session.ended] == ["57014"]


def test_query_clock_starts_on_the_server(clock: Clock) -> None:
    """Time queued for a server connection is acquire_timeout's, not query_timeout's."""
    session, timeouts, _ = started(clock, query_timeout=2)
    send(session, timeouts, Q)  # IDLE: held, waiting for a server
    clock.advance(10)
    assert session.backend.requests == []
    session.attach().clientMessage(Q)
    timeouts.attached()
    clock.advance(1.9)
    assert session.backend.requests == []
    clock.advance(0.1)
    assert len(session.backend.requests) == 1


def test_each_pipelined_request_has_its_own_clock(clock: Clock) -> None:
    session, timeouts, _ = started(clock, query_timeout=2)
    session.attach()
    send(session, timeouts, Q, Q, Q)
    for _ in range(3):
        clock.advance(1.5)
        answer(session, timeouts)
    clock.advance(10)
    assert session.backend.requests == []


def test_nothing_owed_is_no_request(clock: Clock) -> None:
    """A CopyDone outside COPY gets no answer; it is not a request running for ever."""
    session, timeouts, _ = started(clock, query_timeout=2, client_idle_timeout=5)
    session.attach()
    send(session, timeouts, COPY_DONE)
    clock.advance(2)
    assert session.backend.requests == [] and session.ended == []
    clock.advance(5)
    assert [e[0] for e in session.ended] == ["57P05"]


def test_one_timer_checked_lazily(clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    """Client bytes only store a time: the one call is re-armed when it fires."""
    armed: list[float] = []
    callLater = clock.callLater
    monkeypatch.setattr(clock, "callLater", lambda d, f: armed.append(d) or callLater(d, f))
    session, timeouts, _ = started(
        clock, client_idle_timeout=10, idle_transaction_timeout=10, query_timeout=10
    )
    for _ in range(100):
        clock.advance(0.5)
        timeouts.sent([])
        assert len(clock.getDelayedCalls()) == 1
    # 50 s of chatter: about one call per 10 s, not one per message.
    assert len(armed) <= 6
    assert session.ended == []
    clock.advance(10)
    assert [e[0] for e in session.ended] == ["57P05"]


def test_a_nearer_deadline_moves_the_timer_sooner(clock: Clock) -> None:
    session, timeouts, _ = started(clock, client_idle_timeout=300, query_timeout=1)
    session.attach()
    send(session, timeouts, Q)
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(1)
    assert len(session.backend.requests) == 1


def test_stop(clock: Clock) -> None:
    session, timeouts, _ = started(clock, client_idle_timeout=1)
    timeouts.stop()
    assert clock.getDelayedCalls() == []
    clock.advance(10)
    assert session.ended == []


def test_metrics_count_each_timeout_per_pool() -> None:
    metrics = Metrics(clock=Clock())
    figures = metrics.pooled("r", "db")
    figures.timedOut("query_timeout")
    figures.timedOut("query_timeout")
    figures.timedOut("client_idle_timeout")
    text = metrics.text().decode()
    labels = 'database="db",route="r",timeout="{}",worker="0"'
    assert f"pgtls_pool_timeouts_total{{{labels.format('query_timeout')}}} 2.0" in text
    assert f"pgtls_pool_timeouts_total{{{labels.format('client_idle_timeout')}}} 1.0" in text
    assert f"pgtls_pool_timeouts_total{{{labels.format('idle_transaction_timeout')}}} 0.0" in text
    metrics.poolDropped("r", "db")
    assert "pgtls_pool_timeouts_total{" not in metrics.text().decode()
