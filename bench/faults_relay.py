"""
The latency half of bench/faults' first scenario, for a kernel without
C{sch_netem}: a TCP relay that holds every chunk it reads for a fixed
delay before writing it on, in both directions, in order.

It runs inside PostgreSQL's network namespace, between pgtls and the
server; its delay is off until SIGUSR1 (on) and off again at SIGUSR2, so one
warm pool measures both. Packet loss is not its job: bench/faults drops
packets on the veth with nftables, below TCP, where loss belongs. What it
cannot give is TCP's own view of the latency (the kernel measures a short
round trip on the veth, so retransmission timers fire sooner than they would
over a real 50 ms path); FAULTS.md says so.

    faults_relay.py LISTEN_HOST:PORT TARGET_HOST:PORT DELAY_MS
"""

from __future__ import annotations

import asyncio
import signal
import sys

#: The delay each chunk is held, in seconds; 0 until SIGUSR1.
delay = [0.0]


async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy C{reader} to C{writer}, each chunk C{delay} later, never reordered."""
    loop = asyncio.get_running_loop()
    last = 0.0

    def later(action) -> None:  # type: ignore[no-untyped-def]
        nonlocal last
        at = max(loop.time() + delay[0], last)
        last = at
        if at <= loop.time():
            action()
        else:
            loop.call_at(at, action)

    def write(data: bytes) -> None:
        if not writer.is_closing():
            writer.write(data)

    def finish() -> None:
        if not writer.is_closing():
            if writer.can_write_eof():
                writer.write_eof()
            else:
                writer.close()

    try:
        while data := await reader.read(65536):
            later(lambda d=data: write(d))
        later(finish)
    except OSError:
        # A reset on one side is a reset on the other.
        later(lambda: writer.transport.abort())


def handler(target: tuple[str, int]):  # type: ignore[no-untyped-def]
    """A connection handler that opens C{target} and pumps both ways."""

    async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            sr, sw = await asyncio.open_connection(*target)
        except OSError:
            cw.transport.abort()
            return
        await asyncio.gather(pump(cr, sw), pump(sr, cw))
        await asyncio.sleep(delay[0] + 0.01)
        cw.close()
        sw.close()

    return handle


def split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


async def main() -> None:
    listen, target, ms = split(sys.argv[1]), split(sys.argv[2]), float(sys.argv[3])
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, lambda: delay.__setitem__(0, ms / 1000))
    loop.add_signal_handler(signal.SIGUSR2, lambda: delay.__setitem__(0, 0.0))
    stop = loop.create_future()
    loop.add_signal_handler(signal.SIGTERM, lambda: stop.done() or stop.set_result(None))
    server = await asyncio.start_server(handler(target), *listen)
    print(f"relay {sys.argv[1]} -> {sys.argv[2]} ready", flush=True)
    async with server:
        await stop


if __name__ == "__main__":
    asyncio.run(main())
