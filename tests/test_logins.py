"""L{pgtls_twisted.logins.LoginGate}: the bookkeeping of login slots, on a fake clock."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from pgtls_twisted.logins import LoginGate, TicketState, TooManyLogins


class Events:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def admitted(self, name: str):  # type: ignore[no-untyped-def]
        return lambda: self.seen.append(("admitted", name))

    def expired(self, name: str):  # type: ignore[no-untyped-def]
        return lambda text: self.seen.append(("expired", name))


def arrive(gate: LoginGate, events: Events, name: str, address: str = "10.0.0.1"):  # type: ignore[no-untyped-def]
    return gate.arrive(address, events.admitted(name), events.expired(name))


def test_slots_then_waiting_in_order() -> None:
    clock, events = Clock(), Events()
    gate = LoginGate(clock, maxLogins=2, maxPerAddress=10, wait=5)
    a, b = arrive(gate, events, "a"), arrive(gate, events, "b")
    c, d = arrive(gate, events, "c"), arrive(gate, events, "d")
    assert [t.state for t in (a, b, c, d)] == [TicketState.ACTIVE] * 2 + [TicketState.WAITING] * 2
    assert (gate.active, gate.waiting) == (2, 2)
    gate.leave(b)
    assert events.seen == [("admitted", "c")]
    assert c.state is TicketState.ACTIVE and gate.waiting == 1
    gate.leave(b)  # idempotent
    assert gate.active == 2


def test_waiting_is_brief() -> None:
    clock, events = Clock(), Events()
    gate = LoginGate(clock, maxLogins=1, maxPerAddress=10, wait=5)
    arrive(gate, events, "a")
    late = arrive(gate, events, "late")
    clock.advance(4.9)
    assert events.seen == []
    clock.advance(0.2)
    assert events.seen == [("expired", "late")]
    assert late.state is TicketState.DONE
    assert (gate.active, gate.waiting) == (1, 0)


def test_leaving_the_line_cancels_the_wait() -> None:
    clock, events = Clock(), Events()
    gate = LoginGate(clock, maxLogins=1, maxPerAddress=10, wait=5)
    arrive(gate, events, "a")
    quitter = arrive(gate, events, "quitter")
    gate.leave(quitter)
    clock.advance(10)
    assert events.seen == [] and clock.getDelayedCalls() == []


def test_one_address_cannot_take_every_slot() -> None:
    clock, events = Clock(), Events()
    gate = LoginGate(clock, maxLogins=10, maxPerAddress=3, wait=5)
    mine = [arrive(gate, events, f"m{i}", "10.0.0.66") for i in range(3)]
    with pytest.raises(TooManyLogins, match="too many connections from 10.0.0.66"):
        arrive(gate, events, "m3", "10.0.0.66")
    assert arrive(gate, events, "other", "10.0.0.2").state is TicketState.ACTIVE
    gate.leave(mine[0])
    assert arrive(gate, events, "m4", "10.0.0.66").state is TicketState.ACTIVE


def test_waiting_counts_against_the_address() -> None:
    clock, events = Clock(), Events()
    gate = LoginGate(clock, maxLogins=1, maxPerAddress=2, wait=5)
    arrive(gate, events, "a", "x")
    arrive(gate, events, "b", "x")  # waits
    with pytest.raises(TooManyLogins):
        arrive(gate, events, "c", "x")
