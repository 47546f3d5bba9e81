"""
The values a configuration holds: durations, addresses, the parsers the
schema tables (L{pgtls_twisted.config._schema}) check each key with, and
the secret files (private keys, passwords, SCRAM verifiers) they read.

A parser takes the TOML value and the directory relative paths are resolved
against, and returns the converted value or raises L{_Invalid} with a
message that says what is wrong but not where: the caller adds the file,
the route and the key.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import ipaddress
import math
import os
import re
import stat
from collections.abc import Callable, Mapping, Sequence
from datetime import date, datetime, time
from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path
from typing import Any

from pgtls_twisted.config._model import (
    LOG_LEVELS,
    MAX_INSTANCE,
    MAX_WORKERS,
    MIN_MAX_SCRAM_ITERATIONS,
    ScramVerifier,
)
from pgtls_twisted.protocol._authpolicy import parse_require_auth

__all__ = [
    "format_duration",
    "parse_address",
    "parse_duration",
    "parse_verifier",
    "read_verifiers",
    "secret_file_problem",
]

# ---------------------------------------------------------------------------
# Durations and addresses
# ---------------------------------------------------------------------------

_DURATION_UNITS: dict[str, float] = {
    "ms": 0.001,
    "s": 1.0,
    "m": 60.0,
    "min": 60.0,
    "h": 3600.0,
    "d": 86400.0,
}
_DURATION_RE = re.compile(r"(?P<number>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(?P<unit>[a-z]*)")


def parse_duration(value: object, *, allow_zero: bool = False) -> float:
    """
    Turn a configuration duration into seconds.

    Accepted: a number of seconds (TOML integer or float, or a string such as
    C{"30"}), or a string with one unit: C{ms}, C{s}, C{m}, C{min}, C{h},
    C{d} (C{"500ms"}, C{"10s"}, C{"5m"}, C{"30min"}, C{"1h"}, C{"1d"}).
    C{min} and bare seconds are what the Rust pgtls accepted, so its files
    keep working.

    @param value: the value read from TOML.
    @param allow_zero: whether 0 is meaningful for this setting; no current
        setting allows it, because a zero timeout or refresh interval would
        make every connection fail or spin.
    @return: the duration in seconds.
    @raise ValueError: with a message that says what is accepted.
    """
    if isinstance(value, bool):
        raise ValueError(f'expected a duration such as "10s", got {_show(value)}')
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        match = _DURATION_RE.fullmatch(value.strip())
        if match is None or match["unit"] not in ("", *_DURATION_UNITS):
            raise ValueError(
                f"invalid duration {_show(value)}: expected a number of seconds, or a number"
                f" followed by one of {', '.join(_DURATION_UNITS)}"
                ' (for example "500ms", "10s", "5m", "1h")'
            )
        seconds = float(match["number"]) * _DURATION_UNITS.get(match["unit"], 1.0)
    else:
        raise ValueError(f'expected a duration such as "10s", got {_show(value)}')
    if not math.isfinite(seconds):
        raise ValueError(f"invalid duration {_show(value)}: must be finite")
    if seconds < 0 or (seconds == 0 and not allow_zero):
        bound = "0 or more" if allow_zero else "greater than 0"
        raise ValueError(f"invalid duration {_show(value)}: must be {bound}")
    return seconds


def format_duration(seconds: float) -> str:
    """
    Render seconds in the shortest unit L{parse_duration} reads back, so
    that C{pgtls check} output can be pasted into a configuration file.
    """
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size and (seconds / size).is_integer():
            return f"{int(seconds // size)}{unit}"
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    return f"{seconds:g}s"


_HOSTNAME_RE = re.compile(r"[A-Za-z0-9_.-]+")


def parse_address(text: str) -> tuple[str, int]:
    """
    Split C{"host:port"} or C{"[v6]:port"} into host and port.

    The brackets are required around IPv6 literals because otherwise the
    last colon is ambiguous (the Rust pgtls split at the first colon and so
    mangled them).  The host is returned without brackets, ready for
    C{listenTCP}/C{connectTCP} and for certificate checks.  Port 0 is
    accepted here; callers that need a real port say so.

    @param text: the address as written.
    @return: C{(host, port)}.
    @raise ValueError: when the address is malformed.
    """
    if not isinstance(text, str):
        raise ValueError(f'expected an address such as "host:5432", got {_show(text)}')
    if not text or any(ch.isspace() for ch in text):
        raise ValueError(f'invalid address {_show(text)}: expected "host:port" or "[ipv6]:port"')
    if text.startswith("["):
        end = text.find("]")
        if end == -1:
            raise ValueError(f'invalid address {_show(text)}: missing "]" after the IPv6 address')
        host, rest = text[1:end], text[end + 1 :]
        if not host:
            raise ValueError(f"invalid address {_show(text)}: empty host")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(
                f"invalid address {_show(text)}: brackets are only for IPv6 addresses,"
                f" and {_show(host)} is not one"
            ) from None
        if not rest.startswith(":") or rest == ":":
            raise ValueError(f'invalid address {_show(text)}: missing port (write "[{host}]:5432")')
        port_text = rest[1:]
    else:
        if text.count(":") > 1:
            raise ValueError(
                f"invalid address {_show(text)}: an IPv6 address must be in brackets,"
                ' for example "[::1]:5432"'
            )
        host, colon, port_text = text.partition(":")
        if not colon or not port_text:
            raise ValueError(f'invalid address {_show(text)}: missing port (write "host:5432")')
        if not host:
            raise ValueError(
                f'invalid address {_show(text)}: empty host (use "0.0.0.0" or "[::]" for all)'
            )
        if not _HOSTNAME_RE.fullmatch(host):
            raise ValueError(f"invalid address {_show(text)}: {_show(host)} is not a host name")
    if not port_text.isascii() or not port_text.isdigit():
        raise ValueError(f"invalid address {_show(text)}: port {_show(port_text)} is not a number")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"invalid address {_show(text)}: port {port} is outside 0..65535")
    return host, port


# ---------------------------------------------------------------------------
# Value parsers used by the schema tables
# ---------------------------------------------------------------------------


class _Invalid(ValueError):
    """
    A value is wrong; the message says why, without saying where (the caller
    adds the file, route and key).
    """


_TOML_TYPE_NAMES: tuple[tuple[type, str], ...] = (
    (bool, "boolean"),
    (int, "integer"),
    (float, "float"),
    (str, "string"),
    (datetime, "datetime"),
    (date, "date"),
    (time, "time"),
    (Mapping, "table"),
    (list, "array"),
)


def _show(value: object) -> str:
    """
    Render a TOML value the way the user wrote it, with its TOML type, so
    messages such as C{got integer 5} point at the mistake.
    """
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    if isinstance(value, bool):
        return f"boolean {'true' if value else 'false'}"
    for kind, name in _TOML_TYPE_NAMES:
        if isinstance(value, kind):
            if kind in (Mapping, list):
                return f"a {name}" if name == "table" else f"an {name}"
            return f"{name} {value}"
    return repr(value)


_Parser = Callable[[object, Path], Any]


def _string(value: object, base_dir: Path) -> str:
    """A non-empty string: an empty one is never a meaningful setting here."""
    if not isinstance(value, str):
        raise _Invalid(f"expected a string, got {_show(value)}")
    if not value.strip():
        raise _Invalid("must not be empty")
    return value


def _boolean(value: object, base_dir: Path) -> bool:
    """
    C{true} or C{false} only: accepting C{"yes"} or 1 would make C{mtls = "false"}
    mean true.
    """
    if not isinstance(value, bool):
        raise _Invalid(f"expected true or false, got {_show(value)}")
    return value


def _networks(value: object, base_dir: Path) -> tuple[IPv4Network | IPv6Network, ...]:
    """
    A list of networks in CIDR notation (C{"10.0.0.0/8"}, C{"::1/128"}; a
    bare address is a network of one). Host bits set are an error, as a
    typo like C{"10.0.0.1/8"} would otherwise widen what is trusted.
    """
    if not isinstance(value, list):
        raise _Invalid(f'expected a list such as ["10.0.0.0/8"], got {_show(value)}')
    found = []
    for item in value:
        if not isinstance(item, str):
            raise _Invalid(f"expected network strings, got {_show(item)}")
        try:
            found.append(ip_network(item.strip(), strict=True))
        except ValueError as e:
            raise _Invalid(f"invalid network {_show(item)}: {e}") from None
    return tuple(found)


def _positive_int(value: object, base_dir: Path) -> int:
    """An integer of at least 1; TOML booleans are not integers here."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Invalid(f"expected an integer of at least 1, got {_show(value)}")
    if value < 1:
        raise _Invalid(f"expected an integer of at least 1, got {value}")
    return value


def _duration(value: object, base_dir: Path) -> float:
    try:
        return parse_duration(value)
    except ValueError as e:
        raise _Invalid(str(e)) from None


def _address(value: object, base_dir: Path) -> str:
    """A listen address: validated, kept as written (host and port are derived)."""
    if not isinstance(value, str):
        raise _Invalid(f'expected a string such as "0.0.0.0:6432", got {_show(value)}')
    try:
        parse_address(value)
    except ValueError as e:
        raise _Invalid(str(e)) from None
    return value


def _connect_address(value: object, base_dir: Path) -> str:
    """A backend address: like L{_address}, but port 0 cannot be connected to."""
    text = _address(value, base_dir)
    if parse_address(text)[1] == 0:
        raise _Invalid(f"invalid address {_show(text)}: port 0 cannot be connected to")
    return text


def _instance(value: object, base_dir: Path) -> int:
    """A cluster instance number: 1 to L{MAX_INSTANCE} (0 would mean "no cluster")."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Invalid(f"expected an instance number, got {_show(value)}")
    if not 1 <= value <= MAX_INSTANCE:
        raise _Invalid(f"must be between 1 and {MAX_INSTANCE}, got {value}")
    return value


def _connect_addresses(value: object, base_dir: Path) -> tuple[str, ...]:
    """A list of addresses to connect to (C{["10.0.0.1:6432", "pgtls-2:6432"]})."""
    if not isinstance(value, list):
        raise _Invalid(f'expected a list such as ["10.0.0.1:6432"], got {_show(value)}')
    return tuple(_connect_address(item, base_dir) for item in value)


def _server_name(value: object, base_dir: Path) -> str:
    """A host name or IP address, without brackets, as SNI and certificate checks need it."""
    text = _string(value, base_dir)
    if text.startswith("["):
        raise _Invalid(f"{_show(text)}: write IPv6 addresses without brackets here")
    if any(ch.isspace() for ch in text):
        raise _Invalid(f"{_show(text)} is not a host name")
    return text


def _choice(
    choices: Sequence[str],
    aliases: Mapping[str, str] | None = None,
    fold_case: bool = False,
    suggest: bool = True,
) -> _Parser:
    """
    Make a parser for one of a fixed set of strings.

    @param aliases: extra accepted spellings and what they mean.
    @param fold_case: accept any letter case (for log levels, which people
        habitually write in capitals).
    @param suggest: offer the closest choice for a misspelling; off where
        "closest" means nothing (C{"1.1"} is not a typo of C{"1.3"}).
    """
    aliases = dict(aliases or {})
    expected = ", ".join(f'"{c}"' for c in choices)

    def parse(value: object, base_dir: Path) -> str:
        if not isinstance(value, str):
            hint = ""
            if not isinstance(value, bool) and str(value) in choices:
                hint = f'; write it as a string: "{value}"'
            raise _Invalid(f"expected one of {expected}, got {_show(value)}{hint}")
        key = value.lower() if fold_case else value
        if key in choices:
            return key
        if key in aliases:
            return aliases[key]
        message = f"expected one of {expected}, got {_show(value)}"
        close = difflib.get_close_matches(key.lower(), [*choices, *aliases], n=1)
        if suggest and close:
            message += f'; did you mean "{close[0]}"?'
        raise _Invalid(message)

    return parse


_log_level_choice = _choice(LOG_LEVELS, aliases={"warning": "warn"}, fold_case=True)


def _log_level(value: object, base_dir: Path) -> str:
    """
    A log level.  The Rust pgtls took C{tracing} filter directives such as
    C{"pgtls=debug"}; those get a specific hint rather than a bare refusal.
    """
    if isinstance(value, str) and ("=" in value or "," in value):
        raise _Invalid(
            f"expected one of {', '.join(_show(level) for level in LOG_LEVELS)},"
            f" got {_show(value)}; filter directives from the Rust pgtls are not supported,"
            " give a single level"
        )
    return _log_level_choice(value, base_dir)


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def _workers(value: object, base_dir: Path) -> int:
    """
    A process count, or C{"auto"} for one per CPU this process may run on
    (its affinity mask, which a container's cpuset narrows; the machine's
    count where there is none).
    """
    if value == "auto":
        return max(1, min(MAX_WORKERS, _usable_cpus()))
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Invalid(f'expected a number of processes or "auto", got {_show(value)}')
    if not 1 <= value <= MAX_WORKERS:
        raise _Invalid(f"must be between 1 and {MAX_WORKERS}, got {value}")
    return value


def _duration_or_zero(value: object, base_dir: Path) -> float:
    try:
        return parse_duration(value, allow_zero=True)
    except ValueError as e:
        raise _Invalid(str(e)) from None


def _require_auth(value: object, base_dir: Path) -> str:
    """libpq's C{require_auth} syntax, checked now rather than at the first login."""
    text = _string(value, base_dir)
    try:
        parse_require_auth(text)
    except ValueError as e:
        raise _Invalid(str(e)) from None
    return text


def _scram_iterations(value: object, base_dir: Path) -> int:
    """An iteration limit no lower than PostgreSQL's default count."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Invalid(f"expected an integer, got {_show(value)}")
    if value < MIN_MAX_SCRAM_ITERATIONS:
        raise _Invalid(
            f"must be at least {MIN_MAX_SCRAM_ITERATIONS} (PostgreSQL's default iteration"
            f" count), got {value}"
        )
    return value


def _non_negative_int(value: object, base_dir: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Invalid(f"expected an integer, got {_show(value)}")
    if value < 0:
        raise _Invalid(f"must be 0 or more, got {value}")
    return value


def _any_string(value: object, base_dir: Path) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"expected a string, got {_show(value)}")
    return value


def _names(value: object, base_dir: Path) -> tuple[str, ...]:
    """A list of role names."""
    if not isinstance(value, list):
        raise _Invalid(f"expected a list of user names, got {_show(value)}")
    for item in value:
        if not isinstance(item, str) or not item:
            raise _Invalid(f"expected user names (non-empty strings), got {_show(item)}")
    return tuple(value)


# ---------------------------------------------------------------------------
# Files and secrets
# ---------------------------------------------------------------------------

_URL_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def _existing_file(value: object, base_dir: Path) -> Path:
    """
    A path to a regular file this process can open, made absolute.

    Relative paths are relative to the configuration file's directory, so a
    configuration and its certificates can be moved together and the result
    does not depend on the working directory (twistd may change it).
    Symbolic links are deliberately I{not} resolved: certificate rotation
    (Kubernetes secrets, certbot's C{live/} directory) swaps link targets,
    and the refresh logic must keep following the link.
    """
    text = _string(value, base_dir)
    if _URL_RE.match(text):
        raise _Invalid(
            f"{_show(text)}: URLs are not supported (the Rust pgtls fetched them);"
            " download the file and give its path"
        )
    path = base_dir / text
    if not path.exists():
        raise _Invalid(f"file not found: {path}")
    if not path.is_file():
        raise _Invalid(f"not a regular file: {path}")
    try:
        with path.open("rb"):
            pass
    except OSError as e:
        raise _Invalid(f"cannot read {path}: {e.strerror or e}") from None
    return path


def secret_file_problem(path: Path) -> str | None:
    """
    Why a private key or password file is too open, or C{None} when it is
    not: PostgreSQL's rule (libpq's form of it, which is the one that fits a
    process that may run as root): no group or world access when the file
    belongs to anyone but root, and at most group read when it belongs to
    root, so a key can be shared through a group such as C{ssl-cert}. A
    readable key is as good as the certificate itself to whoever reads it,
    so pgtls refuses to use one, as PostgreSQL and libpq do.

    Checked at load and reload (L{_secret_file}) and when certificate files
    are re-read at run time (L{pgtls_twisted.tls._contexts}), where a key that
    became readable keeps the last good context.

    @param path: the file; symbolic links are followed, as in PostgreSQL.
    """
    if os.name != "posix":  # pragma: no cover - no Unix modes to check
        return None
    try:
        st = path.stat()
    except OSError as e:
        return f"cannot read {path}: {e.strerror or e}"
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid == 0:
        loose = mode & (stat.S_IWGRP | stat.S_IXGRP | stat.S_IRWXO)
    else:
        loose = mode & (stat.S_IRWXG | stat.S_IRWXO)
    if not loose:
        return None
    return (
        f'file "{path}" has group or world access (mode {mode:04o}, owner uid {st.st_uid});'
        " it must have permissions u=rw (0600) or less if owned by the user pgtls runs as,"
        " or u=rw,g=r (0640) or less if owned by root"
    )


def _secret_file(value: object, base_dir: Path) -> Path:
    """
    A private key or password file: an L{_existing_file} that passes
    L{secret_file_problem}.
    """
    path = _existing_file(value, base_dir)
    problem = secret_file_problem(path)
    if problem is not None:
        raise _Invalid(problem)
    return path


def _first_line(path: Path) -> str:
    """
    A password file's first line, without its line ending: what README
    promises, so a file that goes on with a comment or a second secret
    does not turn into one long password.  Only C{\\n} (and a C{\\r}
    before it) ends the line: a password may contain any other character.
    """
    return path.read_text().split("\n", 1)[0].removesuffix("\r")


_VERIFIER_RE = re.compile(
    r"SCRAM-SHA-256\$(?P<iterations>[0-9]{1,10}):(?P<salt>[A-Za-z0-9+/]+=*)"
    r"\$(?P<stored>[A-Za-z0-9+/]+=*):(?P<server>[A-Za-z0-9+/]+=*)"
)


def parse_verifier(text: str) -> ScramVerifier:
    """
    A verifier in PostgreSQL's C{pg_authid} format,
    C{SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>} (base64).

    @raise ValueError: not one (the message never repeats the text: it is
        a secret).
    """
    match = _VERIFIER_RE.fullmatch(text)
    if match is None:
        raise ValueError(
            "expected SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>"
            " (PostgreSQL's pg_authid format)"
        )
    try:
        salt, stored, server = (
            base64.b64decode(match[k], validate=True) for k in ("salt", "stored", "server")
        )
    except binascii.Error:
        raise ValueError("invalid base64 in the verifier") from None
    iterations = int(match["iterations"])
    if iterations < 1 or len(stored) != 32 or len(server) != 32 or not salt:
        raise ValueError("not a SCRAM-SHA-256 verifier (bad iteration count or key length)")
    return ScramVerifier(iterations, salt, stored, server)


def read_verifiers(path: Path) -> dict[str, ScramVerifier]:
    """
    C{admin.password_file}: one C{name:verifier} per line (the verifier
    itself contains colons: the name ends at the first one); blank lines
    and lines starting with C{#} are skipped.

    @raise ValueError: naming the line, never its content.
    """
    verifiers: dict[str, ScramVerifier] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, colon, verifier = line.partition(":")
        if not colon or not name:
            raise ValueError(f"{path} line {number}: expected name:SCRAM-SHA-256$...")
        if name in verifiers:
            raise ValueError(f"{path} line {number}: {name!r} is listed twice")
        try:
            verifiers[name] = parse_verifier(verifier)
        except ValueError as e:
            raise ValueError(f"{path} line {number}: {e}") from None
    return verifiers
