# -*- test-case-name: tests.test_unit_peers,tests.test_fuzz_proxyheader -*-
"""
Building PROXY protocol version 2 headers.

pgtls reads PROXY headers with Twisted's parsers (see
L{pgtls_twisted.tls._private}); it writes one in a single case: a
CancelRequest passed to another instance of a cluster whose listener
expects a header (L{pgtls_twisted.proxy._peers}). The header names the
client that sent the request, so that the peer's logs, metrics and
per-address rules see that client and not the instance that passed it on.

Version 2 is binary and so unambiguous about addresses; Twisted has no
builder, and the format is short (HAProxy's proxy-protocol.txt, section
2.2): a 12-byte signature, a version and command byte, an address family
and transport byte, the length of what follows, then the addresses and
ports in network order.
"""

from __future__ import annotations

import ipaddress
import struct

__all__ = ["V2_SIGNATURE", "local_header", "proxy_header"]

#: The first 12 bytes of every version 2 header.
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_PROXY = 0x21  # version 2, command PROXY
_LOCAL = 0x20  # version 2, command LOCAL
_TCP4 = 0x11
_TCP6 = 0x21


def local_header() -> bytes:
    """
    A LOCAL header: the connection is the sender's own, and the receiver
    keeps the address it sees (used when the client's is unknown).
    """
    return V2_SIGNATURE + struct.pack("!BBH", _LOCAL, 0, 0)


def proxy_header(source: tuple[str, int], destination: tuple[str, int] | None = None) -> bytes:
    """
    A PROXY header for a TCP connection from C{source} to C{destination}.

    @param source: the client's (host, port); the host an IPv4 or IPv6
        address (an IPv4-mapped IPv6 address is written as IPv4).
    @param destination: the (host, port) it connected to; left out, or of
        the other family, it is written as the unspecified address and port
        0 (the format wants both of one family, and the receiver uses only
        the source).
    @raise ValueError: C{source} is not an IP address and port.
    """
    host = _address(source[0])
    port = _port(source[1])
    target: ipaddress.IPv4Address | ipaddress.IPv6Address
    targetPort = 0
    if destination is not None and (candidate := _addressOrNone(destination[0])) is not None:
        if candidate.version == host.version:
            target, targetPort = candidate, _port(destination[1])
        else:
            target = ipaddress.ip_address("0.0.0.0" if host.version == 4 else "::")
    else:
        target = ipaddress.ip_address("0.0.0.0" if host.version == 4 else "::")
    family = _TCP4 if host.version == 4 else _TCP6
    body = host.packed + target.packed + struct.pack("!HH", port, targetPort)
    return V2_SIGNATURE + struct.pack("!BBH", _PROXY, family, len(body)) + body


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    address = ipaddress.ip_address(text.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _addressOrNone(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return _address(text)
    except ValueError:
        return None


def _port(port: int) -> int:
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port {port} out of range")
    return port
