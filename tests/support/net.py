"""
Loopback ports: free ones to listen on, and whether something listens.

Everything here blocks (briefly): from a test that runs the reactor, call
it with L{support.waiting.in_thread}.
"""

from __future__ import annotations

import socket


def free_ports(count: int) -> list[int]:
    """C{count} distinct free loopback ports (all bound at once, so none repeats)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    """A free loopback port (free now: nothing keeps another process from taking it)."""
    (port,) = free_ports(1)
    return port


def refused(port: int) -> bool:
    """Whether a TCP connection to 127.0.0.1:C{port} is refused now."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:
        # Queued on a listener that was closing: reset, as README says
        # (SO_REUSEPORT); the port is no longer served either way.
        return True
    return False


def accepting(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:C{port} now."""
    return not refused(port)
