# -*- test-case-name: tests.test_wire -*-
"""
The PostgreSQL wire protocol, as far as a proxy needs it: pure functions and
value objects, no I/O.

Two framings exist on a PostgreSQL connection:

 - I{startup packets}, the first thing a client sends (and, after an
   SSLRequest or GSSENCRequest is answered, the first thing inside the new
   layer): C{Int32 length, Int32 code, body}, with no type byte;
 - I{typed messages} afterwards: C{Byte1 type, Int32 length, body}.

Everything here treats length fields as hostile: a length is checked
against its limit I{before} anything waits for, or allocates, the bytes it
claims.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

# Startup packet codes: (major << 16) | minor; the special requests use the
# reserved major version 1234.
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102
PROTOCOL_3_0 = 3 << 16
PROTOCOL_3_2 = (3 << 16) | 2

#: PostgreSQL's MAX_STARTUP_PACKET_LENGTH, length word included.
MAX_STARTUP_PACKET_LENGTH = 10000
MIN_STARTUP_PACKET_LENGTH = 8
#: A CancelRequest is 12 bytes plus the key: 4 bytes in protocol 3.0,
#: 4 to 256 in 3.2 (libpq 18 enforces 4..256; the server accepts 1..256).
MIN_CANCEL_KEY_LENGTH = 1
MAX_CANCEL_KEY_LENGTH = 256

#: The first byte of a TLS handshake record: a PostgreSQL 17 client using
#: C{sslnegotiation=direct} starts with its ClientHello instead of an
#: SSLRequest. As a length word it would claim hundreds of megabytes, so it
#: can never be a valid startup packet.
TLS_HANDSHAKE_RECORD = 0x16

SSL_REQUEST = struct.pack("!II", 8, SSL_REQUEST_CODE)
GSSENC_REQUEST = struct.pack("!II", 8, GSSENC_REQUEST_CODE)

_HEADER = struct.Struct("!II")
_MSG_HEADER = struct.Struct("!cI")
_INT32 = struct.Struct("!I")


class ProtocolViolation(Exception):
    """
    The peer broke the protocol.

    @ivar sqlstate: the SQLSTATE to report, or C{None} when the protocol
        allows no reply (PostgreSQL just closes, e.g. a bad startup length).
    @ivar message: text for the client's ErrorResponse and the log.
    """

    def __init__(self, message: str, sqlstate: str | None = "08P01") -> None:
        super().__init__(message)
        self.message = message
        self.sqlstate = sqlstate


@dataclass(frozen=True)
class SSLRequest:
    """The client asks for TLS; it waits for one byte, C{S} or C{N}."""


@dataclass(frozen=True)
class GSSENCRequest:
    """The client asks for GSSAPI encryption; pgtls always answers C{N}."""


@dataclass(frozen=True)
class CancelRequest:
    """
    A request to cancel the query running on the session identified by
    C{(pid, key)}. It is never answered.
    """

    pid: int
    key: bytes = field(repr=False)  # never logged: it is a secret

    def encode(self) -> bytes:
        return (
            _HEADER.pack(12 + len(self.key), CANCEL_REQUEST_CODE) + _INT32.pack(self.pid) + self.key
        )


@dataclass(frozen=True)
class StartupMessage:
    """
    The real start of a session.

    There is one form of the packet, the parsed one: every decision pgtls
    takes (the role a certificate must match, the pool, the admin console,
    replication) reads L{parameters}, and what is sent on to a server is
    L{encode}d from the same L{parameters}, never the bytes as received. A
    packet that two readers could understand differently (a repeated name,
    bytes that are not UTF-8) is refused by L{parse_startup_packet}, so the
    encoding is byte for byte what the client sent.

    @ivar parameters: the name/value pairs, in the order received.
    """

    major: int
    minor: int
    parameters: dict[str, str]

    @property
    def user(self) -> str:
        return self.parameters.get("user", "")

    @property
    def database(self) -> str:
        return self.parameters.get("database") or self.user

    @property
    def version(self) -> int:
        return (self.major << 16) | self.minor

    def encode(self) -> bytes:
        """The packet to forward: built from L{parameters}, nothing else."""
        return encode_startup_message(self.parameters, self.version)

    def replace(self, **parameters: str | None) -> StartupMessage:
        """A copy with some parameters changed (C{None} removes one)."""
        merged = dict(self.parameters)
        for name, value in parameters.items():
            if value is None:
                merged.pop(name, None)
            else:
                merged[name] = value
        return StartupMessage(self.major, self.minor, merged)


StartupPacket = SSLRequest | GSSENCRequest | CancelRequest | StartupMessage


def parse_startup_packet(buf: bytes | bytearray) -> tuple[StartupPacket, int] | None:
    """
    Parse one startup packet from the front of C{buf}.

    @return: C{None} while more bytes are needed, else C{(packet, consumed)}.
    @raise ProtocolViolation: the bytes cannot be a valid startup packet.
        The length is judged as soon as its four bytes are here, so a hostile
        length never makes the caller wait for (or buffer) more than
        L{MAX_STARTUP_PACKET_LENGTH} bytes.
    """
    if len(buf) < 4:
        return None
    (length,) = _INT32.unpack_from(buf, 0)
    if length < MIN_STARTUP_PACKET_LENGTH or length > MAX_STARTUP_PACKET_LENGTH:
        raise ProtocolViolation(f"invalid length of startup packet: {length}", sqlstate=None)
    if len(buf) < length:
        return None
    (code,) = _INT32.unpack_from(buf, 4)
    if code == SSL_REQUEST_CODE or code == GSSENC_REQUEST_CODE:
        if length != 8:
            raise ProtocolViolation(f"invalid length of encryption request packet: {length}")
        return (SSLRequest() if code == SSL_REQUEST_CODE else GSSENCRequest()), 8
    if code == CANCEL_REQUEST_CODE:
        keylen = length - 12
        if not MIN_CANCEL_KEY_LENGTH <= keylen <= MAX_CANCEL_KEY_LENGTH:
            raise ProtocolViolation(
                f"invalid length of cancel request packet: {length}", sqlstate=None
            )
        (pid,) = _INT32.unpack_from(buf, 8)
        return CancelRequest(pid, bytes(buf[12:length])), length
    major, minor = code >> 16, code & 0xFFFF
    if major != 3:
        raise ProtocolViolation(
            f"unsupported frontend protocol {major}.{minor}: pgtls supports 3.0 to 3.2"
        )
    return _parse_startup_message(bytes(buf[:length]), major, minor), length


def _parse_startup_message(raw: bytes, major: int, minor: int) -> StartupMessage:
    body = raw[8:]
    # The last value's own NUL is not the terminator: a non-empty list
    # ends in two NULs, as PostgreSQL requires.
    if not body or body[-1] != 0 or (body != b"\0" and not body.endswith(b"\0\0")):
        raise ProtocolViolation("invalid startup packet layout: expected terminator as last byte")
    parts = body[:-1].split(b"\0")
    if parts == [b""]:
        parts = []
    # "name\0value\0...name\0value\0\0": after dropping the final terminator
    # the split ends with an empty item, which pairs up with nothing.
    if parts and parts[-1] == b"":
        parts.pop()
    if len(parts) % 2:
        raise ProtocolViolation("invalid startup packet layout: odd number of name/value strings")
    params: dict[str, str] = {}
    for i in range(0, len(parts), 2):
        name = _startup_text(parts[i], "name")
        if not name:
            raise ProtocolViolation("invalid startup packet layout: empty parameter name")
        if name in params:
            # PostgreSQL keeps the last value, a reader of the first sees
            # another role or database: nobody may choose which is checked.
            raise ProtocolViolation(f'duplicate startup parameter "{name[:63]}"')
        params[name] = _startup_text(parts[i + 1], f'value of "{name[:63]}"')
    if not params.get("user"):
        raise ProtocolViolation(
            "no PostgreSQL user name specified in startup packet", sqlstate="28000"
        )
    return StartupMessage(major, minor, params)


def _startup_text(data: bytes, what: str) -> str:
    """
    A startup packet string, which must be UTF-8: with a lossy decoding two
    different names would look alike to pgtls while meaning two roles or
    databases to the server.
    """
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolViolation(
            f"invalid byte sequence for encoding UTF8 in startup parameter {what}",
            sqlstate="22021",
        ) from None


def encode_startup_message(parameters: dict[str, str], version: int = PROTOCOL_3_0) -> bytes:
    """Build a StartupMessage (what pgtls forwards, or sends for its own logins)."""
    body = b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in parameters.items()) + b"\0"
    return _HEADER.pack(8 + len(body), version) + body


# ---------------------------------------------------------------------------
# Typed messages

#: A generous bound for any message the proxy itself parses during startup
#: and authentication (PostgreSQL's own limit for auth tokens is 64 KiB).
#: Query traffic is never parsed in pass-through mode, so this does not limit
#: what a session can send.
MAX_PARSED_MESSAGE_LENGTH = 1 << 20


class MessageReader:
    """
    Incremental framing of typed messages, for the phases where the proxy
    must look at them (startup and authentication).

    Bytes go in with L{feed}; whole messages come out of L{next}. Lengths
    are checked against C{limit} when the header arrives.
    """

    def __init__(self, limit: int = MAX_PARSED_MESSAGE_LENGTH) -> None:
        self._buf = bytearray()
        self._limit = limit

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next(self) -> tuple[bytes, bytes] | None:
        """
        @return: C{(type, body)} for the next complete message, or C{None}.
        @raise ProtocolViolation: a length field is impossible or too large.
        """
        buf = self._buf
        if len(buf) < 5:
            return None
        mtype, length = _MSG_HEADER.unpack_from(buf, 0)
        if length < 4 or length > self._limit:
            raise ProtocolViolation(f"invalid message length {length} for message type {mtype!r}")
        end = 1 + length
        if len(buf) < end:
            return None
        body = bytes(buf[5:end])
        del buf[:end]
        return mtype, body

    def drain(self) -> bytes:
        """Hand back whatever is buffered, unparsed, and forget it."""
        data = bytes(self._buf)
        self._buf.clear()
        return data


def message(mtype: bytes, body: bytes = b"") -> bytes:
    """Frame C{body} as a typed message."""
    return mtype + _INT32.pack(4 + len(body)) + body


def _cstr(text: str) -> bytes:
    return text.encode("utf-8", "replace").replace(b"\0", b"?") + b"\0"


def error_response(
    sqlstate: str,
    text: str,
    *,
    severity: str = "FATAL",
    detail: str | None = None,
    hint: str | None = None,
) -> bytes:
    """
    An ErrorResponse written by the proxy itself. Both the localized (C{S})
    and the non-localized (C{V}) severity are sent, as PostgreSQL does.
    """
    fields = [
        b"S",
        _cstr(severity),
        b"V",
        _cstr(severity),
        b"C",
        _cstr(sqlstate),
        b"M",
        _cstr(text),
    ]
    if detail:
        fields += [b"D", _cstr(detail)]
    if hint:
        fields += [b"H", _cstr(hint)]
    return message(b"E", b"".join(fields) + b"\0")


def parse_error_fields(body: bytes) -> dict[str, str]:
    """
    Decode the fields of an ErrorResponse or NoticeResponse body into
    C{{code letter: text}}. Malformed bodies give whatever parsed cleanly;
    this never raises, because it only serves logging and routing decisions.
    """
    fields: dict[str, str] = {}
    pos = 0
    while pos < len(body) and body[pos] != 0:
        end = body.find(b"\0", pos + 1)
        if end < 0:
            break
        fields[chr(body[pos])] = body[pos + 1 : end].decode("utf-8", "replace")
        pos = end + 1
    return fields


# Authentication request codes (the Int32 at the start of an 'R' message).
AUTH_OK = 0
AUTH_CLEARTEXT_PASSWORD = 3
AUTH_MD5_PASSWORD = 5
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12


def auth_code(body: bytes) -> int:
    """The request code of an Authentication ('R') message body."""
    if len(body) < 4:
        raise ProtocolViolation("authentication message too short")
    return _INT32.unpack_from(body, 0)[0]


def authentication(code: int, payload: bytes = b"") -> bytes:
    return message(b"R", _INT32.pack(code) + payload)


AUTHENTICATION_OK = authentication(AUTH_OK)
AUTHENTICATION_CLEARTEXT_PASSWORD = authentication(AUTH_CLEARTEXT_PASSWORD)


def sasl_mechanisms(body: bytes) -> list[str]:
    """The mechanism names offered by an AuthenticationSASL body."""
    names = body[4:].split(b"\0")
    return [n.decode("ascii", "replace") for n in names if n]


def authentication_sasl(mechanisms: list[str]) -> bytes:
    return authentication(AUTH_SASL, b"".join(m.encode() + b"\0" for m in mechanisms) + b"\0")


def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    return message(b"p", _cstr(mechanism) + _INT32.pack(len(data)) + data)


def sasl_response(data: bytes) -> bytes:
    return message(b"p", data)


def parse_sasl_initial_response(body: bytes) -> tuple[str, bytes]:
    """
    The mechanism and client-first data of a SASLInitialResponse body:
    C{String mechanism, Int32 length (-1: none), Byte[length] data}.
    The length must match the bytes that follow exactly.
    """
    end = body.find(b"\0")
    if end <= 0 or len(body) < end + 5:
        raise ProtocolViolation("malformed SASLInitialResponse message")
    (length,) = _INT32.unpack_from(body, end + 1)
    data = body[end + 5 :]
    if length == 0xFFFFFFFF:
        length = 0
    if length != len(data):
        raise ProtocolViolation("malformed SASLInitialResponse message: wrong data length")
    return body[:end].decode("ascii", "replace"), data


def password_from_message(body: bytes) -> str:
    """The password in a PasswordMessage body (a NUL-terminated string)."""
    if not body or body[-1] != 0 or body.index(b"\0") != len(body) - 1:
        raise ProtocolViolation("invalid password packet")
    return body[:-1].decode("utf-8", "replace")


def backend_key_data(pid: int, key: bytes) -> bytes:
    return message(b"K", _INT32.pack(pid) + key)


def parse_backend_key_data(body: bytes) -> tuple[int, bytes]:
    if len(body) < 5 or len(body) > 4 + MAX_CANCEL_KEY_LENGTH:
        raise ProtocolViolation(f"invalid BackendKeyData length {len(body)}")
    return _INT32.unpack_from(body, 0)[0], body[4:]


def parameter_status(name: str, value: str) -> bytes:
    return message(b"S", _cstr(name) + _cstr(value))


def parse_parameter_status(body: bytes) -> tuple[str, str]:
    name, _, rest = body.partition(b"\0")
    value = rest.split(b"\0", 1)[0]
    return name.decode("utf-8", "replace"), value.decode("utf-8", "replace")


def ready_for_query(status: bytes = b"I") -> bytes:
    return message(b"Z", status)


TERMINATE = message(b"X")


# -- query results (the admin console answers queries itself) -----------------

#: Type OIDs for RowDescription: text and int8 are all the console needs.
TEXT_OID = 25
INT8_OID = 20
_INT16 = struct.Struct("!h")
_FIELD = struct.Struct("!IhIhih")


def row_description(columns: list[tuple[str, int]]) -> bytes:
    """RowDescription for (name, type OID) columns, all in text format."""
    parts = [_INT16.pack(len(columns))]
    for name, oid in columns:
        size = 8 if oid == INT8_OID else -1
        parts.append(_cstr(name) + _FIELD.pack(0, 0, oid, size, -1, 0))
    return message(b"T", b"".join(parts))


def data_row(values: list[object]) -> bytes:
    """DataRow: each value as text; C{None} is NULL."""
    parts = [_INT16.pack(len(values))]
    for value in values:
        if value is None:
            parts.append(_INT32.pack(0xFFFFFFFF))
        else:
            data = str(value).encode("utf-8")
            parts.append(_INT32.pack(len(data)) + data)
    return message(b"D", b"".join(parts))


def command_complete(tag: str) -> bytes:
    return message(b"C", _cstr(tag))


def notice_response(text: str, *, severity: str = "NOTICE", sqlstate: str = "00000") -> bytes:
    """A NoticeResponse written by the proxy (same fields as L{error_response})."""
    body = error_response(sqlstate, text, severity=severity)[5:]
    return message(b"N", body)


def query_text(body: bytes) -> str:
    """The SQL of a Query message body (NUL-terminated)."""
    return body.split(b"\0", 1)[0].decode("utf-8", "replace")
