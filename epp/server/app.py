"""Wires the picker together: datastore, scraper, scheduler, ext_proc + Pick API, health, metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from epp.config import PickerConfig, config_watcher
from epp.datastore.sources import endpoints_watcher
from epp.datastore.store import Datastore
from epp.filewatch import WatchedFile
from epp.observability.metrics import PickerMetrics, PreciseCollector
from epp.policies import RequestPolicies, parse_policy_file
from epp.scheduling.precise_scorer import PrecisePrefixCacheScorer
from epp.scheduling.prefix_index import PrefixIndex
from epp.server import h2grpc
from epp.server.auth import TokenFile
from epp.server.extproc import SERVICE as EXTPROC_SERVICE
from epp.server.extproc import ExtProcStream, GrpcioExtProc
from epp.server.extproc import h2_services as extproc_services
from epp.server.health import NOT_SERVING, SERVING, HealthState
from epp.server.pickapi import GrpcioPickAPI, PickAPI
from epp.server.picking import PickService
from epp.server.tls import load_cert_dir, self_signed
from epp.signals.httpget import MAX_BODY
from epp.signals.kvevents import KVEventManager
from epp.signals.mappings import names_for
from epp.signals.promtext import MAX_SERIES
from epp.signals.scraper import Scraper
from epp.v1 import picker_pb2_grpc

if TYPE_CHECKING:  # kubernetes_asyncio takes ~0.5 s to import: only when discovery is used
    from epp.datastore.kubernetes import KubernetesDiscovery, KubernetesOptions
    from epp.leader import LeaderElector

log = logging.getLogger("epp")

GRPC_OPTIONS = [
    ("grpc.max_send_message_length", 128 * 1024 * 1024),
    ("grpc.so_reuseport", 0),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
]


# The health services that say whether to send epp traffic (liveness stays SERVING).
READINESS_SERVICES = ("", "readiness", EXTPROC_SERVICE)


@dataclass(slots=True)
class ServeOptions:
    config: PickerConfig
    config_file: str | None = None
    endpoints: tuple[str, ...] = ()
    endpoints_file: str | None = None
    host: str = "0.0.0.0"
    grpc_port: int = 9002
    grpc_health_port: int = 9003
    metrics_port: int = 9090
    secure_serving: bool = True
    cert_path: str | None = None
    refresh_metrics_interval: float = 0.05
    metrics_staleness_threshold: float = 2.0
    scrape_timeout: float = 1.0
    engine: str = "vllm"
    pool_name: str = "default"
    config_poll_interval: float = 0.5
    decision_headers: bool = False
    grpc_transport: str = "h2"  # "h2" (epp's own HTTP/2 server) or "grpcio"
    kubernetes: KubernetesOptions | None = None
    objectives_file: str | None = None  # InferenceObjective / InferenceModelRewrite documents
    drain_timeout: float = 30.0  # SIGTERM: keep serving (unready) until quiet, at most this long
    limits: h2grpc.Limits = field(default_factory=h2grpc.Limits)
    max_scrape_bytes: int = MAX_BODY
    max_scrape_series: int = MAX_SERIES
    metrics_label_values: int = 64  # distinct client-chosen values per label (e.g. model names)
    pick_api_max_outstanding: int = 1024  # unreleased Pick API picks per client address
    pick_api_token_file: str | None = None  # bearer token the Pick API requires
    metrics_token_file: str | None = None  # bearer token /metrics requires (--metrics-endpoint-auth)


class PickerServer:
    """One epp process."""

    def __init__(self, opts: ServeOptions) -> None:
        self.opts = opts
        self.store = Datastore(staleness=opts.metrics_staleness_threshold)
        self.metrics = PickerMetrics(self.store, opts.pool_name, opts.metrics_label_values)
        # Token files are read now, so a missing or empty one stops epp at start.
        self.pick_token = TokenFile(opts.pick_api_token_file) if opts.pick_api_token_file else None
        self.metrics_token = TokenFile(opts.metrics_token_file) if opts.metrics_token_file else None
        scheduler, self._plugins = opts.config.build()
        scheduler.plugin_timer = self.metrics.plugin_timer
        self.picks = PickService(self.store, scheduler, self.metrics)
        self.metrics.prefix_indexer_size.set_function(self._prefix_index_size)
        self.store.on_change(self._endpoints_changed)
        self.scraper = Scraper(
            self.store, names_for(opts.engine), opts.refresh_metrics_interval, opts.scrape_timeout,
            on_error=lambda a, r: self.metrics.scrape_errors.labels(a, r).inc(),
            on_scrape=self.metrics.scrape_parse.observe, max_bytes=opts.max_scrape_bytes,
            max_series=opts.max_scrape_series)
        self.kv_events = KVEventManager()
        self._kv_kick = asyncio.Event()
        self.metrics.loop_collectors.append(
            PreciseCollector(opts.pool_name, self._precise_scorers, self.kv_events.totals))
        self.health = HealthState()
        self._servers: list[grpc.aio.Server] = []
        self._tasks: list[asyncio.Task[Any]] = []
        self._metrics_runner: web.AppRunner | None = None
        self.config_watcher: WatchedFile[PickerConfig] | None = None
        self.endpoints_watcher: WatchedFile[list[str]] | None = None
        self.policies_watcher: WatchedFile[RequestPolicies] | None = None
        self.bound_ports: dict[str, int] = {}
        self.h2: h2grpc.H2GrpcServer | None = None
        self.health_server: h2grpc.H2GrpcServer | None = None
        self.discovery: KubernetesDiscovery | None = None
        self.elector: LeaderElector | None = None
        self._draining = False
        self.pick_api: PickAPI | None = None

    def _prefix_index_size(self) -> float:
        scorers = self.picks.scheduler.profile.scorers
        indexes = (getattr(s, "approx", None) or getattr(s, "index", None) for s, _ in scorers)
        return float(sum(i.size() for i in indexes if isinstance(i, PrefixIndex)))

    def _set_policies(self, policies: RequestPolicies) -> None:
        self.picks.policies = policies

    def _precise_scorers(self) -> list[PrecisePrefixCacheScorer]:
        return [s for s, _ in self.picks.scheduler.profile.scorers if isinstance(s, PrecisePrefixCacheScorer)]

    def _endpoints_changed(self, added: set[str], removed: set[str]) -> None:
        for a in removed:
            self.picks.scheduler.forget(a)
        self._kv_kick.set()

    async def _kv_events_loop(self) -> None:
        """Keep one KV-event subscriber per endpoint for the precise scorer (if the config has one)."""
        while True:
            await self._kv_kick.wait()
            self._kv_kick.clear()
            scorer = next((s for s in self._precise_scorers() if s.kv_events is not None), None)
            try:
                await self.kv_events.sync(scorer.kv_events if scorer else None, scorer.index if scorer else None,
                                          set(self.store.addresses()))
            except Exception:
                log.exception("KV-event subscribers could not be updated")

    def apply_config(self, cfg: PickerConfig) -> None:
        """Swap in a new scheduler; in-flight requests keep the old one, new requests use the new."""
        scheduler, self._plugins = cfg.build(self._plugins)
        scheduler.plugin_timer = self.metrics.plugin_timer
        self.picks.scheduler = scheduler
        self.metrics.config_reloads.inc()
        self._kv_kick.set()

    async def start(self) -> None:
        o = self.opts
        if o.endpoints:
            self.store.set_endpoints(o.endpoints)
        if o.endpoints_file:
            self.endpoints_watcher = endpoints_watcher(o.endpoints_file, self.store, o.config_poll_interval)
            self.endpoints_watcher.check()
            self._tasks.append(asyncio.create_task(self.endpoints_watcher.run()))
        if o.objectives_file:
            path = o.objectives_file
            self.policies_watcher = WatchedFile(path, lambda t: parse_policy_file(t, path), self._set_policies,
                                                what="objectives and rewrites", interval=o.config_poll_interval)
            self.policies_watcher.check()
            self._tasks.append(asyncio.create_task(self.policies_watcher.run()))
        if o.kubernetes is not None:
            kube = o.kubernetes
            self.discovery = await kube.discovery(self.store, self._set_policies)
            await self.discovery.start()
            if kube.leader_election:
                from epp.leader import LeaderElector

                self.elector = LeaderElector(self.discovery.api, self.discovery.namespace, kube.lease,
                                             lease_duration=kube.lease_duration, renew_deadline=kube.renew_deadline,
                                             retry_period=kube.retry_period)
                self.elector.start()
        await self.scraper.start()
        self._kv_kick.set()
        self._tasks.append(asyncio.create_task(self._kv_events_loop()))
        if o.config_file:
            self.config_watcher = config_watcher(o.config_file, o.config, self.apply_config, o.config_poll_interval)
            self._tasks.append(asyncio.create_task(self.config_watcher.run()))

        def new_stream() -> ExtProcStream:
            return ExtProcStream(self.picks, o.decision_headers, o.limits.max_message)

        api = self.pick_api = PickAPI(self.picks, max_outstanding=o.pick_api_max_outstanding, token=self.pick_token)
        key_crt = (load_cert_dir(o.cert_path) if o.cert_path else self_signed()) if o.secure_serving else None
        if o.grpc_transport == "h2":
            self.h2 = h2grpc.H2GrpcServer({**extproc_services(new_stream), **api.h2_services()}, o.limits)
            tls = None
            if key_crt is not None:
                import tempfile

                tls = h2grpc.server_tls(key_crt[0], key_crt[1], tempfile.gettempdir())
            self.bound_ports["grpc"] = await self.h2.start(o.host, o.grpc_port, tls)
        else:
            options = [*GRPC_OPTIONS, ("grpc.max_receive_message_length", o.limits.max_message),
                       ("grpc.max_metadata_size", o.limits.max_header_block)]
            server = grpc.aio.server(options=options)
            server.add_generic_rpc_handlers([GrpcioExtProc(new_stream).handler()])
            picker_pb2_grpc.add_EndpointPickerServicer_to_server(GrpcioPickAPI(api), server)
            addr = f"{o.host}:{o.grpc_port}"
            if key_crt is not None:
                port = server.add_secure_port(addr, grpc.ssl_server_credentials([key_crt]))
            else:
                port = server.add_insecure_port(addr)
            self.bound_ports["grpc"] = port
            await server.start()
            self._servers.append(server)

        self.health_server = h2grpc.H2GrpcServer(self.health.h2_services())
        self.bound_ports["health"] = await self.health_server.start(o.host, o.grpc_health_port)
        self.health.set("liveness", SERVING)
        await self._update_readiness()
        self._tasks.append(asyncio.create_task(self._readiness_loop()))

        app = web.Application()
        app.router.add_get("/metrics", self._metrics_handler)
        self._metrics_runner = web.AppRunner(app, access_log=None)
        await self._metrics_runner.setup()
        site = web.TCPSite(self._metrics_runner, o.host, o.metrics_port)
        await site.start()
        server_obj = getattr(site, "_server", None)
        sockets = getattr(server_obj, "sockets", None) or []
        self.bound_ports["metrics"] = sockets[0].getsockname()[1] if sockets else o.metrics_port
        log.info("epp serving ext_proc + epp.v1 on %s:%d (%s, %s), health :%d, metrics :%d, %d endpoints",
                 o.host, self.bound_ports["grpc"], "TLS" if o.secure_serving else "plaintext", o.grpc_transport,
                 self.bound_ports["health"], self.bound_ports["metrics"], len(self.store.addresses()))

    async def _update_readiness(self) -> None:
        """Ready once some endpoint has fresh metrics, and (with leader election) only the leader."""
        ready = (not self._draining and self.store.fresh_count() > 0
                 and (self.elector is None or self.elector.is_leader))
        status = SERVING if ready else NOT_SERVING
        for svc in READINESS_SERVICES:
            self.health.set(svc, status)

    async def _readiness_loop(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            await self._update_readiness()

    async def _metrics_handler(self, request: web.Request) -> web.Response:
        if self.metrics_token is not None and not self.metrics_token.allows(request.headers.get("Authorization")):
            error = {"message": "missing or wrong bearer token", "type": "AuthenticationError", "param": None,
                     "code": 401}
            return web.json_response({"error": error}, status=401, headers={"WWW-Authenticate": "Bearer"})
        # The loop-owned gauges are read here; the rendering runs in a thread, so even a large
        # exposition costs routing a GIL switch interval at a time, not the whole render.
        everything = self.metrics.prepare()
        body = await asyncio.to_thread(generate_latest, everything)  # type: ignore[arg-type,unused-ignore]
        return web.Response(body=body, headers={"content-type": CONTENT_TYPE_LATEST})

    async def drain(self, timeout: float) -> None:
        """Report NOT_SERVING at once, then keep serving (new streams included) until the gateway
        has gone quiet or ``timeout``: in-flight responses finish, late requests still get picks."""
        self._draining = True
        for svc in READINESS_SERVICES:
            self.health.set(svc, NOT_SERVING)
        if self.h2 is None:
            return
        log.info("draining: readiness NOT_SERVING, %d streams open, up to %gs", self.h2.open_streams(), timeout)
        quiet = await self.h2.drain(timeout)
        if quiet:
            log.info("drained")
        else:
            log.warning("drain timeout: %d streams still open", self.h2.open_streams())

    async def stop(self, grace: float = 1.0) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        if self.h2 is not None:
            await self.h2.stop(grace)
        if self.health_server is not None:
            await self.health_server.stop(grace)
        for s in self._servers:
            await s.stop(grace)
        await self.scraper.stop()
        if self.elector is not None:
            await self.elector.stop(release=True)
        if self.discovery is not None:
            await self.discovery.stop()
        await self.kv_events.close()
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()


async def serve_forever(opts: ServeOptions) -> None:
    server = PickerServer(opts)
    await server.start()
    try:
        await asyncio.Event().wait()
    finally:  # SIGTERM cancels the wait: drain, then stop (a second signal cuts the drain short)
        try:
            await server.drain(opts.drain_timeout)
        finally:
            await server.stop()
