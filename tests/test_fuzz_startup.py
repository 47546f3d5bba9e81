"""
Fuzzing the first bytes of a connection and the messages of a login.

tests/test_wire.py fuzzes L{parse_startup_packet} on one buffer; here the
bytes go where a client's go, to the client leg
(L{pgtls_twisted.proxy._frontend.ClientProtocol}), as a stream of
startup-phase packets (encryption requests, CancelRequests,
StartupMessages, a TLS ClientHello, garbage, hostile length words) cut
into any chunks:

 - nothing escapes C{dataReceived} and nothing is logged as an error;
 - what the leg keeps of an incomplete packet stays below PostgreSQL's
   10,000-byte limit, whatever length the packet claims, and parsing a
   header claiming 2**32 - 1 bytes allocates nothing of the kind;
 - what it answers is C{N} to a GSSENCRequest, C{S} and TLS to an
   SSLRequest, or one ErrorResponse that pgtls's own reader parses.

Then the small parsers of the login phase, each against its builder:
PasswordMessage, BackendKeyData, ParameterStatus, AuthenticationSASL,
the Authentication code and a Query's text, for any bytes and as round
trips.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from support.fakes import connect_client, make_route, sessions
from support.fuzz import CUTS, FUZZ, peak_allocation, read_messages, split_at
from support.logcapture import captured, logged_errors

from pgtls_twisted.protocol import _wire as wire
from pgtls_twisted.protocol._wire import ProtocolViolation
from pgtls_twisted.proxy._route import Route
from pgtls_twisted.testing.pki import PKI


@pytest.fixture(scope="module")
def route(pki: PKI, tmp_path_factory: pytest.TempPathFactory) -> Route:
    """A route that takes plaintext clients too, so a StartupMessage reaches a session."""
    return make_route(pki, Path(tmp_path_factory.mktemp("fuzz")), listener={"tls": "allow"})


# -- what a client may send first ------------------------------------------------------

_NAMES = st.text(st.characters(exclude_characters="\0", exclude_categories=("Cs",)), max_size=8)
_VERSIONS = st.sampled_from([wire.PROTOCOL_3_0, wire.PROTOCOL_3_2, 2 << 16, (3 << 16) | 99])


def _startup(parameters: dict[str, str], version: int) -> bytes:
    return wire.encode_startup_message(parameters, version)


_VALID_STARTUPS = st.builds(
    _startup,
    st.fixed_dictionaries(
        {"user": _NAMES.filter(bool)}, optional={"database": _NAMES, "application_name": _NAMES}
    ),
    st.sampled_from([wire.PROTOCOL_3_0, wire.PROTOCOL_3_2]),
)
_PACKETS = st.one_of(
    _VALID_STARTUPS,
    st.sampled_from([wire.SSL_REQUEST, wire.GSSENC_REQUEST]),
    st.builds(
        lambda pid, key: wire.CancelRequest(pid, key).encode(),
        st.integers(0, 0xFFFFFFFF),
        st.binary(max_size=300),
    ),
    st.builds(
        _startup,
        st.dictionaries(st.sampled_from(["user", "database", "options", ""]) | _NAMES, _NAMES),
        _VERSIONS,
    ),
    st.builds(
        lambda length, rest: struct.pack("!I", length) + rest,
        st.sampled_from([0, 7, 8, 9999, 10000, 10001, 0x7FFFFFFF, 0xFFFFFFFF]),
        st.binary(max_size=16),
    ),
    st.just(bytes([wire.TLS_HANDSHAKE_RECORD, 3, 1, 0, 200])),
    st.binary(max_size=12),
)
_STREAMS = st.lists(_PACKETS, max_size=4).map(b"".join)


def _answers(stream: bytes, written: bytes) -> None:
    """
    What the leg wrote before TLS, if any: C{N}s, then C{S} or one
    ErrorResponse; or, to a client that began with a ClientHello, TLS.
    """
    if stream[:1] == bytes([wire.TLS_HANDSHAKE_RECORD]):
        assert written[:1] in (b"", b"\x15", b"\x16"), written[:40]
        return
    while written[:1] == b"N":
        written = written[1:]
    if not written or written[:1] == b"S":
        return
    ((mtype, body),) = read_messages(written)
    assert mtype == b"E", written[:40]
    fields = wire.parse_error_fields(body)
    assert fields["S"] == "FATAL" and len(fields["C"]) == 5 and fields["M"]


@FUZZ
@given(_STREAMS, CUTS)
@example(wire.GSSENC_REQUEST + wire.SSL_REQUEST, [8])
@example(wire.encode_startup_message({"user": "a"}), [3, 9])
def test_the_client_leg_reads_any_first_bytes(route: Route, stream: bytes, cuts: list[int]) -> None:
    started = len(sessions(route))
    proto, transport = connect_client(route)
    with captured() as events:
        # (A socket never delivers an empty read: Twisted takes it for the end.)
        for chunk in filter(None, split_at(stream, cuts)):
            if len(sessions(route)) > started:
                break  # the session reads the rest
            proto.dataReceived(chunk)
            # Held: never more than an incomplete packet may be.
            assert len(proto._buf) < wire.MAX_STARTUP_PACKET_LENGTH
    assert logged_errors(events) == []
    _answers(stream, transport.value())
    for _, startup in sessions(route)[started:]:
        assert startup.user and startup.encode().startswith(
            struct.pack("!I", len(startup.encode()))
        )
    proto.connectionLost(None)


@pytest.mark.parametrize(
    "length", [9, 9999, 10000, 10001, 1 << 20, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF]
)
def test_a_claimed_startup_length_is_not_allocated(length: int) -> None:
    """The length word alone decides: wait for at most 10,000 bytes, or refuse; allocate neither."""
    header = struct.pack("!II", length, wire.PROTOCOL_3_0)

    def parse() -> None:
        try:
            assert wire.parse_startup_packet(header) is None
        except ProtocolViolation as e:
            assert e.sqlstate is None and length > wire.MAX_STARTUP_PACKET_LENGTH

    assert peak_allocation(parse) < 4096


@pytest.mark.parametrize("length", [4, 1 << 20, (1 << 20) + 1, 0x7FFFFFFF, 0xFFFFFFFF])
def test_a_claimed_message_length_is_not_allocated(length: int) -> None:
    """L{wire.MessageReader} (the login phase): up to its limit it waits, beyond it refuses."""
    reader = wire.MessageReader()

    def read() -> None:
        reader.feed(b"p" + struct.pack("!I", length))
        try:
            message = reader.next()
        except ProtocolViolation:
            assert length > wire.MAX_PARSED_MESSAGE_LENGTH
            return
        assert (message is None) == (length > 4)

    assert peak_allocation(read) < 4096


# -- the login phase's parsers, against their builders ------------------------------------------


@FUZZ
@given(_NAMES, st.binary(max_size=40))
def test_password_message(password: str, junk: bytes) -> None:
    assert wire.password_from_message(password.encode() + b"\0") == password
    try:
        text = wire.password_from_message(junk)
    except ProtocolViolation as e:
        assert e.sqlstate == "08P01"
        return
    assert junk.endswith(b"\0") and junk.count(b"\0") == 1
    assert text == junk[:-1].decode("utf-8", "replace")


@FUZZ
@given(st.integers(0, 0xFFFFFFFF), st.binary(min_size=1, max_size=256), st.binary(max_size=300))
def test_backend_key_data(pid: int, key: bytes, junk: bytes) -> None:
    message = wire.backend_key_data(pid, key)
    assert message[:1] == b"K" and struct.unpack_from("!I", message, 1)[0] == len(message) - 1
    assert wire.parse_backend_key_data(message[5:]) == (pid, key)
    try:
        parsed = wire.parse_backend_key_data(junk)
    except ProtocolViolation:
        assert not 5 <= len(junk) <= 260
        return
    assert parsed == (struct.unpack_from("!I", junk)[0], junk[4:])


@FUZZ
@given(_NAMES, _NAMES, st.binary(max_size=40))
def test_parameter_status(name: str, value: str, junk: bytes) -> None:
    assert wire.parse_parameter_status(wire.parameter_status(name, value)[5:]) == (name, value)
    parsed = wire.parse_parameter_status(junk)
    assert all(isinstance(text, str) for text in parsed)


_MECHANISMS = st.lists(st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ-0123456789", min_size=1), max_size=4)


@FUZZ
@given(_MECHANISMS, st.binary(max_size=40))
def test_authentication_codes_and_mechanisms(mechanisms: list[str], junk: bytes) -> None:
    body = wire.authentication_sasl(mechanisms)[5:]
    assert wire.auth_code(body) == wire.AUTH_SASL
    assert wire.sasl_mechanisms(body) == mechanisms
    try:
        code = wire.auth_code(junk)
    except ProtocolViolation:
        assert len(junk) < 4
        return
    assert code == struct.unpack_from("!I", junk)[0]
    assert all(name and "\0" not in name for name in wire.sasl_mechanisms(junk))


@FUZZ
@given(_NAMES, st.binary(max_size=40))
def test_query_text(sql: str, junk: bytes) -> None:
    assert wire.query_text(wire.message(b"Q", sql.encode() + b"\0")[5:]) == sql
    assert "\0" not in wire.query_text(junk)
