"""
The wire codec (L{pgtls_twisted.protocol._wire}): startup packets, typed-message
framing and the few messages the proxy builds or reads itself.

Startup packet parsing faces unauthenticated bytes, so besides the cases
PostgreSQL's own C{ProcessStartupPacket} distinguishes, it is fuzzed: it may
only ever answer "need more", a packet, or L{ProtocolViolation}, and it
must judge a hostile length before waiting for the bytes it claims.
"""

from __future__ import annotations

import struct
from itertools import pairwise

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from support.fuzz import FUZZ

from pgtls_twisted.protocol import _wire as wire
from pgtls_twisted.protocol._wire import (
    CancelRequest,
    GSSENCRequest,
    MessageReader,
    ProtocolViolation,
    SSLRequest,
    StartupMessage,
    parse_startup_packet,
)


def packet(code: int, body: bytes = b"", length: int | None = None) -> bytes:
    """A startup packet: length word (computed unless given), code, body."""
    if length is None:
        length = 8 + len(body)
    return struct.pack("!II", length, code) + body


def params(*pairs: str) -> bytes:
    """Startup parameters as NUL-terminated strings, plus the final terminator."""
    return b"".join(p.encode() + b"\0" for p in pairs) + b"\0"


def parse_one(buf: bytes | bytearray) -> tuple[wire.StartupPacket, int]:
    parsed = parse_startup_packet(buf)
    assert parsed is not None
    return parsed


def violation(buf: bytes) -> ProtocolViolation:
    with pytest.raises(ProtocolViolation) as info:
        parse_startup_packet(buf)
    return info.value


# ---------------------------------------------------------------------------
# Startup packets: the valid kinds


def test_ssl_request() -> None:
    assert wire.SSL_REQUEST == bytes.fromhex("0000000804d2162f")
    assert parse_one(wire.SSL_REQUEST) == (SSLRequest(), 8)


def test_gssenc_request() -> None:
    assert wire.GSSENC_REQUEST == bytes.fromhex("0000000804d21630")
    assert parse_one(wire.GSSENC_REQUEST) == (GSSENCRequest(), 8)


@pytest.mark.parametrize("keylen", [4, 32, 1, 256])
def test_cancel_request(keylen: int) -> None:
    key = bytes(i % 256 for i in range(keylen))
    raw = packet(wire.CANCEL_REQUEST_CODE, struct.pack("!I", 4242) + key)
    assert len(raw) == 12 + keylen
    request, used = parse_one(raw)
    assert used == len(raw)
    assert request == CancelRequest(4242, key)


def test_cancel_request_key_is_not_in_repr() -> None:
    """The cancel key is a secret: it must not end up in logs via repr()."""
    request = CancelRequest(1, b"SECRETKEY")
    assert "SECRET" not in repr(request)


@pytest.mark.parametrize(
    "version, major, minor", [(wire.PROTOCOL_3_0, 3, 0), (wire.PROTOCOL_3_2, 3, 2)]
)
def test_startup_message(version: int, major: int, minor: int) -> None:
    raw = packet(version, params("user", "alice", "database", "shop", "application_name", "psql"))
    msg, used = parse_one(raw)
    assert used == len(raw)
    assert isinstance(msg, StartupMessage)
    assert (msg.major, msg.minor) == (major, minor)
    assert msg.parameters == {"user": "alice", "database": "shop", "application_name": "psql"}
    assert msg.encode() == raw
    assert msg.user == "alice"
    assert msg.database == "shop"


def test_startup_database_defaults_to_user() -> None:
    msg, _ = parse_one(packet(wire.PROTOCOL_3_0, params("user", "bob")))
    assert isinstance(msg, StartupMessage)
    assert msg.database == "bob"
    msg, _ = parse_one(packet(wire.PROTOCOL_3_0, params("user", "bob", "database", "")))
    assert isinstance(msg, StartupMessage)
    assert msg.database == "bob"


def test_startup_empty_value_is_kept() -> None:
    raw = packet(wire.PROTOCOL_3_0, b"user\0bob\0options\0\0\0")
    msg, _ = parse_one(raw)
    assert isinstance(msg, StartupMessage)
    assert msg.parameters == {"user": "bob", "options": ""}
    assert msg.encode() == raw


@pytest.mark.parametrize(
    "body, name",
    [
        (b"user\0b\xffb\0\0", 'parameter value of "user"'),
        (b"user\0bob\0data\xffbase\0x\0\0", "parameter name"),
        (b"user\0bob\0database\0\xc3\0\0", 'parameter value of "database"'),
    ],
)
def test_startup_strings_must_be_utf8(body: bytes, name: str) -> None:
    """
    Not UTF-8: refused (22021), because a lossy decoding would make two
    different byte strings, two roles to the server, look alike to pgtls.
    """
    with pytest.raises(wire.ProtocolViolation) as e:
        parse_one(packet(wire.PROTOCOL_3_0, body))
    assert e.value.sqlstate == "22021"
    assert name in e.value.message


@pytest.mark.parametrize("name", ["user", "database", "options", "replication", "application_name"])
def test_startup_repeated_parameter_is_refused(name: str) -> None:
    """
    PostgreSQL keeps the last of two values, a reader of the first would
    check another: a repeated name is FATAL 08P01, naming it.
    """
    body = params("user", "alice", "database", "shop", name, "one", name, "other")
    if name in ("user", "database"):
        body = params("user", "alice", "database", "shop", name, "other")
    with pytest.raises(wire.ProtocolViolation) as e:
        parse_one(packet(wire.PROTOCOL_3_0, body))
    assert e.value.sqlstate == "08P01"
    assert e.value.message == f'duplicate startup parameter "{name}"'


def test_startup_replace_builds_a_new_packet() -> None:
    msg, _ = parse_one(packet(wire.PROTOCOL_3_2, params("user", "u", "replication", "on")))
    assert isinstance(msg, StartupMessage)
    other = msg.replace(database="postgres", replication=None)
    assert other.parameters == {"user": "u", "database": "postgres"}
    assert other.version == wire.PROTOCOL_3_2
    assert other.encode() == packet(wire.PROTOCOL_3_2, params("user", "u", "database", "postgres"))
    assert msg.parameters["replication"] == "on"


@pytest.mark.parametrize("minor", [1, 9999])
def test_startup_newer_minor_versions_parse(minor: int) -> None:
    """3.x with an unknown minor is for the session to negotiate (NegotiateProtocolVersion)."""
    msg, _ = parse_one(packet((3 << 16) | minor, params("user", "u", "_pq_.grease", "1")))
    assert isinstance(msg, StartupMessage)
    assert (msg.major, msg.minor) == (3, minor)


# ---------------------------------------------------------------------------
# Incremental parsing

VALID_PACKETS = [
    wire.SSL_REQUEST,
    wire.GSSENC_REQUEST,
    CancelRequest(7, b"abcd").encode(),
    CancelRequest(7, bytes(32)).encode(),
    packet(wire.PROTOCOL_3_0, params("user", "alice", "database", "db")),
    packet(wire.PROTOCOL_3_2, params("user", "alice")),
]


@pytest.mark.parametrize("raw", VALID_PACKETS)
def test_every_prefix_needs_more(raw: bytes) -> None:
    for n in range(len(raw)):
        assert parse_startup_packet(raw[:n]) is None
        assert parse_startup_packet(bytearray(raw[:n])) is None


@pytest.mark.parametrize("raw", VALID_PACKETS)
def test_bytes_after_a_packet_are_left_alone(raw: bytes) -> None:
    whole, used = parse_one(raw)
    assert used == len(raw)
    for extra in (b"\0", b"Q", wire.SSL_REQUEST, b"x" * 20000):
        again, used = parse_one(raw + extra)
        assert used == len(raw)
        assert again == whole
        again, used = parse_one(bytearray(raw + extra))
        assert used == len(raw)


# ---------------------------------------------------------------------------
# Violations


@pytest.mark.parametrize(
    "length", [0, 1, 4, 7, 10001, 65536, 0x7FFFFFFF, 0x80000000, 0x80000008, 0xFFFFFFFF]
)
def test_bad_lengths_close_silently(length: int) -> None:
    """
    Like PostgreSQL ("invalid length of startup packet"): nothing is sent,
    and the verdict comes with the length word alone.
    """
    e = violation(struct.pack("!I", length))
    assert e.sqlstate is None
    assert "invalid length of startup packet" in e.message
    assert violation(struct.pack("!II", length, wire.PROTOCOL_3_0)).sqlstate is None


def test_length_limits_are_inclusive() -> None:
    assert parse_startup_packet(struct.pack("!I", 8)) is None
    assert parse_startup_packet(struct.pack("!I", 10000)) is None
    fixed = len(packet(wire.PROTOCOL_3_0, params("user", "u", "options", "")))
    big = packet(wire.PROTOCOL_3_0, params("user", "u", "options", "x" * (10000 - fixed)))
    assert len(big) == 10000
    msg, used = parse_one(big)
    assert used == 10000


@pytest.mark.parametrize("code", [wire.SSL_REQUEST_CODE, wire.GSSENC_REQUEST_CODE])
@pytest.mark.parametrize("length", [9, 12, 16])
def test_encryption_request_with_wrong_length(code: int, length: int) -> None:
    e = violation(packet(code, b"\0" * (length - 8)))
    assert e.sqlstate == "08P01"
    assert "encryption request" in e.message


@pytest.mark.parametrize("keylen", [0, 257, 1000])
def test_cancel_request_with_bad_key_length(keylen: int) -> None:
    """PG 18: a key of 0 or more than 256 bytes; nothing is ever answered to a cancel."""
    e = violation(packet(wire.CANCEL_REQUEST_CODE, struct.pack("!I", 1) + b"k" * keylen))
    assert e.sqlstate is None
    assert "cancel request" in e.message


def test_cancel_request_shorter_than_a_pid() -> None:
    e = violation(packet(wire.CANCEL_REQUEST_CODE, b"\0\0"))
    assert e.sqlstate is None


@pytest.mark.parametrize(
    "major, minor",
    [(2, 0), (4, 0), (1, 0), (0, 0), (1234, 5681), (1234, 5677), (0xFFFF, 0xFFFF)],
)
def test_unsupported_protocol_versions(major: int, minor: int) -> None:
    e = violation(packet((major << 16) | minor, params("user", "alice")))
    assert e.sqlstate == "08P01"
    assert f"unsupported frontend protocol {major}.{minor}" in e.message


@pytest.mark.parametrize(
    "body",
    [
        b"",  # no terminator at all
        b"user\0alice",  # the last string is unterminated
        b"user",
    ],
)
def test_startup_without_terminator(body: bytes) -> None:
    e = violation(packet(wire.PROTOCOL_3_0, body))
    assert e.sqlstate == "08P01"
    assert "expected terminator as last byte" in e.message


def test_startup_missing_only_the_final_terminator() -> None:
    """C{user\\0alice\\0} lacks the empty string that ends the list."""
    try:
        parse_startup_packet(packet(wire.PROTOCOL_3_0, b"user\0alice\0"))
    except ProtocolViolation as e:
        assert e.sqlstate == "08P01"
        assert "expected terminator as last byte" in e.message
    else:
        raise AssertionError("accepted a startup packet without its final terminator")


@pytest.mark.parametrize(
    "body",
    [
        b"user\0alice\0database\0\0",  # a name without a value
        b"user\0\0",
        b"user\0alice\0\0\0",  # an extra terminator
        b"user\0alice\0x\0\0",
    ],
)
def test_startup_odd_strings(body: bytes) -> None:
    e = violation(packet(wire.PROTOCOL_3_0, body))
    assert e.sqlstate == "08P01"
    assert "invalid startup packet layout" in e.message


def test_startup_empty_parameter_name() -> None:
    e = violation(packet(wire.PROTOCOL_3_0, b"user\0alice\0\0x\0\0"))
    assert e.sqlstate == "08P01"
    assert "invalid startup packet layout" in e.message


@pytest.mark.parametrize(
    "pairs",
    [(), ("database", "db"), ("user", ""), ("User", "alice"), ("user", "", "database", "db")],
)
def test_startup_without_user(pairs: tuple[str, ...]) -> None:
    e = violation(packet(wire.PROTOCOL_3_0, params(*pairs)))
    assert e.sqlstate == "28000"
    assert e.message == "no PostgreSQL user name specified in startup packet"


def test_tls_record_is_never_a_valid_length() -> None:
    """A direct-TLS ClientHello read as a startup packet is refused at once."""
    hello = bytes([wire.TLS_HANDSHAKE_RECORD, 3, 1, 0, 200, 1, 0, 0, 196, 3, 3])
    assert violation(hello).sqlstate is None


# ---------------------------------------------------------------------------
# Fuzzing


def check_parse_outcome(buf: bytes | bytearray) -> None:
    """
    The contract of L{parse_startup_packet}: None while the claimed length
    (already judged to be sane) is not all here, a packet no longer than
    C{buf}, or a L{ProtocolViolation}. Anything else escaping is a bug.
    """
    try:
        parsed = parse_startup_packet(buf)
    except ProtocolViolation as e:
        assert e.sqlstate in (None, "08P01", "28000", "22021")
        assert e.message
        return
    if parsed is None:
        if len(buf) >= 4:
            (claimed,) = struct.unpack_from("!I", buf)
            assert 8 <= claimed <= wire.MAX_STARTUP_PACKET_LENGTH
            assert len(buf) < claimed
        return
    pkt, used = parsed
    assert 8 <= used <= len(buf)
    assert used == struct.unpack_from("!I", buf)[0]
    assert isinstance(pkt, (SSLRequest, GSSENCRequest, CancelRequest, StartupMessage))
    if isinstance(pkt, StartupMessage):
        assert pkt.encode() == bytes(buf[:used])
        assert pkt.major == 3
        assert pkt.user
        assert all(pkt.parameters)
    if isinstance(pkt, CancelRequest):
        assert 1 <= len(pkt.key) <= 256


@FUZZ
@given(st.binary(max_size=200))
def test_fuzz_arbitrary_bytes(buf: bytes) -> None:
    check_parse_outcome(buf)
    check_parse_outcome(bytearray(buf))


_CODES = st.one_of(
    st.sampled_from(
        [
            wire.SSL_REQUEST_CODE,
            wire.GSSENC_REQUEST_CODE,
            wire.CANCEL_REQUEST_CODE,
            wire.PROTOCOL_3_0,
            wire.PROTOCOL_3_2,
            (3 << 16) | 9999,
            2 << 16,
        ]
    ),
    st.integers(0, 0xFFFFFFFF),
)
_STRINGS = st.lists(
    st.one_of(st.sampled_from([b"user", b"database", b"", b"alice"]), st.binary(max_size=8)),
    max_size=8,
)


@st.composite
def plausible_packets(draw: st.DrawFn) -> bytes:
    """A length that passes the first check, a code, and a body that may or may not fit."""
    code = draw(_CODES)
    body = draw(
        st.one_of(
            st.binary(max_size=300),
            _STRINGS.map(lambda items: b"\0".join(items) + b"\0"),
            _STRINGS.map(lambda items: b"\0".join(items)),
        )
    )
    length = draw(st.one_of(st.just(8 + len(body)), st.integers(8, wire.MAX_STARTUP_PACKET_LENGTH)))
    return struct.pack("!II", length, code) + body + draw(st.binary(max_size=10))


@FUZZ
@given(plausible_packets())
@example(packet(wire.PROTOCOL_3_0, b"user\0\xff\0\0"))
@example(packet(wire.CANCEL_REQUEST_CODE, b"\0\0\0\1"))
def test_fuzz_plausible_packets(buf: bytes) -> None:
    check_parse_outcome(buf)
    # And every prefix of it: once the bytes decide (a packet or a
    # violation), more bytes never change the verdict, and before that the
    # answer is always "need more".
    verdicts: list[object] = []
    for n in sorted({*range(0, len(buf) + 1, max(1, len(buf) // 16)), len(buf)}):
        check_parse_outcome(buf[:n])
        try:
            verdicts.append(parse_startup_packet(buf[:n]))
        except ProtocolViolation as e:
            verdicts.append(e.message)
    decided = [v for v in verdicts if v is not None]
    assert verdicts == [None] * (len(verdicts) - len(decided)) + decided
    assert all(v == decided[0] for v in decided)


def postgres_startup_layout(body: bytes) -> dict[str, str] | None:
    """
    PostgreSQL's reading of a StartupMessage body (C{ProcessStartupPacket}
    in C{backend_startup.c}): name/value strings up to an empty name, which
    must be the last byte. C{None} where it reports "invalid startup packet
    layout". Its buffer is NUL-padded, so an unterminated string ends at the
    end of the packet. Names and values are decoded as pgtls decodes them.
    """
    n = len(body)
    padded = body + b"\0"
    found: dict[str, str] = {}
    offset = 0
    while offset < n:
        if body[offset] == 0:
            break
        valoffset = padded.index(b"\0", offset) + 1
        if valoffset >= n:
            break
        end = padded.index(b"\0", valoffset)
        name, value = body[offset : valoffset - 1], body[valoffset:end]
        found[name.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        offset = end + 1
    if offset != n - 1:
        return None
    return found


_LAYOUT_BODIES = st.lists(
    st.one_of(st.sampled_from([b"user", b"alice", b"database", b""]), st.binary(max_size=4)),
    max_size=7,
).map(lambda items: b"\0".join(items)) | st.binary(max_size=24)


@FUZZ
@given(_LAYOUT_BODIES)
@example(b"user\0alice\0")
def test_fuzz_startup_layout_agrees_with_postgresql(body: bytes) -> None:
    """
    Accepting what PostgreSQL refuses, or reading other parameters than it
    does, would be a parser differential between the proxy and the server
    behind it. Being stricter is allowed in one corner: PostgreSQL only
    checks that its scan I{stops} at the last byte, so it takes a lone
    non-NUL byte there (C{user\\0alice\\0x}) as the terminator. And, by
    design, in two more: a repeated name, and a string that is not UTF-8,
    are refused (PostgreSQL reads them, but not as a first-value reader
    or a lossy decoder would).
    """
    expected = postgres_startup_layout(body)
    lenient_corner = not body.endswith(b"\0")
    try:
        parsed = parse_startup_packet(packet(wire.PROTOCOL_3_0, body))
    except ProtocolViolation as e:
        if e.sqlstate == "22021" or e.message.startswith("duplicate startup parameter"):
            return
        if e.sqlstate == "28000":
            assert expected is not None and not expected.get("user"), body
        else:
            assert expected is None or lenient_corner, f"PostgreSQL accepts {body!r}: {e}"
        return
    assert parsed is not None
    msg = parsed[0]
    assert isinstance(msg, StartupMessage)
    assert expected is not None, f"PostgreSQL refuses the layout of {body!r}"
    assert msg.parameters == expected


@FUZZ
@given(
    st.one_of(st.integers(0, 7), st.integers(wire.MAX_STARTUP_PACKET_LENGTH + 1, 0xFFFFFFFF)),
    st.binary(max_size=64),
)
def test_fuzz_hostile_length_refused_at_once(length: int, rest: bytes) -> None:
    """No waiting for (or buffering) the bytes of an impossible length."""
    with pytest.raises(ProtocolViolation) as info:
        parse_startup_packet(struct.pack("!I", length) + rest)
    assert info.value.sqlstate is None


# ---------------------------------------------------------------------------
# Typed messages


def read_all(reader: MessageReader) -> list[tuple[bytes, bytes]]:
    out = []
    while (msg := reader.next()) is not None:
        out.append(msg)
    return out


def test_message_framing() -> None:
    assert wire.message(b"Q", b"select 1\0") == b"Q\0\0\0\x0dselect 1\0"
    assert wire.message(b"X") == wire.TERMINATE == b"X\0\0\0\x04"
    reader = MessageReader()
    reader.feed(wire.message(b"Q", b"select 1\0") + wire.TERMINATE + b"Z\0\0")
    assert read_all(reader) == [(b"Q", b"select 1\0"), (b"X", b"")]
    assert reader.drain() == b"Z\0\0"
    assert reader.next() is None
    assert reader.drain() == b""


@pytest.mark.parametrize("length", [0, 1, 3])
def test_message_length_too_small(length: int) -> None:
    reader = MessageReader()
    reader.feed(b"Q" + struct.pack("!I", length))
    with pytest.raises(ProtocolViolation) as info:
        reader.next()
    assert info.value.sqlstate == "08P01"


def test_message_length_over_limit_is_refused_on_the_header() -> None:
    reader = MessageReader(limit=100)
    reader.feed(b"p" + struct.pack("!I", 100))
    assert reader.next() is None  # at the limit: waits for the body
    reader = MessageReader(limit=100)
    reader.feed(b"p" + struct.pack("!I", 101))
    with pytest.raises(ProtocolViolation):
        reader.next()
    reader = MessageReader()
    reader.feed(b"p" + struct.pack("!I", 0xFFFFFFFF))
    with pytest.raises(ProtocolViolation):
        reader.next()


def test_message_reader_waits_for_header_and_body() -> None:
    msg = wire.message(b"R", b"\0\0\0\0")
    reader = MessageReader()
    for byte in msg[:-1]:
        reader.feed(bytes([byte]))
        assert reader.next() is None
    reader.feed(msg[-1:])
    assert reader.next() == (b"R", b"\0\0\0\0")


_MESSAGES = st.lists(
    st.tuples(st.binary(min_size=1, max_size=1), st.binary(max_size=64)), max_size=12
)


@FUZZ
@given(_MESSAGES, st.data())
def test_fuzz_message_framing_across_chunks(
    messages: list[tuple[bytes, bytes]], data: st.DataObject
) -> None:
    stream = b"".join(wire.message(t, b) for t, b in messages)
    cuts = sorted(data.draw(st.sets(st.integers(0, len(stream)), max_size=20)))
    bounds = [0, *cuts, len(stream)]
    reader = MessageReader()
    got = []
    for start, end in pairwise(bounds):
        reader.feed(stream[start:end])
        got += read_all(reader)
    assert got == messages
    assert reader.drain() == b""


@FUZZ
@given(st.binary(max_size=200))
def test_fuzz_message_reader_never_crashes(buf: bytes) -> None:
    reader = MessageReader(limit=1000)
    reader.feed(buf)
    try:
        for mtype, body in read_all(reader):
            assert len(mtype) == 1
            assert len(body) <= 1000
    except ProtocolViolation:
        pass


# ---------------------------------------------------------------------------
# ErrorResponse


def error_body(data: bytes) -> bytes:
    reader = MessageReader()
    reader.feed(data)
    msg = reader.next()
    assert msg is not None
    assert msg[0] == b"E"
    assert reader.drain() == b""
    return msg[1]


def test_error_response_fields() -> None:
    body = error_body(wire.error_response("08P01", "bad things"))
    assert body.endswith(b"\0\0")
    assert wire.parse_error_fields(body) == {
        "S": "FATAL",
        "V": "FATAL",
        "C": "08P01",
        "M": "bad things",
    }


def test_error_response_detail_hint_severity() -> None:
    data = wire.error_response("28000", "no", severity="ERROR", detail="because", hint="try again")
    assert wire.parse_error_fields(error_body(data)) == {
        "S": "ERROR",
        "V": "ERROR",
        "C": "28000",
        "M": "no",
        "D": "because",
        "H": "try again",
    }


def test_error_response_nul_in_text_is_replaced() -> None:
    """A NUL would end the field early and let the rest pose as other fields."""
    data = wire.error_response("08P01", "a\0Cxxxxx", detail="d\0e")
    fields = wire.parse_error_fields(error_body(data))
    assert fields["M"] == "a?Cxxxxx"
    assert fields["C"] == "08P01"
    assert fields["D"] == "d?e"


@FUZZ
@given(st.text(max_size=50), st.one_of(st.none(), st.text(max_size=20)))
def test_fuzz_error_response_round_trip(text: str, detail: str | None) -> None:
    fields = wire.parse_error_fields(error_body(wire.error_response("XX000", text, detail=detail)))
    assert fields["M"] == text.replace("\0", "?")
    assert fields["C"] == "XX000"
    if detail:
        assert fields["D"] == detail.replace("\0", "?")
    else:
        assert "D" not in fields


@FUZZ
@given(st.binary(max_size=200))
def test_fuzz_parse_error_fields_never_raises(body: bytes) -> None:
    fields = wire.parse_error_fields(body)
    assert all(len(k) == 1 for k in fields)


def test_parse_error_fields_malformed() -> None:
    assert wire.parse_error_fields(b"") == {}
    assert wire.parse_error_fields(b"\0") == {}
    assert wire.parse_error_fields(b"Mtruncated") == {}
    assert wire.parse_error_fields(b"C08P01\0Mhalf") == {"C": "08P01"}
    assert wire.parse_error_fields(b"M\0") == {"M": ""}


# ---------------------------------------------------------------------------
# Authentication and other messages


def one_message(data: bytes, mtype: bytes) -> bytes:
    reader = MessageReader()
    reader.feed(data)
    msg = reader.next()
    assert msg is not None and msg[0] == mtype
    assert reader.drain() == b""
    return msg[1]


def test_authentication_messages() -> None:
    assert wire.AUTHENTICATION_OK == b"R\0\0\0\x08\0\0\0\0"
    assert wire.auth_code(one_message(wire.AUTHENTICATION_OK, b"R")) == wire.AUTH_OK
    body = one_message(wire.AUTHENTICATION_CLEARTEXT_PASSWORD, b"R")
    assert wire.auth_code(body) == wire.AUTH_CLEARTEXT_PASSWORD
    for short in (b"", b"\0\0\0"):
        with pytest.raises(ProtocolViolation):
            wire.auth_code(short)


@pytest.mark.parametrize(
    "mechanisms", [["SCRAM-SHA-256"], ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"], []]
)
def test_authentication_sasl_round_trip(mechanisms: list[str]) -> None:
    body = one_message(wire.authentication_sasl(mechanisms), b"R")
    assert wire.auth_code(body) == wire.AUTH_SASL
    assert wire.sasl_mechanisms(body) == mechanisms


def test_sasl_mechanisms_as_postgresql_sends_them() -> None:
    body = struct.pack("!I", 10) + b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0"
    assert wire.sasl_mechanisms(body) == ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]


def test_sasl_initial_response_layout() -> None:
    body = one_message(wire.sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=abc"), b"p")
    assert body == b"SCRAM-SHA-256\0" + struct.pack("!I", 11) + b"n,,n=,r=abc"
    assert one_message(wire.sasl_response(b"c=biws"), b"p") == b"c=biws"


def test_password_from_message() -> None:
    assert wire.password_from_message(b"s3cret\0") == "s3cret"
    assert wire.password_from_message(b"\0") == ""
    assert wire.password_from_message("pässword".encode() + b"\0") == "pässword"


@pytest.mark.parametrize("body", [b"", b"s3cret", b"s3\0cret\0", b"s3cret\0\0", b"\0\0"])
def test_password_message_malformed(body: bytes) -> None:
    with pytest.raises(ProtocolViolation) as info:
        wire.password_from_message(body)
    assert info.value.sqlstate == "08P01"


@pytest.mark.parametrize("keylen", [4, 32, 256])
def test_backend_key_data_round_trip(keylen: int) -> None:
    key = bytes(i % 251 for i in range(keylen))
    body = one_message(wire.backend_key_data(0x7FFFFFFF, key), b"K")
    assert wire.parse_backend_key_data(body) == (0x7FFFFFFF, key)


@pytest.mark.parametrize("size", [0, 3, 4, 4 + 257])
def test_parse_backend_key_data_bounds(size: int) -> None:
    with pytest.raises(ProtocolViolation):
        wire.parse_backend_key_data(b"\1" * size)


@pytest.mark.parametrize("size", [5, 8, 4 + 256])
def test_parse_backend_key_data_accepted_sizes(size: int) -> None:
    pid, key = wire.parse_backend_key_data(b"\0\0\0\x05" + b"k" * (size - 4))
    assert pid == 5
    assert len(key) == size - 4


@pytest.mark.parametrize(
    "name, value", [("server_version", "18.1"), ("application_name", ""), ("TimeZone", "Etc/UTC")]
)
def test_parameter_status_round_trip(name: str, value: str) -> None:
    body = one_message(wire.parameter_status(name, value), b"S")
    assert wire.parse_parameter_status(body) == (name, value)


def test_parse_parameter_status_malformed() -> None:
    assert wire.parse_parameter_status(b"") == ("", "")
    assert wire.parse_parameter_status(b"name") == ("name", "")
    assert wire.parse_parameter_status(b"name\0val") == ("name", "val")


def test_ready_for_query() -> None:
    assert wire.ready_for_query() == b"Z\0\0\0\x05I"
    assert one_message(wire.ready_for_query(b"T"), b"Z") == b"T"


@FUZZ
@given(st.integers(0, 0xFFFFFFFF), st.binary(min_size=1, max_size=256))
def test_fuzz_cancel_request_round_trip(pid: int, key: bytes) -> None:
    raw = CancelRequest(pid, key).encode()
    assert len(raw) == 12 + len(key)
    assert parse_one(raw) == (CancelRequest(pid, key), len(raw))


_NAMES = st.text(
    st.characters(exclude_characters="\0", exclude_categories=("Cs",)), min_size=1, max_size=12
)
_VALUES = st.text(st.characters(exclude_characters="\0", exclude_categories=("Cs",)), max_size=12)


@FUZZ
@given(
    st.dictionaries(_NAMES, _VALUES, max_size=6),
    st.text(st.characters(exclude_characters="\0", exclude_categories=("Cs",)), min_size=1),
    st.sampled_from([wire.PROTOCOL_3_0, wire.PROTOCOL_3_2]),
)
def test_fuzz_encode_startup_message_round_trip(
    extra: dict[str, str], user: str, version: int
) -> None:
    parameters = {**extra, "user": user}
    raw = wire.encode_startup_message(parameters, version)
    if len(raw) > wire.MAX_STARTUP_PACKET_LENGTH:  # pragma: no cover - sizes kept small
        return
    msg, used = parse_one(raw)
    assert used == len(raw)
    assert isinstance(msg, StartupMessage)
    assert msg.parameters == parameters
    assert (msg.major << 16) | msg.minor == version
    assert msg.encode() == raw
    assert msg.user == user
