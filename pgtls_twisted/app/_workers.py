# -*- test-case-name: tests.test_workers,tests.test_workers_lifecycle -*-
"""
C{workers = N}: N reactor processes sharing every listening port.

The process C{twist pgtls} starts becomes a L{Supervisor}. It binds
nothing itself except the metrics endpoint: each worker (C{python -m
pgtls_twisted worker}) loads the same configuration and binds every route
with C{SO_REUSEPORT}, so the kernel spreads new connections over them; a
worker that dies is started again (connections it had are lost, as with
any crashed process; the others carry on).

Workers talk to each other through one Unix socket each in a private
run directory (L{ControlService}), a line protocol for what one process
cannot do alone:

 - C{cancel <hex>}: a CancelRequest that reached a worker other than the
   one running its session (the minted secret key names the worker, see
   L{pgtls_twisted.proxy._cancel});
 - C{metrics}: the worker's Prometheus text, which the supervisor merges
   into the one page it serves (each series already has its C{worker}
   label);
 - C{show <routes|pools|clients|servers|stats>}: the worker's rows of
   that admin console table, as JSON, so that a console session on any
   worker answers for all of them (L{WorkerProxy.complete});
 - C{pause <route|*>} / C{resume <route|*>}: the admin console's
   C{PAUSE}/C{RESUME} apply to every worker.

Signals go to the supervisor, which passes them on: SIGHUP (after
checking the file once, so an invalid one is reported once, not N times),
SIGTERM (each worker drains, the supervisor waits), SIGINT, SIGUSR1/2.
Worker logs reach the supervisor as JSON events on the worker's stdout and
are re-published there, so C{--logfile}, C{log_format} and C{twistd}
behave as with one process.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet import defer, protocol
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.error import CannotListenError
from twisted.logger import Logger, eventAsJSON, eventFromJSON, globalLogPublisher
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.reflect import qual

from pgtls_twisted.app._reactor import install, isShortDispatch
from pgtls_twisted.app._service import ProxyService
from pgtls_twisted.app._signals import Signals, proxy_signals
from pgtls_twisted.config import Config, ConfigError, load_config
from pgtls_twisted.ops._commands import PER_WORKER, AdminCommands, Result, merge_rows
from pgtls_twisted.ops._logs import LogLevels
from pgtls_twisted.ops._metrics import Metrics
from pgtls_twisted.protocol import _wire as wire
from pgtls_twisted.proxy._cancel import CancelRegistry
from pgtls_twisted.proxy._route import Route
from pgtls_twisted.tls._contexts import TLSConfigError

#: Delay before a dead worker is started again (doubles while it keeps dying quickly).
RESTART_DELAY = 0.5
#: How long workers get beyond C{shutdown_timeout} before they are killed.
KILL_MARGIN = 10.0


def control_path(runDir: str | Path, worker: int) -> str:
    return os.path.join(str(runDir), f"worker-{worker}.sock")


def check_config(config: Config, reactor: Any, bind: bool = False) -> Config:
    """
    What the workers would find wrong with C{config}, found once, here:
    every route's TLS files are loaded (and, with C{bind}, every listening
    address is bound and released, see L{check_bindable}), so a broken file
    is reported once and not by each worker, and C{twist} exits non-zero
    instead of restarting workers that cannot start.

    @raise ConfigError: naming every problem.
    """
    problems = []
    for routeConfig in config.routes:
        try:
            Route(routeConfig, reactor, CancelRegistry(), Metrics(clock=reactor))
        except TLSConfigError as e:
            problems.append(f'{config.path}: route "{routeConfig.name}": {e}')
            continue
        if bind:
            listener = routeConfig.listener
            try:
                check_bindable(listener.host, listener.port)
            except CannotListenError as e:
                problems.append(f'{config.path}: route "{routeConfig.name}": {e}')
    if problems:
        raise ConfigError(problems)
    return config


def check_bindable(host: str, port: int) -> None:
    """
    Bind C{host:port} as a worker will (C{SO_REUSEPORT}) and close it,
    without listening. A socket that listened, even for a moment, would join
    the port's C{SO_REUSEPORT} group: the kernel would hand it connections,
    those of the pgtls already serving the port in a deploy on the same
    ports among them, and they would be reset when it closed.

    @raise CannotListenError: the address cannot be bound.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
        except OSError as e:
            raise CannotListenError(host, port, e) from None


# -- the worker side ----------------------------------------------------------------


class WorkerProxy(ProxyService):
    """A L{ProxyService} that knows its siblings."""

    def __init__(
        self, config: Config, reactor: Any, worker: int, runDir: str, logLevels: LogLevels
    ) -> None:
        super().__init__(
            config,
            reactor,
            worker=worker,
            serveMetrics=False,
            logLevels=logLevels,
            connectionIds=itertools.count(worker + 1, config.workers),
        )
        self.runDir = runDir
        self.cancels.relay = self._relayCancel
        self.cancels.workers = config.workers
        ControlService(self, control_path(runDir, worker)).setServiceParent(self)

    def _siblings(self) -> list[int]:
        # The count this process started with: a reload cannot change it.
        return [i for i in range(self.cancels.workers) if i != self.worker]

    def _relayCancel(self, worker: int, request: wire.CancelRequest, via: Any) -> None:
        line = f"cancel {request.encode().hex()} {via.name if via is not None else ''}"
        control_request(self.reactor, control_path(self.runDir, worker), line.strip()).addErrback(
            lambda f: self._log.warn(
                "could not pass a cancel request to worker {owner}: {error}",
                owner=worker,
                error=f.getErrorMessage(),
            )
        )

    def requestReload(self) -> list[str]:
        """Check the file here (so the console sees errors), then reload every worker."""
        assert self.config.path is not None
        check_config(load_config(self.config.path), self.reactor)
        os.kill(os.getppid(), signal.SIGHUP)
        return [f"reload requested for all {self.config.workers} workers"]

    def requestShutdown(self) -> None:
        os.kill(os.getppid(), signal.SIGTERM)

    def complete(self, results: list[Any]) -> defer.Deferred[list[Any]]:
        """
        The console's SHOW ROUTES/POOLS/CLIENTS/SERVERS/STATS, with every
        worker's rows (asked over their control sockets; a worker that does
        not answer is left out, with a NOTICE saying so).
        """
        shows = [r for r in results if isinstance(r, Result) and r.show in PER_WORKER]
        if not shows:
            return defer.succeed(results)

        def gather(result: Result) -> defer.Deferred[None]:
            asks = [
                control_request(
                    self.reactor, control_path(self.runDir, w), f"show {result.show}"
                ).addErrback(lambda f: None)
                for w in self._siblings()
            ]

            def merge(answers: list[bytes | None]) -> None:
                rows = list(result.rows)
                for worker, answer in zip(self._siblings(), answers, strict=True):
                    try:
                        rows.extend(json.loads(answer or b"null"))
                    except (ValueError, TypeError):
                        result.notices.append(f"worker {worker} did not answer")
                result.rows = merge_rows(result.show, rows)

            return defer.gatherResults(asks).addCallback(merge)

        return defer.gatherResults([gather(r) for r in shows]).addCallback(lambda _: results)

    def requestForget(self, user: str | None) -> list[str]:
        notes = super().requestForget(user)
        # The name as hex: a role name may hold any character but NUL.
        argument = "*" if user is None else user.encode().hex()
        for worker in self._siblings():
            control_request(
                self.reactor, control_path(self.runDir, worker), f"forget {argument}"
            ).addErrback(lambda f: None)
        return [f"{notes[0]} in this worker; asked the {len(self._siblings())} others"]

    def requestPause(self, name: str | None, paused: bool) -> list[str]:
        names = self.setPaused(name, paused)
        verb = "pause" if paused else "resume"
        for worker in self._siblings():
            control_request(
                self.reactor, control_path(self.runDir, worker), f"{verb} {name or '*'}"
            ).addErrback(lambda f: None)
        return names


class _Control(LineOnlyReceiver):
    delimiter = b"\n"
    MAX_LENGTH = 4096

    def lineReceived(self, line: bytes) -> None:
        proxy: WorkerProxy = self.factory.proxy
        command, _, argument = line.decode("ascii", "replace").partition(" ")
        if command == "metrics":
            self.transport.write(proxy.metrics.text())
        elif command == "cancel":
            packet, _, routeName = argument.partition(" ")
            try:
                parsed = wire.parse_startup_packet(bytes.fromhex(packet))
            except (ValueError, wire.ProtocolViolation):
                parsed = None
            group = proxy.groups.get(routeName)
            via = group.route if group is not None else None
            if parsed is not None and isinstance(parsed[0], wire.CancelRequest):
                proxy.cancels.cancel(parsed[0], 0, via, relayed=True)
        elif command == "forget":
            try:
                user = None if argument == "*" else bytes.fromhex(argument).decode()
            except (ValueError, UnicodeDecodeError):
                return
            proxy.forgetLogins(user)
        elif command == "show":
            if argument in PER_WORKER:
                result = AdminCommands(proxy).one(f"SHOW {argument}")
                self.transport.write(json.dumps(result.rows).encode())
        elif command in ("pause", "resume"):
            try:
                proxy.setPaused(None if argument == "*" else argument, command == "pause")
            except KeyError:
                pass
        self.transport.loseConnection()


class ControlService(MultiService):
    """A worker's Unix control socket (mode 0600, in a 0700 directory)."""

    def __init__(self, proxy: WorkerProxy, path: str) -> None:
        super().__init__()
        self.proxy = proxy
        self.path = path
        self.port: Any = None

    def startService(self) -> None:
        super().startService()
        factory = protocol.Factory.forProtocol(_Control)
        factory.proxy = self.proxy  # type: ignore[attr-defined]
        factory.noisy = False
        if os.path.exists(self.path):
            os.unlink(self.path)
        self.port = self.proxy.reactor.listenUNIX(self.path, factory, mode=0o600)

    def stopService(self) -> Any:
        super().stopService()
        port, self.port = self.port, None
        if port is not None:
            return port.stopListening()
        return None


class _Collect(protocol.Protocol):
    def __init__(self, line: str) -> None:
        self.line = line
        self.chunks: list[bytes] = []
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.line.encode("ascii") + b"\n")

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.done.callback(b"".join(self.chunks))


def control_request(
    reactor: Any, path: str, line: str, timeout: float = 5.0
) -> defer.Deferred[bytes]:
    """Send one line to a worker's control socket; fires with its whole answer."""
    endpoint = UNIXClientEndpoint(reactor, path, timeout=timeout)
    collector = _Collect(line)
    factory = protocol.Factory.forProtocol(lambda: collector)
    factory.noisy = False
    d = endpoint.connect(factory)
    d.addCallback(lambda _: collector.done)
    return d.addTimeout(timeout, reactor)


class _WorkerLog:
    """Worker log events as JSON lines on stdout, for the supervisor to re-publish."""

    def __init__(self, out: Any, worker: int) -> None:
        self.out = out
        self.worker = worker

    def __call__(self, event: dict[str, Any]) -> None:
        event = dict(event)
        event.setdefault("worker", self.worker)
        try:
            line = eventAsJSON(event)
        except Exception:
            return
        self.out.write(line + "\n")
        self.out.flush()


def run_worker(configPath: str, worker: int, runDir: str, shortDispatch: bool = False) -> int:
    """
    The body of C{python -m pgtls_twisted worker}.

    @param shortDispatch: run pgtls's own reactor, as the supervisor does
        (L{pgtls_twisted.app._reactor}).
    """
    _die_with_parent()
    if shortDispatch:
        install()
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner

    config = load_config(configPath)
    levels = LogLevels(config.log_level)
    globalLogBeginner.beginLoggingTo(
        [levels.filtered(_WorkerLog(sys.stdout, worker))], redirectStandardIO=False
    )
    Logger().info("reactor: {reactor}", reactor=qual(type(reactor)))
    proxy = WorkerProxy(config, reactor, worker, runDir, levels)
    proxy_signals(proxy, reactor).setServiceParent(proxy)
    proxy.privilegedStartService()
    reactor.callWhenRunning(proxy.startService)
    reactor.addSystemEventTrigger("before", "shutdown", proxy.stopService)
    reactor.run()
    return 0


def _die_with_parent() -> None:
    """Linux: get SIGTERM (a graceful drain) if the supervisor dies."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except Exception:
        pass


# -- the supervisor side --------------------------------------------------------------


class _WorkerProcess(protocol.ProcessProtocol):
    def __init__(self, supervisor: Supervisor, index: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self._out = b""
        self._err = b""
        self.ended: defer.Deferred[None] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self._out += data
        *lines, self._out = self._out.split(b"\n")
        for line in lines:
            if not line.strip():
                continue
            try:
                event = eventFromJSON(line.decode("utf-8", "replace"))
            except Exception:
                self.supervisor._log.info(
                    "worker {worker}: {line}",
                    worker=self.index,
                    line=line.decode("utf-8", "replace"),
                )
                continue
            globalLogPublisher(event)

    def errReceived(self, data: bytes) -> None:
        self._err += data
        *lines, self._err = self._err.split(b"\n")
        for line in lines:
            if line.strip():
                self.supervisor._log.warn(
                    "worker {worker} stderr: {line}",
                    worker=self.index,
                    line=line.decode("utf-8", "replace"),
                )

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(None)
        self.supervisor._ended(self, reason)


class Supervisor(MultiService):
    """
    Runs C{config.workers} workers, restarts those that die, passes
    signals on, and serves the merged metrics.

    @ivar workers: worker number to its running process protocol.
    @ivar restarts: how many times each worker was started again.
    """

    _log = Logger()

    def __init__(self, config: Config, reactor: Any, logLevels: LogLevels | None = None) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        #: The supervisor's own output filter (its events and the workers').
        self.logLevels = logLevels
        self.runDir = tempfile.mkdtemp(prefix="pgtls-workers-")
        os.chmod(self.runDir, 0o700)
        self.workers: dict[int, _WorkerProcess] = {}
        self.restarts: dict[int, int] = {i: 0 for i in range(config.workers)}
        self._delays: dict[int, float] = {}
        self._stopping = False
        self._interrupted = False
        Signals(
            reactor,
            {
                signal.SIGHUP: self._hangup,
                signal.SIGINT: self._interrupt,
                signal.SIGUSR1: lambda: self.signalAll(signal.SIGUSR1),
                signal.SIGUSR2: lambda: self.signalAll(signal.SIGUSR2),
            },
        ).setServiceParent(self)
        if config.metrics is not None:
            from prometheus_client import CollectorRegistry

            # Imported here: prometheus_client's Twisted resource imports
            # the global reactor, which must not happen before twist (or an
            # embedding application) has chosen it.
            from pgtls_twisted.app._metricsweb import MetricsService

            registry = CollectorRegistry(auto_describe=False)
            registry.register(_Merged(self))
            MetricsService(
                config.metrics, registry, reactor, lambda: not self._stopping
            ).setServiceParent(self)

    # -- workers ------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._log.info(
            "supervisor: starting {count} workers (run directory {dir})",
            count=self.config.workers,
            dir=self.runDir,
        )
        for index in range(self.config.workers):
            self._spawn(index)

    def _spawn(self, index: int) -> None:
        if self._stopping:
            return
        assert self.config.path is not None
        proto = _WorkerProcess(self, index)
        args = [
            sys.executable, "-m", "pgtls_twisted", "worker",
            "--config", str(self.config.path), "--index", str(index), "--run-dir", self.runDir,
        ]  # fmt: skip
        if isShortDispatch(self.reactor):
            args.append("--short-dispatch")
        self.reactor.spawnProcess(proto, sys.executable, args, env=os.environ.copy())
        self.workers[index] = proto
        self._log.info("worker {worker} started (pid {pid})", worker=index, pid=proto.transport.pid)

    def _ended(self, proto: _WorkerProcess, reason: Any) -> None:
        if self.workers.get(proto.index) is proto:
            del self.workers[proto.index]
        if self._stopping:
            self._log.info("worker {worker} exited", worker=proto.index)
            return
        delay = self._delays.get(proto.index, RESTART_DELAY)
        self._delays[proto.index] = min(delay * 2, 30.0)
        self.reactor.callLater(60, self._delays.pop, proto.index, None)
        self.restarts[proto.index] += 1
        self._log.error(
            "worker {worker} died ({reason}); starting it again in {delay:g}s",
            worker=proto.index,
            reason=reason.getErrorMessage(),
            delay=delay,
        )
        self.reactor.callLater(delay, self._spawn, proto.index)

    def signalAll(self, signum: int) -> None:
        for proto in list(self.workers.values()):
            try:
                proto.transport.signalProcess(signum)
            except Exception:
                pass

    def _hangup(self) -> None:
        assert self.config.path is not None
        try:
            config = check_config(load_config(self.config.path), self.reactor)
        except ConfigError as e:
            for line in str(e).splitlines():
                self._log.error("reload refused, nothing changed: {problem}", problem=line)
            return
        if config.workers != self.config.workers:
            self._log.warn("workers changed: takes effect after a restart")
        if self.logLevels is not None:
            self.logLevels.setLevel(config.log_level)
        self._log.info("SIGHUP: every worker re-reads the configuration")
        self.signalAll(signal.SIGHUP)

    def _interrupt(self) -> None:
        self._log.info("SIGINT: workers close every session now")
        self._stopping = True
        self._interrupted = True
        self.signalAll(signal.SIGINT)
        if self.reactor.running:
            self.reactor.stop()

    def stopService(self) -> defer.Deferred[None]:
        """Each worker drains (SIGTERM); wait for all of them, killing stragglers."""
        self._stopping = True
        Service.stopService(self)
        ended = [p.ended for p in self.workers.values()]
        if not self._interrupted:  # after SIGINT they are stopping already
            self.signalAll(signal.SIGTERM)
        killer = self.reactor.callLater(
            self.config.shutdown_timeout + KILL_MARGIN, self.signalAll, signal.SIGKILL
        )

        def done(_: object) -> defer.Deferred[None]:
            if killer.active():
                killer.cancel()
            shutil.rmtree(self.runDir, ignore_errors=True)
            # Signal handlers and metrics stay up until the workers are gone.
            return defer.gatherResults(
                [defer.maybeDeferred(child.stopService) for child in reversed(list(self))]
            ).addCallback(lambda _: None)

        return defer.gatherResults(ended).addBoth(done)

    # -- metrics ------------------------------------------------------------------

    def scrape(self) -> defer.Deferred[list[bytes]]:
        """Every running worker's metrics text (a worker that fails to answer is left out)."""
        requests = [
            control_request(self.reactor, control_path(self.runDir, i), "metrics").addErrback(
                lambda f: b""
            )
            for i in sorted(self.workers)
        ]
        return defer.gatherResults(requests)


class _Merged:
    """The supervisor's collector: all workers' series as one set of families."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        from prometheus_client.parser import text_string_to_metric_families
        from twisted.internet.threads import blockingCallFromThread

        sup = self.supervisor
        texts = blockingCallFromThread(sup.reactor, sup.scrape)
        families: dict[str, Any] = {}
        for text in texts:
            for family in text_string_to_metric_families(text.decode("utf-8", "replace")):
                known = families.get(family.name)
                if known is None:
                    families[family.name] = family
                else:
                    known.samples.extend(family.samples)
        yield from families.values()
        alive = GaugeMetricFamily("pgtls_workers_running", "Worker processes running now")
        alive.add_metric([], len(sup.workers))
        yield alive
        restarts = CounterMetricFamily(
            "pgtls_worker_restarts", "Times a worker was started again", labels=["worker"]
        )
        for index, count in sorted(sup.restarts.items()):
            restarts.add_metric([str(index)], count)
        yield restarts
