"""
pgtls configuration files, written from the same tables as
L{support.proxy.route} builds: for a proxy started from a file (so that a
reload has a file to re-read) and for C{twist pgtls} as a child process.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, Path)):
        return json.dumps(str(value))  # a JSON string is a TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def _is_array_of_tables(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def toml_text(data: dict[str, Any]) -> str:
    """A TOML document for C{data} (scalars, lists, tables, arrays of tables)."""
    lines: list[str] = []

    def table(prefix: str, values: dict[str, Any]) -> None:
        for key, value in values.items():
            if not isinstance(value, dict) and not _is_array_of_tables(value):
                lines.append(f"{key} = {_toml_value(value)}")
        for key, value in values.items():
            path = f"{prefix}{key}"
            if isinstance(value, dict):
                lines.append(f"[{path}]")
                table(f"{path}.", value)
            elif _is_array_of_tables(value):
                for item in value:
                    lines.append(f"[[{path}]]")
                    table(f"{path}.", item)

    table("", data)
    return "\n".join(lines) + "\n"


def write_config(path: Path, routes: list[dict[str, Any]], **top: Any) -> Path:
    """
    Write a configuration file: the top-level keys and sections (C{admin},
    C{metrics} as dicts) of C{top}, then one C{[[proxy]]} table per route.

    Shutdown is immediate unless C{top} says otherwise, as for
    L{support.proxy.start_proxy}: only the tests of the drain wait for it.
    """
    data = {"shutdown_timeout": "0s", **top, "proxy": routes}
    path.write_text(toml_text(data))
    return path


def on_port(table: dict[str, Any], port: int) -> dict[str, Any]:
    """C{table} (a route from L{support.proxy.route}) listening on 127.0.0.1:C{port}."""
    table["listener"]["bind_address"] = f"127.0.0.1:{port}"
    return table
