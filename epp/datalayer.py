"""The reference's data-layer plugin types, as configuration of epp's scraper.

- ``metrics-data-source``: where each endpoint's metrics are (``scheme`` http or https, ``path``,
  a ``port`` other than the endpoint's, ``insecureSkipVerify`` (default true, as the reference),
  ``caCertPath``, ``clientCertPath`` + ``clientKeyPath`` for mTLS, and a scrape ``interval`` that
  overrides --refresh-metrics-interval).
- ``core-metrics-extractor``: which series carry the signals: ``defaultEngine`` (vllm), the pod
  label that names an endpoint's engine (``engineLabelKey``, default llm-d.ai/engine-type, the
  older inference.networking.k8s.io/engine-type read too), and ``engineConfigs`` that add engines
  or replace the built-in ones (vllm, sglang, trtllm-serve, triton-tensorrt-llm, triton).

Without them epp scrapes ``http://<endpoint>/metrics`` as ``--engine`` says. ``loraSpec`` (vLLM:
``vllm:lora_requests_info``) feeds the lora-affinity-scorer; custom metrics are refused: no epp
plugin reads them.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, ClassVar

from epp.datastore.endpoint import EndpointState
from epp.scheduling.contract import (
    AttributeExtractor,
    AttributeSource,
    DataSource,
    EndpointDiscovery,
    EndpointNotifier,
    LoadsResources,
    MetricsExtractor,
)
from epp.scheduling.params import Params
from epp.scheduling.types import ConfigError
from epp.signals.dcgm import gpu_utilization
from epp.signals.mappings import ENGINE_LABEL, ENGINES, EngineMapping, MetricNames, MetricSpec
from epp.signals.scraper import ScrapeTarget


def read_path(params: Params, default: str) -> str:
    """A source's URL ``path`` (must start with '/')."""
    path = params.text("path", default) or default
    if not path.startswith("/"):
        raise ConfigError(f"{params.path}.path", f"must start with '/', got {path!r}")
    return path


def https_context(where: str, skip_verify: bool, ca: str | None = None, client_cert: str | None = None,
                  client_key: str | None = None) -> ssl.SSLContext:
    """A source's HTTPS context (reads the CA and client certificate files; ConfigError at ``where``)."""
    try:
        ctx = ssl.create_default_context(cafile=ca) if ca else ssl.create_default_context()
        if client_cert and client_key:
            ctx.load_cert_chain(client_cert, client_key)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"{where}.caCertPath", f"cannot load the TLS files: {e}") from None
    if skip_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


class MetricsDataSource(DataSource, LoadsResources):
    type_name: ClassVar[str] = "metrics-data-source"

    def __init__(self, name: str, params: Params) -> None:
        self.name = name
        self._path = params.path
        self.scheme = params.text("scheme", "http", choices=("http", "https")) or "http"
        self.metrics_path = read_path(params, "/metrics")
        port = params.int("port", 0, minimum=0, maximum=65535)
        self.port = port or None
        self.skip_verify = params.bool("insecureSkipVerify", True)
        self.ca = params.text("caCertPath")
        self.client_cert = params.text("clientCertPath")
        self.client_key = params.text("clientKeyPath")
        if bool(self.client_cert) != bool(self.client_key):
            raise ConfigError(f"{params.path}.clientCertPath", "clientCertPath and clientKeyPath go together")
        self.interval = params.optional_duration("interval")
        params.done()
        if self.scheme == "http" and (self.ca or self.client_cert):
            raise ConfigError(f"{params.path}.scheme", "caCertPath and client certificates need scheme: https")
        self._tls: ssl.SSLContext | None = None

    def load(self) -> None:
        """The TLS context (reads the CA and client certificate files)."""
        if self.scheme == "https":
            self._tls = https_context(self._path, self.skip_verify, self.ca, self.client_cert, self.client_key)

    def scrape_target(self) -> ScrapeTarget:
        return ScrapeTarget(self.metrics_path, self.port, self._tls)

    def scrape_interval(self) -> float | None:
        return self.interval


def _spec(p: Params, key: str, default: MetricSpec | None) -> MetricSpec | None:
    text = p.text(key)
    if text is None:
        return default
    if not text:
        return None
    try:
        return MetricSpec.parse(text)
    except ValueError as e:
        raise ConfigError(f"{p.path}.{key}", str(e)) from None


class CoreMetricsExtractor(MetricsExtractor):
    type_name: ClassVar[str] = "core-metrics-extractor"

    def __init__(self, name: str, params: Params) -> None:
        self.name = name
        label_key = params.text("engineLabelKey", ENGINE_LABEL) or ENGINE_LABEL
        engines = dict(ENGINES)
        for p in params.sections("engineConfigs"):
            engine = p.text("name") or ""
            if not engine or engine == "default":
                raise ConfigError(f"{p.path}.name", "required, and 'default' is reserved")
            base = engines.get(engine)
            waiting = _spec(p, "queuedRequestsSpec", base.waiting if base else None)
            running = _spec(p, "runningRequestsSpec", base.running if base else None)
            if waiting is None or running is None:
                raise ConfigError(f"{p.path}", "queuedRequestsSpec and runningRequestsSpec are required")
            if p.sections("customMetrics"):
                raise ConfigError(f"{p.path}.customMetrics", "not supported by epp (no epp plugin reads them)")
            engines[engine] = MetricNames(
                engine, waiting, running, _spec(p, "kvUsageSpec", base.kv_usage if base else None),
                _spec(p, "cacheInfoSpec", base.cache_info if base else None),
                p.text("cacheBlockSizeLabelName", base.block_size_label if base else "block_size") or "block_size",
                p.text("cacheNumBlocksLabelName", base.num_blocks_label if base else "num_gpu_blocks")
                or "num_gpu_blocks",
                _spec(p, "cacheBlockSizeSpec", base.block_size if base else None),
                _spec(p, "cacheNumBlocksSpec", base.num_blocks if base else None),
                _spec(p, "loraSpec", base.lora_info if base else None))
            p.done()
        default = params.text("defaultEngine", "vllm") or "vllm"
        if default not in engines:
            raise ConfigError(f"{params.path}.defaultEngine",
                              f"unknown engine {default!r} (known: {', '.join(sorted(engines))})")
        params.done()
        self.mapping = EngineMapping(MappingProxyType(engines), default, label_key)

    def engine_mapping(self) -> EngineMapping:
        return self.mapping


class DcgmDataSource(AttributeSource, LoadsResources):
    """``dcgm-data-source``: the NVIDIA DCGM exporter on each endpoint's host (a sidecar or the
    node's DaemonSet reached at the pod IP): ``scheme`` http/https, ``path`` (/metrics), ``port``
    (9400), ``insecureSkipVerify`` (true), ``interval`` (default: --refresh-metrics-interval).
    ``useNodeAddress`` is refused: epp knows the pods' addresses, not their nodes'."""

    type_name: ClassVar[str] = "dcgm-data-source"

    def __init__(self, name: str, params: Params) -> None:
        self.name = name
        self.scheme = params.text("scheme", "http", choices=("http", "https")) or "http"
        self.metrics_path = read_path(params, "/metrics")
        self._path = params.path
        self.port = params.int("port", 9400, minimum=1, maximum=65535)
        self.skip_verify = params.bool("insecureSkipVerify", True)
        if params.bool("useNodeAddress", False):
            raise ConfigError(f"{params.path}.useNodeAddress", "not supported by epp (it knows the pods' addresses, "
                                                               "not their nodes'; reach the exporter at the pod IP)")
        self.interval = params.optional_duration("interval")
        params.done()
        self._tls: ssl.SSLContext | None = None

    def load(self) -> None:
        if self.scheme == "https":
            self._tls = https_context(self._path, self.skip_verify)

    def attribute_target(self) -> ScrapeTarget:
        return ScrapeTarget(self.metrics_path, self.port, self._tls)

    def attribute_interval(self) -> float | None:
        return self.interval


GPU_UTILIZATION = "GPUUtilization"


class DcgmExtractor(AttributeExtractor):
    """``dcgm-extractor``: ``GPUUtilization`` (0..1, the pod's busiest GPU) from the DCGM exposition."""

    type_name: ClassVar[str] = "dcgm-extractor"

    def __init__(self, name: str, params: Params) -> None:
        self.name = name
        params.done()

    def attributes(self, text: str, endpoint: EndpointState) -> Mapping[str, float]:
        return {f"{GPU_UTILIZATION}/{self.type_name}": gpu_utilization(text, endpoint.pod)}


class FileDiscovery(EndpointDiscovery):
    """``file-discovery``: the endpoints from a YAML file (``path``, required; the reference's
    entries ``{name, namespace, address, port, labels}`` or epp's HOST:PORT forms), re-read on
    change with ``watchFile`` (false: read once at start)."""

    type_name: ClassVar[str] = "file-discovery"

    def __init__(self, name: str, params: Params) -> None:
        self.name = name
        path = params.text("path")
        if not path:
            raise ConfigError(f"{params.path}.path", "required (the endpoints file)")
        self.path = path
        self.watch = params.bool("watchFile", False)
        params.done()

    def endpoints_file(self) -> tuple[str, bool]:
        return self.path, self.watch


class EndpointNotificationSource(EndpointNotifier):
    type_name: ClassVar[str] = "endpoint-notification-source"

    def __init__(self, name: str, params: Params) -> None:
        self.name = name
        params.done()


# The data-layer plugin types; the config's registry adds them to the scheduling plugins.
DATA_LAYER: tuple[type[Any], ...] = (MetricsDataSource, CoreMetricsExtractor, EndpointNotificationSource,
                                     DcgmDataSource, DcgmExtractor, FileDiscovery)
