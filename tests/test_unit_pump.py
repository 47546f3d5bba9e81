"""
The byte pump (L{pgtls_twisted.proxy._pump}) between two fake legs: bytes
copied both ways and counted, flow control through the producers each side
registers (each leg's backlog pauses the I{other} leg's socket), teardown
left to the session (a producer's C{stopProducing} is ignored), and
L{Pump.atReady}.

How closing one leg closes the other once the pump runs is the session's
job: see C{test_unit_session} (C{..._closing_after_startup_...}).
"""

from __future__ import annotations

from typing import Any

import pytest
from support.unit import Event, Wire, answer, query
from twisted.internet.testing import StringTransport

from pgtls_twisted.protocol import _wire as wire
from pgtls_twisted.proxy._leg import Leg, ReadingValve
from pgtls_twisted.proxy._pump import Pump, join, separate
from pgtls_twisted.proxy._stats import ConnectionStats


class FakeLeg:
    """
    A leg as the pump sees one: C{out} (where bytes for the peer are
    written: a TLS layer, say, recorded as events under C{name}) and
    C{transport} (the TCP socket, whose reading is paused and resumed).
    """

    def __init__(self, name: str, events: list[Event]) -> None:
        self.out = Wire(name, events)
        self.transport = StringTransport()
        self.deliver: Any = None
        self.direct = None
        self.producer = None
        self.valve = ReadingValve(self)  # type: ignore[arg-type]
        self.pauseReading()  # as during startup

    # A real leg's reading, paused and resumed on its transport.
    pauseReading = Leg.pauseReading
    resumeReading = Leg.resumeReading


@pytest.fixture
def events() -> list[Event]:
    return []


@pytest.fixture
def legs(events: list[Event]) -> tuple[FakeLeg, FakeLeg, Pump]:
    client, server = FakeLeg("client", events), FakeLeg("server", events)
    pump = Pump(client, server, ConnectionStats())
    pump.start()
    return client, server, pump


def test_bytes_go_both_ways_unchanged_and_counted(
    legs: tuple[FakeLeg, FakeLeg, Pump], events: list[Event]
) -> None:
    client, server, pump = legs
    client.deliver(query("select 1"))
    server.deliver(answer())
    assert events == [
        ("server", "Q"),
        ("client", "T"),
        ("client", "D"),
        ("client", "C"),
        ("client", "Z:I"),
    ]
    assert pump.stats == ConnectionStats(bytes_in=len(query("select 1")), bytes_out=len(answer()))


def test_chunks_are_not_framed(legs: tuple[FakeLeg, FakeLeg, Pump], events: list[Event]) -> None:
    client, server, _ = legs
    data = query("select 1")
    for byte in data:
        client.deliver(bytes([byte]))
    assert server.out.value() == data
    assert events == [("server", "Q")]


def test_start_resumes_both_sockets(legs: tuple[FakeLeg, FakeLeg, Pump]) -> None:
    client, server, _ = legs
    assert client.transport.producerState == "producing"
    assert server.transport.producerState == "producing"


@pytest.mark.parametrize("slow", ["client", "server"])
def test_a_slow_reader_pauses_reading_from_its_peer(
    legs: tuple[FakeLeg, FakeLeg, Pump], slow: str
) -> None:
    client, server, _ = legs
    reader, peer = (client, server) if slow == "client" else (server, client)
    # Its outgoing buffer is full: Twisted pauses the producer registered with it.
    reader.out.producer.pauseProducing()
    assert peer.transport.producerState == "paused"
    assert reader.transport.producerState == "producing"
    reader.out.producer.resumeProducing()
    assert peer.transport.producerState == "producing"


def test_producers_are_streaming(legs: tuple[FakeLeg, FakeLeg, Pump]) -> None:
    client, server, _ = legs
    assert client.out.streaming is True
    assert server.out.streaming is True


def test_stop_producing_is_left_to_the_session(legs: tuple[FakeLeg, FakeLeg, Pump]) -> None:
    """
    Twisted calls C{stopProducing} when the consumer's connection is lost;
    passed on, it would cut the other TCP connection under its TLS layer.
    """
    client, server, _ = legs
    client.out.producer.stopProducing()
    server.out.producer.stopProducing()
    assert server.transport.producerState == "producing"
    assert client.transport.producerState == "producing"


def test_separate_undoes_join_and_leaves_both_reading(events: list[Event]) -> None:
    client, server = FakeLeg("client", events), FakeLeg("server", events)
    join(client, server)
    client.out.producer.pauseProducing()
    server.out.producer.pauseProducing()
    separate(client, server)
    assert (client.out.producer, server.out.producer) == (None, None)
    assert client.transport.producerState == "producing"
    assert server.transport.producerState == "producing"
    # And the two can be joined again (a pooled server given to the next client).
    join(client, server)
    assert client.out.producer is not None and server.out.producer is not None


# ---------------------------------------------------------------------------
# atReady: may pgtls speak to the client without cutting a message?


def test_at_ready_when_the_pump_starts(legs: tuple[FakeLeg, FakeLeg, Pump]) -> None:
    """A pump starts right behind the ReadyForQuery that ended the startup."""
    assert legs[2].atReady()


@pytest.mark.parametrize("status", [b"I", b"T", b"E"])
def test_at_ready_after_a_ready_for_query(
    legs: tuple[FakeLeg, FakeLeg, Pump], status: bytes
) -> None:
    _, server, pump = legs
    server.deliver(answer(status=status))
    assert pump.atReady()


@pytest.mark.parametrize(
    "data",
    [
        answer()[:-6],  # the result, its ReadyForQuery still to come
        answer()[:-1],  # a ReadyForQuery cut short
        wire.data_row(["x"]),
        wire.notice_response("hello"),  # asynchronous, after the ReadyForQuery
        b"Z\x00\x00\x00\x05X",  # no such status
    ],
    ids=["result", "cut-ready", "row", "notice", "bad-status"],
)
def test_not_at_ready_inside_a_response(legs: tuple[FakeLeg, FakeLeg, Pump], data: bytes) -> None:
    _, server, pump = legs
    server.deliver(data)
    assert not pump.atReady()


def test_client_bytes_do_not_change_at_ready(legs: tuple[FakeLeg, FakeLeg, Pump]) -> None:
    client, _, pump = legs
    client.deliver(query("select 1"))
    assert pump.atReady()


def test_at_ready_when_the_ready_for_query_is_split_over_two_reads(
    legs: tuple[FakeLeg, FakeLeg, Pump],
) -> None:
    """A ReadyForQuery whose last byte comes in a read of its own is still seen."""
    client, server, pump = legs
    server.deliver(b"C\x00\x00\x00\x0bSELECT 1\x00" + b"Z\x00\x00\x00\x05")
    assert not pump.atReady()
    server.deliver(b"I")
    assert pump.atReady()
