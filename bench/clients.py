"""
Load clients for the resource figures of C{bench/run}, each run as its own
process so that its memory and CPU are not counted as the proxy's.

 - C{idle}: holds thousands of logged-in TLS sessions (SSLRequest, TLS,
   StartupMessage, password or SCRAM, ReadyForQuery) and then does nothing.
   asyncio keeps one TLS session in a few tens of KiB, where libpq (pgbench,
   psql) would need a process or a thread each. Commands come on stdin, one
   a line: C{connect N} opens N more sessions and answers
   C{connected TOTAL FAILED FIRST-ERROR}; C{exit} closes everything.
 - C{slowread}: one session that runs a query with a large result and reads
   it at a fixed rate, slower than PostgreSQL produces it, so that the
   proxy's flow control is what keeps its memory flat. Prints
   C{done BYTES SECONDS} at the end.

Both speak just enough of the protocol (v3.0, text results, no
extended query). Run with the project's virtualenv Python, from C{bench/run}.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import socket
import ssl
import struct
import sys
import time

from scramp import ScramClient

from pgtls_twisted.protocol import _wire as wire


def _context(ca: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca)
    ctx.check_hostname = True
    return ctx


def _startup(user: str, database: str) -> bytes:
    return wire.encode_startup_message({"user": user, "database": database})


class LoginError(Exception):
    pass


class _Auth:
    """The client side of authentication, fed one backend message at a time."""

    def __init__(self, user: str, password: str) -> None:
        self.user = user
        self.password = password
        self.scram: ScramClient | None = None

    def answer(self, mtype: bytes, body: bytes) -> bytes | None:
        """The reply to one authentication message, C{None} for none."""
        if mtype == b"E":
            raise LoginError(wire.parse_error_fields(body).get("M", "error"))
        if mtype != b"R":
            return None
        code = struct.unpack_from("!I", body)[0]
        if code == wire.AUTH_CLEARTEXT_PASSWORD:
            return wire.message(b"p", self.password.encode() + b"\0")
        if code == wire.AUTH_SASL:
            self.scram = ScramClient(["SCRAM-SHA-256"], self.user, self.password)
            first = self.scram.get_client_first().encode()
            return wire.sasl_initial_response("SCRAM-SHA-256", first)
        if code == wire.AUTH_SASL_CONTINUE:
            assert self.scram is not None
            self.scram.set_server_first(body[4:].decode())
            return wire.sasl_response(self.scram.get_client_final().encode())
        if code == wire.AUTH_SASL_FINAL:
            assert self.scram is not None
            self.scram.set_server_final(body[4:].decode())
            return None
        if code == wire.AUTH_OK:
            return None
        raise LoginError(f"unsupported authentication request {code}")


async def _readMessage(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    header = await reader.readexactly(5)
    mtype, length = struct.unpack("!cI", header)
    return mtype, await reader.readexactly(length - 4)


async def _openSession(
    args: argparse.Namespace, ctx: ssl.SSLContext, times: dict[str, float] | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """
    One session to ReadyForQuery. C{times}, if given, gets the
    C{time.perf_counter()} at C{start}, C{connected} (TCP), C{tls_start}
    (the SSLRequest answered), C{tls_done} and C{ready}.
    """
    times = {} if times is None else times
    times["start"] = time.perf_counter()
    reader, writer = await asyncio.open_connection(args.host, args.port)
    times["connected"] = time.perf_counter()
    writer.write(wire.SSL_REQUEST)
    if await reader.readexactly(1) != b"S":
        raise LoginError("server refused TLS")
    times["tls_start"] = time.perf_counter()
    await writer.start_tls(ctx, server_hostname=args.server_name)
    times["tls_done"] = time.perf_counter()
    writer.write(_startup(args.user, args.database))
    auth = _Auth(args.user, args.password)
    while True:
        mtype, body = await _readMessage(reader)
        reply = auth.answer(mtype, body)
        if reply is not None:
            writer.write(reply)
        if mtype == b"Z":
            times["ready"] = time.perf_counter()
            return reader, writer


async def _idle(args: argparse.Namespace) -> None:
    ctx = _context(args.ca)
    sessions: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    failed = 0
    firstError = "-"
    while True:
        line = (await stdin.readline()).decode().split()
        if not line or line[0] == "exit":
            break
        wanted = int(line[1])
        limit = asyncio.Semaphore(args.concurrency)

        async def one(limit: asyncio.Semaphore) -> None:
            nonlocal failed, firstError
            async with limit:
                try:
                    sessions.append(await _openSession(args, ctx))
                except (OSError, LoginError, asyncio.IncompleteReadError, ssl.SSLError) as e:
                    failed += 1
                    if firstError == "-":
                        firstError = repr(e).replace(" ", "_")[:200]

        await asyncio.gather(*(one(limit) for _ in range(wanted)))
        print(f"connected {len(sessions)} {failed} {firstError}", flush=True)
    for _, writer in sessions:
        writer.close()


def _slowread(args: argparse.Namespace) -> None:
    """Blocking, so the pace is exact: read C{chunk} bytes, sleep to keep to C{rate}."""
    raw = socket.create_connection((args.host, args.port))
    # A small receive buffer, so the kernel does not hide the backlog.
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    raw.sendall(wire.SSL_REQUEST)
    if raw.recv(1) != b"S":
        raise SystemExit("server refused TLS")
    sock = _context(args.ca).wrap_socket(raw, server_hostname=args.server_name)
    sock.sendall(_startup(args.user, args.database))
    auth = _Auth(args.user, args.password)
    buf = b""

    def message() -> tuple[bytes, bytes]:
        nonlocal buf
        while len(buf) < 5 or len(buf) < 1 + struct.unpack_from("!I", buf, 1)[0]:
            data = sock.recv(65536)
            if not data:
                raise SystemExit("connection closed during login")
            buf += data
        length = struct.unpack_from("!I", buf, 1)[0]
        mtype, body, buf = buf[:1], buf[5 : 1 + length], buf[1 + length :]
        return mtype, body

    while True:
        mtype, body = message()
        reply = auth.answer(mtype, body)
        if reply is not None:
            sock.sendall(reply)
        if mtype == b"Z":
            break
    sock.sendall(wire.message(b"Q", args.query.encode() + b"\0"))
    print("started", flush=True)
    started = time.monotonic()
    total = len(buf)
    chunk = args.chunk
    tail = buf[-6:]
    while True:
        data = sock.recv(chunk)
        if not data:
            raise SystemExit("connection closed before ReadyForQuery")
        total += len(data)
        tail = (tail + data)[-6:]
        # ReadyForQuery(I) is the last 6 bytes of the answer.
        if tail == b"Z\0\0\0\5I":
            break
        due = started + total / args.rate
        pause = due - time.monotonic()
        if pause > 0:
            time.sleep(pause)
    print(f"done {total} {time.monotonic() - started:.1f}", flush=True)
    sock.sendall(wire.TERMINATE)
    sock.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mode", choices=("idle", "slowread"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--server-name", default="localhost")
    parser.add_argument("--ca", required=True)
    parser.add_argument("--user", required=True)
    parser.add_argument("--password", required=True)
    parser.add_argument("--database", required=True)
    parser.add_argument("--concurrency", type=int, default=16, help="idle: logins at once")
    parser.add_argument("--query", default="SELECT 1", help="slowread: the query")
    parser.add_argument("--rate", type=float, default=64 << 20, help="slowread: bytes/s")
    parser.add_argument("--chunk", type=int, default=64 * 1024, help="slowread: recv size")
    args = parser.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.mode == "idle":
        asyncio.run(_idle(args))
    else:
        _slowread(args)


if __name__ == "__main__":
    main()
