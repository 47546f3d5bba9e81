"""
What the Python programs of the driver matrix share: their settings, the
SQL every driver runs, the checks of the session-state leak, and the loop
that runs each scenario with a deadline and reports it as one JSON line.

The programs run as children of the test (C{python tests/drivers/run.py
DRIVER}), so that a driver wedged by a proxy that lost the protocol's
thread is killed with its process instead of hanging the suite, and so
that asyncio drivers own their event loop. The Java and JavaScript
programs beside this file follow the same contract: settings from
C{MATRIX_*} environment variables, one line C{{"scenario": ..., "ok": ...,
"error": ..., "seconds": ...}} per scenario on stdout, in the order asked.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

#: Every driver runs these, with its own prefix for the names it creates.
NOTIFY_PAYLOADS = ("first", "second")

#: What client B of the leak scenario asks, in one statement: A's setting,
#: A's temporary table, the advisory locks of B's own backend, and the
#: statement timeout A set.
LEAK_CHECK = (
    "SELECT coalesce(current_setting('app.tenant_id', true), '') AS tenant, "
    "coalesce(to_regclass('pg_temp.leak_tmp')::text, '') AS temp_table, "
    "(SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
    "AND pid = pg_backend_pid())::int AS locks, "
    "current_setting('statement_timeout') AS statement_timeout"
)


def leak_statements(lock_key: int) -> list[str]:
    """Client A's session state, in order (the timeout last, or it would hit A)."""
    return [
        "SET app.tenant_id = 'A'",
        "CREATE TEMP TABLE leak_tmp (secret text)",
        "INSERT INTO leak_tmp VALUES ('A')",
        f"SELECT pg_advisory_lock({lock_key})",
        "SET statement_timeout = '1ms'",
    ]


def check_no_leak(row: Any) -> None:
    """
    @param row: C{LEAK_CHECK}'s row as client B saw it.
    @raise AssertionError: naming whatever of A's session B inherited.
    """
    tenant, temp_table, locks, timeout = tuple(row)
    leaked = []
    if tenant:
        leaked.append(f"app.tenant_id = {tenant!r}")
    if temp_table:
        leaked.append(f"temporary table {temp_table}")
    if int(locks):
        leaked.append(f"{locks} advisory lock(s) held by B's backend")
    if timeout != "0":
        leaked.append(f"statement_timeout = {timeout!r}")
    if leaked:
        raise AssertionError("client B inherited client A's session: " + ", ".join(leaked))


def client_b(check: Callable[[], Any]) -> None:
    """
    Run client B's C{check} (it returns C{LEAK_CHECK}'s row) and judge the
    row; an error (A's statement timeout cancels B's query) is a leak too.
    """
    try:
        row = check()
    except Exception as e:
        raise _b_failed(e) from e
    check_no_leak(row)


def _b_failed(error: Exception) -> AssertionError:
    return AssertionError(f"client B's check failed: {describe(error)}")


async def expect_error_async(
    sqlstate: str, action: Callable[[], Awaitable[Any]], what: str
) -> BaseException:
    """L{expect_error} for a coroutine function."""
    try:
        await action()
    except Exception as e:
        return _judged(sqlstate, e, what)
    raise AssertionError(f"{what}: expected SQLSTATE {sqlstate}, but it succeeded")


async def client_b_async(check: Callable[[], Awaitable[Any]]) -> None:
    """L{client_b} for a coroutine function."""
    try:
        row = await check()
    except Exception as e:
        raise _b_failed(e) from e
    check_no_leak(row)


def expect_notifications(
    got: list[tuple[str, str]], channel: str, payload: str, when: str = "within 5s"
) -> None:
    """The listener got exactly C{payload} on C{channel}."""
    if got != [(channel, payload)]:
        raise AssertionError(
            f"expected notification {payload!r} on {channel!r} {when}, got {got!r}"
        )


@dataclass(frozen=True)
class Settings:
    """
    One run of a driver against one route, from C{MATRIX_*} variables.

    @ivar port: the route the scenarios run through.
    @ivar leak_port: the route of the leak scenario (a pool of one server
        connection, so that client B is served by client A's).
    @ivar prefix: starts the name of every table and channel this run
        makes, so that runs side by side never share one.
    @ivar lock_key: the advisory lock of the leak scenario, this run's own:
        a lock leaked by one run must not block another.
    """

    host: str
    port: int
    leak_port: int
    dbname: str
    user: str
    password: str
    ca: str
    prefix: str
    lock_key: int
    scenarios: tuple[str, ...]
    clients: int
    repeat: int
    timeout: float

    @classmethod
    def from_env(cls) -> Settings:
        env = os.environ
        return cls(
            host=env["MATRIX_HOST"],
            port=int(env["MATRIX_PORT"]),
            leak_port=int(env["MATRIX_LEAK_PORT"]),
            dbname=env["MATRIX_DB"],
            user=env["MATRIX_USER"],
            password=env["MATRIX_PASSWORD"],
            ca=env["MATRIX_CA"],
            prefix=env["MATRIX_PREFIX"],
            lock_key=int(env["MATRIX_LOCK_KEY"]),
            scenarios=tuple(env["MATRIX_SCENARIOS"].split(",")),
            clients=int(env["MATRIX_CLIENTS"]),
            repeat=int(env["MATRIX_REPEAT"]),
            timeout=float(env["MATRIX_TIMEOUT"]),
        )

    def dsn(self, leak: bool = False) -> str:
        """A libpq connection string: verify-full against the suite's CA."""
        return (
            f"host={self.host} port={self.leak_port if leak else self.port} "
            f"dbname={self.dbname} user={self.user} password={self.password} "
            f"sslmode=verify-full sslrootcert={self.ca} connect_timeout=10"
        )

    def table(self, name: str) -> str:
        return f"{self.prefix}_{name}"


def sqlstate_of(error: BaseException) -> str | None:
    """The SQLSTATE a driver's exception carries, however that driver spells it."""
    orig = getattr(error, "orig", None)  # SQLAlchemy wraps the driver's error
    if isinstance(orig, BaseException):
        return sqlstate_of(orig)
    code = getattr(error, "sqlstate", None) or getattr(error, "pgcode", None)
    if code is None and error.args and isinstance(error.args[0], dict):
        code = error.args[0].get("C")  # pg8000: the server's fields
    return code


def describe(error: BaseException) -> str:
    """An exception as the report shows it: its class, SQLSTATE if any, message."""
    sqlstate = sqlstate_of(error)
    text = str(error).strip() or repr(error)
    if error.args and isinstance(error.args[0], dict):  # pg8000: the server's fields
        text = str(error.args[0].get("M", text))
    # The scenario's own line, in the driver's program rather than here.
    here = os.path.dirname(os.path.abspath(__file__))
    frames = [
        f
        for f in traceback.extract_tb(error.__traceback__)
        if f.filename.startswith(here) and f.filename != os.path.abspath(__file__)
    ]
    where = f"{os.path.basename(frames[-1].filename)}:{frames[-1].lineno}" if frames else "?"
    kind = f"{type(error).__module__}.{type(error).__qualname__}"
    code = f" [{sqlstate}]" if sqlstate else ""
    return f"{kind}{code}: {text}\n  (at {where})"


def expect_error(sqlstate: str, action: Callable[[], Any], what: str) -> BaseException:
    """Run C{action}, which must fail with C{sqlstate}; the error."""
    try:
        action()
    except Exception as e:
        return _judged(sqlstate, e, what)
    raise AssertionError(f"{what}: expected SQLSTATE {sqlstate}, but it succeeded")


def _judged(sqlstate: str, error: Exception, what: str) -> Exception:
    """C{error}, if it has C{sqlstate}."""
    if sqlstate_of(error) != sqlstate:
        raise AssertionError(
            f"{what}: expected SQLSTATE {sqlstate}, got {describe(error)}"
        ) from error
    return error


def copy_rows(count: int = 1000) -> str:
    """COPY text for the copy scenario: C{id<TAB>row-id} lines."""
    return "".join(f"{i}\trow-{i}\n" for i in range(count))


def run_in_threads(work: Callable[[int], Any], count: int) -> list[Any]:
    """C{work(0..count-1)} in threads side by side; their results, or the first error."""
    results: list[Any] = [None] * count
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            results[i] = work(i)
        except BaseException as e:  # reported below, with the first one raised
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def main(scenarios: dict[str, Callable[[Settings], Any]]) -> None:
    """
    Run the scenarios the settings name, each in a thread with the settings'
    deadline, printing one JSON line per scenario; exit without waiting for
    a thread that missed its deadline (it is stuck in the driver).
    """
    settings = Settings.from_env()
    for name in settings.scenarios:
        start = time.monotonic()
        outcome: dict[str, Any] = {}

        def scenario(name: str = name, outcome: dict[str, Any] = outcome) -> None:
            try:
                scenarios[name](settings)
                outcome["ok"] = True
            except BaseException as e:
                outcome["error"] = describe(e)

        thread = threading.Thread(target=scenario, daemon=True)
        thread.start()
        thread.join(settings.timeout)
        if thread.is_alive():
            outcome["error"] = f"still running after {settings.timeout:g}s"
        report = {
            "scenario": name,
            "ok": bool(outcome.get("ok")),
            "error": outcome.get("error"),
            "seconds": round(time.monotonic() - start, 3),
        }
        print(json.dumps(report), flush=True)
    sys.stdout.flush()
    os._exit(0)
