"""
Waiting, the one way the suite does it: for a while (L{sleep}), until
something holds (L{until} on the reactor, L{eventually} where blocking is
allowed), and blocking calls that fail rather than hang (L{in_thread}).

A test that runs the reactor (C{pytest_twisted.ensureDeferred}) has the
proxy under test on the same thread: it must never block, or the proxy
stops answering. It sleeps and polls with the asynchronous helpers, which
give the reactor its turn between tries, and runs blocking clients with
L{in_thread}. A plain blocking test (the proxy is another process) polls
with L{eventually}.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.internet.threads import deferToThread


async def sleep(seconds: float) -> None:
    """Let the reactor run for C{seconds}."""
    await task.deferLater(reactor, seconds, lambda: None)  # type: ignore[arg-type]


async def until(
    check: Callable[[], Any],
    timeout: float = 5.0,
    what: str = "",
    *,
    interval: float = 0.02,
    fail: bool = True,
) -> Any:
    """
    Call C{check} until it returns something true, letting the reactor run
    between tries; that value.

    @param check: a function, or one returning an awaitable (such as
        L{in_thread}'s Deferred, for a check that blocks), whose result
        is awaited.
    @param what: what is being waited for, for the failure message.
    @param fail: C{False} to return the last (false) value at the deadline
        instead of failing, for a caller whose own assertions on what it
        finds say more than "still not true".
    @raise AssertionError: still false after C{timeout} seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value or (not fail and time.monotonic() > deadline):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"still not true after {timeout}s: {what or check}")
        await sleep(interval)


async def until_in_thread(
    check: Callable[[], Any], timeout: float = 5.0, what: str = "", *, interval: float = 0.05
) -> Any:
    """L{until} for a C{check} that blocks (a query to the server, a socket): run in a thread."""
    return await until(lambda: in_thread(check), timeout, what, interval=interval)


def eventually(
    check: Callable[[], Any], timeout: float = 10.0, what: str = "", *, interval: float = 0.05
) -> Any:
    """
    (Blocking.) Call C{check} until it returns something true; that value.

    @raise AssertionError: still false after C{timeout} seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"still not true after {timeout}s: {what or check}")
        time.sleep(interval)


def in_thread(
    f: Callable[..., Any], *args: Any, timeout: float = 60.0, **kwargs: Any
) -> defer.Deferred[Any]:
    """
    L{deferToThread}, failing (not hanging) the test if C{f} has not
    returned after C{timeout} seconds: a proxy that never answers.
    """
    return deferToThread(f, *args, **kwargs).addTimeout(timeout, reactor)
