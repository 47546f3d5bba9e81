"""L{pgtls_twisted.proxy._logins.LoginGate}: the bookkeeping of login slots."""

from __future__ import annotations

import pytest

from pgtls_twisted.proxy._logins import LoginGate, TicketState, TooManyLogins


class Admissions:
    def __init__(self) -> None:
        self.order: list[str] = []

    def __call__(self, name: str):  # type: ignore[no-untyped-def]
        return lambda: self.order.append(name)


def test_slots_then_waiting_in_order() -> None:
    gate, admitted = LoginGate(maxLogins=2, maxPerAddress=10, maxWaiting=10), Admissions()
    a, b, c, d = (gate.arrive("10.0.0.1", admitted(n)) for n in "abcd")
    assert [t.state for t in (a, b, c, d)] == [TicketState.ACTIVE] * 2 + [TicketState.WAITING] * 2
    assert (gate.active, gate.waiting) == (2, 2)
    gate.leave(b)
    assert admitted.order == ["c"]
    assert c.state is TicketState.ACTIVE and gate.waiting == 1
    gate.leave(b)  # idempotent
    assert (gate.active, admitted.order) == (2, ["c"])


def test_one_address_cannot_take_every_slot() -> None:
    gate, admitted = LoginGate(maxLogins=10, maxPerAddress=3, maxWaiting=10), Admissions()
    mine = [gate.arrive("10.0.0.66", admitted(f"m{i}")) for i in range(5)]
    assert [t.state for t in mine] == [TicketState.ACTIVE] * 3 + [TicketState.WAITING] * 2
    assert "max_logins_per_address = 3" in gate.refusal(mine[3])
    # Another address goes first, past the waiting ones.
    assert gate.arrive("10.0.0.2", admitted("other")).state is TicketState.ACTIVE
    gate.leave(mine[0])
    assert admitted.order == ["m3"]


def test_the_first_waiting_ticket_that_may_start_goes_first() -> None:
    gate, admitted = LoginGate(maxLogins=2, maxPerAddress=1, maxWaiting=10), Admissions()
    x1 = gate.arrive("x", admitted("x1"))
    y1 = gate.arrive("y", admitted("y1"))
    gate.arrive("x", admitted("x2"))  # waits: x is at its limit
    gate.arrive("z", admitted("z1"))  # waits: no slot
    gate.leave(y1)  # x2 may not start (x1 is still logging in), z1 may
    assert admitted.order == ["z1"]
    gate.leave(x1)
    assert admitted.order == ["z1", "x2"]


def test_a_waiting_ticket_that_leaves_frees_its_place() -> None:
    gate, admitted = LoginGate(maxLogins=1, maxPerAddress=5, maxWaiting=1), Admissions()
    first = gate.arrive("a", admitted("first"))
    quitter = gate.arrive("a", admitted("quitter"))
    with pytest.raises(TooManyLogins, match="waiting to log in"):
        gate.arrive("b", admitted("late"))
    gate.leave(quitter)
    assert gate.waiting == 0
    gate.leave(first)
    assert admitted.order == [] and gate.active == 0
    gate.arrive("c", admitted("c"))
    assert "max_logins = 1" in gate.refusal(gate.arrive("d", admitted("d")))


def test_what_counts_as_one_address() -> None:
    from pgtls_twisted.proxy._logins import address_key

    assert address_key("127.0.0.2") == "127.0.0.2"
    assert address_key("::ffff:10.1.2.3") == "10.1.2.3"
    # One IPv6 host can use any address of its /64.
    assert (
        address_key("2001:db8:1:2::1") == address_key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    )
    assert address_key("2001:db8:1:3::1") != address_key("2001:db8:1:2::1")
    assert address_key("not an address") == "not an address"
