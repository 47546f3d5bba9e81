# -*- test-case-name: tests.test_reload_plan,tests.test_reload -*-
"""
What a reload changes, decided from the two configurations alone.

L{plan_reload} is pure (configurations in, a L{ReloadPlan} out), so the
rules can be read and tested without a socket; the service
(L{pgtls_twisted.app._service.ProxyService.reload}) then builds what the
plan says, binds what must be bound, and changes nothing if anything
fails.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from pgtls_twisted.config import RouteConfig


@dataclass
class ReloadPlan:
    """
    @ivar build: routes to build anew (added or changed), by name, in the
        order of the new file.
    @ivar keep: unchanged routes (only their certificates are re-read).
    @ivar remove: routes that are gone (their sessions go on).
    @ivar takeOver: for a route to build, the current route whose
        listening socket it takes over: its own predecessor on an
        unchanged address, or a removed route on the same address (a
        rename). Routes to build that are not here bind a new socket.
    """

    build: list[str] = field(default_factory=list)
    keep: list[str] = field(default_factory=list)
    remove: list[str] = field(default_factory=list)
    takeOver: dict[str, str] = field(default_factory=dict)

    def renamedFrom(self, name: str) -> str | None:
        """The removed route whose socket the added route C{name} takes over."""
        source = self.takeOver.get(name)
        return source if source is not None and source != name else None


def plan_reload(current: Mapping[str, RouteConfig], new: Sequence[RouteConfig]) -> ReloadPlan:
    """
    @param current: the routes serving now, by name.
    @param new: the routes of the new configuration, in file order.
    """
    plan = ReloadPlan()
    names = {route.name for route in new}
    plan.remove = [name for name in current if name not in names]
    vacated = {current[name].listener.bind_address: name for name in plan.remove}
    for route in new:
        old = current.get(route.name)
        if old is not None and old == route:
            plan.keep.append(route.name)
            continue
        plan.build.append(route.name)
        address = route.listener.bind_address
        if old is not None and old.listener.bind_address == address:
            plan.takeOver[route.name] = route.name
        elif old is None and address in vacated:
            plan.takeOver[route.name] = vacated.pop(address)
    return plan
