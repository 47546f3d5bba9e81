"""
Throwaway PostgreSQL clusters for tests, the demo and the benchmarks.

A proxy is only as correct as its behaviour against a real server, so the
integration tests run against real PostgreSQL: one cluster per need, made
with C{initdb} in a temporary directory, listening on a free port on
127.0.0.1 and on a Unix socket in its own directory, never touching a system
cluster.

Every cluster gets the same roles (see the module constants), one per
authentication method the proxy must relay: SCRAM, MD5, trust and, with
TLS, client certificates.

PostgreSQL refuses to run as root. When this process is root (as in CI and
in containers), every server-side command runs as the C{postgres} OS user
through C{runuser}, and the cluster directory and the key files are handed
to that user; the directories above the cluster must therefore be
traversable by it (a fresh C{tempfile.mkdtemp()} is not, until chmod'ed).
"""

from __future__ import annotations

import atexit
import os
import pwd
import re
import shutil
import socket
import stat
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

from pgtls_twisted.testing.pki import PKI

__all__ = [
    "APP_DB",
    "CERT_USER",
    "MD5_PASSWORD",
    "MD5_USER",
    "POOL_PASSWORD",
    "POOL_USER",
    "PROXY_USER",
    "SCRAM_PASSWORD",
    "SCRAM_USER",
    "SERVER_OS_USER",
    "SUPERUSER",
    "TRUST_USER",
    "PostgresCluster",
    "find_pg_bindir",
]

#: The cluster's superuser (initdb -U); reachable over the Unix socket only.
SUPERUSER = "postgres"
#: A role with a SCRAM-SHA-256 password, the modern default.
SCRAM_USER = "scram_user"
SCRAM_PASSWORD = "scram_pw"
#: A role whose password is stored as MD5 and authenticated with C{md5}.
MD5_USER = "md5_user"
MD5_PASSWORD = "md5_pw"
#: A role with no password and C{trust} in pg_hba.conf.
TRUST_USER = "trust_user"
#: A role authenticated by client certificate (CN=cert_user) on TLS clusters.
CERT_USER = "cert_user"
#: The proxy's own identity for C{cert} auth to a backend: the CN of the
#: PKI's C{proxy_client} certificate.
PROXY_USER = "pgtls_proxy"
#: A SCRAM service role for the pooler's server connections.
POOL_USER = "pool_user"
POOL_PASSWORD = "pool_pw"
#: A database owned by SCRAM_USER in which every role may create tables.
APP_DB = "app"

#: The unprivileged OS user the server runs as when we are root.
SERVER_OS_USER = "postgres"

_NOT_FOUND = (
    "PostgreSQL server binaries not found: install the Debian 'postgresql' package "
    "(initdb must be on PATH)"
)
#: sockaddr_un.sun_path is 108 bytes on Linux, terminating NUL included.
_MAX_SOCKET_PATH = 107
_START_TIMEOUT = 60


def find_pg_bindir() -> Path:
    """
    The directory holding C{initdb}, C{postgres} and C{pg_ctl}.

    C{pg_config --bindir} is not used: on Debian it can name the client-only
    package's directory. C{initdb} on PATH is usually a symlink into the real
    server directory, so it is resolved; failing that, the newest
    C{/usr/lib/postgresql/*/bin} wins. C{PGTLS_PG_BINDIR} overrides both.

    @raise RuntimeError: no server binaries were found, with the fix in the
        message, so a missing package fails loudly instead of skipping tests.
    """
    candidates: list[Path] = []
    override = os.environ.get("PGTLS_PG_BINDIR")
    if override:
        candidates.append(Path(override))
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(os.path.realpath(initdb)).parent)

    def version(p: Path) -> tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", p.parent.name)) or (0,)

    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True)
    for bindir in candidates:
        if all(os.access(bindir / exe, os.X_OK) for exe in ("initdb", "postgres", "pg_ctl")):
            return bindir
    raise RuntimeError(_NOT_FOUND)


def _free_port(host: str) -> int:
    """
    A TCP port nothing listens on right now. Racy by nature; the first
    start retries with another port if the server cannot bind it.
    """
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _conf_quote(value: str) -> str:
    """A postgresql.conf string literal (any setting accepts the quoted form)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def _dsn_quote(value: str) -> str:
    """A libpq keyword/value connection-string value."""
    if value and not re.search(r"[\s'\\]", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _sql_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _clean_env() -> dict[str, str]:
    """
    The environment for PostgreSQL commands, without the caller's C{PG*}
    variables (PGHOST, PGSSLMODE, PGOPTIONS, ...) that would silently change
    where or how psql connects, and in the C locale so messages are stable.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    env["LANG"] = "C"
    return env


class PostgresCluster:
    """
    One PostgreSQL cluster in C{base_dir / name}: C{data/} (PGDATA, with
    the TLS files copied in), the Unix socket, and C{postgres.log}.

    Usable as a context manager (start on enter, stop on exit). The cluster
    directory is left in place after L{stop} so a failed test's log can be
    read; deleting C{base_dir} is the caller's job.

    @ivar host: the TCP address the server listens on.
    @ivar port: its TCP port (and the Unix socket's number).
    @ivar data_dir: PGDATA.
    @ivar socket_dir: where the Unix socket lives.
    @ivar log_path: the server log, also where start failures are explained.
    """

    host: str = "127.0.0.1"

    def __init__(
        self,
        base_dir: Path,
        *,
        ssl: bool,
        pki: PKI | None = None,
        name: str = "pg",
        port: int | None = None,
        extra_conf: Mapping[str, str] | None = None,
    ) -> None:
        if ssl and pki is None:
            raise ValueError("a TLS cluster (ssl=True) needs a pki for its certificate")
        self.bindir = find_pg_bindir()
        self.ssl = ssl
        self.pki = pki
        self.name = name
        self.root = Path(base_dir).absolute() / name
        self.data_dir = self.root / "data"
        self.socket_dir = self.root
        self.log_path = self.root / "postgres.log"
        self._port_chosen = port is None
        self.port = _free_port(self.host) if port is None else port
        self.extra_conf = dict(extra_conf or {})
        self._running = False
        # root must hand everything to the server's OS user; anyone else
        # runs the server as themselves.
        self._as_root = os.geteuid() == 0
        sock = self.socket_dir / f".s.PGSQL.{self.port}"
        if len(os.fsencode(sock)) > _MAX_SOCKET_PATH:
            raise ValueError(
                f"Unix socket path {sock} is too long for the kernel; use a shorter base_dir"
            )

    # -- context manager --------------------------------------------------

    def __enter__(self) -> PostgresCluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self._running else "stopped"
        return f"<PostgresCluster {self.name} ssl={self.ssl} {self.host}:{self.port} {state}>"

    # -- lifecycle --------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether this object started the server and has not stopped it."""
        return self._running

    def start(self) -> None:
        """
        Create the cluster if needed, (re)write its configuration, start it
        and wait until it accepts connections, then create the test roles and
        database (idempotently, so a restart on an old directory is fine).

        @raise RuntimeError: C{initdb} or the server failed; the message
            carries the command's output and the tail of the server log.
        """
        if self._running:
            return
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
        attempts = 3 if self._port_chosen else 1
        for attempt in range(attempts):
            self._write_config()
            try:
                self._pg_ctl_start()
                break
            except RuntimeError:
                # Another process took the port we picked: pick again, but
                # only before anyone could have learnt the old port.
                if attempt + 1 < attempts and "could not bind" in self.log_tail(20):
                    self.port = _free_port(self.host)
                    continue
                raise
        self._running = True
        # Never leave a postmaster behind if the caller forgets to stop (or
        # is interrupted): pg_ctl puts it in its own session, out of reach of
        # the terminal's Ctrl-C.
        atexit.register(self.stop)
        try:
            self._wait_for_tcp()
            self._bootstrap()
        except BaseException:
            self.stop()
            raise
        self._port_chosen = False

    def stop(self) -> None:
        """
        Stop the server (C{pg_ctl stop -m fast}: roll back, disconnect, shut
        down cleanly). Does nothing if it is not running.
        """
        atexit.unregister(self.stop)
        if not (self.data_dir / "postmaster.pid").exists():
            self._running = False
            return
        result = self._run(
            [self._bin("pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w", "-s", "stop"],
            check=False,
            timeout=_START_TIMEOUT + 30,
        )
        self._running = False
        if result.returncode != 0 and (self.data_dir / "postmaster.pid").exists():
            raise RuntimeError(
                f"PostgreSQL cluster {self.name!r} did not stop: {result.stderr.strip()}"
                + self._log_excerpt()
            )

    def restart(self) -> None:
        """Stop and start again, re-reading the configuration and TLS files."""
        self.stop()
        self.start()

    # -- clients ----------------------------------------------------------

    def psql(self, sql: str, *, user: str = SUPERUSER, dbname: str = "postgres") -> str:
        """
        Run C{sql} (any number of statements, psql meta-commands allowed) with
        psql over the Unix socket, where every role is trusted, and return the
        output in unaligned tuples-only form, without the final newline.

        This is for setting up and inspecting the server from synchronous
        code; from a test that runs the reactor, use a child process that
        does not block it instead.

        @raise RuntimeError: psql failed (ON_ERROR_STOP), with its stderr.
        """
        psql = self.bindir / "psql"
        cmd = [
            str(psql) if psql.exists() else "psql",
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            str(self.socket_dir),
            "-p",
            str(self.port),
            "-U",
            user,
            "-d",
            dbname,
            "-f",
            "-",
        ]
        result = self._run(cmd, input=sql, check=False, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(
                f"psql on cluster {self.name!r} failed (exit {result.returncode}):\n"
                f"{result.stderr.strip()}"
            )
        return result.stdout.removesuffix("\n")

    def dsn(self, **params: str | int | None) -> str:
        """
        A libpq keyword/value connection string to this server, directly
        (not through a proxy): C{host}, C{port} and C{dbname=postgres}, then
        C{params}, which override those; a C{None} value drops a keyword.
        """
        merged: dict[str, str | int | None] = {
            "host": self.host,
            "port": self.port,
            "dbname": "postgres",
        }
        merged.update(params)
        return " ".join(f"{k}={_dsn_quote(str(v))}" for k, v in merged.items() if v is not None)

    def log_tail(self, n: int = 50) -> str:
        """The last C{n} lines of the server log ("" if there is none yet)."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return ""
        return "\n".join(lines[-n:])

    # -- internals --------------------------------------------------------

    def _bin(self, exe: str) -> str:
        return str(self.bindir / exe)

    def _run(
        self,
        cmd: Sequence[str],
        *,
        input: str | None = None,
        check: bool = True,
        timeout: float = 120,
    ) -> subprocess.CompletedProcess[str]:
        """
        Run a PostgreSQL command as the server's OS user, in the cluster
        directory (the caller's cwd may be unreadable to that user).
        """
        argv = list(cmd)
        if self._as_root:
            argv = ["runuser", "-u", SERVER_OS_USER, "--", *argv]
        result = subprocess.run(
            argv,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            cwd=self.root,
            env=_clean_env(),
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(cmd)} failed (exit {result.returncode}):\n"
                f"{(result.stdout + result.stderr).strip()}" + self._log_excerpt()
            )
        return result

    def _log_excerpt(self) -> str:
        tail = self.log_tail(30)
        return f"\n--- tail of {self.log_path} ---\n{tail}" if tail else ""

    def _server_ids(self) -> tuple[int, int]:
        try:
            pw = pwd.getpwnam(SERVER_OS_USER)
        except KeyError:
            raise RuntimeError(
                f"running as root, but there is no {SERVER_OS_USER!r} OS user to run "
                "PostgreSQL as (the Debian 'postgresql' package creates it)"
            ) from None
        return pw.pw_uid, pw.pw_gid

    def _give(self, path: Path, mode: int | None = None) -> None:
        """Hand C{path} to the server's OS user (when root), then chmod."""
        if self._as_root:
            uid, gid = self._server_ids()
            os.chown(path, uid, gid)
        if mode is not None:
            os.chmod(path, mode)

    def _check_traversable(self) -> None:
        """
        Fail early, and clearly, if the server's OS user cannot reach the
        cluster directory: otherwise initdb reports a bare "Permission
        denied" on a path that looks fine to root.
        """
        uid, gid = self._server_ids()
        groups = set(os.getgrouplist(SERVER_OS_USER, gid))
        for path in [self.root.parent, *self.root.parent.parents]:
            st = path.stat()
            if st.st_uid == uid:
                ok = bool(st.st_mode & stat.S_IXUSR)
            elif st.st_gid in groups:
                ok = bool(st.st_mode & stat.S_IXGRP)
            else:
                ok = bool(st.st_mode & stat.S_IXOTH)
            if not ok:
                raise RuntimeError(
                    f"the {SERVER_OS_USER!r} OS user cannot enter {path} (mode "
                    f"{stat.filemode(st.st_mode)}), so PostgreSQL cannot use {self.root}; "
                    "chmod it (e.g. 0o755) or choose a base_dir elsewhere"
                )

    def _initdb(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if self._as_root:
            self._check_traversable()
        self._give(self.root, 0o700)
        self._run(
            [
                self._bin("initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                SUPERUSER,
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ]
        )
        with (self.data_dir / "postgresql.conf").open("a") as f:
            f.write("\n# Added by pgtls_twisted.testing.cluster; rewritten at each start.\n")
            f.write("include 'pgtls.conf'\n")

    def _write_file(self, name: str, text: str, mode: int = 0o600) -> Path:
        path = self.data_dir / name
        path.write_text(text)
        self._give(path, mode)
        return path

    def _copy_in(self, source: Path, name: str) -> Path:
        # Copies, not references: the PKI may live where the server user
        # cannot read, and the key must be owned by that user with mode 0600.
        return self._write_file(name, source.read_text(), 0o600)

    def _write_config(self) -> None:
        settings: dict[str, str] = {
            "port": str(self.port),
            "listen_addresses": self.host,
            "unix_socket_directories": str(self.socket_dir),
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "300",
            "shared_buffers": "64MB",
            "password_encryption": "scram-sha-256",
            "ssl": "on" if self.ssl else "off",
        }
        if self.ssl:
            assert self.pki is not None
            settings["ssl_cert_file"] = str(self._copy_in(self.pki.server_cert, "server.crt"))
            settings["ssl_key_file"] = str(self._copy_in(self.pki.server_key, "server.key"))
            # Lets the server verify the proxy's client certificate.
            settings["ssl_ca_file"] = str(self._copy_in(self.pki.ca_cert, "root.crt"))
            settings["ssl_min_protocol_version"] = "TLSv1.2"
        settings.update(self.extra_conf)
        self._write_file(
            "pgtls.conf",
            "".join(f"{k} = {_conf_quote(v)}\n" for k, v in settings.items()),
        )
        self._write_file("pg_hba.conf", self._hba())

    def _hba(self) -> str:
        lines = ["# TYPE  DATABASE  USER  ADDRESS  METHOD", "local all all trust"]
        for net in ("127.0.0.1/32", "::1/128"):
            lines.append(f"host all {TRUST_USER} {net} trust")
            if self.ssl:
                lines.append(f"hostssl all {CERT_USER},{PROXY_USER} {net} cert")
            lines.append(f"host all {MD5_USER} {net} md5")
            lines.append(f"host all all {net} scram-sha-256")
        return "\n".join(lines) + "\n"

    def _pg_ctl_start(self) -> None:
        result = self._run(
            [
                self._bin("pg_ctl"),
                "-D",
                str(self.data_dir),
                "-l",
                str(self.log_path),
                "-w",
                "-t",
                str(_START_TIMEOUT),
                "-s",
                "start",
            ],
            check=False,
            timeout=_START_TIMEOUT + 30,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"PostgreSQL cluster {self.name!r} failed to start on port {self.port} "
                f"(pg_ctl exit {result.returncode}): {(result.stdout + result.stderr).strip()}"
                + self._log_excerpt()
            )

    def _wait_for_tcp(self) -> None:
        """
        pg_ctl -w already waited for "ready"; also make sure the TCP
        listener answers, since that is what tests and the proxy use.
        """
        deadline = time.monotonic() + _START_TIMEOUT
        while True:
            try:
                with socket.create_connection((self.host, self.port), timeout=1):
                    return
            except OSError as e:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"PostgreSQL cluster {self.name!r} started but {self.host}:{self.port} "
                        f"does not accept connections: {e}" + self._log_excerpt()
                    ) from e
                time.sleep(0.05)

    def _bootstrap(self) -> None:
        roles = (SCRAM_USER, MD5_USER, TRUST_USER, CERT_USER, PROXY_USER, POOL_USER)
        create = "\n".join(
            f"  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = {_sql_literal(r)}) THEN "
            f"CREATE ROLE {r} LOGIN; END IF;"
            for r in roles
        )
        self.psql(
            f"""
DO $$
BEGIN
{create}
END
$$;
SET password_encryption = 'scram-sha-256';
ALTER ROLE {SCRAM_USER} LOGIN PASSWORD {_sql_literal(SCRAM_PASSWORD)};
ALTER ROLE {POOL_USER} LOGIN PASSWORD {_sql_literal(POOL_PASSWORD)};
SET password_encryption = 'md5';
ALTER ROLE {MD5_USER} LOGIN PASSWORD {_sql_literal(MD5_PASSWORD)};
RESET password_encryption;
ALTER ROLE {TRUST_USER} LOGIN PASSWORD NULL;
ALTER ROLE {CERT_USER} LOGIN PASSWORD NULL;
ALTER ROLE {PROXY_USER} LOGIN PASSWORD NULL;
SELECT 'CREATE DATABASE {APP_DB} OWNER {SCRAM_USER}'
 WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = {_sql_literal(APP_DB)})
\\gexec
\\connect {APP_DB}
GRANT ALL ON SCHEMA public TO PUBLIC;
"""
        )
