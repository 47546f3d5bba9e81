"""
The C{twist pgtls} / C{twistd pgtls} command: options and service maker.
Found through C{twisted/plugins/pgtls_plugin.py}.
"""

from __future__ import annotations

from twisted.application.service import IService
from twisted.python import usage

from .config import ConfigError, load_config
from .logs import apply_log_level
from .service import make_service
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


def makeService(options: Options) -> IService:
    config = options["loaded"]
    apply_log_level(config.log_level)
    try:
        return make_service(config)
    except TLSConfigError as e:
        # Raised before anything binds: the process exits non-zero.
        raise usage.UsageError(f"{config.path}: {e}") from None
