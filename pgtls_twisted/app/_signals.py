# -*- test-case-name: tests.test_shutdown,tests.test_workers -*-
"""
Signal handlers as a service: installed while it runs, the previous ones
put back when it stops (PgBouncer's signals: SIGHUP reload, SIGTERM drain,
SIGINT stop now, SIGUSR1/SIGUSR2 pause and resume).
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.logger import Logger

from pgtls_twisted.app._service import ProxyService
from pgtls_twisted.config import ConfigError


class Signals(Service):
    """
    Installs signal handlers while running, and puts the previous ones
    back when stopped. Handlers only schedule work in the reactor.
    """

    _log = Logger()

    def __init__(self, reactor: Any, handlers: dict[int, Callable[[], object]]) -> None:
        self._reactor = reactor
        self._handlers = handlers
        self._previous: dict[int, Any] = {}

    def startService(self) -> None:
        super().startService()
        for signum in self._handlers:
            self._previous[signum] = signal.signal(signum, self._handle)

    def stopService(self) -> None:
        super().stopService()
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame: object) -> None:
        self._reactor.callFromThread(self._handlers[signum])


def proxy_signals(proxy: ProxyService, reactor: Any) -> Signals:
    """The signal handlers of a single-process (or worker) proxy."""
    log = Logger()

    def hangup() -> None:
        log.info("SIGHUP: re-reading the configuration")
        try:
            proxy.reloadFromFile()
        except ConfigError:
            pass  # already logged, problem by problem; nothing changed

    def interrupt() -> None:
        log.info("SIGINT: closing every session now")
        proxy.shutdown(0)
        if reactor.running:
            reactor.stop()

    return Signals(
        reactor,
        {
            signal.SIGHUP: hangup,
            signal.SIGINT: interrupt,
            # This process only: with workers the supervisor signals each one.
            signal.SIGUSR1: lambda: proxy.setPaused(None, True),
            signal.SIGUSR2: lambda: proxy.setPaused(None, False),
        },
    )
