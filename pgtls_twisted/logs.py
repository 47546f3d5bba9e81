"""
Logging for pgtls's own events.

C{twist} and C{twistd} own the log observers (C{twist --log-level},
C{--log-format}); the configuration's C{log_level} sets the lowest level
pgtls itself emits. It is applied in L{Logger.emit}, before an event is
built, so a disabled level costs one comparison (Twisted's own
C{Logger.emit} has no such short cut: filtering happens in observers).
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger as _TwistedLogger
from twisted.logger import LogLevel

_PRIORITY = {
    LogLevel.debug: 0,
    LogLevel.info: 1,
    LogLevel.warn: 2,
    LogLevel.error: 3,
    LogLevel.critical: 4,
}
_NAMES = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
}
_minimum = _PRIORITY[LogLevel.info]


def apply_log_level(level: str) -> None:
    """Make C{level} (debug, info, warn, error) the lowest pgtls emits."""
    global _minimum
    _minimum = _PRIORITY[_NAMES[level]]


class Logger(_TwistedLogger):
    """A L{twisted.logger.Logger} that honours L{apply_log_level}."""

    def emit(self, level: LogLevel, format: str | None = None, **kwargs: Any) -> None:
        if _PRIORITY.get(level, 4) < _minimum:
            return
        super().emit(level, format, **kwargs)
