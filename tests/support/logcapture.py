"""
The events pgtls logs through Twisted's global log publisher, captured for
a test to assert on: as Twisted's event dicts, or as the JSON records
C{log_format = "json"} writes.

A test that only needs every event it caused takes conftest's C{events}
fixture, which is L{captured} for the length of the test.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

from twisted.logger import ILogObserver, globalLogPublisher

from pgtls_twisted.ops import _logs as logs


@contextmanager
def captured() -> Iterator[list[dict[str, Any]]]:
    """Every event logged meanwhile."""
    events: list[dict[str, Any]] = []
    # Twisted accepts any callable as an observer; the cast is for mypy.
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(observer)


@contextmanager
def json_events() -> Iterator[list[dict[str, Any]]]:
    """Every event logged meanwhile, as the JSON records C{log_format = "json"} writes."""
    records: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        records.append(json.loads(logs.event_as_json_line(event)))

    observer = cast(ILogObserver, observe)
    globalLogPublisher.addObserver(observer)
    try:
        yield records
    finally:
        globalLogPublisher.removeObserver(observer)


def logged_errors(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """
    The events of C{events} logged as errors (a failure, C{log.err}, level
    error or critical): what a fuzz test asserts is empty after each
    example, so that Hypothesis shrinks to the input that caused one
    (conftest's C{no_logged_errors} only fails the test as a whole).
    """
    return [
        e
        for e in events
        if e.get("isError")
        or "log_failure" in e
        or str(e.get("log_level")) in ("error", "critical")
    ]
