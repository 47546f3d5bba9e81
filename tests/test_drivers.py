"""
The real-driver matrix: every major PostgreSQL driver, in its default
settings, runs the same scenarios through pgtls's three kinds of route,
TLS on both legs (client -> pgtls verify-full, pgtls -> server verify-full):

 - pass-through;
 - a session pool;
 - a transaction pool.

The drivers: psycopg 3 (with pipeline mode), psycopg2, asyncpg (its
statement cache on), pg8000, SQLAlchemy 2 on psycopg and on asyncpg,
pgjdbc (Debian's jar, a Java program compiled here), node-postgres (named
queries) and postgres.js (C{prepare: true}). The scenarios:

 - C{many}: clients side by side repeating the same statements in small
   transactions, past every driver's prepare threshold;
 - C{pipeline}: pipelined or batched statements, named and unnamed, with
   an error in the middle, then the connection used again;
 - C{copy}: COPY in, then out;
 - C{failed_tx}: a transaction that fails midway, then the connection used again;
 - C{cancel}: a long pg_sleep cancelled with the driver's own cancel API;
 - C{listen}: LISTEN, and notifications sent while the listener is idle;
 - C{leak}: client A makes session state (a setting, a temporary table,
   an advisory lock, a statement timeout) and leaves; client B, served by
   the same server connection of a one-connection pool, sees none of it.

Each (driver, route, scenario) is one test. A driver's program runs all
its scenarios through a route in one process, and each test reads its
line of the report (L{support.drivers}). A missing driver, JDK, jar or
Node package fails every test here, loudly: C{make test} installs them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.drivers import DRIVERS, ROUTES, Matrix, missing_tools

CELLS = [
    pytest.param(driver, mode, scenario, id=f"{driver}-{mode}-{scenario}")
    for driver, spec in DRIVERS.items()
    for mode in ROUTES
    for scenario in spec.scenarios
]


@pytest.fixture(scope="module")
def matrix(
    request: pytest.FixtureRequest,
    pki: Any,
    pg_tls: Any,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Matrix]:
    """
    The runs of the (driver, route) pairs of the selected tests (all, unless
    C{-k} says otherwise), started at once; stopped after the module.
    """
    missing = missing_tools()
    if missing:
        pytest.fail("the driver matrix cannot run; missing:\n  " + "\n  ".join(missing))
    wanted: list[tuple[str, str]] = []
    for item in request.session.items:
        params = getattr(item, "callspec", None)
        if item.module is request.module and params is not None:
            pair = (params.params["driver"], params.params["mode"])
            if pair not in wanted:
                wanted.append(pair)
    running = Matrix(pki, pg_tls, Path(tmp_path_factory.mktemp("drivers")), wanted)
    try:
        yield running
    finally:
        running.close()


@pytest.mark.parametrize(("driver", "mode", "scenario"), CELLS)
def test_driver(matrix: Matrix, driver: str, mode: str, scenario: str) -> None:
    outcome = matrix.outcome(driver, mode, scenario)
    if not outcome.ok:
        pytest.fail(
            f"{driver} through the {mode} route, scenario {scenario!r}:\n{outcome.error}\n"
            f"(pgtls log: {matrix.log(mode)})",
            pytrace=False,
        )
