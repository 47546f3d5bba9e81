"""
The C{twist pgtls} / C{twistd pgtls} command: options and service maker.
Found through C{twisted/plugins/pgtls_plugin.py}.

Process-wide concerns that an embedding application must stay in charge
of (signal handlers, log output) live here, not in
L{pgtls_twisted.app._service}:

 - SIGHUP re-reads the configuration (L{ProxyService.reloadFromFile});
 - SIGTERM is Twisted's: the reactor stops, and stopping the
   L{ProxyService} is the graceful shutdown (up to C{shutdown_timeout});
 - SIGINT closes every session at once (FATAL 57P01) and stops;
 - SIGUSR1 / SIGUSR2 pause and resume every route, as in PgBouncer.

With C{workers} above 1 this process becomes the supervisor of that many
worker processes instead (L{pgtls_twisted.app._workers}).
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

from twisted.application.service import IService, Service
from twisted.logger import Logger
from twisted.python import usage

from pgtls_twisted.app._service import ProxyService, make_service
from pgtls_twisted.config import ConfigError, load_config
from pgtls_twisted.ops._logs import LogLevels, configure_output
from pgtls_twisted.tls._contexts import TLSConfigError


class Options(usage.Options):
    synopsis = "--config FILE"
    longdesc = "Run the pgtls routes described in a TOML configuration file."
    optParameters = [["config", "c", None, "path to the routes TOML file"]]

    def postOptions(self) -> None:
        if not self["config"]:
            raise usage.UsageError("--config is required")
        try:
            self["loaded"] = load_config(self["config"])
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
        loaded = self["loaded"]
        self["levels"] = LogLevels(loaded.log_level)
        configure_output(getattr(self, "parent", None), loaded.log_format, self["levels"])


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


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    config = options["loaded"]
    levels = options["levels"]
    if config.workers > 1:
        from pgtls_twisted.app._workers import Supervisor, check_config

        try:
            check_config(config, reactor, bind=True)
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
        return Supervisor(config, reactor, levels)
    try:
        top = make_service(config, reactor, logLevels=levels)
    except TLSConfigError as e:
        # Raised before anything binds: the process exits non-zero.
        raise usage.UsageError(f"{config.path}: {e}") from None
    proxy_signals(top, reactor).setServiceParent(top)
    return top
