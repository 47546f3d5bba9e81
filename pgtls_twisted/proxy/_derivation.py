# -*- test-case-name: tests.test_security_backend -*-
"""
Where SCRAM keys are derived: threads of their own, off the reactor.

L{pgtls_twisted.protocol._scram} is pure: its exchange is given a runner
(C{run(f, *args)}, firing with the result) for the one costly step, the
PBKDF2 of the password. L{DerivationThreads.run} is that runner in
production; C{hashlib.pbkdf2_hmac} releases the GIL, so the reactor thread
goes on serving every other connection while a derivation runs.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, threads
from twisted.python.threadpool import ThreadPool

#: Derivations run at once at most: PBKDF2 is all CPU, so one per core.
DERIVATION_THREADS = max(1, os.cpu_count() or 1)


class DerivationThreads:
    """
    The threads that derive SCRAM keys for one process's logins (one
    object, made by the service and given to every route's
    L{pgtls_twisted.proxy._backend.BackendConnector}), started on first use
    and stopped when the reactor shuts down.

    A pool of its own, not the reactor's: that one also resolves host
    names (and, in the tests, runs blocking clients), and neither may keep
    a login waiting, nor a burst of logins keep them waiting.
    """

    def __init__(self, reactor: Any, size: int = DERIVATION_THREADS) -> None:
        self._reactor = reactor
        self._size = size
        self._pool: ThreadPool | None = None

    def run(self, f: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        """Run C{f(*args)} in a derivation thread; fires with its result."""
        return threads.deferToThreadPool(self._reactor, self._threads(), f, *args)

    @property
    def working(self) -> bool:
        """Whether a derivation is running now."""
        return self._pool is not None and bool(self._pool.working)

    def _threads(self) -> ThreadPool:
        pool = self._pool
        if pool is None:
            pool = self._pool = ThreadPool(0, self._size, "pgtls-scram")
            pool.start()
            self._reactor.addSystemEventTrigger("during", "shutdown", self._stop)
        return pool

    def _stop(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.stop()
