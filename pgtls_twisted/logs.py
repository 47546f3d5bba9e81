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


# -- output formats -------------------------------------------------------------

#: Fields every line has; the event's own fields (C{conn}, C{route}, ...) follow.
_STANDARD = ("time", "level", "namespace", "message")


def event_as_json_line(event: dict[str, Any]) -> str:
    """
    One event as one line of JSON, for log shippers: C{time} (ISO 8601,
    UTC), C{level}, C{namespace}, the formatted C{message}, then every
    field of the event (C{conn} on every event of a connection, C{route},
    C{worker}, ...), values that JSON cannot carry as their C{repr}, and a
    C{traceback} for failures.
    """
    import json
    from datetime import datetime, timezone

    from twisted.logger import formatEvent

    level = event.get("log_level")
    when = event.get("log_time")
    record: dict[str, Any] = {
        "time": datetime.fromtimestamp(when, timezone.utc).isoformat(timespec="milliseconds")
        if isinstance(when, (int, float))
        else None,
        "level": getattr(level, "name", level),
        "namespace": event.get("log_namespace"),
        "message": formatEvent(event),
    }
    for key, value in event.items():
        if key.startswith("log_") or key in _STANDARD or key.startswith("_"):
            continue
        if value is None or isinstance(value, (str, int, float, bool)):
            record[key] = value
        elif isinstance(value, dict) and all(
            isinstance(v, (str, int, float, bool, type(None))) for v in value.values()
        ):
            record[key] = value
        else:
            record[key] = repr(value)
    failure = event.get("log_failure")
    if failure is not None:
        try:
            record["traceback"] = failure.getTraceback()
        except Exception:
            record["traceback"] = repr(failure)
    return json.dumps(record, separators=(",", ":"), default=repr) + "\n"


def json_line_observer(out: Any) -> Any:
    """A log observer writing L{event_as_json_line} lines to the file C{out}."""
    from twisted.logger import FileLogObserver

    return FileLogObserver(out, event_as_json_line)


def configure_output(parent: Any, log_format: str) -> None:
    """
    Make C{twist} or C{twistd} (whose options object is C{parent}) write
    logs in C{log_format}. The configuration decides (the default is
    text), not C{twist}'s own habit of switching to its JSON record
    format when stdout is not a terminal.
    """
    if parent is None:
        return
    if "fileLogObserverFactory" in parent:  # twist
        if log_format == "json":
            parent["fileLogObserverFactory"] = json_line_observer
        else:
            from twisted.logger import textFileLogObserver

            parent["fileLogObserverFactory"] = textFileLogObserver
    elif log_format == "json" and "logfile" in parent:  # twistd
        # twistd's --logger takes the dotted name of a factory, which gets
        # no arguments: the options it needs are kept here.
        global _twistd_options
        _twistd_options = parent
        parent["logger"] = f"{__name__}.twistd_json_observer"


_twistd_options: Any = None


def twistd_json_observer() -> Any:
    """JSON lines where twistd would write its log (C{--logfile}, or stdout with C{-n})."""
    import sys

    from twisted.python.logfile import LogFile

    options = _twistd_options or {}
    path = options.get("logfile") or ""
    if path == "-" or (not path and options.get("nodaemon")):
        return json_line_observer(sys.stdout)
    return json_line_observer(LogFile.fromFullPath(path or "twistd.log"))
