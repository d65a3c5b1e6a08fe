"""``--workers N``: protocol worker processes on one gRPC port, one routing state.

The serving process keeps everything that decides (datastore, scraping, KV events, director, flow
control, the scheduler and its plugins, metrics, health); it does not listen on the gRPC port.
N worker processes do (SO_REUSEPORT: the kernel spreads the gateway's connections over them) and
run the HTTP/2 server and the ext_proc state machine, echoing body chunks themselves; picks and the
events that change routing state go to the serving process over one Unix socket each
(``epp.server.workerlink``). Why this split: a decision needs every other decision's effect (in-flight
counts, pending tokens, the prefix index, the queues), so one process decides, and the part that
scales with traffic (framing, protobuf, per-chunk answers) runs on the other cores.

A worker that dies is started again (its in-flight requests end as Envoy ends a lost ext_proc
stream; the serving process releases what they held). ``python -m epp.server.workers CONFIG``
runs one worker; the serving process starts them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import uvloop
from prometheus_client import CollectorRegistry, Counter, Gauge

from epp.gcpolicy import settle
from epp.requestcontrol.director import Director
from epp.server import h2grpc
from epp.server.extproc import BodySkips, ExtProcStream
from epp.server.observed import ObservedPicks
from epp.server.pickapi import PICK_PATH, RELEASE_PATH, STARTED_PATH
from epp.server.serving import GrpcServing
from epp.server.tls import TLSPolicy
from epp.server.workerlink import RelayedObservers, RelayedSkips, RelayedUnary, StateEnd, UnaryFactory, WorkerEnd

log = logging.getLogger("epp.workers")

MAX_WORKERS = 64
# 'auto' stops here: one serving process decides every pick, and measured (epp bench workers) it
# saturates at ~110 us of CPU per pick and ~145 us per 64-token stream, while a worker spends
# ~65 us / ~420 us: past a few workers, more only wait on it.
AUTO_CAP = 8
RESTART_BACKOFF = (0.1, 0.5, 2.0, 5.0)  # seconds before restarting a worker that died, by its deaths in a row


def available_cores(cgroup: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """The cores this process may use: its CPU affinity, and its cgroup's CPU quota (a container's
    CPU limit), rounded up."""
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = cgroup.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return cores


def default_workers(cores: int | None = None) -> int:
    """'auto': a worker per available core, capped; none on one core (a worker there would only
    add a hop to every pick)."""
    n = available_cores() if cores is None else cores
    return 0 if n < 2 else min(AUTO_CAP, n)


@dataclass
class WorkerConfig:
    """What a worker is started with (JSON on its command line)."""

    link: str
    host: str
    port: int
    secure: bool
    cert_path: str | None
    cert_reload: bool
    tls_min_version: str
    tls_cipher_suites: list[str]
    limits: dict[str, int]
    decision_headers: bool
    emit_scores: bool
    allow_mode_override: bool
    drain_timeout: float
    log_level: int = logging.INFO
    index: int = 0
    observed: bool = False  # --observed-responses: observer streams read the responses


@dataclass
class _Worker:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    deaths: int = 0  # in a row (reset once it has linked up)
    restart: asyncio.TimerHandle | None = field(default=None, repr=False)


LINK_DIR_PREFIX = "epp-workers-"  # + the serving process's pid + "-": the directory of its link socket


def sweep_link_dirs(tmp: Path) -> list[Path]:
    """Remove the link directories that serving processes killed outright (no cleanup ran) left
    in ``tmp``: this user's, named for a pid that no longer runs. Returns what was removed."""
    removed = []
    for d in tmp.glob(f"{LINK_DIR_PREFIX}*-*"):
        pid = d.name[len(LINK_DIR_PREFIX):].partition("-")[0]
        try:
            if not pid.isdigit() or d.stat().st_uid != os.getuid() or _alive(int(pid)):
                continue
            for child in d.iterdir():
                child.unlink()
            d.rmdir()
        except OSError:  # gone meanwhile, or not ours to remove: left as it is
            continue
        removed.append(d)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class WorkerPool:
    """The serving process's side: starts the workers, links them to the director, restarts the
    ones that die."""

    def __init__(self, count: int, config: WorkerConfig, director: Director, unary: dict[str, UnaryFactory],
                 skips: BodySkips | None, registry: CollectorRegistry | None,
                 observed: ObservedPicks | None = None) -> None:
        self.count = count
        self.observed = observed
        self.config = config
        self.director = director
        self.unary = unary
        self.skips = skips
        self.links: set[StateEnd] = set()
        self.workers = [_Worker(i) for i in range(count)]
        self._server: asyncio.Server | None = None
        self._watch: asyncio.Task[None] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._stopping = False
        self.running = Gauge("epp_workers_linked", "Worker processes linked to the serving process (--workers).",
                             registry=registry)
        self.restarts = Counter("epp_worker_restarts_total", "Worker processes started again after they died.",
                                registry=registry)

    async def start(self, timeout: float = 30.0) -> None:
        sweep_link_dirs(Path(tempfile.gettempdir()))
        self._tmp = tempfile.TemporaryDirectory(prefix=f"{LINK_DIR_PREFIX}{os.getpid()}-")
        path = str(Path(self._tmp.name) / "link.sock")
        self.config.link = path
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(self._new_link, path)
        for w in self.workers:
            self._spawn(w)
        deadline = loop.time() + timeout
        while len(self.links) < self.count:
            failed = [w for w in self.workers if w.proc is not None and w.proc.poll() is not None]
            if failed or loop.time() > deadline:
                await self.stop()
                why = (f"worker {failed[0].index} exited (code {failed[0].proc.returncode}) before serving"  # type: ignore[union-attr]
                       if failed else f"{len(self.links)} of {self.count} workers started within {timeout:g}s")
                raise OSError(f"{why} on {self.config.host}:{self.config.port}; see the log lines above")
            await asyncio.sleep(0.02)
        self._watch = asyncio.create_task(self._supervise())  # from now on, a worker that dies is restarted

    def _new_link(self) -> StateEnd:
        link = StateEnd(self.director, self.unary, self._lost, self.skips, self.config.decision_headers,
                        self.config.emit_scores, self.observed)
        self.links.add(link)
        self.running.set(len(self.links))
        for w in self.workers:
            w.deaths = 0 if w.proc is not None and w.proc.poll() is None else w.deaths
        return link

    def _lost(self, link: StateEnd) -> None:
        self.links.discard(link)
        self.running.set(len(self.links))

    def _spawn(self, w: _Worker) -> None:
        cfg = WorkerConfig(**{**asdict(self.config), "index": w.index})
        w.proc = subprocess.Popen([sys.executable, "-m", "epp.server.workers", json.dumps(asdict(cfg))])

    async def _supervise(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping:
            await asyncio.sleep(0.1)
            for w in self.workers:
                if w.proc is None or w.proc.poll() is None or w.restart is not None or self._stopping:
                    continue
                delay = RESTART_BACKOFF[min(w.deaths, len(RESTART_BACKOFF) - 1)]
                log.warning("worker %d exited (code %s); starting it again in %gs", w.index, w.proc.returncode,
                            delay)
                w.deaths += 1
                w.restart = loop.call_later(delay, self._restart, w)

    def _restart(self, w: _Worker) -> None:
        w.restart = None
        if not self._stopping:
            self.restarts.inc()
            self._spawn(w)

    def pids(self) -> list[int]:
        return [w.proc.pid for w in self.workers if w.proc is not None and w.proc.poll() is None]

    async def drain(self, timeout: float) -> None:
        """Workers keep serving until their gateway connections go quiet (SIGTERM: they drain)."""
        self._stopping = True
        for w in self.workers:
            if w.proc is not None and w.proc.poll() is None:
                w.proc.send_signal(signal.SIGTERM)
        await self._wait_all(timeout + 2.0)

    async def stop(self, grace: float = 1.0) -> None:
        self._stopping = True
        for w in self.workers:
            if w.restart is not None:
                w.restart.cancel()
            if w.proc is not None and w.proc.poll() is None:
                w.proc.send_signal(signal.SIGTERM)
        await self._wait_all(grace + 2.0)
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        if self._server is not None:
            self._server.close()
        for link in list(self.links):
            if link.transport is not None:
                link.transport.close()
        if self._tmp is not None:
            self._tmp.cleanup()

    async def _wait_all(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        for w in self.workers:
            p = w.proc
            if p is None:
                continue
            try:
                await asyncio.to_thread(p.wait, max(0.0, deadline - loop.time()))
            except subprocess.TimeoutExpired:
                p.kill()
                await asyncio.to_thread(p.wait, 5)


# -- one worker process ------------------------------------------------------------------------------
async def serve_worker(cfg: WorkerConfig) -> None:
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    lost = asyncio.Event()

    def on_lost() -> None:
        lost.set()
        stopping.set()

    link = WorkerEnd(on_lost)
    skips = RelayedSkips(link) if cfg.allow_mode_override else None
    observed = RelayedObservers(link) if cfg.observed else None

    def new_stream() -> ExtProcStream:
        return ExtProcStream(link, cfg.decision_headers, cfg.limits["max_message"], cfg.emit_scores, skips, observed)

    def relay(path: str) -> h2grpc.HandlerFactory:
        return lambda responder, headers: RelayedUnary(link, path, responder, headers)

    unary = {p: relay(p) for p in (PICK_PATH, STARTED_PATH, RELEASE_PATH)}
    grpc = GrpcServing(new_stream, unary, h2grpc.Limits(**cfg.limits), observed)
    await grpc.start(cfg.host, cfg.port, cfg.secure, cfg.cert_path,
                     TLSPolicy(cfg.tls_min_version, tuple(cfg.tls_cipher_suites)), cfg.cert_reload, reuse_port=True)
    # Linked only once it serves the port: a worker that cannot bind never counts as started.
    await loop.create_unix_connection(lambda: link, cfg.link)
    link.send(["h", 0, cfg.index, os.getpid()])
    settle()
    loop.add_signal_handler(signal.SIGTERM, stopping.set)
    loop.add_signal_handler(signal.SIGINT, stopping.set)
    await stopping.wait()
    if not lost.is_set():  # asked to stop: let the gateway's streams finish first, unless the state goes
        draining = asyncio.ensure_future(grpc.drain(cfg.drain_timeout))
        gone = asyncio.ensure_future(lost.wait())
        await asyncio.wait({draining, gone}, return_when=asyncio.FIRST_COMPLETED)
        for task in (draining, gone):
            task.cancel()
    # Without the state process nothing here can be answered but 503: leave at once, so the
    # gateway's next connections reach a process that can pick (a restarted epp's workers).
    await grpc.stop(0.0 if lost.is_set() else 1.0)


def _die_with_parent() -> None:
    """Linux: the kernel sends SIGTERM when the serving process dies, however it dies."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def main(argv: list[str]) -> int:
    from epp.observability.logs import configure

    _die_with_parent()
    cfg = WorkerConfig(**json.loads(argv[0]))
    configure(cfg.log_level)
    try:
        uvloop.run(serve_worker(cfg))
    except OSError as e:
        log.error("worker %d cannot serve on %s:%d: %s", cfg.index, cfg.host, cfg.port, e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
