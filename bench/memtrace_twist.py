"""
Run C{twist} with tracemalloc on, for C{bench/idle_clients.py --memtrace}:
where pgtls's memory goes, and what stays after its clients are gone.

    python bench/memtrace_twist.py OUTDIR pgtls --config routes.toml

Each SIGRTMIN+1 (C{os.kill(pid, signal.SIGRTMIN + 1)}) runs a full garbage
collection and writes C{OUTDIR/snapshot-N.txt}: live objects by type, and
the allocation sites holding the most memory, both as totals and as the
difference from the first snapshot. Only for C{workers = 1}: the workers of
a supervisor are processes of their own, started without it. tracemalloc
roughly doubles memory use and slows allocation: the figures it gives are
where memory is, not how much pgtls uses untraced.
"""

from __future__ import annotations

import gc
import signal
import sys
import tracemalloc
from collections import Counter
from pathlib import Path
from typing import Any

from twisted.application.twist import _twist
from twisted.application.twist._twist import Twist

#: Frames kept per allocation: enough to tell callers of a shared helper apart.
FRAMES = 8


class Dumper:
    def __init__(self, out: Path) -> None:
        self.out = out
        self.count = 0
        self.first: tracemalloc.Snapshot | None = None
        self.firstTypes: Counter[str] = Counter()

    def __call__(self, signum: int, frame: Any) -> None:
        gc.collect()
        types = Counter(type(o).__qualname__ for o in gc.get_objects())
        snap = tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(False, tracemalloc.__file__)]
        )
        self.count += 1
        lines = [
            f"snapshot {self.count}; traced {tracemalloc.get_traced_memory()[0] >> 10} KiB",
            "",
        ]
        lines.append("live objects by type (gc), top 40, with the change since snapshot 1:")
        for name, n in types.most_common(40):
            lines.append(f"  {n:9d} {n - self.firstTypes.get(name, 0):+9d}  {name}")
        lines += ["", "allocation sites, top 30 by size:"]
        for stat in snap.statistics("lineno")[:30]:
            lines.append(f"  {stat.size >> 10:8d} KiB {stat.count:8d}  {stat.traceback[0]}")
        if self.first is None:
            self.first, self.firstTypes = snap, types
        else:
            lines += ["", "growth since snapshot 1, top 25 by traceback:"]
            for stat in snap.compare_to(self.first, "traceback")[:25]:
                lines.append(f"  {stat.size_diff >> 10:+8d} KiB {stat.count_diff:+8d} objects")
                lines += [f"        {fr}" for fr in stat.traceback.format()[-FRAMES * 2 :]]
        (self.out / f"snapshot-{self.count}.txt").write_text("\n".join(lines) + "\n")


def main() -> None:
    out, argv = Path(sys.argv[1]), sys.argv[2:]
    out.mkdir(parents=True, exist_ok=True)
    tracemalloc.start(FRAMES)
    signal.signal(signal.SIGRTMIN + 1, Dumper(out))
    _twist._exitWithSignal = lambda sig: None  # type: ignore[attr-defined]
    try:
        Twist.main([sys.argv[0], *argv])
    except SystemExit:
        pass


if __name__ == "__main__":
    main()
