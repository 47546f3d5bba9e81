"""
The C{twist pgtls} / C{twistd pgtls} command: options and service maker.
Found through C{twisted/plugins/pgtls_plugin.py}.

Process-wide concerns that an embedding application must stay in charge
of (signal handlers) live here, not in L{pgtls_twisted.service}.
"""

from __future__ import annotations

import signal
from typing import Any

from twisted.application.service import IService, MultiService, Service
from twisted.python import usage

from .config import ConfigError, load_config
from .logs import Logger, apply_log_level
from .service import make_service, reload_certificates
from .tlsconfig import TLSConfigError


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


class HangupReload(Service):
    """
    SIGHUP re-reads every route's certificate files (neither C{twist} nor
    C{twistd} uses SIGHUP). The handler only schedules the work: it runs in
    the reactor, never inside the signal handler.
    """

    _log = Logger()

    def __init__(self, top: MultiService, reactor: Any) -> None:
        self._top = top
        self._reactor = reactor
        self._previous: Any = None

    def startService(self) -> None:
        super().startService()
        self._previous = signal.signal(signal.SIGHUP, self._hangup)

    def stopService(self) -> None:
        super().stopService()
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)
            self._previous = None

    def _hangup(self, signum: int, frame: object) -> None:
        self._reactor.callFromThread(self._reload)

    def _reload(self) -> None:
        self._log.info("SIGHUP: re-reading certificate files")
        reload_certificates(self._top)


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    config = options["loaded"]
    apply_log_level(config.log_level)
    try:
        top = make_service(config, reactor)
    except TLSConfigError as e:
        # Raised before anything binds: the process exits non-zero.
        raise usage.UsageError(f"{config.path}: {e}") from None
    HangupReload(top, reactor).setServiceParent(top)
    return top
