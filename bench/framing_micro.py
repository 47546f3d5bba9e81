"""
Micro-benchmark of pool-mode framing: how fast can one core split
pgbench-like server traffic with L{pgtls_twisted.protocol._framing.MessageSplitter}?

The traffic is what C{pgbench -S} gets back per transaction (RowDescription,
one small DataRow, CommandComplete, ReadyForQuery: 4 messages in about 70
bytes, the worst case for a per-message cost), cut into 16 KiB chunks at
arbitrary points, as TCP/TLS delivers it. Three figures are printed:

 - C{baseline}: the loop with no splitting (what a pass-through pump pays);
 - C{split}: one L{MessageSplitter.feed} per chunk, watching what
   L{pgtls_twisted.protocol._txstate.TransactionTracker} needs;
 - C{split+track}: the same, feeding each event to a tracker, i.e. the
   whole per-chunk work of a transaction pooler's server side.

Numbers only: nothing here asserts a speed. Run from the repository root:

    PYTHONPATH=. python bench/framing_micro.py [megabytes]
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from pgtls_twisted.protocol import _wire as wire
from pgtls_twisted.protocol._framing import MessageSplitter
from pgtls_twisted.protocol._txstate import SERVER_PEEK, SERVER_WATCH, TransactionTracker

CHUNK = 16 * 1024


def pgbenchTransaction(aid: int) -> bytes:
    """The server's answer to one C{SELECT abalance FROM pgbench_accounts WHERE aid = ...}."""
    field = (
        b"abalance\0" + b"\0\0\0\0" + b"\0\3" + b"\0\0\0\x17" + b"\0\4" + b"\xff\xff\xff\xff\0\0"
    )
    value = str(aid % 10000).encode()
    return (
        wire.message(b"T", b"\0\1" + field)
        + wire.message(b"D", b"\0\1" + len(value).to_bytes(4, "big") + value)
        + wire.message(b"C", b"SELECT 1\0")
        + wire.message(b"Z", b"I")
    )


def makeChunks(total: int) -> tuple[list[bytes], int, int]:
    """
    About 4 MiB of traffic cut into 16 KiB chunks, to be replayed as often
    as needed: it ends on a message boundary, so replaying it is a valid
    stream. Returns the chunks, the replay count and the message count per
    replay.
    """
    parts = []
    size = 0
    count = 0
    aid = 1
    while size < 4 << 20:
        txn = pgbenchTransaction(aid)
        parts.append(txn)
        size += len(txn)
        count += 4
        aid += 7919
    stream = b"".join(parts)
    chunks = [stream[i : i + CHUNK] for i in range(0, len(stream), CHUNK)]
    return chunks, -(-total // len(stream)), count


def timed(name: str, work: Callable[[bytes], object], chunks: list[bytes], rounds: int) -> None:
    nbytes = sum(map(len, chunks)) * rounds
    start = time.perf_counter()
    for _ in range(rounds):
        for chunk in chunks:
            work(chunk)
    elapsed = time.perf_counter() - start
    print(
        f"{name:12} {nbytes / elapsed / 1e6:8.1f} MB/s  ({elapsed:.2f} s for {nbytes / 1e6:.0f} MB)"
    )


def main() -> None:
    megabytes = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    chunks, rounds, messages = makeChunks(megabytes * 1_000_000)
    print(
        f"{rounds} x {sum(map(len, chunks)) / 1e6:.1f} MB, {len(chunks)} chunks of "
        f"{CHUNK} bytes, {messages * rounds / 1e6:.1f} M messages"
    )
    sink: list[bytes] = []

    def baseline(chunk: bytes) -> None:
        sink.append(chunk)
        sink.pop()

    splitter = MessageSplitter(watch=SERVER_WATCH, peek=SERVER_PEEK)

    def split(chunk: bytes) -> None:
        out, events = splitter.feed(chunk)
        sink.append(out)
        sink.pop()

    tracked = MessageSplitter(watch=SERVER_WATCH, peek=SERVER_PEEK)
    tracker = TransactionTracker()
    serverMessage = tracker.serverMessage
    clientMessage = tracker.clientMessage

    def splitAndTrack(chunk: bytes) -> None:
        out, events = tracked.feed(chunk)
        for _, mtype, _, peek in events:
            if mtype == 90:  # 'Z': count the Query it answers
                clientMessage(81)
            serverMessage(mtype, peek or None)
        sink.append(out)
        sink.pop()

    timed("baseline", baseline, chunks, rounds)
    timed("split", split, chunks, rounds)
    timed("split+track", splitAndTrack, chunks, rounds)
    assert tracker.pinned is None and tracker.idle


if __name__ == "__main__":
    main()
