# -*- test-case-name: tests.test_logins,tests.test_security_startup -*-
"""
How many clients of a route may be logging in at once.

A client that has not logged in costs pgtls a TLS handshake and a backend
connection (the server's own C{authentication_timeout} and
C{max_connections} included), and it costs the attacker nothing but a
socket. So, per route (L{LoginGate}):

 - at most C{listener.max_logins} connections are logging in at once;
 - at most C{listener.max_logins_per_address} of them come from one client
   address, so one address cannot take every slot;
 - a connection beyond either limit waits in line, unread (no handshake,
   no backend), until a slot it may use is free; its C{login_timeout}
   runs meanwhile, and a connection still waiting when it ends is refused
   with 53300. A burst of logins from one application server is served a
   slot at a time instead of refused.
 - at most C{maxWaiting} connections wait; one more is refused at once.

"Logging in" lasts from accept to the end of authentication; sessions that
are logged in never count, and waiting connections do not count against
C{max_clients} (L{pgtls_twisted.proxy._route.Route.admission}), so a flood can
slow down new logins but never touches a working session, and one address
cannot lock out the others.

This module is bookkeeping only (no protocol, no sockets, no clock), like
L{pgtls_twisted.pool._pool}.
"""

from __future__ import annotations

import enum
import ipaddress
from collections import deque
from collections.abc import Callable


def address_key(host: str) -> str:
    """
    What counts as one client address for C{max_logins_per_address}: an
    IPv4 address (an IPv4-mapped IPv6 one too), or an IPv6 /64 (one
    subscriber's network: a single host can take any address in it).
    """
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


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

    def __init__(self, address: str, admitted: Callable[[], None]) -> None:
        self.address = address
        self.state = TicketState.WAITING
        self._admitted = admitted


class LoginGate:
    """
    @param maxLogins: connections of the route logging in at once.
    @param maxPerAddress: of those, from one address.
    @param maxWaiting: connections waiting for a slot.
    """

    def __init__(self, maxLogins: int, maxPerAddress: int, maxWaiting: int) -> None:
        self.maxLogins = maxLogins
        self.maxPerAddress = maxPerAddress
        self.maxWaiting = maxWaiting
        #: Connections holding a slot.
        self.active = 0
        self._waiting: deque[Ticket] = deque()
        self._perAddress: dict[str, int] = {}

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def arrive(self, address: str, admitted: Callable[[], None]) -> Ticket:
        """
        A new connection from C{address}: a ticket that is
        L{TicketState.ACTIVE} (log in now) or L{TicketState.WAITING}
        (C{admitted} is called when its turn comes).

        @raise TooManyLogins: the line is full.
        """
        ticket = Ticket(address, admitted)
        if self._mayStart(address):
            self._start(ticket)
        elif len(self._waiting) < self.maxWaiting:
            self._waiting.append(ticket)
        else:
            raise TooManyLogins(
                f"pgtls: too many connections are waiting to log in ({self.maxWaiting})"
            )
        return ticket

    def refusal(self, ticket: Ticket) -> str:
        """Why C{ticket} is still waiting, for its 53300 when its time is up."""
        if self._perAddress.get(ticket.address, 0) >= self.maxPerAddress:
            return (
                f"pgtls: too many connections from {ticket.address} are logging in"
                f" (listener.max_logins_per_address = {self.maxPerAddress})"
            )
        return f"pgtls: too many logins in progress (listener.max_logins = {self.maxLogins})"

    def leave(self, ticket: Ticket) -> None:
        """The connection logged in, gave up or went away. Idempotent."""
        if ticket.state is TicketState.DONE:
            return
        if ticket.state is TicketState.WAITING:
            self._waiting.remove(ticket)
            ticket.state = TicketState.DONE
            return
        ticket.state = TicketState.DONE
        self.active -= 1
        count = self._perAddress[ticket.address] - 1
        if count:
            self._perAddress[ticket.address] = count
        else:
            del self._perAddress[ticket.address]
        self._admitNext()

    def _mayStart(self, address: str) -> bool:
        return (
            self.active < self.maxLogins and self._perAddress.get(address, 0) < self.maxPerAddress
        )

    def _start(self, ticket: Ticket) -> None:
        ticket.state = TicketState.ACTIVE
        self.active += 1
        self._perAddress[ticket.address] = self._perAddress.get(ticket.address, 0) + 1

    def _admitNext(self) -> None:
        """The first waiting ticket that may start now, in order of arrival."""
        if self.active >= self.maxLogins:
            return
        for ticket in self._waiting:
            if self._mayStart(ticket.address):
                self._waiting.remove(ticket)
                self._start(ticket)
                ticket._admitted()
                return
