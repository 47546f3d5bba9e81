"""
Fuzzing PROXY protocol headers (v1 and v2) where pgtls reads them: the
client leg of a route with C{listener.proxy_protocol}
(L{pgtls_twisted.proxy._frontend.ClientProtocol}, C{_proxyHeaderData}),
which picks Twisted's C{V1Parser} or C{V2Parser} through
L{pgtls_twisted.tls._private.proxyHeaderParser}; and pgtls's own v2
builder (L{pgtls_twisted.protocol._proxyheader}, which passes cancels
between instances) read back by Twisted's parser.

The leg is driven in memory (L{drive}): accepted from a trusted balancer,
fed any bytes in any chunks. Properties:

 - nothing escapes C{dataReceived} and nothing is logged as an error;
 - the connection is refused (aborted, nothing written, counted as
   C{proxy_protocol}), or admitted with the header's source as the
   client's address (C{peerAddress}, the C{open peer=} line) and the
   bytes after the header handed on untouched, or still waiting;
 - a valid header (this file's builders and pgtls's) is admitted, cut
   anywhere: L{test_a_header_cut_anywhere_is_admitted} tries every cut;
 - while waiting, what is held is bounded: 107 bytes for v1, 16 + 65535
   for v2 whatever its length field claims, which is never allocated
   ahead;
 - from an untrusted peer, everything is refused, a valid header too.

And, pinned as they are today so that a change in Twisted shows, what
Twisted's parsers and wrapper do on their own, and what of it pgtls takes
as it is (README's "By design"): L{test_twisted_v1_parser_lets_other_errors_through}
and the tests after it.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from support.fakes import CLIENT_ADDRESS, ClientTransport, make_route, startup_message
from support.fuzz import CUTS, FUZZ, fuzz, peak_allocation, split_at
from support.logcapture import captured, logged_errors
from support.proxyheader import v1_header, v2_header
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.protocols.haproxy._exceptions import (
    InvalidNetworkProtocol,
    InvalidProxyHeader,
    MissingAddressData,
)
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser
from twisted.protocols.haproxy._wrapper import HAProxyWrappingFactory

from pgtls_twisted.protocol import _wire as wire
from pgtls_twisted.protocol._proxyheader import local_header, proxy_header
from pgtls_twisted.proxy._frontend import ClientProtocol
from pgtls_twisted.proxy._leg import Phase
from pgtls_twisted.proxy._route import Route
from pgtls_twisted.testing.pki import PKI

#: The longest v1 header, CRLF included (the specification's).
V1_MAX = 107
#: A v2 header's fixed part: signature, version and command, family, length.
V2_FIXED = 16
V2_SIGNATURE = V2Parser.PREFIX
#: The balancer: in the route's C{proxy_trusted}.
BALANCER = CLIENT_ADDRESS
UNTRUSTED = IPv4Address("TCP", "192.0.2.200", 4321)

IP = ipaddress.IPv4Address | ipaddress.IPv6Address

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


def v2_inet(source: IP, destination: IP, sport: int, dport: int, tlvs: bytes = b"") -> bytes:
    family = 0x11 if source.version == 4 else 0x21
    return v2(
        1, family, source.packed + destination.packed + struct.pack("!HH", sport, dport), tlvs
    )


def v2_unix(source: bytes, destination: bytes) -> bytes:
    return v2(1, 0x31, source.ljust(108, b"\0") + destination.ljust(108, b"\0"))


# -- the client leg, driven in memory --------------------------------------------------


@pytest.fixture(scope="module")
def route(pki: PKI, tmp_path_factory: pytest.TempPathFactory) -> Route:
    """A route behind a balancer (C{BALANCER} trusted), taking plaintext clients too."""
    return make_route(
        pki,
        Path(tmp_path_factory.mktemp("fuzzproxy")),
        listener={"proxy_protocol": True, "proxy_trusted": ["127.0.0.0/8"], "tls": "allow"},
    )


class _Leg(ClientProtocol):
    """
    The client leg, recording what reaches its own C{dataReceived}: while
    the header is awaited, an instance attribute stands in front of it, so
    what it sees is what the header left (and what came after).
    """

    def __init__(self, route: Route) -> None:
        super().__init__(route)
        self.handed = bytearray()

    def dataReceived(self, data: bytes) -> None:
        self.handed += data
        super().dataReceived(data)


@dataclass
class Outcome:
    """What became of a connection fed a stream (L{drive})."""

    proto: _Leg
    transport: ClientTransport
    #: Counted as refused for C{proxy_protocol}.
    refused: bool
    #: Bytes fed when the header was taken (admitted), else C{None}.
    admittedAt: int | None
    #: Where the leg was when the last chunk had been read.
    phase: Phase
    events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def waiting(self) -> bool:
        return not self.refused and self.admittedAt is None


def _awaiting(proto: ClientProtocol) -> bool:
    return bool(proto.dataReceived == proto._proxyHeaderData)


def _held(proto: ClientProtocol) -> int:
    """What the leg holds of a header not yet whole, checked against its bound."""
    parser = proto._proxyParser
    head = len(proto._proxyHead)
    assert head < V2_FIXED
    if parser is None:
        return head
    buffered = parser.buffer
    if isinstance(parser, V2Parser):
        (claimed,) = struct.unpack("!H", buffered[14:16])
        assert len(buffered) < V2_FIXED + claimed <= V2_FIXED + 0xFFFF
    else:
        assert isinstance(parser, V1Parser) and len(buffered) <= V1_MAX
    return head + len(buffered)


def drive(route: Route, chunks: list[bytes], peer: Any = BALANCER) -> Outcome:
    """
    A connection from C{peer}, fed C{chunks} (empty ones left out: a socket
    never delivers one), then lost; with the bound of what is held checked
    after every chunk while the header is awaited.
    """
    refusals = route.metrics.stats[route.name].refused
    before = refusals["proxy_protocol"]
    proto = _Leg(route)
    transport = ClientTransport()
    transport.peerAddr = peer
    fed = 0
    admittedAt = None
    with captured() as events:
        proto.makeConnection(transport)
        for chunk in filter(None, chunks):
            awaiting = _awaiting(proto)
            proto.dataReceived(chunk)
            fed += len(chunk)
            if awaiting and _awaiting(proto):
                _held(proto)
            elif awaiting and refusals["proxy_protocol"] == before:
                admittedAt = fed
        phase = proto.phase
        proto.connectionLost(None)
    refused = refusals["proxy_protocol"] - before
    assert refused in (0, 1)
    return Outcome(proto, transport, bool(refused), admittedAt, phase, events)


def _opened(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if "open peer=" in str(e.get("log_format"))]


def _header_length(stream: bytes) -> int:
    """Where the header at the start of C{stream} ends, by its own rules."""
    if stream.startswith(V2_SIGNATURE):
        return V2_FIXED + struct.unpack("!H", stream[14:16])[0]
    return stream.index(b"\r\n") + 2


def check(stream: bytes, outcome: Outcome) -> Any:
    """
    The properties every connection has, whatever it was sent; for one
    admitted, the source its header named (C{None}: the balancer's kept).
    """
    proto, transport = outcome.proto, outcome.transport
    assert logged_errors(outcome.events) == []
    if outcome.admittedAt is None:
        # Refused or still waiting: the socket's peer, nothing written or handed on.
        assert proto.peerAddress == transport.getPeer()
        assert transport.value() == b"" and proto.handed == b"" and _opened(outcome.events) == []
        assert transport.aborted is outcome.refused
        return None
    used = _header_length(stream)
    parser = V2Parser() if stream.startswith(V2_SIGNATURE) else V1Parser()
    info, rest = parser.feed(stream[:used])
    assert info is not None and rest == b""
    # The bytes after the header, untouched: all of the chunk that completed
    # it, then what followed, unless the leg stopped reading.
    assert outcome.admittedAt >= used
    handed = bytes(proto.handed)
    assert handed.startswith(stream[used : outcome.admittedAt])
    assert stream[used:].startswith(handed)
    if outcome.phase is Phase.NEGOTIATING:
        assert handed == stream[used:]
    source = info.source
    if source is None or not getattr(source, "host", None):
        source = None
    assert proto.peerAddress == (source or transport.getPeer())
    (opened,) = _opened(outcome.events)
    named = source or transport.getPeer()
    assert opened["peer"] == f"{named.host}:{named.port}"
    assert opened["via"] == f"{BALANCER.host}:{BALANCER.port}"
    return source


# -- valid headers are admitted ----------------------------------------------------------

_PORTS = st.integers(0, 0xFFFF)
_PAYLOAD = (
    st.binary(max_size=40)
    | st.sampled_from(
        [wire.SSL_REQUEST, wire.GSSENC_REQUEST, startup_message("alice", database="db")]
    )
    | st.just(b"")
)
_TLVS = st.lists(
    st.tuples(st.integers(0, 255), st.binary(max_size=20)).map(
        lambda tlv: bytes([tlv[0]]) + struct.pack("!H", len(tlv[1])) + tlv[1]
    ),
    max_size=3,
).map(b"".join)
_IPV4_MAPPED = st.ip_addresses(v=4).map(lambda a: ipaddress.IPv6Address(f"::ffff:{a}"))
_HOSTS = st.ip_addresses(v=4) | st.ip_addresses(v=6) | _IPV4_MAPPED


def _unmapped(address: IP) -> IP:
    mapped = getattr(address, "ipv4_mapped", None)
    return mapped if mapped is not None else address


#: A valid header, and the source it names (C{None}: keep the balancer's).
Header = tuple[bytes, tuple[IP, int] | None]


@st.composite
def headers(draw: st.DrawFn) -> Header:
    kind = draw(st.sampled_from(["v1", "inet", "pgtls", "local", "unspec", "unix", "pgtls-local"]))
    sport, dport = draw(_PORTS), draw(_PORTS)
    if kind in ("v1", "inet"):
        version = draw(st.sampled_from([4, 6]))
        source = draw(st.ip_addresses(v=version))
        destination = draw(st.ip_addresses(v=version))
        if kind == "v1":
            return v1(str(source), str(destination), sport, dport, f"TCP{version}"), (source, sport)
        return v2_inet(source, destination, sport, dport, draw(_TLVS)), (source, sport)
    if kind == "pgtls":
        source, destination = draw(_HOSTS), draw(_HOSTS)
        return proxy_header((str(source), sport), (str(destination), dport)), (
            _unmapped(source),
            sport,
        )
    if kind == "unix":
        names = st.binary(min_size=1, max_size=107).map(lambda b: b.replace(b"\0", b"/"))
        return v2_unix(draw(names), draw(names)), None
    if kind == "pgtls-local":
        return local_header(), None
    tlvs = draw(_TLVS)
    return (v2(0, 0x11, tlvs) if kind == "local" else v2(1, 0x00, tlvs)), None


def _same(address: Any, expected: tuple[IP, int] | None) -> bool:
    if expected is None:
        return address is None
    ip, port = expected
    return bool(ipaddress.ip_address(address.host) == ip and address.port == port)


@FUZZ
@given(headers(), _PAYLOAD, CUTS)
def test_a_valid_header_is_admitted(
    route: Route, header: Header, payload: bytes, cuts: list[int]
) -> None:
    data, expected = header
    stream = data + payload
    outcome = drive(route, split_at(stream, cuts))
    assert outcome.admittedAt is not None, outcome.proto.stats.reason
    assert _same(check(stream, outcome), expected)


#: Valid headers, each tried at every cut: this file's, pgtls's own, and
#: the test balancer's (L{support.proxyheader}, tests/test_proxy_protocol.py).
_EVERY_CUT = {
    "v1-tcp4": v1("192.0.2.1", "198.51.100.2", 5432, 6432),
    "v1-tcp6": v1("2001:db8::1", "2001:db8::2", 1, 65535),
    "v2-tcp4": v2_inet(ipaddress.ip_address("192.0.2.1"), ipaddress.ip_address("192.0.2.2"), 1, 2),
    "v2-tcp6-tlv": v2_inet(
        ipaddress.ip_address("2001:db8::1"), ipaddress.ip_address("::1"), 3, 4, b"\1\0\1x"
    ),
    "v2-unix": v2_unix(b"/a", b"/b"),
    "pgtls-mapped": proxy_header(("::ffff:192.0.2.9", 40000), ("192.0.2.2", 6432)),
    "pgtls-tcp6": proxy_header(("2001:db8::9", 40000)),
    "pgtls-local": local_header(),
    "balancer-v1": v1_header(("203.0.113.7", 40000), ("127.0.0.1", 6432)),
    "balancer-v2": v2_header(("203.0.113.7", 40000), ("127.0.0.1", 6432)),
    "balancer-local": v2_header(None),
}


@pytest.mark.parametrize("header", _EVERY_CUT.values(), ids=_EVERY_CUT.keys())
def test_a_header_cut_anywhere_is_admitted(route: Route, header: bytes) -> None:
    """
    At every single cut, and a byte at a time. (A v2 header whose first
    12 to 15 bytes came alone was refused: Twisted's C{V2Parser} refuses a
    first feed shorter than the fixed part, and pgtls fed it one.)
    """
    stream = header + wire.SSL_REQUEST
    chunkings = [[stream[:at], stream[at:]] for at in range(len(stream) + 1)]
    for chunks in chunkings + [[bytes([b]) for b in stream]]:
        outcome = drive(route, chunks)
        assert outcome.admittedAt is not None, (chunks, outcome.proto.stats.reason)
        check(stream, outcome)
        assert outcome.transport.value()[:1] == b"S"  # (then TLS, which the loss closes)


# -- anything else: refused, admitted as its header says, or waiting within bounds -------------


@st.composite
def near_headers(draw: st.DrawFn) -> bytes:
    """A valid header with a piece replaced, or bytes made of the pieces headers are made of."""
    valid = draw(st.sampled_from(list(_EVERY_CUT.values())))
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


_ANY = (
    near_headers()
    | st.binary(max_size=120)
    | st.builds(
        lambda head, rest: V2_SIGNATURE[:head] + rest, st.integers(0, 12), st.binary(max_size=100)
    )
    | st.builds(lambda h, rest: h[0] + rest, headers(), st.binary(max_size=40))
)


@FUZZ
@given(_ANY, CUTS)
@example(b"PROXY TCP4 192.0.2.1 192.0.2.2 x 80\r\n", [])
@example(b"PROXY TCP4 \xff 192.0.2.2 1 80\r\n", [])
@example(b"PROXY TCP4 " + b"1" * 200 + b"\r\n", [])
@example(b"PROXY UNKNOWN\r\n", [])
@example(V2_SIGNATURE + b"\x21\x11\xff\xff", [])
@example(V2_SIGNATURE + b"\x21\x11\x00\x00", [13])
def test_anything_is_refused_admitted_or_awaited(
    route: Route, stream: bytes, cuts: list[int]
) -> None:
    outcome = drive(route, split_at(stream, cuts))
    check(stream, outcome)
    if outcome.waiting:
        # A prefix of something that may yet be a header.
        assert stream.startswith(V2_SIGNATURE) or len(stream) <= V1_MAX


@fuzz(150)
@given(headers().map(lambda h: h[0]) | _ANY, _PAYLOAD, CUTS)
def test_an_untrusted_peer_is_refused(
    route: Route, stream: bytes, payload: bytes, cuts: list[int]
) -> None:
    """Refused at once, before a byte is read: a header too, and a valid one."""
    outcome = drive(route, split_at(stream + payload, cuts), peer=UNTRUSTED)
    assert outcome.refused and outcome.transport.aborted
    check(stream + payload, outcome)
    assert outcome.proto.stats.reason == (
        "pgtls: connection from an address not in listener.proxy_trusted"
    )


def test_a_v2_length_is_not_allocated_ahead(route: Route) -> None:
    """
    A v2 header claiming 65535 bytes: nothing of the kind is allocated
    before they come, what comes is held up to that length and no further,
    and the bytes beyond it go on.
    """
    fixed = V2_SIGNATURE + b"\x21\x11\xff\xff"
    proto = _Leg(route)
    transport = ClientTransport()
    proto.makeConnection(transport)
    assert peak_allocation(lambda: proto.dataReceived(fixed)) < 4096
    assert _held(proto) == V2_FIXED
    body = bytes(0xFFFF)  # addresses 0.0.0.0, ports 0, then padding
    for at in range(0, len(body) - 1, 4096):
        proto.dataReceived(body[at : min(at + 4096, len(body) - 1)])
        assert _held(proto) == V2_FIXED + min(at + 4096, len(body) - 1)
    assert _awaiting(proto)
    proto.dataReceived(body[-1:] + wire.SSL_REQUEST)
    assert not _awaiting(proto) and proto.peerAddress == IPv4Address("TCP", "0.0.0.0", 0)
    assert proto.handed == wire.SSL_REQUEST and transport.value() == b"S"
    proto.connectionLost(None)


def test_a_v1_line_is_refused_past_107_bytes(route: Route) -> None:
    """Held up to the specification's 107 bytes while no CRLF came, then refused."""
    line = b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2" + b" " * 80
    outcome = drive(route, [line[:V1_MAX], line[V1_MAX:]])
    assert outcome.refused
    outcome = drive(route, [bytes([b]) for b in line[:V1_MAX]])
    assert outcome.waiting


# -- pgtls's builder, read back by Twisted's parser ------------------------------------


def _read_back(stream: bytes, cuts: list[int]) -> tuple[Any, bytes]:
    """
    C{stream} fed in chunks to one C{V2Parser}, the first chunk at least
    the fixed part (which it needs at once): the header, and every byte
    after it.
    """
    chunks = split_at(stream, cuts)
    while len(chunks) > 1 and len(chunks[0]) < V2_FIXED:
        chunks[:2] = [chunks[0] + chunks[1]]
    parser = V2Parser()
    for index, chunk in enumerate(chunks):
        info, rest = parser.feed(chunk)
        if info is not None:
            return info, (rest or b"") + b"".join(chunks[index + 1 :])
    raise AssertionError("no header read")


@FUZZ
@given(_HOSTS, _PORTS, st.none() | st.tuples(_HOSTS, _PORTS), st.binary(max_size=40), CUTS)
@example(
    ipaddress.ip_address("::ffff:192.0.2.1"), 1, (ipaddress.ip_address("2001:db8::1"), 2), b"", []
)
def test_proxy_header_round_trips(
    source: IP, sport: int, destination: tuple[IP, int] | None, after: bytes, cuts: list[int]
) -> None:
    """
    The source comes back (an IPv4-mapped one as IPv4); the destination
    too when its family is the source's, else the unspecified address.
    """
    header = proxy_header(
        (str(source), sport), None if destination is None else (str(destination[0]), destination[1])
    )
    info, rest = _read_back(header + after, cuts)
    assert info.header == header and rest == after
    source = _unmapped(source)
    assert isinstance(info.source, IPv4Address if source.version == 4 else IPv6Address)
    assert _same(info.source, (source, sport))
    expected = (ipaddress.ip_address("0.0.0.0" if source.version == 4 else "::"), 0)
    if destination is not None and _unmapped(destination[0]).version == source.version:
        expected = (_unmapped(destination[0]), destination[1])
    assert _same(info.destination, expected)


@fuzz(100)
@given(st.binary(max_size=40), CUTS)
def test_local_header_round_trips(after: bytes, cuts: list[int]) -> None:
    info, rest = _read_back(local_header() + after, cuts)
    assert (info.source, info.destination, rest) == (None, None, after)


@fuzz(200)
@given(st.text(max_size=45) | _HOSTS.map(str), st.integers(-(2**17), 2**17))
def test_proxy_header_takes_an_address_or_raises_value_error(host: str, port: int) -> None:
    """What is no IP address and 16-bit port is C{ValueError}, and nothing else."""
    try:
        header = proxy_header((host, port))
    except ValueError:
        return
    info, rest = V2Parser().feed(header)
    assert rest == b"" and info is not None and info.source.port == port
    assert ipaddress.ip_address(info.source.host) == _unmapped(
        ipaddress.ip_address(host.split("%", 1)[0])
    )


# -- what Twisted does on its own, and what pgtls takes as it is -------------------------


@pytest.mark.parametrize(
    "line, error",
    [
        (b"PROXY TCP4 192.0.2.1 192.0.2.2 x 80\r\n", ValueError),
        (b"PROXY TCP4 \xff 192.0.2.2 1 80\r\n", UnicodeDecodeError),
        (b"PROXY TCP4 192.0.2.1 192.0.2.2 " + b"1" * 5000 + b" 80\r\n", ValueError),
    ],
)
def test_twisted_v1_parser_lets_other_errors_through(
    route: Route, line: bytes, error: type
) -> None:
    """
    Not C{InvalidProxyHeader}: C{int()} and C{decode()} raise through
    C{V1Parser.feed}. pgtls refuses the connection all the same.
    """
    with pytest.raises(error) as info:
        V1Parser().feed(line)
    assert not isinstance(info.value, InvalidProxyHeader)
    outcome = drive(route, [line])
    assert outcome.refused
    assert outcome.proto.stats.reason == f"pgtls: invalid PROXY protocol header ({error.__name__})"


def test_twisted_v1_parser_takes_what_is_no_address(route: Route) -> None:
    """
    Ports beyond 16 bits, hosts that are not addresses, a line past 107
    bytes that came with its CRLF: Twisted takes them, and so does pgtls,
    as written (README, "By design"); its text logs escape the controls.
    """
    for line in (
        b"PROXY TCP4 192.0.2.1 192.0.2.2 99999 -1\r\n",
        b"PROXY TCP6 not\nan-address x 1 2\r\n",
        b"PROXY TCP4 ::1 192.0.2.2 1 2\r\n",
        b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2 " + b"x" * 100 + b"\r\n",
    ):
        info, _ = V1Parser().feed(line)
        assert info is not None
        outcome = drive(route, [line])
        assert outcome.admittedAt is not None
        assert check(line, outcome) == info.source


def test_twisted_v1_parser_refuses_proxy_unknown(route: Route) -> None:
    """
    C{PROXY UNKNOWN\\r\\n} is valid v1 (the sender has no addresses to
    give); Twisted refuses it, and so does pgtls (README, "By design"),
    but takes C{PROXY UNKNOWN} followed by anything, keeping the
    balancer's address.
    """
    with pytest.raises(InvalidNetworkProtocol):
        V1Parser().feed(b"PROXY UNKNOWN\r\n")
    assert drive(route, [b"PROXY UNKNOWN\r\n"]).refused
    line = b"PROXY UNKNOWN 192.0.2.1 192.0.2.2 1 2\r\n"
    outcome = drive(route, [line])
    assert outcome.admittedAt is not None and check(line, outcome) is None


def test_twisted_v2_parser_needs_16_bytes_at_once(route: Route) -> None:
    """
    C{V2Parser.feed} refuses a first chunk shorter than the fixed part, so
    pgtls waits for 16 bytes before it feeds one (and was refusing headers
    cut there); and a v2 header with too few address bytes for its family
    is C{MissingAddressData}, which pgtls refuses.
    """
    header = v2_inet(ipaddress.ip_address("192.0.2.1"), ipaddress.ip_address("192.0.2.2"), 1, 2)
    with pytest.raises(InvalidProxyHeader):
        V2Parser().feed(header[:15])
    outcome = drive(route, [header[:12], header[12:15]])
    assert outcome.waiting
    outcome = drive(route, [header[:13], header[13:]])
    assert outcome.admittedAt == len(header)
    short = v2(1, 0x11, b"\1\2\3\4")
    with pytest.raises(MissingAddressData):
        V2Parser().feed(short)
    outcome = drive(route, [short])
    assert outcome.proto.stats.reason == "pgtls: invalid PROXY protocol header (MissingAddressData)"


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
    16 bytes, or a v1 one with fewer than 8, loses the connection. One
    reason pgtls does not use it (L{pgtls_twisted.tls._private}).
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


def test_a_unix_header_keeps_the_balancers_address(route: Route) -> None:
    """A v2 AF_UNIX source names no host: the balancer's address is kept, as for LOCAL."""
    header = v2_unix(b"/run/client", b"/run/pgtls")
    info, _ = V2Parser().feed(header)
    assert info is not None and info.source == UNIXAddress(b"/run/client")
    outcome = drive(route, [header])
    assert outcome.admittedAt is not None and check(header, outcome) is None
    assert outcome.proto.peerAddress == BALANCER
