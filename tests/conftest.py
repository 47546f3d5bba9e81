"""
Fixtures shared by the whole suite: a throwaway PKI, real PostgreSQL clusters
(one with TLS, one without) and a guard that fails any test during which
Twisted logged an error.

The Twisted reactor is never imported here at module level: pytest-twisted
installs the reactor chosen with C{--reactor} in its C{pytest_configure},
which runs after conftest modules are imported, and an earlier import would
install the default reactor first and break that choice. Ours runs first
and installs pgtls's own reactor (L{pgtls_twisted.app._reactor}), the one
C{twist pgtls} runs on, which pytest-twisted accepts as the default (an
epoll reactor); C{PGTLS_TEST_REACTOR=twisted} keeps Twisted's.

Missing PostgreSQL binaries make the cluster fixtures error, never skip: a
suite that silently skips its integration tests would look green while
proving nothing.
"""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from pgtls_twisted.testing.cluster import PostgresCluster, find_pg_bindir
from pgtls_twisted.testing.pki import PKI, make_pki

try:
    find_pg_bindir()
    _PG_MISSING: str | None = None
except RuntimeError as e:
    _PG_MISSING = str(e)


#: PGTLS_TEST_FULL_GC=1: a full garbage collection after every test, to pin
#: an "Unhandled error in Deferred" on the right test even when the Deferred
#: outlived a young-generation collection.
_FULL_GC = bool(os.environ.get("PGTLS_TEST_FULL_GC"))


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """
    Register our markers, since the suite runs with --strict-markers, and
    install the reactor (see the module).
    """
    if os.environ.get("PGTLS_TEST_REACTOR", "pgtls") == "pgtls":
        from pgtls_twisted.app._reactor import installUnlessChosen

        installUnlessChosen()
    config.addinivalue_line(
        "markers",
        "allow_logged_errors: the test expects Twisted to log errors; "
        "do not fail it for them (they are still collected in no_logged_errors).",
    )


def _require_postgres() -> None:
    if _PG_MISSING is not None:
        raise RuntimeError(_PG_MISSING)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    """The throwaway PKI of L{pgtls_twisted.testing.pki}, made once per session."""
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def pg_base_dir() -> Iterator[Path]:
    """
    A directory for the session's clusters.

    Not under pytest's basetemp: that is mode 0700 and owned by root in CI,
    so the C{postgres} OS user the server runs as could not enter it. A
    short path also keeps the Unix socket path under the kernel's limit.
    Set C{PGTLS_KEEP_CLUSTERS=1} to keep it (and the server logs) afterwards.
    """
    base = Path(tempfile.mkdtemp(prefix="pgtls-pg-"))
    base.chmod(0o755)
    yield base
    if not os.environ.get("PGTLS_KEEP_CLUSTERS"):
        shutil.rmtree(base, ignore_errors=True)


def _cluster(base: Path, **kwargs: Any) -> Iterator[PostgresCluster]:
    _require_postgres()
    cluster = PostgresCluster(base, **kwargs)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def pg_tls(pg_base_dir: Path, pki: PKI) -> Iterator[PostgresCluster]:
    """
    A PostgreSQL cluster with TLS on (the PKI's C{server} certificate, and
    C{ca} trusted for client certificates), started on first use.
    """
    yield from _cluster(pg_base_dir, ssl=True, pki=pki, name="tls")


@pytest.fixture(scope="session")
def pg_plain(pg_base_dir: Path) -> Iterator[PostgresCluster]:
    """A PostgreSQL cluster without TLS, started on first use."""
    yield from _cluster(pg_base_dir, ssl=False, name="plain")


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    """
    Dummy files for every file key of a configuration, in C{tmp_path}
    (L{support.configdocs}): for tests that parse configuration documents.
    """
    from support.configdocs import write_dummy_files

    return write_dummy_files(tmp_path)


@pytest.fixture
def events() -> Iterator[list[dict[str, Any]]]:
    """Every event logged through Twisted while the test runs (L{support.logcapture})."""
    from support.logcapture import captured

    with captured() as seen:
        yield seen


@pytest.fixture
def threads() -> Iterator[None]:
    """Up to 64 worker threads for L{deferToThread}, restored afterwards."""
    from twisted.internet import reactor

    pool = reactor.getThreadPool()  # type: ignore[attr-defined]
    before = pool.max
    pool.adjustPoolsize(maxthreads=64)
    yield
    pool.adjustPoolsize(maxthreads=before)


@pytest.fixture
def processes() -> Iterator[list[Any]]:
    """
    The L{support.processes.ProxyProcess}es a test appends, killed after it
    if still running, however it ends (tests stop theirs, and check how).
    """
    started: list[Any] = []
    yield started
    for proc in started:
        proc.close()


@pytest.fixture(autouse=True)
def no_logged_errors(request: pytest.FixtureRequest) -> Iterator[list[dict[str, Any]]]:
    """
    Fail a test during which anything was logged as an error through
    Twisted's logging (C{log.failure}, C{log.err}, "Unhandled error in
    Deferred"), since pytest-twisted does not: such errors are otherwise
    printed and forgotten while the test passes (magic-wormhole's
    C{observe_errors} pattern).

    Yields the list of error events, so a test marked
    C{@pytest.mark.allow_logged_errors} can assert on what was logged.
    """
    from twisted.logger import ILogObserver, LogLevel, globalLogPublisher

    errors: list[dict[str, Any]] = []

    def collect(event: dict[str, Any]) -> None:
        if (
            event.get("isError")
            or "log_failure" in event
            or event.get("log_level") in (LogLevel.error, LogLevel.critical)
        ):
            errors.append(event)

    # Twisted accepts any callable as an observer; the cast is for mypy.
    observer = cast(ILogObserver, collect)

    globalLogPublisher.addObserver(observer)
    try:
        yield errors
        # A Deferred that failed with nobody listening reports "Unhandled
        # error in Deferred" only when garbage-collected: collect now, so it
        # is blamed on this test rather than on whichever runs next. The
        # young generations hold what this test made and cost microseconds;
        # a full collection costs ~40 ms a test, so it is opt-in.
        gc.collect(2 if _FULL_GC else 1)
    finally:
        globalLogPublisher.removeObserver(observer)
    if errors and request.node.get_closest_marker("allow_logged_errors") is None:
        from twisted.logger import eventAsText

        text = "\n\n".join(
            eventAsText(e, includeTraceback=True, includeTimestamp=False) for e in errors
        )
        pytest.fail(f"{len(errors)} error(s) logged through Twisted during the test:\n{text}")
