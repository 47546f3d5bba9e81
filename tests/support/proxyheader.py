"""
A load balancer for tests of C{listener.proxy_protocol}: a threaded TCP
forwarder that connects to pgtls from a chosen source address and sends a
PROXY protocol header (v1 or v2, built here from the specification)
before whatever its client sends, then copies bytes both ways.

Real clients (psycopg, libpq's cancel) connect to the forwarder as they
would to HAProxy with C{send-proxy} or C{send-proxy-v2}.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import threading
from collections.abc import Callable

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def v1_header(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    family = "TCP6" if ":" in source[0] else "TCP4"
    return f"PROXY {family} {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n".encode()


def v2_header(source: tuple[str, int] | None, destination: tuple[str, int] | None = None) -> bytes:
    """A v2 PROXY header over TCP/IPv4, or a LOCAL one (a health check) when C{source} is None."""
    if source is None:
        return V2_SIGNATURE + bytes([0x20, 0x00]) + struct.pack("!H", 0)
    assert destination is not None
    body = (
        ipaddress.IPv4Address(source[0]).packed
        + ipaddress.IPv4Address(destination[0]).packed
        + struct.pack("!HH", source[1], destination[1])
    )
    return V2_SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", len(body)) + body


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class Forwarder:
    """
    Listens on 127.0.0.1 (an ephemeral port, L{port}); each connection is
    forwarded to C{127.0.0.1:target} from C{source_address}, with
    C{header(client_address)} sent first (C{b""}: no header).
    """

    def __init__(
        self,
        target: int,
        header: Callable[[tuple[str, int]], bytes],
        source_address: str = "127.0.0.1",
    ) -> None:
        self.target = target
        self.header = header
        self.source_address = source_address
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, address = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(
                    ("127.0.0.1", self.target), timeout=10, source_address=(self.source_address, 0)
                )
                upstream.settimeout(None)
                upstream.sendall(self.header(address))
            except OSError:
                client.close()
                continue
            self._sockets += [client, upstream]
            threading.Thread(target=_pipe, args=(client, upstream), daemon=True).start()
            threading.Thread(target=_pipe, args=(upstream, client), daemon=True).start()

    def close(self) -> None:
        self.listener.close()
        for s in self._sockets:
            try:
                s.close()
            except OSError:
                pass
