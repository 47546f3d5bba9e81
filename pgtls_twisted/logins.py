# -*- test-case-name: tests.test_logins -*-
"""
How many clients of a route may be logging in at once.

A client that has not logged in costs pgtls a TLS handshake and a backend
connection (the server's own C{authentication_timeout} and
C{max_connections} included), and it costs the attacker nothing but a
socket. So, per route (L{LoginGate}):

 - at most C{listener.max_logins} connections are logging in at once; a
   connection beyond that waits, unread, for a slot (I{briefly}:
   L{LoginGate.wait}), and is then refused with 53300;
 - at most C{listener.max_logins_per_address} of the connections that
   are logging in or waiting come from one client address; one more is
   refused at once.

"Logging in" lasts from accept to the end of authentication; sessions
that are logged in never count, so a flood can slow down new logins but
never touches a working session, and one address cannot take every slot.

This module is bookkeeping only (no protocol, no sockets), like
L{pgtls_twisted.pool}; its clock is injected.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from typing import Any

#: The longest a connection waits for a login slot.
MAX_WAIT = 5.0


class TooManyLogins(Exception):
    """Refused: the text is for the client's ErrorResponse (53300) and the log."""


class TicketState(enum.Enum):
    WAITING = "waiting"
    ACTIVE = "active"
    DONE = "done"


class Ticket:
    """
    One connection's place at the gate.

    @ivar state: L{TicketState.WAITING} in line, L{TicketState.ACTIVE}
        holding a slot, L{TicketState.DONE} after L{LoginGate.leave}.
    """

    def __init__(
        self, address: str, admitted: Callable[[], None], expired: Callable[[str], None]
    ) -> None:
        self.address = address
        self.state = TicketState.WAITING
        self._admitted = admitted
        self._expired = expired
        self.timer: Any = None


class LoginGate:
    """
    @param maxLogins: connections of the route logging in at once.
    @param maxPerAddress: connections logging in or waiting, per address.
    @param wait: how long one waits for a slot before it is refused.
    """

    def __init__(self, clock: Any, maxLogins: int, maxPerAddress: int, wait: float) -> None:
        self._clock = clock
        self.maxLogins = maxLogins
        self.maxPerAddress = maxPerAddress
        self.wait = wait
        #: Connections holding a slot.
        self.active = 0
        self._waiting: deque[Ticket] = deque()
        self._perAddress: dict[str, int] = {}

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def arrive(
        self, address: str, admitted: Callable[[], None], expired: Callable[[str], None]
    ) -> Ticket:
        """
        A new connection from C{address}.

        @param admitted: called when a waiting ticket gets its slot (not
            for one admitted at once: see the returned ticket's state).
        @param expired: called with the refusal's text when the wait is over.
        @raise TooManyLogins: C{address} already has C{maxPerAddress}.
        """
        count = self._perAddress.get(address, 0)
        if count >= self.maxPerAddress:
            raise TooManyLogins(
                f"pgtls: too many connections from {address} are logging in"
                f" (listener.max_logins_per_address = {self.maxPerAddress})"
            )
        self._perAddress[address] = count + 1
        ticket = Ticket(address, admitted, expired)
        if self.active < self.maxLogins:
            self.active += 1
            ticket.state = TicketState.ACTIVE
        else:
            ticket.timer = self._clock.callLater(self.wait, self._expire, ticket)
            self._waiting.append(ticket)
        return ticket

    def leave(self, ticket: Ticket) -> None:
        """The connection logged in or went away: its place is free. Idempotent."""
        if ticket.state is TicketState.DONE:
            return
        if ticket.state is TicketState.WAITING:
            self._waiting.remove(ticket)
            if ticket.timer.active():
                ticket.timer.cancel()
        else:
            self.active -= 1
        ticket.state = TicketState.DONE
        count = self._perAddress[ticket.address] - 1
        if count:
            self._perAddress[ticket.address] = count
        else:
            del self._perAddress[ticket.address]
        self._admitNext()

    def _admitNext(self) -> None:
        while self._waiting and self.active < self.maxLogins:
            ticket = self._waiting.popleft()
            ticket.timer.cancel()
            ticket.state = TicketState.ACTIVE
            self.active += 1
            ticket._admitted()

    def _expire(self, ticket: Ticket) -> None:
        self.leave(ticket)
        ticket._expired(
            f"pgtls: too many logins in progress (listener.max_logins = {self.maxLogins});"
            " try again later"
        )
