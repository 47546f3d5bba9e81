# -*- test-case-name: tests.test_security_misc -*-
"""
Startup parameters read as PostgreSQL reads them. Pure: no Twisted, no I/O.
"""

from __future__ import annotations


def _parse_bool(text: str) -> bool | None:
    """
    PostgreSQL's C{parse_bool}: C{true}, C{false}, C{yes}, C{no} or any
    prefix of them, C{on} and C{off} (at least two letters), C{1} and
    C{0}, in any ASCII letter case; C{None} for anything else.
    """
    if not text.isascii():
        return None
    word = text.lower()
    for whole, value in (("true", True), ("false", False), ("yes", True), ("no", False)):
        if word and whole.startswith(word):
            return value
    if len(word) >= 2:
        if "on".startswith(word):
            return True
        if "off".startswith(word):
            return False
    return {"1": True, "0": False}.get(word)


def replication_kind(value: str | None) -> str | None:
    """
    What the C{replication} startup parameter asks for, read as PostgreSQL
    reads it (C{ProcessStartupPacket}): exactly C{"database"} is logical
    replication, a true boolean physical replication, a false one (or no
    parameter) none.

    @return: C{"logical"}, C{"physical"} or C{None}.
    @raise ValueError: a value PostgreSQL refuses (FATAL 22023).
    """
    if value is None:
        return None
    if value == "database":
        return "logical"
    enabled = _parse_bool(value)
    if enabled is None:
        raise ValueError(value)
    return "physical" if enabled else None
