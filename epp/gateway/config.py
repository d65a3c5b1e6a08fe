"""The gateway config file of ``epp gateway``: listeners, model servers, keys, timeouts, retries.

One small YAML file says what the front door of a VM or small-cluster deployment does; epp turns
it into an Envoy bootstrap (epp.gateway.bootstrap) and runs the picker behind it:

    listeners:
    - {port: 8443, tls: {certFile: /etc/epp/tls.crt, keyFile: /etc/epp/tls.key}}
    - {port: 8080, address: 127.0.0.1}          # plain, for local use
    servers: {static: [10.0.0.11:8000, 10.0.0.12:8000]}   # or endpointsFile: PATH, or pool: {name, namespace}
                                                 # (+ apiKeyFile: the servers' own key, vllm --api-key)
    apiKeys: /etc/epp/keys.yaml                  # the keys file of ``epp serve --api-keys-file``
    picker: {config: /etc/epp/epp-config.yaml}   # an EndpointPickerConfig (optional)
    timeouts: {connect: 10s, upstreamIdle: 300s, listenerIdle: 300s}
    retries: {attempts: 3, backoff: 100ms}
    circuitBreaker: {consecutiveFailures: 5, ejectionTime: 30s}
    metering: {log: stdout}                      # or a file path, or false
    envoy: {adminPort: 9901, concurrency: 0}     # admin on 127.0.0.1; worker threads (0: one per core)

Every field is optional except ``servers``; unknown fields are errors naming the file and the
field, as in the picker's own config.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from epp.datastore.sources import parse_address
from epp.durations import parse_duration

RETRY_STATUSES = (502, 503, 504, 429)  # from a model server; connection failures and resets too


class GatewayConfigError(ValueError):
    """A bad gateway config: the message names the file and the field."""


@dataclass(frozen=True, slots=True)
class Listener:
    port: int
    address: str = "0.0.0.0"
    cert_file: str | None = None  # TLS when both are given
    key_file: str | None = None
    http2: bool = True  # HTTP/2 next to HTTP/1.1 (ALPN with TLS, prior knowledge without)

    @property
    def tls(self) -> bool:
        return self.cert_file is not None


@dataclass(frozen=True, slots=True)
class Servers:
    static: tuple[str, ...] = ()
    endpoints_file: str | None = None
    pool_name: str | None = None
    pool_namespace: str | None = None
    kubeconfig: str | None = None  # with a pool: the API server to ask (default: in-cluster, else ~/.kube/config)
    api_key_file: str | None = None  # the model servers' own key (vllm serve --api-key), sent as Bearer


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds. ``request`` 0: no limit on a whole request (a long generation is never cut)."""

    connect: float = 10.0  # to a model server; then the next endpoint, and 502 when none is left
    upstream_idle: float = 300.0  # no byte from the model server for this long: 504 (reset once streaming)
    listener_idle: float = 300.0  # a client connection with no request open for this long is closed
    request: float = 0.0
    picker: float = 0.0  # ext_proc stream deadline; 0: derived from the others and flow control's TTLs


@dataclass(frozen=True, slots=True)
class Retries:
    attempts: int = 3  # in all, the first included
    backoff: float = 0.1  # the first retry's base interval; doubling, at most 10 times it
    status_codes: tuple[int, ...] = RETRY_STATUSES


@dataclass(frozen=True, slots=True)
class CircuitBreaker:
    consecutive_failures: int = 5  # 5xx or connect failures in a row eject a model server...
    ejection_time: float = 30.0  # ...for this long (then it gets traffic again)


@dataclass(frozen=True, slots=True)
class Metering:
    log: str | None = "stdout"  # one JSON line per finished request: stdout, a file path, or None (off)


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    servers: Servers
    listeners: tuple[Listener, ...] = (Listener(8080),)
    api_keys: str | None = None
    picker_config: str | None = None
    objectives: str | None = None
    timeouts: Timeouts = field(default_factory=Timeouts)
    retries: Retries = field(default_factory=Retries)
    circuit_breaker: CircuitBreaker = field(default_factory=CircuitBreaker)
    metering: Metering = field(default_factory=Metering)
    admin_port: int = 9901  # Envoy's admin interface, on 127.0.0.1 only
    envoy_concurrency: int = 0  # Envoy's worker threads (0: one per core)
    picker_port: int = 9002  # the picker's ext_proc port, on 127.0.0.1 only
    picker_health_port: int = 9003
    metrics_port: int = 9090  # the picker's /metrics (all interfaces: Prometheus scrapes it)
    source: str = "<gateway config>"
    scale: float = 1.0  # every duration has been multiplied by this (--timeout-scale)

    def scaled(self, factor: float) -> GatewayConfig:
        """Every timeout times ``factor`` (tests run a 300 s chain in seconds)."""
        t, cb, r = self.timeouts, self.circuit_breaker, self.retries
        return replace(self, timeouts=Timeouts(t.connect * factor, t.upstream_idle * factor, t.listener_idle * factor,
                                               t.request * factor, t.picker * factor),
                       circuit_breaker=replace(cb, ejection_time=cb.ejection_time * factor),
                       retries=replace(r, backoff=r.backoff * factor), scale=self.scale * factor)


class _Section:
    """One mapping of the file, read field by field; ``done`` refuses what was not read."""

    def __init__(self, raw: object, path: str, source: str) -> None:
        self.path, self.source = path, source
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise self.error("", f"expected a mapping, got {type(raw).__name__}")
        self.raw: dict[str, Any] = raw
        self.read: set[str] = set()

    def error(self, name: str, message: str) -> GatewayConfigError:
        where = ".".join(p for p in (self.path, name) if p) or "(top level)"
        return GatewayConfigError(f"{self.source}: {where}: {message}")

    def get(self, name: str) -> Any:
        self.read.add(name)
        return self.raw.get(name)

    def string(self, name: str, default: str | None = None) -> str | None:
        v = self.get(name)
        if v is None:
            return default
        if not isinstance(v, str) or not v:
            raise self.error(name, f"expected a non-empty string, got {v!r}")
        return v

    def integer(self, name: str, default: int, low: int, high: int) -> int:
        v = self.get(name)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
            raise self.error(name, f"expected an integer in [{low}, {high}], got {v!r}")
        return v

    def boolean(self, name: str, default: bool) -> bool:
        v = self.get(name)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise self.error(name, f"expected true or false, got {v!r}")
        return v

    def duration(self, name: str, default: float, zero: bool = False) -> float:
        v = self.get(name)
        if v is None:
            return default
        if zero and v in (0, "0", "0s"):
            return 0.0
        try:
            return parse_duration(str(v))
        except ValueError as e:
            raise self.error(name, str(e)) from None

    def section(self, name: str) -> _Section:
        return _Section(self.get(name), ".".join(p for p in (self.path, name) if p), self.source)

    def done(self) -> None:
        unknown = sorted(set(self.raw) - self.read)
        if unknown:
            raise self.error(unknown[0], f"unknown field (allowed: {', '.join(sorted(self.read))})")


def _port(s: _Section, name: str, default: int) -> int:
    return s.integer(name, default, 1, 65535)


def _listeners(raw: object, source: str) -> tuple[Listener, ...]:
    if raw is None:
        return (Listener(8080),)
    if not isinstance(raw, list) or not raw:
        raise GatewayConfigError(f"{source}: listeners: expected a non-empty list")
    out: list[Listener] = []
    for i, item in enumerate(raw):
        s = _Section(item, f"listeners[{i}]", source)
        port = s.integer("port", 0, 1, 65535)
        if port == 0:
            raise s.error("port", "required")
        address = s.string("address", "0.0.0.0") or "0.0.0.0"
        tls = s.get("tls")
        cert = key = None
        if tls is not None:
            t = s.section("tls")
            cert, key = t.string("certFile"), t.string("keyFile")
            if cert is None or key is None:
                raise t.error("", "give both certFile and keyFile")
            for name, p in (("certFile", cert), ("keyFile", key)):
                if not Path(p).is_file():
                    raise t.error(name, f"no such file: {p}")
            t.done()
        out.append(Listener(port, address, cert, key, s.boolean("http2", True)))
        s.done()
    ports = [(x.address, x.port) for x in out]
    if len(set(ports)) != len(ports):
        raise GatewayConfigError(f"{source}: listeners: two listeners on the same address and port")
    return tuple(out)


def _servers(s: _Section) -> Servers:
    static, file, pool = s.get("static"), s.string("endpointsFile"), s.get("pool")
    key_file = s.string("apiKeyFile")
    if key_file is not None and not Path(key_file).is_file():
        raise s.error("apiKeyFile", f"no such file: {key_file}")
    given = [n for n, v in (("static", static), ("endpointsFile", file), ("pool", pool)) if v is not None]
    if len(given) != 1:
        raise s.error("", "give exactly one of static (a list of HOST:PORT), endpointsFile or pool"
                      + (f" (got {', '.join(given)})" if given else ""))
    out = Servers()
    if static is not None:
        if not isinstance(static, list) or not static:
            raise s.error("static", "expected a non-empty list of HOST:PORT")
        addrs = []
        for i, a in enumerate(static):
            try:
                addrs.append(parse_address(str(a), f"{s.source}: servers.static[{i}]"))
            except ValueError as e:
                raise GatewayConfigError(str(e)) from None
        out = Servers(static=tuple(addrs), api_key_file=key_file)
    elif file is not None:
        out = Servers(endpoints_file=file, api_key_file=key_file)
    else:
        p = s.section("pool")
        name = p.string("name")
        if name is None:
            raise p.error("name", "required (the InferencePool's name)")
        out = Servers(pool_name=name, pool_namespace=p.string("namespace"), kubeconfig=p.string("kubeconfig"),
                      api_key_file=key_file)
        p.done()
    s.done()
    return out


def parse_gateway_config(text: str, source: str) -> GatewayConfig:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise GatewayConfigError(f"{source}: invalid YAML: {e}") from None
    top = _Section(data, "", source)
    if top.get("servers") is None:
        raise top.error("servers", "required: the model servers (static, endpointsFile or pool)")
    servers = _servers(top.section("servers"))
    listeners = _listeners(top.get("listeners"), source)
    picker = top.section("picker")
    picker_config, objectives = picker.string("config"), picker.string("objectives")
    picker_port, health_port = _port(picker, "grpcPort", 9002), _port(picker, "healthPort", 9003)
    metrics_port = _port(picker, "metricsPort", 9090)
    picker.done()
    t = top.section("timeouts")
    timeouts = Timeouts(t.duration("connect", 10.0), t.duration("upstreamIdle", 300.0),
                        t.duration("listenerIdle", 300.0), t.duration("request", 0.0, zero=True),
                        t.duration("picker", 0.0, zero=True))
    t.done()
    if 0 < timeouts.request < timeouts.upstream_idle:
        raise t.error("request", "shorter than upstreamIdle: the whole-request limit would fire first")
    r = top.section("retries")
    attempts = r.integer("attempts", 3, 1, 10)
    backoff = r.duration("backoff", 0.1)
    codes_raw = r.get("statusCodes")
    codes: tuple[int, ...] = RETRY_STATUSES
    if codes_raw is not None:
        if not isinstance(codes_raw, list) or not all(isinstance(c, int) and 400 <= c <= 599 for c in codes_raw):
            raise r.error("statusCodes", f"expected a list of HTTP statuses (4xx, 5xx), got {codes_raw!r}")
        codes = tuple(codes_raw)
    r.done()
    cb = top.section("circuitBreaker")
    breaker = CircuitBreaker(cb.integer("consecutiveFailures", 5, 1, 1000), cb.duration("ejectionTime", 30.0))
    cb.done()
    m = top.section("metering")
    log_to = m.get("log")
    if log_to is not None and log_to is not False and (not isinstance(log_to, str) or not log_to):
        raise m.error("log", f"expected stdout, a file path, or false, got {log_to!r}")
    m.done()
    admin = top.section("envoy")
    admin_port = _port(admin, "adminPort", 9901)
    concurrency = admin.integer("concurrency", 0, 0, 1024)
    admin.done()
    api_keys = top.string("apiKeys")
    top.done()
    return GatewayConfig(servers=servers, listeners=listeners, api_keys=api_keys, picker_config=picker_config,
                         objectives=objectives, timeouts=timeouts, retries=Retries(attempts, backoff, codes),
                         circuit_breaker=breaker,
                         metering=Metering(None if log_to is False else (log_to or "stdout")),
                         admin_port=admin_port, envoy_concurrency=concurrency, picker_port=picker_port,
                         picker_health_port=health_port,
                         metrics_port=metrics_port, source=source)


def load_gateway_config(path: str) -> GatewayConfig:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise GatewayConfigError(f"{path}: cannot read the gateway config: {e.strerror}") from None
    return parse_gateway_config(text, path)
