"""
How pgtls's log lines look, and which reach the output.

Every module logs through a plain L{twisted.logger.Logger}. C{twist} and
C{twistd} own the log observers (C{twist --log-level}, C{--log-format});
pgtls gives them the observer factories of its formats (text or JSON
lines), behind a L{LogLevels} filter for the configuration's
C{log_level}. Nothing pgtls logs per message or per chunk, so filtering
in the observer, Twisted's way, costs nothing that matters.

Text logs escape control characters in every message (L{escape_controls}):
user, database and application names, statement texts and error messages
come from clients, and a name holding a newline, a carriage return or a
terminal escape sequence must not forge or hide a log line. JSON lines
need no such care (JSON escapes them) and keep the exact values.
"""

from __future__ import annotations

import re
from typing import Any

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
)
from zope.interface import implementer

_NAMES = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
}
#: Every pgtls logger's namespace starts with this (Twisted's default
#: namespace is the module and class that own the logger).
NAMESPACE = "pgtls_twisted"


class LogLevels:
    """
    C{log_level}: the lowest level of pgtls's own events that reach the
    output. Other namespaces (Twisted's own) are not filtered here:
    C{twist --log-level} does that.

    One object per process, made by the plugin (L{pgtls_twisted.app}) and
    shared by the output observers it builds (L{filtered}) and the service
    (a reload changes the level); no module-level setting. An embedded
    proxy has none: the application's own observers decide.
    """

    def __init__(self, level: str = "info") -> None:
        self._predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.debug)
        self.setLevel(level)

    def setLevel(self, level: str) -> None:
        self._predicate.setLogLevelForNamespace(NAMESPACE, _NAMES[level])

    def filtered(self, observer: ILogObserver) -> ILogObserver:
        """C{observer}, behind this filter."""
        return FilteringLogObserver(observer, [self._predicate])


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


#: What L{escape_controls} escapes: C0 and C1 controls and DEL, Unicode line
#: and paragraph separators, and the bidirectional overrides that can make a
#: line read differently from what it holds.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    c = match.group()
    named = _NAMED.get(c)
    if named is not None:
        return named
    code = ord(c)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_controls(text: str) -> str:
    """
    C{text} on one line, safe for a terminal: C{\\n}, C{\\r}, C{\\t} and
    C{\\xNN}/C{\\uNNNN} for the other characters L{_CONTROL} matches.
    (A backslash is left as it is, so SQL stays readable; JSON logs carry
    exact values.)
    """
    return _CONTROL.sub(_escape, text)


def escaped_event(event: dict[str, Any]) -> dict[str, Any]:
    """
    C{event} with its message formatted once and escaped
    (L{escape_controls}), as its new C{log_format}, for a text observer.
    Fields are kept as they are; a failure's traceback, which Twisted
    appends on lines of its own, too.
    """
    message = formatEvent(event)
    if not message:
        return event
    safe = dict(event)
    safe["log_format"] = escape_controls(message).replace("{", "{{").replace("}", "}}")
    return safe


@implementer(ILogObserver)
class EscapingObserver:
    """Passes L{escaped_event}s to another observer (a text one)."""

    def __init__(self, observer: Any) -> None:
        self._observer = observer

    def __call__(self, event: dict[str, Any]) -> None:
        self._observer(escaped_event(event))


def text_line_observer(out: Any) -> ILogObserver:
    """Twisted's text lines (C{textFileLogObserver}) to the file C{out}, escaped."""
    from twisted.logger import textFileLogObserver

    return EscapingObserver(textFileLogObserver(out))


def json_line_observer(out: Any) -> Any:
    """A log observer writing L{event_as_json_line} lines to the file C{out}."""
    from twisted.logger import FileLogObserver

    return FileLogObserver(out, event_as_json_line)


def configure_output(parent: Any, log_format: str, levels: LogLevels) -> None:
    """
    Make C{twist} or C{twistd} (whose options object is C{parent}) write
    logs in C{log_format}, behind C{levels}. The configuration decides (the
    default is text), not C{twist}'s own habit of switching to its JSON
    record format when stdout is not a terminal.
    """
    if parent is None:
        return
    if "fileLogObserverFactory" in parent:  # twist
        output = json_line_observer if log_format == "json" else text_line_observer
        parent["fileLogObserverFactory"] = lambda out: levels.filtered(output(out))
    elif "logfile" in parent:  # twistd
        # twistd's --logger takes the dotted name of a factory, which gets
        # no arguments: what it needs is kept here, the one place twistd's
        # interface leaves (set once, when twistd parses its options).
        global _twistd_options
        _twistd_options = (parent, levels)
        if log_format == "json":
            parent["logger"] = f"{__name__}.twistd_json_observer"
        elif not parent.get("logger"):  # an explicit --logger is the operator's choice
            parent["logger"] = f"{__name__}.twistd_text_observer"


_twistd_options: tuple[Any, LogLevels] | None = None


def _twistd() -> tuple[Any, LogLevels]:
    return _twistd_options or ({}, LogLevels())


def _twistd_log_file() -> Any:
    """Where twistd would write its log: C{--logfile}, or stdout with C{-n}."""
    import sys

    from twisted.python.logfile import LogFile

    options, _ = _twistd()
    path = options.get("logfile") or ""
    if path == "-" or (not path and options.get("nodaemon")):
        return sys.stdout
    return LogFile.fromFullPath(path or "twistd.log")


def twistd_json_observer() -> Any:
    """JSON lines where twistd would write its log (C{--logfile}, or stdout with C{-n})."""
    _, levels = _twistd()
    return levels.filtered(json_line_observer(_twistd_log_file()))


def twistd_text_observer() -> Any:
    """twistd's text log (to a file, stdout or C{--syslog}), escaped."""
    options, levels = _twistd()
    if options.get("syslog"):
        from twisted.logger import LegacyLogObserverWrapper
        from twisted.python.syslog import SyslogObserver

        syslog = SyslogObserver(options.get("prefix") or "twisted")
        return levels.filtered(EscapingObserver(LegacyLogObserverWrapper(syslog.emit)))
    return levels.filtered(text_line_observer(_twistd_log_file()))
