"""
Fuzzing PROXY protocol headers (v1 and v2) through Twisted's parsers
(C{twisted.protocols.haproxy}), which pgtls's listeners are to use for
C{listener.proxy_protocol} (issue 15).

pgtls's integration is not written yet, so L{read_header} below is how
this file expects pgtls to call Twisted: on the bytes received so far,
with a fresh C{V1Parser} or C{V2Parser} fed all of them, and with what
fuzzing showed Twisted leaves to its caller done here (L{_checked}): a
C{ValueError} from the v1 parser turned into C{InvalidProxyHeader}, the
v1 line held to the specification's 107 bytes, C{PROXY UNKNOWN} taken,
and the addresses and ports checked. Whoever writes the integration
should lift it (or its rules) into pgtls and point these tests at it.

Properties, for any bytes in any chunks:

 - a header built by L{v1} or L{v2} comes back with its addresses, and
   the bytes after it are left for the PostgreSQL protocol, untouched;
 - until a header is complete the answer is "need more", and what is
   held is bounded (107 bytes for v1, 16 + 65535 for v2, whatever the v2
   length field claims, which is never allocated ahead);
 - anything else raises C{InvalidProxyHeader} (C{InvalidNetworkProtocol}
   and C{MissingAddressData} are its subclasses), nothing else.

And, pinned as they are today so that a change in Twisted shows, what
Twisted's own parsers and wrapper do that the integration must not
inherit (L{test_twisted_v1_parser_lets_other_errors_through} and the
tests after it).
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from support.fuzz import CUTS, FUZZ, peak_allocation, split_at
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.protocols.haproxy._exceptions import (
    InvalidNetworkProtocol,
    InvalidProxyHeader,
    MissingAddressData,
)
from twisted.protocols.haproxy._info import ProxyInfo
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser
from twisted.protocols.haproxy._wrapper import HAProxyWrappingFactory

#: The longest v1 header, CRLF included (the specification's).
V1_MAX = 107
#: A v2 header's fixed part: signature, version and command, family, length.
V2_FIXED = 16
V2_SIGNATURE = V2Parser.PREFIX

# -- builders -------------------------------------------------------------------------


def v1(source: str, destination: str, sport: int, dport: int, family: str | None = None) -> bytes:
    """A v1 header line (C{family} C{TCP4} or C{TCP6}, from the addresses unless given)."""
    if family is None:
        family = "TCP6" if ":" in source else "TCP4"
    return f"PROXY {family} {source} {destination} {sport} {dport}\r\n".encode()


def v2(command: int = 1, family: int = 0x11, addresses: bytes = b"", tlvs: bytes = b"") -> bytes:
    """A v2 header: C{command} 0 (LOCAL) or 1 (PROXY), C{family} the family and transport byte."""
    body = addresses + tlvs
    return V2_SIGNATURE + bytes([0x20 | command, family]) + struct.pack("!H", len(body)) + body


def v2_inet(
    source: ipaddress.IPv4Address | ipaddress.IPv6Address,
    destination: ipaddress.IPv4Address | ipaddress.IPv6Address,
    sport: int,
    dport: int,
    tlvs: bytes = b"",
    transport: int = 1,
) -> bytes:
    family = 0x10 if source.version == 4 else 0x20
    addresses = source.packed + destination.packed + struct.pack("!HH", sport, dport)
    return v2(1, family | transport, addresses, tlvs)


def v2_unix(source: bytes, destination: bytes) -> bytes:
    return v2(1, 0x31, source.ljust(108, b"\0") + destination.ljust(108, b"\0"))


# -- the reader this file expects pgtls to have --------------------------------------------


def _checked(info: ProxyInfo) -> ProxyInfo:
    """Refuse what Twisted takes without looking: an address that is none, a port beyond 16 bits."""
    for address in (info.source, info.destination):
        if isinstance(address, (IPv4Address, IPv6Address)):
            try:
                parsed = ipaddress.ip_address(address.host)
            except ValueError:
                raise InvalidProxyHeader() from None
            if parsed.version != (4 if isinstance(address, IPv4Address) else 6):
                raise InvalidProxyHeader()
            if not 0 <= address.port <= 0xFFFF:
                raise InvalidProxyHeader()
    return info


def read_header(buffer: bytes) -> tuple[ProxyInfo, bytes] | None:
    """
    The PROXY header at the start of C{buffer} (everything received so
    far) and the bytes after it, or C{None} while it is incomplete.

    @raise InvalidProxyHeader: the bytes are no valid header.
    """
    head = buffer[: len(V2_SIGNATURE)]
    if V2_SIGNATURE.startswith(head) and (head or not buffer):
        if len(buffer) < V2_FIXED:
            return None
        info, rest = V2Parser().feed(buffer)
        return None if info is None else (_checked(info), rest or b"")
    if not b"PROXY ".startswith(buffer[:6]):
        raise InvalidProxyHeader()
    end = buffer.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(buffer) >= V1_MAX:
            raise InvalidProxyHeader()
        return None
    line, rest = buffer[:end], buffer[end + 2 :]
    if line == b"PROXY UNKNOWN" or line.startswith(b"PROXY UNKNOWN "):
        # Valid (the sender does not know the addresses): Twisted's v1
        # parser refuses the first form, which HAProxy sends.
        return ProxyInfo(line, None, None), rest
    try:
        info, _ = V1Parser().feed(line + b"\r\n")
    except ValueError:
        # A port that is not a number, an address that is not UTF-8:
        # Twisted lets int() and decode() raise through.
        raise InvalidProxyHeader() from None
    assert info is not None
    return _checked(info), rest


def read_chunks(chunks: list[bytes]) -> tuple[tuple[ProxyInfo, bytes] | None, int]:
    """
    L{read_header} on the bytes so far after each chunk, as a listener
    would: the first answer, and how many bytes were held when it came.
    """
    buffer = b""
    for chunk in chunks:
        buffer += chunk
        found = read_header(buffer)
        if found is not None:
            return found, len(buffer)
        # Held while waiting: bounded, whatever a length field claims.
        assert len(buffer) < (V2_FIXED + 0xFFFF if buffer[:1] == b"\r" else V1_MAX)
    return None, len(buffer)


# -- valid headers come back ---------------------------------------------------------------

_PORTS = st.integers(0, 0xFFFF)
_PAYLOAD = st.binary(max_size=40) | st.just(b"\0\0\0\x08\x04\xd2\x16\x2f")  # an SSLRequest


def _same(address: Any, ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> bool:
    return ipaddress.ip_address(address.host) == ip and address.port == port


@FUZZ
@given(st.sampled_from([4, 6]), st.data(), _PORTS, _PORTS, _PAYLOAD, CUTS)
def test_a_v1_header_comes_back(
    version: int, data: st.DataObject, sport: int, dport: int, payload: bytes, cuts: list[int]
) -> None:
    source = data.draw(st.ip_addresses(v=version))
    destination = data.draw(st.ip_addresses(v=version))
    header = v1(str(source), str(destination), sport, dport, f"TCP{version}")
    assert len(header) <= V1_MAX
    found, held = read_chunks(split_at(header + payload, cuts))
    assert found is not None
    info, rest = found
    assert info.header == header[:-2]
    assert _same(info.source, source, sport) and _same(info.destination, destination, dport)
    assert rest == (header + payload)[len(header) : held]


_TLVS = st.lists(
    st.tuples(st.integers(0, 255), st.binary(max_size=20)).map(
        lambda tlv: bytes([tlv[0]]) + struct.pack("!H", len(tlv[1])) + tlv[1]
    ),
    max_size=3,
).map(b"".join)


@FUZZ
@given(
    st.sampled_from(["inet", "inet6", "unix", "local", "unspec"]),
    st.data(),
    _PORTS,
    _PORTS,
    _TLVS,
    _PAYLOAD,
    CUTS,
)
def test_a_v2_header_comes_back(
    kind: str,
    data: st.DataObject,
    sport: int,
    dport: int,
    tlvs: bytes,
    payload: bytes,
    cuts: list[int],
) -> None:
    expected: tuple[Any, Any] = (None, None)
    if kind in ("inet", "inet6"):
        version = 4 if kind == "inet" else 6
        source = data.draw(st.ip_addresses(v=version))
        destination = data.draw(st.ip_addresses(v=version))
        header = v2_inet(source, destination, sport, dport, tlvs)
        expected = ((source, sport), (destination, dport))
    elif kind == "unix":
        names = st.binary(min_size=1, max_size=107).map(lambda b: b.replace(b"\0", b"/"))
        source_name, destination_name = data.draw(names), data.draw(names)
        header = v2_unix(source_name, destination_name)
        expected = (UNIXAddress(source_name), UNIXAddress(destination_name))
    else:
        header = v2(0, 0x11, tlvs) if kind == "local" else v2(1, 0x00, tlvs)
    found, held = read_chunks(split_at(header + payload, cuts))
    assert found is not None
    info, rest = found
    assert info.header == header
    assert rest == (header + payload)[len(header) : held]
    if kind in ("inet", "inet6"):
        assert _same(info.source, *expected[0]) and _same(info.destination, *expected[1])
    else:
        assert (info.source, info.destination) == expected


# -- anything else is refused, and nothing is held beyond the bounds --------------------------------


@st.composite
def near_headers(draw: st.DrawFn) -> bytes:
    """A valid header with a piece replaced, or bytes made of the pieces headers are made of."""
    valid = draw(
        st.sampled_from(
            [
                v1("192.0.2.1", "198.51.100.2", 5432, 6432),
                v1("2001:db8::1", "2001:db8::2", 1, 2),
                v2_inet(ipaddress.ip_address("192.0.2.1"), ipaddress.ip_address("192.0.2.2"), 1, 2),
                v2(0),
                v2_unix(b"/a", b"/b"),
            ]
        )
    )
    at = draw(st.integers(0, len(valid)))
    piece = draw(
        st.sampled_from(
            [
                b"",
                b" ",
                b"\r\n",
                b"TCP4",
                b"TCP6",
                b"UNKNOWN",
                b"x",
                b"\xff",
                b"99999",
                b"-1",
                b"1" * 5000,
                b"::",
                b"\0",
                b"\x21",
                b"\x20",
                b"\x13",
                b"\x41",
                b"\xff\xff",
            ]
        )  # fmt: skip
        | st.binary(max_size=8)
    )
    cut = draw(st.integers(0, 8))
    return valid[:at] + piece + valid[at + cut :]


@FUZZ
@given(near_headers() | st.binary(max_size=120), CUTS)
@example(b"PROXY TCP4 192.0.2.1 192.0.2.2 x 80\r\n", [])
@example(b"PROXY TCP4 \xff 192.0.2.2 1 80\r\n", [])
@example(b"PROXY TCP4 192.0.2.1 192.0.2.2 99999 80\r\n", [])
@example(b"PROXY TCP4 " + b"1" * 200 + b"\r\n", [])
@example(V2_SIGNATURE + b"\x21\x11\xff\xff", [])
def test_anything_else_is_refused(data: bytes, cuts: list[int]) -> None:
    try:
        found, held = read_chunks(split_at(data, cuts))
    except InvalidProxyHeader:
        return
    if found is None:
        # Still waiting: a prefix of something that may yet be a header.
        assert held == len(data)
        assert len(data) < V1_MAX or data.startswith(V2_SIGNATURE)
        return
    # Taken: the header is a prefix (v1: its CRLF follows), the rest is what came after.
    info, rest = found
    used = held - len(rest)
    assert data.startswith(info.header) and data[used:held] == rest
    assert used - len(info.header) in (0, 2)


def test_a_v2_length_is_not_allocated_ahead() -> None:
    """A v2 header claiming 65535 bytes: nothing of the kind is allocated before they come."""
    header = V2_SIGNATURE + b"\x21\x11\xff\xff"
    assert peak_allocation(lambda: read_header(header)) < 4096
    parser = V2Parser()
    assert parser.feed(header) == (None, None)
    assert len(parser.buffer) == len(header)


def test_a_v1_line_is_refused_past_107_bytes() -> None:
    """Even with its CRLF further on: the specification's limit, whatever arrived at once."""
    line = b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2" + b" " * 80 + b"\r\n"
    with pytest.raises(InvalidProxyHeader):
        read_header(line)
    assert read_header(b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2" + b" " * 60) is None


# -- what Twisted does today that the integration must not inherit --------------------------------


@pytest.mark.parametrize(
    "line, error",
    [
        (b"PROXY TCP4 192.0.2.1 192.0.2.2 x 80\r\n", ValueError),
        (b"PROXY TCP4 \xff 192.0.2.2 1 80\r\n", UnicodeDecodeError),
        (b"PROXY TCP4 192.0.2.1 192.0.2.2 " + b"1" * 5000 + b" 80\r\n", ValueError),
    ],
)
def test_twisted_v1_parser_lets_other_errors_through(line: bytes, error: type) -> None:
    """
    Not C{InvalidProxyHeader}: C{int()} and C{decode()} raise through
    C{V1Parser.feed} (L{read_header} converts them).
    """
    with pytest.raises(error) as info:
        V1Parser().feed(line)
    assert not isinstance(info.value, InvalidProxyHeader)
    with pytest.raises(InvalidProxyHeader):
        read_header(line)


def test_twisted_v1_parser_takes_what_is_no_address() -> None:
    """Ports beyond 16 bits and hosts that are not addresses pass (L{_checked} refuses them)."""
    for line in (
        b"PROXY TCP4 192.0.2.1 192.0.2.2 99999 -1\r\n",
        b"PROXY TCP6 nonsense x 1 2\r\n",
        b"PROXY TCP4 ::1 192.0.2.2 1 2\r\n",
    ):
        info, _ = V1Parser().feed(line)
        assert info is not None
        with pytest.raises(InvalidProxyHeader):
            read_header(line)


def test_twisted_v1_parser_refuses_proxy_unknown() -> None:
    """C{PROXY UNKNOWN\\r\\n} is valid v1 (the sender has no addresses to give)."""
    with pytest.raises(InvalidNetworkProtocol):
        V1Parser().feed(b"PROXY UNKNOWN\r\n")
    found = read_header(b"PROXY UNKNOWN\r\nrest")
    assert found is not None and found[0].source is None and found[1] == b"rest"


def test_twisted_v2_parser_needs_16_bytes_at_once() -> None:
    """
    C{V2Parser.feed} refuses a first chunk shorter than the fixed part
    (L{read_header} waits for 16 bytes before it feeds one); and a v2
    header with too few address bytes for its family is C{MissingAddressData}.
    """
    header = v2_inet(ipaddress.ip_address("192.0.2.1"), ipaddress.ip_address("192.0.2.2"), 1, 2)
    with pytest.raises(InvalidProxyHeader):
        V2Parser().feed(header[:15])
    assert read_header(header[:15]) is None
    with pytest.raises(MissingAddressData):
        read_header(v2(1, 0x11, b"\1\2\3\4"))


class _Recorder(Protocol):
    def __init__(self) -> None:
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data


def _wrapped() -> tuple[Any, StringTransport]:
    factory = HAProxyWrappingFactory(Factory.forProtocol(_Recorder))
    protocol = factory.buildProtocol(IPv4Address("TCP", "10.0.0.1", 1234))
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def test_twisted_wrapper_needs_the_header_start_in_one_chunk() -> None:
    """
    C{HAProxyWrappingFactory} (what C{proxyEndpoint} uses) decides on the
    first chunk alone: a v2 header whose first TCP segment has fewer than
    16 bytes, or a v1 one with fewer than 8, loses the connection. A
    listener cannot use it as it is if a header may arrive cut.
    """
    header = v2_inet(ipaddress.ip_address("192.0.2.1"), ipaddress.ip_address("192.0.2.2"), 1, 2)
    protocol, transport = _wrapped()
    protocol.dataReceived(header + b"x")
    assert not transport.disconnecting
    assert protocol.getPeer() == IPv4Address("TCP", "192.0.2.1", 1)
    assert protocol.wrappedProtocol.received == b"x"
    for first in (header[:15], b"PROXY "):
        protocol, transport = _wrapped()
        protocol.dataReceived(first)
        assert transport.disconnecting


def test_twisted_wrapper_lets_a_value_error_escape() -> None:
    """Its C{dataReceived} catches C{InvalidProxyHeader} only: a bad port raises out of it."""
    protocol, transport = _wrapped()
    with pytest.raises(ValueError):
        protocol.dataReceived(b"PROXY TCP4 192.0.2.1 192.0.2.2 x 80\r\n")
