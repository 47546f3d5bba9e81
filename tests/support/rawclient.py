"""
A tiny blocking PostgreSQL client on raw sockets and the stdlib C{ssl}
module, for misbehaving on purpose: pipelining bytes after an SSLRequest,
sending impossible lengths, stalling mid-handshake, asking for encryption
twice. Real drivers refuse to do any of that.

Everything here blocks, so a test that needs the proxy (on the reactor
thread) to answer must run it with L{deferToThread}. Every socket has a
timeout, so a proxy that never answers fails the test instead of hanging it.
"""

from __future__ import annotations

import select
import socket
import ssl
import struct
import time
from pathlib import Path
from typing import Any

from cryptography import x509

from pgtls_twisted.pool import _serverlogin as serverlogin
from pgtls_twisted.protocol import _wire as wire

#: Seconds any single blocking operation may take before the test fails.
TIMEOUT = 5.0

SSL_REQUEST = wire.SSL_REQUEST
GSSENC_REQUEST = wire.GSSENC_REQUEST
TERMINATE = wire.TERMINATE

#: What "the peer closed the connection" looks like, in all its forms: an
#: orderly FIN, a reset (the proxy aborts), a TLS EOF without close_notify.
_CLOSED = (ConnectionResetError, ConnectionAbortedError, BrokenPipeError, ssl.SSLEOFError)


class Closed(Exception):
    """The peer closed the connection before the expected bytes arrived."""

    def __init__(self, received: bytes = b"") -> None:
        super().__init__(f"connection closed after {len(received)} byte(s): {received[:64]!r}")
        self.received = received


class ServerError(Exception):
    """The server (or the proxy) sent an ErrorResponse."""

    def __init__(self, fields: dict[str, str]) -> None:
        super().__init__(f"{fields.get('S')} {fields.get('C')} {fields.get('M')}")
        self.fields = fields


# ---------------------------------------------------------------------------
# Packets


def startup_message(
    user: str, database: str | None = None, version: int = wire.PROTOCOL_3_0, **params: str
) -> bytes:
    """A StartupMessage (protocol 3.0 unless told otherwise)."""
    parameters = {"user": user, "database": database or user, **params}
    return wire.encode_startup_message(parameters, version)


def raw_startup(body: bytes, version: int = wire.PROTOCOL_3_0) -> bytes:
    """A StartupMessage with C{body} exactly as given (well-formed or not)."""
    return struct.pack("!II", 8 + len(body), version) + body


def cancel_request(pid: int, key: bytes) -> bytes:
    """A CancelRequest; the key length is whatever C{key} is, valid or not."""
    return wire.CancelRequest(pid, key).encode()


def length_word(length: int, payload: bytes = b"") -> bytes:
    """A startup packet header claiming C{length}, whatever follows."""
    return struct.pack("!I", length) + payload


def query_message(sql: str) -> bytes:
    return wire.message(b"Q", sql.encode() + b"\0")


def password_message(password: str) -> bytes:
    return wire.message(b"p", password.encode() + b"\0")


def md5_password(user: str, password: str, salt: bytes) -> str:
    """libpq's C{md5} answer (pgtls's own implementation, also used to log in pools)."""
    return serverlogin.md5_password(user, password, salt).decode()


# ---------------------------------------------------------------------------
# Sockets


def connect(port: int, host: str = "127.0.0.1", timeout: float = TIMEOUT) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Exactly C{n} bytes, or L{Closed} with whatever came first."""
    data = bytearray()
    while len(data) < n:
        try:
            chunk = sock.recv(n - len(data))
        except _CLOSED:
            chunk = b""
        if not chunk:
            raise Closed(bytes(data))
        data += chunk
    return bytes(data)


def read_until_close(sock: socket.socket, timeout: float = TIMEOUT, limit: int = 1 << 20) -> bytes:
    """
    Everything the peer sends until it closes the connection.

    @raise TimeoutError: the connection is still open after C{timeout}.
    """
    deadline = time.monotonic() + timeout
    data = bytearray()
    while len(data) < limit:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"connection still open after {timeout}s; got {bytes(data)!r}")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except _CLOSED:
            break
        except TimeoutError:
            raise TimeoutError(
                f"connection still open after {timeout}s; got {bytes(data)!r}"
            ) from None
        if not chunk:
            break
        data += chunk
    return bytes(data)


def read_message(sock: socket.socket) -> tuple[bytes, bytes]:
    """One typed message: C{(type, body)}."""
    header = recv_exact(sock, 5)
    mtype, length = struct.unpack("!cI", header)
    if length < 4 or length > wire.MAX_PARSED_MESSAGE_LENGTH:
        raise AssertionError(f"impossible message length {length} for type {mtype!r}")
    return mtype, recv_exact(sock, length - 4)


def read_error(sock: socket.socket) -> dict[str, str]:
    """The fields of the ErrorResponse that must come next."""
    mtype, body = read_message(sock)
    if mtype != b"E":
        raise AssertionError(f"expected an ErrorResponse, got {mtype!r} {body[:200]!r}")
    return wire.parse_error_fields(body)


def read_fatal(sock: socket.socket, timeout: float = TIMEOUT) -> dict[str, str]:
    """
    A FATAL ErrorResponse followed by the end of the connection, and
    nothing in between.
    """
    fields = read_error(sock)
    if fields.get("S") != "FATAL":
        raise AssertionError(f"expected a FATAL error, got {fields}")
    rest = read_until_close(sock, timeout)
    if rest:
        raise AssertionError(f"bytes after the FATAL error: {rest[:200]!r}")
    return fields


# ---------------------------------------------------------------------------
# TLS


def tls_context(
    ca: Path | str | None,
    *,
    alpn: list[str] | None = None,
    minimum_version: ssl.TLSVersion | None = None,
    maximum_version: ssl.TLSVersion | None = None,
    ciphers: str | None = None,
    cert: Path | str | None = None,
    key: Path | str | None = None,
) -> ssl.SSLContext:
    """
    A client context verifying the server against C{ca} (no verification
    if C{None}), presenting C{cert} and C{key} if given.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key) if key is not None else None)
    if ca is None:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx.load_verify_locations(str(ca))
    if ciphers is not None:
        ctx.set_ciphers(ciphers)
    if minimum_version is not None:
        ctx.minimum_version = minimum_version
    if maximum_version is not None:
        ctx.maximum_version = maximum_version
    if alpn is not None:
        ctx.set_alpn_protocols(alpn)
    return ctx


def tls_wrap(
    sock: socket.socket,
    ca: Path | str | None,
    *,
    server_hostname: str = "localhost",
    **options: Any,
) -> ssl.SSLSocket:
    """
    Run a TLS handshake on C{sock} (already negotiated, or direct);
    C{options} are L{tls_context}'s.
    """
    return tls_context(ca, **options).wrap_socket(sock, server_hostname=server_hostname)


def request_tls(sock: socket.socket, ca: Path | str | None, **kwargs: object) -> ssl.SSLSocket:
    """SSLRequest, expect exactly C{S}, then the TLS handshake."""
    sock.sendall(SSL_REQUEST)
    answer = recv_exact(sock, 1)
    if answer != b"S":
        raise AssertionError(f"SSLRequest answered {answer!r}")
    return tls_wrap(sock, ca, **kwargs)  # type: ignore[arg-type]


def served_serial(port: int, ca: Path | str) -> int:
    """The serial number of the certificate a new handshake on C{port} is served."""
    with connect(port) as raw, request_tls(raw, ca) as sock:
        der = sock.getpeercert(binary_form=True)
        assert der is not None
        return int(x509.load_der_x509_certificate(der).serial_number)


def client_hello(server_hostname: str = "localhost", alpn: list[str] | None = None) -> bytes:
    """The bytes of a genuine ClientHello, made in memory (nothing is sent)."""
    ctx = tls_context(None, alpn=alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    conn = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    try:
        conn.do_handshake()
    except ssl.SSLWantReadError:
        pass
    hello = outgoing.read()
    assert hello[:1] == b"\x16", hello[:16]
    return hello


# ---------------------------------------------------------------------------
# Sessions


def startup_cleartext(
    sock: socket.socket, user: str, password: str, database: str = "postgres"
) -> dict[str, object]:
    """
    Log in: StartupMessage, then answer AuthenticationCleartextPassword or
    AuthenticationMD5Password, up to ReadyForQuery.

    @return: C{{"parameters": {...}, "backend_key": (pid, key)}}.
    @raise ServerError: the login failed.
    """
    sock.sendall(startup_message(user, database))
    parameters: dict[str, str] = {}
    backend_key: tuple[int, bytes] | None = None
    while True:
        mtype, body = read_message(sock)
        if mtype == b"R":
            code = wire.auth_code(body)
            if code == wire.AUTH_OK:
                continue
            if code == wire.AUTH_CLEARTEXT_PASSWORD:
                sock.sendall(password_message(password))
            elif code == wire.AUTH_MD5_PASSWORD:
                sock.sendall(password_message(md5_password(user, password, body[4:8])))
            else:
                raise AssertionError(f"unsupported authentication request {code}")
        elif mtype == b"S":
            name, value = wire.parse_parameter_status(body)
            parameters[name] = value
        elif mtype == b"K":
            backend_key = wire.parse_backend_key_data(body)
        elif mtype == b"E":
            raise ServerError(wire.parse_error_fields(body))
        elif mtype == b"Z":
            return {"parameters": parameters, "backend_key": backend_key}
        # NoticeResponse, NegotiateProtocolVersion: ignored.


def simple_query(sock: socket.socket, sql: str) -> list[tuple[str | None, ...]]:
    """Run C{sql} with the simple query protocol; the rows, as text."""
    sock.sendall(query_message(sql))
    rows: list[tuple[str | None, ...]] = []
    error: dict[str, str] | None = None
    while True:
        mtype, body = read_message(sock)
        if mtype == b"D":
            (count,) = struct.unpack_from("!H", body, 0)
            pos, row = 2, []
            for _ in range(count):
                (length,) = struct.unpack_from("!i", body, pos)
                pos += 4
                if length < 0:
                    row.append(None)
                else:
                    row.append(body[pos : pos + length].decode())
                    pos += length
            rows.append(tuple(row))
        elif mtype == b"E":
            error = wire.parse_error_fields(body)
        elif mtype == b"Z":
            if error is not None:
                raise ServerError(error)
            return rows


def readable(sock: socket.socket, timeout: float) -> bool:
    """Whether C{sock} has something to read (or was closed) within C{timeout}."""
    ready, _, _ = select.select([sock], [], [], timeout)
    return bool(ready)
