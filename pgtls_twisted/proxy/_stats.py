# -*- test-case-name: tests.test_frontend -*-
"""
What pgtls learns about one client connection, for its close log line and
the traffic figures.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class ConnectionStats:
    """
    Filled in by whoever learns each fact: the client leg (its TLS, why it
    closed), the session (the backend's TLS, errors), the byte pump and the
    pooled session (bytes). Slotted: the byte counts are updated for every
    chunk.

    @ivar reason: why the connection closed (or is closing), the first
        reason given; C{None} until then.
    @ivar bytes_in: bytes from the client to the server, after startup.
    @ivar bytes_out: bytes from the server to the client, after startup.
    @ivar client_tls: the client leg's TLS version and cipher
        (L{pgtls_twisted.tls._contexts.describe_tls}), or C{None} (plaintext,
        or not known yet).
    @ivar backend_tls: the same for the backend leg of a pass-through
        session.
    """

    reason: str | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    client_tls: dict[str, str | None] | None = None
    backend_tls: dict[str, str | None] | None = None
