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
 - SIGUSR1 / SIGUSR2 pause and resume every route, as in PgBouncer;
 - the reactor: pgtls's short dispatch reactor unless C{--reactor}
   chose another (L{pgtls_twisted.app._reactor}).

With C{workers} above 1 this process becomes the supervisor of that many
worker processes instead (L{pgtls_twisted.app._workers}).
"""

from __future__ import annotations

from twisted.application.service import IService
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.reflect import qual

from pgtls_twisted.app._reactor import installUnlessChosen
from pgtls_twisted.app._service import make_service
from pgtls_twisted.app._signals import proxy_signals
from pgtls_twisted.app._workers import Supervisor, check_config
from pgtls_twisted.config import ConfigError, load_config
from pgtls_twisted.ops._logs import LogLevels, configure_output
from pgtls_twisted.tls._contexts import TLSConfigError


class Options(usage.Options):
    synopsis = "--config FILE"
    longdesc = "Run the pgtls routes described in a TOML configuration file."
    optParameters = [["config", "c", None, "path to the routes TOML file"]]

    def postOptions(self) -> None:
        # Before anything imports the reactor, and before twist installs
        # its default: the short dispatch reactor, unless one was chosen.
        installUnlessChosen()
        if not self["config"]:
            raise usage.UsageError("--config is required")
        try:
            self["loaded"] = load_config(self["config"])
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
        loaded = self["loaded"]
        self["levels"] = LogLevels(loaded.log_level)
        configure_output(getattr(self, "parent", None), loaded.log_format, self["levels"])


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    config = options["loaded"]
    levels = options["levels"]
    Logger().info("reactor: {reactor}", reactor=qual(type(reactor)))
    if config.workers > 1:
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
