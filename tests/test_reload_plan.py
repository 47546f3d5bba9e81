"""L{pgtls_twisted.app._reload.plan_reload}: what a reload changes, from the configurations alone."""

from __future__ import annotations

from pathlib import Path

import pytest

from pgtls_twisted.app._reload import plan_reload
from pgtls_twisted.config import parse_config


@pytest.fixture
def files(tmp_path: Path) -> Path:
    for name in ("server.crt", "server.key"):
        (tmp_path / name).write_text("dummy\n")
    (tmp_path / "server.key").chmod(0o600)
    return tmp_path


def routes(files: Path, *specs: tuple[str, str, str]) -> list:
    """Routes (name, bind address, backend address)."""
    doc = {
        "proxy": [
            {
                "name": name,
                "listener": {
                    "bind_address": bind,
                    "server_cert": "server.crt",
                    "server_key": "server.key",
                },
                "backend": {"address": backend, "tls": "disable"},
            }
            for name, bind, backend in specs
        ]
    }
    return list(parse_config(doc, base_dir=files).routes)


def current(files: Path, *specs: tuple[str, str, str]) -> dict:
    return {r.name: r for r in routes(files, *specs)}


def test_nothing_changed(files: Path) -> None:
    old = current(files, ("a", "127.0.0.1:6001", "db:5432"))
    plan = plan_reload(old, routes(files, ("a", "127.0.0.1:6001", "db:5432")))
    assert (plan.build, plan.keep, plan.remove, plan.takeOver) == ([], ["a"], [], {})


def test_added_and_removed(files: Path) -> None:
    old = current(files, ("a", "127.0.0.1:6001", "db:5432"))
    plan = plan_reload(old, routes(files, ("b", "127.0.0.1:6002", "db:5432")))
    assert (plan.build, plan.keep, plan.remove, plan.takeOver) == (["b"], [], ["a"], {})


def test_changed_on_the_same_address_keeps_its_socket(files: Path) -> None:
    old = current(files, ("a", "127.0.0.1:6001", "db:5432"))
    plan = plan_reload(old, routes(files, ("a", "127.0.0.1:6001", "db2:5432")))
    assert (plan.build, plan.takeOver, plan.renamedFrom("a")) == (["a"], {"a": "a"}, None)


def test_changed_address_binds_anew(files: Path) -> None:
    old = current(files, ("a", "127.0.0.1:6001", "db:5432"))
    plan = plan_reload(old, routes(files, ("a", "127.0.0.1:6009", "db:5432")))
    assert (plan.build, plan.takeOver) == (["a"], {})


def test_a_rename_on_the_same_address_takes_the_socket_over(files: Path) -> None:
    old = current(files, ("a", "127.0.0.1:6001", "db:5432"), ("b", "127.0.0.1:6002", "db:5432"))
    plan = plan_reload(
        old, routes(files, ("c", "127.0.0.1:6001", "db:5432"), ("b", "127.0.0.1:6002", "db:5432"))
    )
    assert (plan.build, plan.keep, plan.remove) == (["c"], ["b"], ["a"])
    assert plan.takeOver == {"c": "a"}
    assert plan.renamedFrom("c") == "a"


def test_a_removed_socket_goes_to_one_successor_only(files: Path) -> None:
    old = current(files, ("a", "127.0.0.1:6001", "db:5432"))
    plan = plan_reload(
        old, routes(files, ("c", "127.0.0.1:6001", "db:5432"), ("d", "127.0.0.1:6003", "db:5432"))
    )
    assert plan.takeOver == {"c": "a"}
    assert plan.build == ["c", "d"]
