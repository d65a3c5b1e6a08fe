"""One epp process: the parts, each with one job, wired together.

datastore (epp.datastore) <- pool sources (endpoints, policies) and signal collection
(scrapes, KV events); config -> scheduler, held by the director (epp.requestcontrol), which the
serving part's protocol adapters (ext_proc, the Pick API) call; with leader election (HA) only
the Lease holder is ready; with a shared-state store (active-active) every replica is, and each
counts the others' load and prefix records; readiness reports it all.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from epp.config import Built, PickerConfig, build, config_watcher, load_shadow_config
from epp.datastore.store import Datastore
from epp.filewatch import WatchedFile
from epp.flowcontrol.controller import FlowController
from epp.gcpolicy import settle
from epp.observability.dashboard import Dashboard, PoolParts
from epp.observability.flowmetrics import FlowCollector, FlowGauges, FlowMetrics
from epp.observability.looplag import LoopLag
from epp.observability.metrics import PickerMetrics, PluginCollector
from epp.observability.tracing import Tracing
from epp.requestcontrol.admission import SheddableAdmission
from epp.requestcontrol.apikeys import KeyTable, parse_keys_file
from epp.requestcontrol.director import Director
from epp.requestcontrol.ejections import Ejections
from epp.requestcontrol.metering import Metering
from epp.requestcontrol.policies import RequestPolicies
from epp.requestcontrol.recorder import Recorder
from epp.requestcontrol.shadow import ShadowEvaluation
from epp.server import h2grpc
from epp.server.auth import KubernetesReviews, TokenFile, TokenFileAuthorizer
from epp.server.extproc import ExtProcStream, ResponseBodySkips
from epp.server.observed import USAGE_SAMPLE, ObservedPicks
from epp.server.pickapi import PickAPI
from epp.server.readiness import Readiness
from epp.server.recording import RecordEndpoint
from epp.server.serving import GrpcServing, MetricsEndpoint
from epp.server.signals import SignalCollection
from epp.server.sources import PoolSources
from epp.server.tls import TLSPolicy, self_signed
from epp.server.workers import WorkerConfig, WorkerPool
from epp.signals.httpget import MAX_BODY
from epp.signals.kvevents import KVEventManager
from epp.signals.models import ModelCatalog
from epp.signals.promtext import MAX_SERIES
from epp.tasks import cancel_and_wait

if TYPE_CHECKING:  # kubernetes_asyncio takes ~0.5 s to import: only when discovery is used
    from epp.datastore.kubernetes import KubernetesOptions
    from epp.leader import LeaderElector
    from epp.server.sharedstate import SharedState, SharedStateOptions

log = logging.getLogger("epp")


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
    allow_mode_override: bool = False  # the gateway's ext_proc filter honours mode_override: skip unread bodies
    observed_responses: bool = False  # observer ext_proc filters read responses (envoy/epp-observed.yaml)
    observed_usage_sample: float = USAGE_SAMPLE  # the share of observed streams read to their end
    workers: int = 0  # protocol worker processes on the gRPC port (0: this process serves it)
    kubernetes: KubernetesOptions | None = None
    objectives_file: str | None = None  # InferenceObjective / InferenceModelRewrite documents
    api_keys_file: str | None = None  # --api-keys-file: API keys, their tenants and tiers (watched)
    drain_timeout: float = 30.0  # SIGTERM: keep serving (unready) until quiet, at most this long
    limits: h2grpc.Limits = field(default_factory=h2grpc.Limits)
    max_scrape_bytes: int = MAX_BODY
    max_scrape_series: int = MAX_SERIES
    metrics_label_values: int = 64  # distinct client-chosen values per label (e.g. model names)
    pick_api_max_outstanding: int = 1024  # unreleased Pick API picks per client address
    pick_api_token_file: str | None = None  # bearer token the Pick API requires
    metrics_token_file: str | None = None  # bearer token /metrics requires (--metrics-endpoint-auth)
    metrics_token_review: bool = False  # /metrics checks tokens with the API server (in a cluster)
    tls: TLSPolicy = field(default_factory=TLSPolicy)  # --tls-min-version, --tls-cipher-suites
    cert_reload: bool = False  # --enable-cert-reload: re-read --cert-path when it changes
    emit_endpoint_scores: bool = False  # per-endpoint scores in the envoy.lb metadata
    subset_filter: bool = True  # honour the gateway's subset hint (off: --disable-endpoint-subset-filter)
    tracing: bool = False  # --tracing: OpenTelemetry spans, set up from the OTEL_* environment
    metrics_host: str | None = None  # where /metrics binds (None: ``host``)
    metering_log: str | None = None  # usage lines, one JSON per finished request: "stdout" or a file path
    strip_api_keys: bool = False  # remove the client's API key headers before the model server sees them
    upstream_api_key_file: str | None = None  # the model servers' own key, sent as Authorization: Bearer
    ejections: tuple[int, float] | None = None  # (failures in a row, seconds): the gateway's outlier detection
    answer_models: bool = False  # answer GET /v1/models from the pool's merged listing
    dashboard: bool = True  # the live dashboard at /dashboard on the metrics port (--dashboard=false: off)
    shadow_configs: tuple[str, ...] = ()  # --shadow-config FILE...: candidate configs evaluated on live requests
    shadow_sample_rate: float = 1.0  # the fraction of requests they schedule
    record: bool = True  # GET /record on the metrics port: finished requests as trace records (epp record)
    record_prompts: bool = False  # --record-prompts: a recording may ask for the prompt text too
    shared_state: SharedStateOptions | None = None  # --shared-state-url: active-active replicas


class PickerServer:
    """One epp process."""

    def __init__(self, opts: ServeOptions) -> None:
        self.opts = opts
        self.store = Datastore(staleness=opts.metrics_staleness_threshold,
                               refresh_interval=opts.refresh_metrics_interval)
        self.metrics = PickerMetrics(self.store, opts.pool_name, opts.metrics_label_values)
        self.loop_lag = LoopLag(self.metrics.registry)
        # Token files are read now, so a missing or empty one stops epp at start.
        pick_token = TokenFile(opts.pick_api_token_file) if opts.pick_api_token_file else None
        metrics_token = TokenFile(opts.metrics_token_file) if opts.metrics_token_file else None
        self.built = build(opts.config)  # plugins that load files (a tokenizer) load here, once
        self.built.scheduler.plugin_timer = self.metrics.plugin_timer
        self.tracing = Tracing() if opts.tracing else None
        rt = self.built.runtime()
        self.director = Director(self.store, self.built.scheduler, self.metrics,
                                 admission=SheddableAdmission(rt.detector), subset_filter=opts.subset_filter,
                                 tracing=self.tracing)
        self.director.admitters = rt.admitters
        self.director.tokens = rt.tokens
        self.director.preparers = rt.preparers
        self.keys_watcher: WatchedFile[KeyTable] | None = None
        if opts.api_keys_file:  # read now: a missing or bad keys file stops epp at start
            path = opts.api_keys_file
            try:
                text = Path(path).read_text()
            except OSError as e:
                raise ValueError(f"{path}: cannot read the API keys file: {e.strerror}") from None
            self.director.keys = parse_keys_file(text, path)
            self.keys_watcher = WatchedFile(path, lambda t: parse_keys_file(t, path), self._set_keys, what="API keys",
                                            current=self.director.keys, current_text=text,
                                            interval=opts.config_poll_interval)
        if rt.parsers is not None:
            self.director.parsers = rt.parsers
        self.director.strip_keys = opts.strip_api_keys
        if opts.upstream_api_key_file:  # read now: a missing or empty file stops epp at start
            try:
                upstream = Path(opts.upstream_api_key_file).read_text().strip()
            except OSError as e:
                raise ValueError(f"{opts.upstream_api_key_file}: cannot read the model servers' API key: "
                                 f"{e.strerror}") from None
            if not upstream or any(c in upstream for c in "\r\n"):
                raise ValueError(f"{opts.upstream_api_key_file}: expected one line with the model servers' API key")
            self.director.upstream_auth = (("authorization", f"Bearer {upstream}"),)
        if opts.ejections is not None:
            self.director.ejections = Ejections(opts.ejections[0], opts.ejections[1], time.monotonic)
        if opts.metering_log is not None:
            self.director.metering = Metering(opts.metering_log)
            self.metrics.loop_collectors.append(self.director.metering)
        self.models: ModelCatalog | None = None
        if opts.answer_models:
            self.models = ModelCatalog(self.store)
            self.director.models = self.models.listing
        self.flow_metrics = FlowMetrics(self.metrics.registry, opts.pool_name)
        self.body_skips = ResponseBodySkips(self.metrics.registry) if opts.allow_mode_override else None
        self.observed = ObservedPicks(self.metrics.registry, usage_sample=opts.observed_usage_sample) \
            if opts.observed_responses else None
        self._sweeper: asyncio.Task[None] | None = None
        self.workers: WorkerPool | None = None  # --workers: the processes serving the gRPC port
        self._cert_dir: tempfile.TemporaryDirectory[str] | None = None
        self.director.set_flow_control(rt.flow, self.flow_metrics)
        self.metrics.loop_collectors.append(FlowCollector(opts.pool_name, self._flow_gauges))
        discovered = self.built.config.discovery()  # dataLayer.discovery (file-discovery), when given
        self.sources = PoolSources(self.store, self._set_policies, endpoints=opts.endpoints,
                                   endpoints_file=discovered[0] if discovered else opts.endpoints_file,
                                   watch_endpoints_file=discovered[1] if discovered else True,
                                   objectives_file=opts.objectives_file,
                                   kubernetes=opts.kubernetes, poll_interval=opts.config_poll_interval)
        self.signals = SignalCollection(self.store, self.metrics, self._plugins, engine=opts.engine,
                                        interval=opts.refresh_metrics_interval, timeout=opts.scrape_timeout,
                                        max_bytes=opts.max_scrape_bytes, max_series=opts.max_scrape_series,
                                        data_layer=self.built.data_layer(), attributes=self.built.attribute_layer())
        self.metrics.loop_collectors.append(PluginCollector(opts.pool_name, self._plugins,
                                                            self.signals.kv_events.totals))
        self.store.on_change(self._endpoints_changed)
        self.pick_api = PickAPI(self.director, max_outstanding=opts.pick_api_max_outstanding, token=pick_token)
        self.grpc = GrpcServing(self._new_stream, self.pick_api.h2_services(), opts.limits, self.observed)
        self.elector: LeaderElector | None = None  # high availability: serve only while holding the Lease
        # With flow control on, epp is ready without endpoints: requests wait for one (scale from zero).
        self.readiness = Readiness(lambda: self.store.fresh_count() > 0 or self.director.flow_control,
                                   self._serving, self.sources.synced)
        self.metrics_endpoint = MetricsEndpoint(self.metrics, TokenFileAuthorizer(metrics_token)
                                                if metrics_token is not None else None)
        if opts.shadow_configs:  # read and built now: a bad candidate stops epp at start
            self.director.shadow = ShadowEvaluation([load_shadow_config(p) for p in opts.shadow_configs],
                                                    opts.shadow_sample_rate)
            self.metrics.loop_collectors.append(self.director.shadow)
        self.dashboard: Dashboard | None = None
        if opts.dashboard and metrics_token is None and not opts.metrics_token_review:
            plugins = PluginCollector(opts.pool_name, self._plugins, self.signals.kv_events.totals)
            self.dashboard = Dashboard(PoolParts(
                opts.pool_name, self.store.snapshot, lambda: self.store.total_picks, self.metrics.activity,
                lambda: self._flow_gauges() if self.director.waiting is not None else None, plugins.collect,
                lambda: self.director.shadow.view() if self.director.shadow is not None else None))
            self.metrics_endpoint.pages.append(self.dashboard.routes)
        elif opts.dashboard:
            log.warning("the dashboard is off: /metrics requires a token, and a browser page cannot send one")
        if opts.record:
            self.director.recorder = Recorder(opts.record_prompts)
            self.metrics_endpoint.pages.append(RecordEndpoint(self.director.recorder,
                                                              self.metrics_endpoint.refusal, self.store).routes)
        self.shared: SharedState | None = None  # active-active: the others' load and prefix records
        if opts.shared_state is not None:
            from epp.server.sharedstate import SharedState

            self.shared = SharedState(opts.shared_state, self.store, self._plugins, self._flow_controller,
                                      self.metrics.registry)
        self.config_watcher: WatchedFile[Built] | None = None
        self._watch: asyncio.Task[None] | None = None
        self.bound_ports: dict[str, int] = {}
        self._closing: asyncio.Task[None] | None = None  # a replaced token producer's connections
        self._rediscover: asyncio.Task[None] | None = None  # a reload's new dataLayer.discovery file
        self._keys_task: asyncio.Task[None] | None = None

    @property
    def kv_events(self) -> KVEventManager:
        return self.signals.kv_events

    def _flow_gauges(self) -> FlowGauges:
        room = self.director.waiting
        return room.gauges(self.opts.pool_name) if room is not None else FlowGauges()

    def _flow_controller(self) -> FlowController | None:
        room = self.director.waiting
        return room.controller if room is not None else None

    def _plugins(self) -> list[Any]:
        tokens = self.director.tokens
        return [*self.director.scheduler.plugins(), *([tokens] if tokens is not None else [])]

    def _new_stream(self) -> ExtProcStream:
        o = self.opts
        return ExtProcStream(self.director, o.decision_headers, o.limits.max_message, o.emit_endpoint_scores,
                             self.body_skips, self.observed)

    def _set_keys(self, keys: KeyTable) -> None:
        self.director.keys = keys

    def _set_policies(self, policies: RequestPolicies) -> None:
        self.director.policies = policies

    def _endpoints_changed(self, added: set[str], removed: set[str]) -> None:
        for a in removed:
            self.director.endpoint_removed(a)
            if self.director.ejections is not None:
                self.director.ejections.forget(a)
            self.metrics.activity.forget(a)
        self.signals.resync()

    def apply(self, built: Built) -> None:
        """Swap in a new scheduler; in-flight requests keep the old one, new requests use the new."""
        built.scheduler.plugin_timer = self.metrics.plugin_timer
        self.built = built
        self.director.scheduler = built.scheduler
        rt = built.runtime()
        self.director.admission = SheddableAdmission(rt.detector)
        self.director.admitters = rt.admitters
        if rt.parsers is not None:
            self.director.parsers = rt.parsers
        self.director.preparers = rt.preparers
        old_tokens, self.director.tokens = self.director.tokens, rt.tokens
        if old_tokens is not None and old_tokens is not rt.tokens:  # fetches under way on it go on without ids
            self._closing = asyncio.get_running_loop().create_task(old_tokens.close())
        self.director.set_flow_control(rt.flow, self.flow_metrics)
        self.metrics.config_reloads.inc()
        self.signals.reconfigure(built.data_layer(), built.attribute_layer())
        discovered = built.config.discovery()
        if discovered is not None:
            self._rediscover = asyncio.get_running_loop().create_task(self.sources.use_endpoints_file(*discovered))

    async def start(self) -> None:
        o = self.opts
        self.loop_lag.start()
        await self.sources.start()
        kube, discovery = o.kubernetes, self.sources.discovery
        if kube is not None and kube.leader_election and discovery is not None:
            from epp.leader import LeaderElector

            self.elector = LeaderElector(discovery.api, discovery.namespace, kube.lease,
                                         lease_duration=kube.lease_duration, renew_deadline=kube.renew_deadline,
                                         retry_period=kube.retry_period)
            self.elector.start()
        await self.signals.start()
        if self.shared is not None:
            self.shared.start()
        if self.models is not None:
            self.models.start()
        if o.config_file:
            self.config_watcher = config_watcher(o.config_file, self.built, self.apply, o.config_poll_interval)
            self._watch = asyncio.create_task(self.config_watcher.run())
        if self.keys_watcher is not None:
            self._keys_task = asyncio.create_task(self.keys_watcher.run())
        if self.observed is not None:
            self._sweeper = asyncio.create_task(self._sweep_observed(self.observed))
        if o.workers:
            self.workers = self._worker_pool()
            await self.workers.start()
            self.bound_ports["grpc"] = o.grpc_port
        else:
            self.bound_ports["grpc"] = await self.grpc.start(o.host, o.grpc_port, o.secure_serving, o.cert_path,
                                                             o.tls, o.cert_reload)
        self.bound_ports["health"] = await self.readiness.start(o.host, o.grpc_health_port)
        if o.metrics_token_review and discovery is not None:  # the API server answers who may read /metrics
            self.metrics_endpoint.auth = KubernetesReviews(discovery.api)
        self.bound_ports["metrics"] = await self.metrics_endpoint.start(o.metrics_host or o.host, o.metrics_port)
        log.info("epp serving ext_proc + epp.v1 on %s:%d (%s), health :%d, metrics :%d, %d endpoints",
                 o.host, self.bound_ports["grpc"], "TLS" if o.secure_serving else "plaintext",
                 self.bound_ports["health"], self.bound_ports["metrics"], len(self.store.addresses()))

    async def drain(self, timeout: float) -> None:
        """Report NOT_SERVING at once, then keep serving (new streams included) until the gateway
        has gone quiet or ``timeout``: in-flight responses finish, late requests still get picks."""
        self.readiness.drain()
        if self.workers is not None:
            await self.workers.drain(timeout)
        else:
            await self.grpc.drain(timeout)

    @staticmethod
    async def _sweep_observed(observed: ObservedPicks) -> None:
        """Finish the picks no observer stream claimed, also while no request comes."""
        while True:
            await asyncio.sleep(1.0)
            observed.sweep()

    def _serving(self) -> bool:
        """This process serves picks: it holds the Lease (when elected) and, with --workers, at
        least one worker is linked to it."""
        leading = self.elector is None or self.elector.is_leader
        return leading and (self.workers is None or bool(self.workers.links))

    def _worker_pool(self) -> WorkerPool:
        o = self.opts
        if not o.grpc_port:
            raise ValueError("--workers needs a fixed --grpc-port (the workers share it)")
        cert_path = o.cert_path
        if o.secure_serving and not cert_path:  # one self-signed certificate for all the workers
            self._cert_dir = tempfile.TemporaryDirectory(prefix="epp-cert-")
            key, crt = self_signed()
            for name, pem in (("tls.key", key), ("tls.crt", crt)):
                path = Path(self._cert_dir.name) / name
                path.write_bytes(pem)
                path.chmod(0o600)
            cert_path = self._cert_dir.name
        tls = o.tls or TLSPolicy()
        cfg = WorkerConfig(link="", host=o.host, port=o.grpc_port, secure=o.secure_serving, cert_path=cert_path,
                           cert_reload=o.cert_reload, tls_min_version=tls.min_version,
                           tls_cipher_suites=list(tls.cipher_suites), limits=dataclasses.asdict(o.limits),
                           decision_headers=o.decision_headers, emit_scores=o.emit_endpoint_scores,
                           allow_mode_override=o.allow_mode_override, drain_timeout=o.drain_timeout,
                           log_level=logging.getLogger().getEffectiveLevel(), observed=self.observed is not None)
        return WorkerPool(o.workers, cfg, self.director, self.pick_api.h2_services(), self.body_skips,
                          self.metrics.registry, self.observed)

    async def stop(self, grace: float = 1.0) -> None:
        self.loop_lag.stop()
        await cancel_and_wait([self._watch, self._keys_task, self._sweeper])
        if self.director.waiting is not None:  # what still waits is told 503 now, not cut off
            self.director.waiting.close()
        if self.workers is not None:
            await self.workers.stop(grace)
        else:
            await self.grpc.stop(grace)
        if self._cert_dir is not None:
            self._cert_dir.cleanup()
        await self.readiness.stop(grace)
        await self.signals.stop()
        if self.shared is not None:
            await self.shared.stop()
        if self.models is not None:
            await self.models.stop()
        if self.director.metering is not None:
            self.director.metering.close()
        if self.director.tokens is not None:
            await self.director.tokens.close()
        if self.elector is not None:
            await self.elector.stop(release=True)
        await self.sources.stop()
        if self.dashboard is not None:
            await self.dashboard.stop()
        if self.director.recorder is not None:
            self.director.recorder.stop()
        await self.metrics_endpoint.stop()
        if self.tracing is not None:
            await asyncio.to_thread(self.tracing.shutdown)  # exports what is buffered


async def serve_forever(opts: ServeOptions) -> None:
    server = PickerServer(opts)
    await server.start()
    settle()  # what start-up built lives as long as the process: out of the collector's full passes
    try:
        await asyncio.Event().wait()
    finally:  # SIGTERM cancels the wait: drain, then stop (a second signal cuts the drain short)
        try:
            await server.drain(opts.drain_timeout)
        finally:
            await server.stop()
