"""
Hypothesis settings for the suite's fuzz tests: more examples than
Hypothesis's default, and no deadline, since CI machines are shared and a
slow example is not a failure. Also what most fuzz tests of a parser need:
a stream cut into arbitrary chunks, and the memory a call allocated.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable, Iterable

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from pgtls_twisted.protocol import _wire as wire


def fuzz(max_examples: int = 300) -> settings:
    """Settings for a fuzz test of C{max_examples} examples."""
    return settings(
        max_examples=max_examples, deadline=None, suppress_health_check=[HealthCheck.too_slow]
    )


#: The settings most fuzz tests use.
FUZZ = fuzz()


#: Where to cut a stream (L{split_at}): drawn once for any stream, so that a
#: test need not build a strategy for each (Hypothesis validates every new one).
CUTS = st.lists(st.integers(0, 1 << 16), max_size=12)


def split_at(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    """
    C{data} cut at C{cuts}, each taken modulo one more than its length: the
    chunks a peer's stream may arrive in (an empty one included).
    """
    pieces = []
    start = 0
    for cut in sorted(c % (len(data) + 1) for c in cuts):
        pieces.append(data[start:cut])
        start = cut
    pieces.append(data[start:])
    return pieces


def peak_allocation(run: Callable[[], object]) -> int:
    """
    The most memory C{run} held at once beyond what was allocated before it
    (tracemalloc): how a test sees that a parser did not allocate what a
    hostile length field claims.
    """
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        run()
        return tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()


def read_messages(data: bytes) -> list[tuple[bytes, bytes]]:
    """
    Every typed message of C{data}, as pgtls's own reader frames them: what
    pgtls wrote must come back whole, so a message cut short fails.
    """
    reader = wire.MessageReader()
    reader.feed(data)
    messages = []
    while (message := reader.next()) is not None:
        messages.append(message)
    assert reader.drain() == b"", "a message written in part"
    return messages
