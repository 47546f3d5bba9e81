"""
Loading a configuration: the TOML file read, every route parsed against the
schema (L{pgtls_twisted.config._schema}), and the rules across routes.

Everything here is pure: the only I/O is reading the configuration file and
checking that the files it names exist and can be opened.  Every problem is
reported as a L{ConfigError} I{before} anything binds a port, because a proxy
that starts with half of its routes, or with a security setting silently
ignored, is worse than one that refuses to start.

The file format is a superset of the Rust pgtls one (C{[[proxy]]} routes with
C{[proxy.listener]} and C{[proxy.backend]} tables), so users can bring their
existing files along.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pgtls_twisted.config._model import Config, ConfigError, ListenerConfig, RouteConfig
from pgtls_twisted.config._schema import (
    _BAD,
    _ROUTE,
    _ROUTE_SECTIONS,
    _TOP_LEVEL,
    _TOP_SECTIONS,
    _build_sections,
    _parse_sections,
    _parse_table,
    _Report,
)
from pgtls_twisted.config._values import _show

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib

__all__ = ["load_config", "parse_config"]


def _route_label(index: int, name: object) -> str:
    """C{[[proxy]] #2 "app"}: the index always (names can repeat or be wrong), the name if any."""
    if isinstance(name, str) and name.strip():
        return f"[[proxy]] #{index} {_show(name)}"
    return f"[[proxy]] #{index}"


def _parse_route(
    index: int, table: object, base_dir: Path, report: _Report
) -> tuple[str, RouteConfig | None]:
    """
    Parse one C{[[proxy]]} entry.

    @return: the route's label for messages, and the route, or L{None} when
        it has problems (already reported).
    """
    if not isinstance(table, Mapping):
        label = f"[[proxy]] #{index}"
        report.add(label, f"expected a table, got {_show(table)}")
        return label, None
    label = _route_label(index, table.get("name"))
    before = len(report.messages)
    top = _parse_table(table, _ROUTE, "proxy", f"{label}: ", base_dir, report, _ROUTE_SECTIONS)
    sections = _parse_sections(_ROUTE_SECTIONS, table, f"{label}: ", base_dir, report)
    if len(report.messages) != before:
        return label, None
    if top["name"] is None:
        top["name"] = f"proxy-{index}"
    return label, RouteConfig(**top, **_build_sections(_ROUTE_SECTIONS, sections))


def _binds_overlap(a: ListenerConfig, b: ListenerConfig) -> bool:
    """
    Whether two listeners would fight over a port.

    Port 0 never conflicts (each gets its own ephemeral port).  Wildcard
    addresses overlap with every address of their family, and C{::} also
    with IPv4 because Twisted leaves C{IPV6_V6ONLY} off, so Linux binds it
    dual-stack.  Host names are compared as written: resolving them would
    be I/O, and the bind would fail loudly anyway.
    """
    if a.port != b.port or a.port == 0:
        return False
    if a.host.lower() == b.host.lower():
        return True
    try:
        ip_a, ip_b = ipaddress.ip_address(a.host), ipaddress.ip_address(b.host)
    except ValueError:
        return False
    if ip_a == ip_b:
        return True
    for wild, other in ((ip_a, ip_b), (ip_b, ip_a)):
        if wild.is_unspecified and (wild.version == other.version or wild.version == 6):
            return True
    return False


def _check_routes(routes: Sequence[tuple[str, RouteConfig]], report: _Report) -> None:
    """Rules across routes: unique names, and no two listeners on one port."""
    seen: dict[str, str] = {}
    for label, route in routes:
        if route.name in seen:
            report.add(
                f"{label}: name", f"{_show(route.name)} is already used by {seen[route.name]}"
            )
        else:
            seen[route.name] = label
    for i, (label, route) in enumerate(routes):
        for other_label, other in routes[:i]:
            if _binds_overlap(route.listener, other.listener):
                report.add(
                    f"{label}: listener.bind_address",
                    f"{_show(route.listener.bind_address)} conflicts with"
                    f" {_show(other.listener.bind_address)} of {other_label}",
                )
                break


def _check_admin_routes(
    admin: Mapping[str, Any] | None, routes: Sequence[RouteConfig], report: _Report
) -> None:
    """
    A console that no listener could open is a mistake worth saying:
    C{cert} needs a listener with C{client_ca}, C{backend} a route whose
    backend leg is C{verify-full}.
    """
    if admin is None or any(value is _BAD for value in admin.values()):
        return
    if admin["auth"] == "cert" and not any(r.listener.client_ca for r in routes):
        report.add("admin.auth", 'is "cert", but no listener has a client_ca to verify with')
    if admin["auth"] == "backend" and not any(r.backend.tls == "verify-full" for r in routes):
        report.add(
            "admin.auth",
            'is "backend", but no route has backend.tls = "verify-full"'
            " (a password is only checked by a server pgtls has verified)",
        )


def parse_config(
    data: Mapping[str, Any], path: Path | None = None, base_dir: Path | None = None
) -> Config:
    """
    Validate already-parsed TOML data and build a L{Config}.

    Separate from L{load_config} so that callers and tests can build or
    rewrite configurations in memory.

    @param data: the TOML document as a mapping.
    @param path: the file it came from; named in every message, and stored
        (made absolute) in L{Config.path}.
    @param base_dir: the directory relative file paths are resolved
        against; defaults to C{path}'s directory, or the working directory.
    @raise ConfigError: listing every problem found.
    """
    if path is not None:
        path = Path(path)
    report = _Report(prefix=f"{path}: " if path is not None else "")
    if base_dir is None:
        base_dir = path.parent if path is not None else Path()
    base_dir = Path(os.path.abspath(base_dir))
    if not isinstance(data, Mapping):
        raise ConfigError(f"{report.prefix}expected a TOML document, got {_show(data)}")
    top = _parse_table(data, _TOP_LEVEL, "", "", base_dir, report, ("proxy", *_TOP_SECTIONS))
    sections = _parse_sections(_TOP_SECTIONS, data, "", base_dir, report)
    proxies = data.get("proxy")
    routes: list[tuple[str, RouteConfig]] = []
    if isinstance(proxies, Mapping):
        report.add(
            "proxy",
            "expected an array of tables, got a table; write [[proxy]] (two brackets) for each route",
        )
    elif proxies is not None and not isinstance(proxies, list):
        report.add("proxy", f"expected an array of tables ([[proxy]]), got {_show(proxies)}")
    elif not proxies:
        report.add("", "at least one [[proxy]] route is required")
    else:
        complete = True
        for index, table in enumerate(proxies, start=1):
            label, route = _parse_route(index, table, base_dir, report)
            if route is None:
                complete = False
            else:
                routes.append((label, route))
        if complete:
            _check_routes(routes, report)
            _check_admin_routes(sections.get("admin"), [r for _, r in routes], report)
    if report.messages:
        raise ConfigError(report.messages)
    return Config(
        routes=tuple(route for _, route in routes),
        path=Path(os.path.abspath(path)) if path is not None else None,
        **top,
        **_build_sections(_TOP_SECTIONS, sections),
    )


def load_config(path: str | os.PathLike[str]) -> Config:
    """
    Read, parse and validate a configuration file.

    @param path: the TOML file; relative paths inside it are relative to
        its directory.
    @raise ConfigError: when the file cannot be read, is not TOML, or is
        not a valid configuration.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read config file: {path}: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not valid UTF-8 (TOML files must be): {e}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    return parse_config(data, path=path)
