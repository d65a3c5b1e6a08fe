"""The ``epp`` command: serve | sim | bench | config validate | pick | demo."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import sys
from collections.abc import Coroutine, Sequence
from typing import Any


def parse_duration(text: str) -> float:
    """'50ms', '2s', '1m', '1.5s' -> seconds (an argparse type)."""
    from epp.durations import parse_duration as parse

    try:
        return parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_bool(text: str) -> bool:
    t = text.strip().lower()
    if t in ("true", "1", "yes", "on"):
        return True
    if t in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_size(text: str) -> int:
    """A byte size as the reference reads it: 4194304, 10Mi, 10MiB, 25M, 25MB, 1e6 (an argparse type)."""
    t = text.strip()
    if len(t) > 1 and t[-1] in "Bb":  # the reference's sanitizeSizeString
        t = t[:-1]
    m = _SIZE.fullmatch(t)
    if m is None:
        raise argparse.ArgumentTypeError(f"expected a size like 4194304, 10Mi or 25MB, got {text!r}")
    value = float(m.group(1)) * _SIZE_UNITS[m.group(2) or ""]
    if value <= 0 or value != int(value) or value > 1 << 40:
        raise argparse.ArgumentTypeError(f"expected a whole number of bytes > 0 and <= 1Ti, got {text!r}")
    return int(value)


_SIZE = re.compile(r"([0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?)(Ki|Mi|Gi|Ti|k|M|G|T)?")
_SIZE_UNITS = {"": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 1024.0, "Mi": 1024.0**2, "Gi": 1024.0**3,
               "Ti": 1024.0**4}


def bool_flag(p: Any, name: str, default: bool, help: str | None = None) -> None:
    """A boolean flag as Go's pflag reads it: bare (``--flag``) or ``--flag=true|false``."""
    p.add_argument(name, type=parse_bool, nargs="?", const=True, default=default, metavar="true|false", help=help)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {value}")
    return value


# Reference flags for features epp does not have: false is what epp does; true is refused.
OFF_ONLY = {
    "--enable-pprof": "epp has no pprof endpoint (profile it with py-spy)",
    "--health-checking": "epp does not health-check the model servers (a failing scrape takes a pod out)",
    "--enable-grpc-stream-metrics": "epp has no ext_proc stream metrics yet",
}
# Reference flags epp refuses whatever their value, and why.
REFUSED = {
    "--metrics-client-ca-file": "/metrics has no TLS in epp (use a bearer token: --metrics-token-file)",
    "--metrics-cert-dir": "/metrics has no TLS in epp (use a bearer token: --metrics-token-file)",
    "--refresh-prometheus-metrics-interval": "epp computes the pool gauges at each /metrics scrape",
    "--total-queued-requests-metric": "deprecated in the reference; epp reads the metric names of --engine",
    "--total-running-requests-metric": "deprecated in the reference; epp reads the metric names of --engine",
    "--kv-cache-usage-percentage-metric": "deprecated in the reference; epp reads the metric names of --engine",
    "--lora-info-metric": "deprecated in the reference; epp reads the metric names of --engine",
    "--cache-info-metric": "deprecated in the reference; epp reads the metric names of --engine",
    "--zap-stacktrace-level": "epp logs a traceback with every error that has one",
}


def refused_flags(args: argparse.Namespace) -> list[str]:
    """One line per reference flag given that epp cannot honour."""
    out = []
    for name, why in OFF_ONLY.items():
        if vars(args)[name[2:].replace("-", "_")]:
            out.append(f"{name}=true is not supported by epp: {why}")
    for name, why in REFUSED.items():
        if vars(args)[name[2:].replace("-", "_")] is not None:
            out.append(f"{name} is not supported by epp: {why}")
    return out


def _add_limits(p: argparse.ArgumentParser) -> None:
    """What a client, a pod or a gateway can make epp hold (the README's limits table)."""
    g = p.add_argument_group("limits")
    g.add_argument("--grpc-max-recv-msg-size", type=parse_size, default=64 << 20, metavar="SIZE",
                   help="largest gRPC message, and largest request body held for a pick (default 64Mi)")
    g.add_argument("--grpc-max-send-msg-size", type=parse_size, default=128 << 20, metavar="SIZE",
                   help="largest gRPC message epp sends; a larger answer ends the call RESOURCE_EXHAUSTED "
                        "(default 128Mi)")
    g.add_argument("--grpc-max-header-list-size", type=positive_int, default=64 << 10, metavar="BYTES",
                   help="largest HTTP/2 header block, CONTINUATION frames included (default 64 KiB)")
    g.add_argument("--grpc-max-buffered-bytes", type=positive_int, default=128 << 20, metavar="BYTES",
                   help="partial gRPC messages held per connection (default 128 MiB)")
    g.add_argument("--max-scrape-bytes", type=positive_int, default=4 << 20, metavar="BYTES",
                   help="largest /metrics response read from a pod (default 4 MiB)")
    g.add_argument("--max-scrape-series", type=positive_int, default=1024, metavar="N",
                   help="series of one routing metric read per scrape (default 1024)")
    g.add_argument("--metrics-label-values", type=positive_int, default=64, metavar="N",
                   help="distinct client-chosen values (model names) per metric label; more become 'other'")
    g.add_argument("--pick-api-max-outstanding", type=positive_int, default=1024, metavar="N",
                   help="unreleased epp.v1 picks per client address (default 1024)")


def _add_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("serve", help="run the endpoint picker (Envoy ext_proc + epp.v1 Pick API)")
    p.add_argument("--config-file", help="EndpointPickerConfig YAML (watched; default profile if absent)")
    p.add_argument("--config-text", help="the EndpointPickerConfig itself, instead of a file (not reloaded)")
    p.add_argument("--endpoints", help="HOST:PORT[,HOST:PORT...] of the model servers")
    p.add_argument("--endpoints-file", help="YAML list of HOST:PORT (watched and reloaded on change)")
    p.add_argument("--grpc-port", type=int, default=9002)
    p.add_argument("--grpc-health-port", type=int, default=9003)
    p.add_argument("--metrics-port", type=int, default=9090)
    bool_flag(p, "--secure-serving", True, "TLS on the gRPC port (a self-signed certificate without --cert-path)")
    p.add_argument("--cert-path", help="directory with tls.crt and tls.key (self-signed if absent)")
    bool_flag(p, "--enable-cert-reload", False, "re-read the certificate in --cert-path when it changes")
    p.add_argument("--tls-min-version", default="VersionTLS12", help="VersionTLS10 ... VersionTLS13 (default 1.2)")
    p.add_argument("--tls-cipher-suites", default="", metavar="NAME,...",
                   help="Go crypto/tls cipher suite names for TLS 1.2 and below (TLS 1.3 suites are fixed)")
    p.add_argument("--refresh-metrics-interval", type=parse_duration, default=0.05, metavar="DURATION")
    p.add_argument("--metrics-staleness-threshold", type=parse_duration, default=2.0, metavar="DURATION")
    p.add_argument("--scrape-timeout", type=parse_duration, default=1.0, metavar="DURATION")
    p.add_argument("--engine", default="vllm", help="metric names of the model servers: vllm or sglang")
    p.add_argument("--pool-name", help="the InferencePool to serve (Kubernetes discovery; also the metrics label)")
    p.add_argument("--pool-namespace", help="its namespace (default: POD_NAMESPACE, the pod's own, or default)")
    p.add_argument("--pool-group", default="inference.networking.k8s.io", help="the InferencePool API group")
    p.add_argument("--endpoint-selector", help="instead of a pool: pods with these labels (app=vllm,tier=gpu)")
    p.add_argument("--endpoint-target-ports", help="with --endpoint-selector: the pods' ports (8000[,8001])")
    p.add_argument("--api-keys-file", help="YAML of API keys (their sha256), each with a tenant and a tier: "
                                           "requests without a valid one get 401 (watched; see the README)")
    p.add_argument("--objectives-file", help="YAML InferenceObjective / InferenceModelRewrite documents (reloaded "
                   "on change; for pools outside Kubernetes, where discovery reads them from the API)")
    bool_flag(p, "--ha-enable-leader-election", False,
              "run several replicas: only the Lease holder reports ready (Kubernetes discovery only)")
    p.add_argument("--ha-lease-name", help="the Lease's name (default: epp-<pool name>)")
    active = p.add_argument_group("active-active replicas (every replica ready, picker state shared)")
    active.add_argument("--shared-state-url", default=os.environ.get("EPP_SHARED_STATE_URL"), metavar="URL",
                        help="Valkey or Redis to share in-flight load, the approximate prefix index and flow "
                             "control's usage through: redis://[:password@]host:port[/db], rediss:// with TLS "
                             "(default: $EPP_SHARED_STATE_URL; none: each replica alone)")
    active.add_argument("--shared-state-key", metavar="KEY",
                        help="the keys' prefix in the store (default: epp:<pool namespace>/<pool name>)")
    active.add_argument("--shared-state-interval", type=parse_duration, default=0.05, metavar="DURATION",
                        help="how often each replica publishes and reads (50ms)")
    active.add_argument("--shared-state-staleness", type=parse_duration, default=1.0, metavar="DURATION",
                        help="a replica whose load has not moved for this long is dropped, and with the store "
                             "unreachable a replica routes alone after it (1s)")
    p.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster config, else ~/.kube/config)")
    p.add_argument("--host", default="0.0.0.0", help="bind address of the gRPC and metrics servers")
    bool_flag(p, "--dashboard", True, "the live dashboard at /dashboard on the metrics port (off unless /metrics "
              "is open: a browser page cannot send a token)")
    p.add_argument("--shadow-config", action="append", default=[], metavar="FILE",
                   help="a candidate EndpointPickerConfig (plugins and schedulingProfiles) that also schedules "
                        "sampled live requests, without acting: agreement and estimated cache hits on /metrics "
                        "and the dashboard (repeatable; named by the file's stem)")
    p.add_argument("--shadow-sample-rate", type=float, default=1.0, metavar="FRACTION",
                   help="the fraction of requests the shadow configs schedule (default 1)")
    bool_flag(p, "--record-prompts", False, "let `epp record --prompts` include the prompt text (off: the trace "
              "holds block hashes and token counts only)")
    bool_flag(p, "--decision-headers", False,
              "add x-epp-endpoint and x-epp-reason to responses (debugging; off by default)")
    bool_flag(p, "--allow-mode-override", False,
              "the gateway's ext_proc filter sets allow_mode_override: true (and a request_body_mode other than "
              "FULL_DUPLEX_STREAMED): epp then asks it not to send a response's body when nothing in epp reads it "
              "(no usage, first-bytes timing, flow control, metering or recording), sparing a round trip per chunk")
    bool_flag(p, "--observed-responses", False,
              "the gateway reads responses through ext_proc filters in observability_mode "
              "(envoy/epp-observed.yaml): picks are answered as usual; epp takes each response's first bytes and "
              "its end off the data path, and reads a sample of streams to their end for their usage")
    p.add_argument("--observed-usage-sample", type=_fraction, default=0.02, metavar="FRACTION",
                   help="with --observed-responses: the share of streams read to their end, for their usage (the "
                        "latency model's TPOT, cache-hit feedback, inter-token latency); streams whose usage "
                        "metering, token limits or fairness need are always read (default 0.02)")
    bool_flag(p, "--emit-endpoint-scores", False,
              "add each picked endpoint's score to the envoy.lb metadata (x-gateway-destination-endpoint-scores)")
    bool_flag(p, "--disable-endpoint-subset-filter", False,
              "ignore the gateway's subset hint (envoy.lb.subset_hint) and pick from the whole pool")
    bool_flag(p, "--tracing", False, "OpenTelemetry spans, one per request, set up from the OTEL_* environment "
              "(the reference defaults this to true; epp to false)")
    bool_flag(p, "--allow-experimental-plugins", False,
              "accepted for the reference's charts: epp has no experimental plugin types")
    logs = p.add_argument_group("logging (the reference's klog and zap flags, or --log-level)")
    logs.add_argument("--log-level", help="debug, info, warning or error (default info)")
    logs.add_argument("-v", "--v", type=int, metavar="N", help="verbosity: 4 or more logs at debug (default 2)")
    logs.add_argument("--zap-log-level", help="debug, info, error, panic, or a verbosity N")
    logs.add_argument("--zap-encoder", default="console", help="json or console")
    bool_flag(logs, "--zap-devel", False, "debug level and console output, unless given otherwise")
    logs.add_argument("--zap-time-encoding", help="epoch, millis, nano, iso8601, rfc3339 or rfc3339nano")
    ref = p.add_argument_group("reference flags epp does not implement (off is accepted, on is refused)")
    for name in OFF_ONLY:
        bool_flag(ref, name, False)
    for name in REFUSED:
        ref.add_argument(name, help=argparse.SUPPRESS)
    p.add_argument("--drain-timeout", type=parse_duration, default=30.0, metavar="DURATION",
                   help="on SIGTERM: report NOT_SERVING, keep serving until quiet, at most this long (30s)")
    p.add_argument("--workers", type=_workers, default=None, metavar="N|auto",
                   help="protocol worker processes serving the gRPC port (SO_REUSEPORT), every pick made by this "
                        "process's one routing state; 0: this process serves the port itself; 'auto' (default): "
                        "one per available core (CPU affinity and the cgroup's CPU limit), at most 8, none on one "
                        "core or with --grpc-port 0")
    bool_flag(p, "--metrics-endpoint-auth", False, "require a bearer token on /metrics: the one in "
              "--metrics-token-file, else (with Kubernetes discovery) any the API server authorizes to get /metrics")
    p.add_argument("--metrics-token-file", help="file with the bearer token /metrics requires")
    p.add_argument("--pick-api-token-file", help="file with the bearer token the epp.v1 Pick API requires")
    _add_limits(p)


def run_serve(args: argparse.Namespace) -> int:
    from epp.config import load_config, parse_config
    from epp.datastore.sources import parse_endpoint_list
    from epp.scheduling.types import ConfigError
    from epp.server.app import ServeOptions, serve_forever
    from epp.server.h2grpc import Limits
    from epp.server.tls import TLSPolicy
    from epp.signals.mappings import names_for

    refused = refused_flags(args)
    if refused:
        for line in refused:
            print(f"epp serve: {line}", file=sys.stderr)
        return 2
    try:
        if args.config_file and args.config_text:
            raise ValueError("give --config-file or --config-text, not both")
        cfg = parse_config(args.config_text, "--config-text") if args.config_text else load_config(args.config_file)
        tls = TLSPolicy(args.tls_min_version, tuple(n.strip() for n in args.tls_cipher_suites.split(",") if n.strip()))
        if args.enable_cert_reload and not args.cert_path:
            raise ValueError("--enable-cert-reload needs --cert-path (a self-signed certificate never changes)")
        endpoints = tuple(parse_endpoint_list(args.endpoints)) if args.endpoints else ()
        discovered = cfg.discovery()  # dataLayer.discovery (file-discovery)
        if discovered is not None and (endpoints or args.endpoints_file or args.pool_name or args.endpoint_selector):
            raise ValueError("the config's dataLayer.discovery and a flag (--endpoints, --endpoints-file, --pool-name, "
                             "--endpoint-selector) both give the model servers: give one")
        kube = kubernetes_options(args) if not endpoints and not args.endpoints_file and discovered is None else None
        if args.ha_enable_leader_election and kube is None:
            raise ValueError("--ha-enable-leader-election needs Kubernetes discovery (--pool-name or "
                             "--endpoint-selector), not --endpoints / --endpoints-file")
        shared = shared_state_options(args, kube)
        if not endpoints and not args.endpoints_file and kube is None and discovered is None:
            raise ValueError("give the model servers: --pool-name NAME (Kubernetes InferencePool), "
                             "--endpoint-selector LABELS --endpoint-target-ports PORTS (Kubernetes pods), "
                             "--endpoints HOST:PORT,... or --endpoints-file PATH")
        names_for(args.engine)
        if args.metrics_endpoint_auth and not args.metrics_token_file and kube is None:
            raise ValueError("--metrics-endpoint-auth=true needs Kubernetes discovery (tokens are checked with "
                             "TokenReview) or --metrics-token-file")
    except (ConfigError, ValueError) as e:
        print(f"epp serve: {e}", file=sys.stderr)
        return 2
    opts = ServeOptions(
        config=cfg, config_file=args.config_file, endpoints=endpoints, endpoints_file=args.endpoints_file,
        host=args.host, grpc_port=args.grpc_port, grpc_health_port=args.grpc_health_port,
        metrics_port=args.metrics_port, secure_serving=args.secure_serving, cert_path=args.cert_path,
        refresh_metrics_interval=args.refresh_metrics_interval,
        metrics_staleness_threshold=args.metrics_staleness_threshold, scrape_timeout=args.scrape_timeout,
        engine=args.engine, pool_name=args.pool_name or "default", decision_headers=args.decision_headers,
        allow_mode_override=args.allow_mode_override, observed_responses=args.observed_responses,
        observed_usage_sample=args.observed_usage_sample,
        workers=_worker_count(args), kubernetes=kube,
        objectives_file=args.objectives_file,
        api_keys_file=args.api_keys_file,
        drain_timeout=args.drain_timeout,
        limits=Limits(max_message=args.grpc_max_recv_msg_size, max_header_block=args.grpc_max_header_list_size,
                      max_buffered=args.grpc_max_buffered_bytes, max_send=args.grpc_max_send_msg_size),
        tls=tls, cert_reload=args.enable_cert_reload, emit_endpoint_scores=args.emit_endpoint_scores,
        subset_filter=not args.disable_endpoint_subset_filter, tracing=args.tracing, dashboard=args.dashboard,
        shadow_configs=tuple(args.shadow_config), shadow_sample_rate=args.shadow_sample_rate,
        record_prompts=args.record_prompts,
        max_scrape_bytes=args.max_scrape_bytes, max_scrape_series=args.max_scrape_series,
        metrics_label_values=args.metrics_label_values, pick_api_max_outstanding=args.pick_api_max_outstanding,
        pick_api_token_file=args.pick_api_token_file, metrics_token_file=args.metrics_token_file,
        metrics_token_review=args.metrics_endpoint_auth and not args.metrics_token_file, shared_state=shared)
    try:
        _run(serve_forever(opts))
    except ValueError as e:  # a token file that cannot be read
        print(f"epp serve: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a port taken, an address this host does not have
        print(f"epp serve: cannot serve: {e}", file=sys.stderr)
        return 1
    return 0


def _worker_count(args: argparse.Namespace) -> int:
    """--workers as given; by default one per core, none when the port is picked at random (the
    workers must share a fixed one)."""
    from epp.server.workers import default_workers

    if args.workers is not None:
        return int(args.workers)
    return default_workers() if args.grpc_port else 0


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction from 0 to 1, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction from 0 to 1, got {value}")
    return value


def _workers(text: str) -> int:
    from epp.server.workers import MAX_WORKERS, default_workers

    if text == "auto":
        return default_workers()
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of workers or 'auto', got {text!r}") from None
    if not 0 <= n <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"expected 0 to {MAX_WORKERS} workers, got {n}")
    return n


def shared_state_options(args: argparse.Namespace, kube: Any) -> Any:
    """Active-active options from the flags (None without --shared-state-url)."""
    from epp.server.sharedstate import SharedStateOptions

    if not args.shared_state_url:
        return None
    if args.ha_enable_leader_election:
        raise ValueError("--shared-state-url (active-active: every replica serves) and --ha-enable-leader-election "
                         "(passive: only the Lease holder serves) exclude each other: give one")
    url = args.shared_state_url
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("--shared-state-url: expected redis://, rediss:// or unix://, got "
                         f"{url.partition('@')[2] or url!r}")
    if args.shared_state_interval <= 0 or args.shared_state_staleness < 2 * args.shared_state_interval:
        raise ValueError("--shared-state-interval must be > 0 and --shared-state-staleness at least twice it")
    pool = args.pool_name or "default"
    namespace = getattr(kube, "namespace", None) or args.pool_namespace or os.environ.get("POD_NAMESPACE", "default")
    return SharedStateOptions(url, args.shared_state_key or f"epp:{namespace}/{pool}", args.shared_state_interval,
                              args.shared_state_staleness)


def kubernetes_options(args: argparse.Namespace) -> Any:
    """Kubernetes discovery options from the flags, or None when no pool or selector is given."""
    from epp.datastore.kubernetes import KubernetesOptions

    if args.endpoint_selector:
        if not args.endpoint_target_ports:
            raise ValueError("--endpoint-selector needs --endpoint-target-ports")
        try:
            ports = tuple(int(p) for p in args.endpoint_target_ports.split(","))
        except ValueError:
            raise ValueError(f"--endpoint-target-ports: expected port numbers, got {args.endpoint_target_ports!r}")\
                from None
        if not all(0 < p < 65536 for p in ports):
            raise ValueError(f"--endpoint-target-ports: invalid port in {args.endpoint_target_ports!r}")
        if "=" not in args.endpoint_selector:
            raise ValueError(f"--endpoint-selector: expected key=value[,key=value], got {args.endpoint_selector!r}")
        return KubernetesOptions(namespace=args.pool_namespace, selector=args.endpoint_selector, target_ports=ports,
                                 kubeconfig=args.kubeconfig, leader_election=args.ha_enable_leader_election,
                                 lease_name=args.ha_lease_name)
    if args.pool_name:
        return KubernetesOptions(namespace=args.pool_namespace, pool_name=args.pool_name, pool_group=args.pool_group,
                                 kubeconfig=args.kubeconfig, leader_election=args.ha_enable_leader_election,
                                 lease_name=args.ha_lease_name)
    if args.ha_enable_leader_election:
        raise ValueError("--ha-enable-leader-election needs Kubernetes discovery (--pool-name or --endpoint-selector)")
    return None


def _add_config(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("config", help="config tools")
    csub = p.add_subparsers(dest="config_command", required=True)
    v = csub.add_parser("validate", help="validate an EndpointPickerConfig file")
    v.add_argument("file")


def run_config(args: argparse.Namespace) -> int:
    from epp.config import load_config
    from epp.scheduling.types import ConfigError

    try:
        cfg = load_config(args.file)
        cfg.build()  # what the plugins load (a tokenizer) is checked too
    except ConfigError as e:
        print(f"invalid: {e}", file=sys.stderr)
        return 1
    scorers = ", ".join(f"{n} x{w:g}" for n, w in cfg.scorer_refs)
    filters = f"filters {', '.join(cfg.filter_refs)}; " if cfg.filter_refs else ""
    print(f"{args.file}: valid; profile {cfg.profile_name}: {filters}{scorers}; "
          f"picker {cfg.picker_ref or 'max-score-picker'}")
    return 0


def _add_pick(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("pick", help="ask a running epp for an endpoint (epp.v1 Pick API)")
    p.add_argument("--target", default="127.0.0.1:9002", help="epp gRPC address")
    p.add_argument("--secure", type=parse_bool, default=False, metavar="true|false",
                   help="TLS without verification (for the self-signed default)")
    p.add_argument("--model", required=True)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--prompt", default="")
    g.add_argument("--message", action="append", help="a user message (repeatable)")
    p.add_argument("--header", action="append", default=[], help="NAME=VALUE (repeatable)")


def run_pick(args: argparse.Namespace) -> int:
    import grpc

    from epp.v1 import picker_pb2, picker_pb2_grpc

    headers = {}
    for h in args.header:
        k, _, v = h.partition("=")
        headers[k.lower()] = v
    req = picker_pb2.PickRequest(model=args.model, headers=headers)
    if args.message:
        req.messages.messages.extend(picker_pb2.ChatMessage(role="user", content=m) for m in args.message)
    else:
        req.prompt = args.prompt
    if args.secure:
        from epp.server.tls import fetch_server_cert

        creds = grpc.ssl_channel_credentials(fetch_server_cert(args.target))
        channel = grpc.secure_channel(args.target, creds, options=[("grpc.ssl_target_name_override", "localhost")])
    else:
        channel = grpc.insecure_channel(args.target)
    try:
        resp = picker_pb2_grpc.EndpointPickerStub(channel).Pick(req, timeout=5)
    except grpc.RpcError as e:
        print(f"epp pick: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    print(resp.endpoint + ("," + ",".join(resp.fallback_endpoints) if resp.fallback_endpoints else ""))
    print(f"reason: {resp.reason}")
    picker_pb2_grpc.EndpointPickerStub(channel).Release(picker_pb2.ReleaseRequest(pick_id=resp.pick_id))
    return 0


def _add_bench(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("bench", help="benchmarks (results as JSON + markdown)")
    bsub = p.add_subparsers(dest="bench_command", required=True)
    o = bsub.add_parser("overhead", help="Envoy alone vs Envoy + epp: latency and picker CPU per request")
    o.add_argument("--out", default="results/overhead")
    o.add_argument("--servers", type=int, default=4)
    o.add_argument("--requests", type=int, default=3000, help="requests per run at concurrency 16 (half at 1)")
    o.add_argument("--max-seconds", type=float, default=20.0, help="time cap per run")
    o.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the median run is reported")
    o.add_argument("--buffered", action="store_true", help="also measure BUFFERED mode")
    o.add_argument("--body-skips", action="store_true", help="also measure a gateway that streams the response "
                   "to the picker (request BUFFERED), without and with allow_mode_override + --allow-mode-override")
    o.add_argument("--observed", action="store_true", help="also measure one epp process (--workers 0) in full "
                   "duplex and with the response read by observer filters (--observed-responses), and observed "
                   "with the default workers")
    o.add_argument("--stream-tokens", type=int, default=64,
                   help="also measure gateway mode with SSE streams of this many tokens, one per chunk "
                        "(concurrency 16; 0: not)")
    o.add_argument("--baseline-src", metavar="DIR",
                   help="also run the epp of another checkout (DIR with its epp/v1 generated), side by side")
    o.add_argument("--profile", nargs="?", type=int, const=16, choices=(1, 16), metavar="CONCURRENCY",
                   help="py-spy profile of epp during one run at this concurrency (default 16)")
    sm = bsub.add_parser("sim", help="simulator: round robin vs prefix-affine TTFT at a load; or --scale N")
    _fleet_load_args(sm, "results/sim", requests=1800, capacity_seconds=20.0)
    sm.add_argument("--scale", type=int, help="instead: N fast servers in one process; RSS and CPU")
    pb = bsub.add_parser("pool", help="one epp in front of a large simulated pool: scrape CPU, pick latency, "
                                      "prefix-index memory")
    pb.add_argument("--out", default="results/pool")
    pb.add_argument("--servers", type=int, default=1000)
    pb.add_argument("--refresh-metrics-interval", type=parse_duration, default=0.05,
                    help="how often epp scrapes each pod, as for epp serve (default 50ms)")
    pb.add_argument("--seconds", type=float, default=10.0, help="the scraping window")
    wb = bsub.add_parser("workers", help="picks/s at saturation with --workers 0, 1, 2 (a cheap ext_proc load "
                                         "generator, no gateway); CPU per pick of the state process and the workers")
    wb.add_argument("--out", default="results/workers")
    wb.add_argument("--workers", default="0,1,2", help="comma-separated worker counts (default 0,1,2)")
    wb.add_argument("--rounds", type=int, default=3)
    wb.add_argument("--seconds", type=float, default=8.0, help="each round's load (default 8)")
    wb.add_argument("--connections", type=int, default=16)
    wb.add_argument("--streams", type=int, default=8, help="streams open per connection (default 8)")
    wb.add_argument("--client-nice", type=int, default=0, help="run the load generator at this nice level")
    wb.add_argument("--tokens", default="0,64", help="comma-separated: 0 = request only (BUFFERED), N = gateway-mode "
                                                   "streams of N SSE chunks (default 0,64)")
    wb.add_argument("--observed", action="store_true",
                    help="also each stream count as epp-observed.yaml's three streams per request, epp serving "
                         "--observed-responses (N: the response's chunks, read past the first only for the sample)")
    sw = bsub.add_parser("seeds", help="routing configs side by side over many seeds of one workload, replayed in "
                                       "virtual time: each config's spread of TTFT p90 and its bad seeds")
    sw.add_argument("--out", default="results/seeds")
    sw.add_argument("--config", action="append", default=[], metavar="NAME=PATH", required=True,
                    help="an EndpointPickerConfig to replay (repeatable)")
    sw.add_argument("--workload", default="zipf", help="mix, zipf, hot, multiturn (first turns), long or bursty")
    sw.add_argument("--rate", type=float, required=True, help="requests/s")
    sw.add_argument("--requests", type=int, default=3000)
    sw.add_argument("--fleet", default="h100-llama8b", help="a simulator preset or a mixed fleet "
                                                            "(h100-llama8b*4,slow-llama8b*4)")
    sw.add_argument("--servers", type=int, default=8, help="servers of a single preset")
    sw.add_argument("--seeds", type=int, default=12, help="seeds 1..N")
    sw.add_argument("--path-ms", type=float, default=0.0,
                    help="a live gateway's path per request, half each way (the routing bench's is ~12 ms)")
    tb = bsub.add_parser("tune", help="validate epp tune: record the default config live, tune on the trace, then "
                                      "the default vs the tuned config on a fresh trace of the same workload")
    tb.add_argument("--out", default="results/tune")
    tb.add_argument("--profile", default="h100-llama8b", help="simulator preset, or a mixed fleet")
    tb.add_argument("--servers", type=int, default=8)
    tb.add_argument("--workload", default="zipf")
    tb.add_argument("--load", type=float, default=1.2, help="fraction of the fleet's capacity")
    tb.add_argument("--requests", type=int, default=1200)
    tb.add_argument("--capacity-rps", type=float, help="use this capacity (req/s) instead of measuring it")
    tb.add_argument("--capacity-basis", default="no-affinity", choices=("spread", "no-affinity"))
    tb.add_argument("--objective", default="p90", choices=("p50", "p90", "p99", "mean"))
    tb.add_argument("--seeds", type=int, default=2, help="tuner replays per config")
    tb.add_argument("--max-seconds", type=float, default=240.0)
    ro = bsub.add_parser("routing", help="epp vs Envoy and the peer routers on the simulated fleet (+ plots)")
    ro.add_argument("--out", default="results/routing")
    ro.add_argument("--profile", default="h100-llama8b", help="simulator preset, or a mixed fleet: "
                    "h100-llama8b*4,slow-llama8b*4 (its counts replace --servers)")
    ro.add_argument("--servers", type=int, default=8)
    ro.add_argument("--loads", default="0.9", help="fractions of the fleet's capacity, e.g. 0.5,0.9,1.1")
    ro.add_argument("--requests", type=int, default=1200, help="requests per run")
    ro.add_argument("--workload", default="mix", help="mix, zipf, hot, multiturn, long or bursty")
    ro.add_argument("--contenders", default=",".join(("envoy-round-robin", "envoy-least-request", "epp",
                                                      "vllm-router", "sglang-router")),
                    help="also: epp-active-active (two replicas sharing state through a real Redis), "
                    "epp-active-active-unshared (the same two without the store), epp-one-process (--workers 0) "
                    "and epp-workers-2 (--workers 2, Envoy cycling its ext_proc connections)")
    ro.add_argument("--kill-replica-at", type=float, metavar="SECONDS",
                    help="SIGKILL one active-active replica this far into each of their runs; the row gains "
                    "failures before/after and the recovery time")
    ro.add_argument("--epp-config", action="append", default=[], metavar="NAME=PATH",
                    help="also run epp with this EndpointPickerConfig, as contender epp-NAME (repeatable)")
    ro.add_argument("--baseline-src", metavar="DIR", help="contenders named epp...-baseline run the epp of this "
                    "checkout (DIR with its epp/v1 generated), e.g. --contenders epp,epp-baseline")
    ro.add_argument("--trace", help="replay this saved trace instead of generating one")
    ro.add_argument("--prefix-tokens", type=int, default=6000, help="shared system prompt length")
    ro.add_argument("--groups", type=int, default=128, help="prefix groups (Zipf popularity)")
    ro.add_argument("--output-tokens", type=int, default=64)
    ro.add_argument("--seed", type=int, default=1)
    ro.add_argument("--capacity-seconds", type=float, default=20.0)
    ro.add_argument("--capacity-rps", type=float, help="use this capacity (req/s) instead of measuring it: the "
                    "same offered load across runs and seeds")
    ro.add_argument("--capacity-basis", choices=("spread", "no-affinity"), default="spread",
                    help="what load 1.0 is: the fleet's throughput with requests spread evenly (spread), or "
                    "with no prefix cached anywhere (no-affinity: the same whoever routes)")
    ro.add_argument("--max-seconds", type=float, default=240.0, help="time cap per run")
    ro.add_argument("--late-limit-ms", type=float, default=5.0, help="repeat a contender's run once when the "
                    "simulated GPUs' steps ran later than this on average (the host was busy)")
    ro.add_argument("--no-progress", action="store_true")
    ov = bsub.add_parser("overload", help="flow control off vs on (and the peers): overload, priorities, "
                         "fairness, scale from zero, queue cost")
    ov.add_argument("--out", default="results/overload")
    ov.add_argument("--profile", default="a100-llama8b", help="simulator preset")
    ov.add_argument("--servers", type=int, default=4)
    ov.add_argument("--requests", type=int, default=800, help="requests per run")
    ov.add_argument("--scenarios", default="overload,priority,fairness,scale-from-zero,queue",
                    help="comma-separated; also: eviction (in-flight eviction of sheddable work, on request)")
    ov.add_argument("--ttl", default="400ms", help="flowControl.defaultRequestTTL of the flow-control runs")
    ov.add_argument("--no-peers", action="store_true", help="skip vllm-router and sglang-router")
    ov.add_argument("--detector", default="concurrency",
                    help="the flow-control runs' saturation detector: concurrency or utilization (see "
                    "epp/bench/overload.py), or KIND:{parameters} e.g. 'concurrency:{maxConcurrency: 8}'")
    ov.add_argument("--workload", default="bursty", help="the overload and priority scenarios' workload")
    ov.add_argument("--ordering", default="least-prefill-ordering-policy",
                    help="the flow-control runs' ordering policy (e.g. fcfs-ordering-policy)")
    ov.add_argument("--output-tokens", type=int, default=16, help="tokens per answer (each is one SSE chunk "
                    "through the gateway: on a 2-core host the simulated fleet falls behind its clock at 64)")
    ov.add_argument("--seed", type=int, default=1)
    ov.add_argument("--capacity-rps", type=float, help="use this capacity (req/s) instead of measuring it")
    ov.add_argument("--max-seconds", type=float, default=180.0, help="time cap per run")
    pr = bsub.add_parser("precise", help="approximate vs precise prefix routing under churn (sim fleet)")
    _fleet_load_args(pr, "results/precise", requests=800, capacity_seconds=15.0)
    pr.add_argument("--side-fraction", type=float, default=0.3, help="share of requests sent straight to a pod")
    pr.add_argument("--restart-every", type=float, default=6.0, help="seconds between pod restarts (0: none)")
    pr.add_argument("--down-for", type=float, default=0.5, help="seconds a restarting pod is down")
    db = bsub.add_parser("dashboard", help="epp's CPU with 0, 1 and 8 dashboards open")
    db.add_argument("--out", default="results/dashboard")
    db.add_argument("--seconds", type=float, default=10.0)
    gw = bsub.add_parser("gateway", help="epp gateway (keys, limits, metering) vs nginx as seed 000 configures it")
    gw.add_argument("--out", default="results/gateway")
    gw.add_argument("--requests", type=int, default=2000, help="requests per concurrency-16 run")
    gw.add_argument("--rounds", type=int, default=2)
    gw.add_argument("--no-instructions", action="store_true", help="skip counting instructions under callgrind")
    pd = bsub.add_parser("pd", help="prefill/decode disaggregation vs the same pods aggregated (long prompts)")
    pd.add_argument("--out", default="results/pd")
    pd.add_argument("--profile", default="h100-llama8b", help="simulator preset")
    pd.add_argument("--servers", type=int, default=8)
    pd.add_argument("--prefill", type=int, default=4, help="prefill pods of --servers in the P/D run")
    pd.add_argument("--load", type=float, default=0.6, help="fraction of the aggregated no-affinity capacity")
    pd.add_argument("--requests", type=int, default=300)
    pd.add_argument("--prompt-tokens", type=int, default=8000)
    pd.add_argument("--output-tokens", type=int, default=256)
    pd.add_argument("--seed", type=int, default=1)
    pd.add_argument("--capacity-rps", type=float, help="use this capacity (req/s) instead of measuring it")
    p.add_argument("--log-level", default="warning")


def run_bench(args: argparse.Namespace) -> int:
    import shutil
    from pathlib import Path

    if args.bench_command == "overhead":
        from epp.bench.overhead import bench_overhead

        prof = None
        if args.profile:
            prof = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
        if args.profile and prof is None:
            print("epp bench: --profile needs py-spy (pip install py-spy)", file=sys.stderr)
            return 2
        out = Path(args.out)
        _run(bench_overhead(out, servers=args.servers, requests=args.requests, max_seconds=args.max_seconds,
                            rounds=args.rounds, buffered=args.buffered, profile_with=prof,
                            stream_tokens=args.stream_tokens, body_skips=args.body_skips, observed=args.observed,
                            baseline_src=Path(args.baseline_src) if args.baseline_src else None,
                            profile_concurrency=args.profile or 16))
        print((out / "overhead.md").read_text())
        if prof:
            from epp.bench.profile import top_functions

            print(top_functions(out / "profile.txt"))
        return 0
    if args.bench_command == "dashboard":
        from epp.bench.dashboardbench import bench_dashboard

        out = Path(args.out)
        _run(bench_dashboard(out, seconds=args.seconds))
        print((out / "dashboard.md").read_text())
        return 0
    if args.bench_command == "gateway":
        from epp.bench.gatewaybench import bench_gateway

        out = Path(args.out)
        _run(bench_gateway(out, requests=args.requests, rounds=args.rounds, instructions=not args.no_instructions))
        print((out / "gateway.md").read_text())
        return 0
    if args.bench_command == "sim":
        from epp.bench.simbench import Workload, bench_routing_effect, bench_scale

        out = Path(args.out)
        if args.scale:
            holder: dict[str, object] = {}

            async def scale() -> None:
                holder["r"] = await bench_scale(out, servers=args.scale)

            _run(scale())
            print(json.dumps(holder["r"], indent=1))
            return 0
        wl = Workload(groups=args.groups, prefix_tokens=args.prefix_tokens)
        _run(bench_routing_effect(out, preset=args.profile, servers=args.servers, load=args.load,
                                  requests=args.requests, capacity_seconds=args.capacity_seconds, wl=wl))
        print((out / "sim-routing.md").read_text())
        return 0
    if args.bench_command == "pool":
        from epp.bench.poolbench import bench_pool

        out = Path(args.out)
        _run(bench_pool(out, args.servers, args.refresh_metrics_interval, args.seconds))
        print((out / "pool.md").read_text())
        return 0
    if args.bench_command == "seeds":
        from epp.bench.seedsweep import Sweep, sweep_seeds

        replayed: dict[str, str] = {}
        for spec in args.config:
            name, sep, path = spec.partition("=")
            if not sep or not name or not path:
                print(f"epp bench seeds: --config: expected NAME=PATH, got {spec!r}", file=sys.stderr)
                return 2
            try:
                replayed[name] = Path(path).read_text()
            except OSError as e:
                print(f"epp bench seeds: --config {name}: {e}", file=sys.stderr)
                return 2
        out = Path(args.out)
        if args.path_ms < 0:
            print("epp bench seeds: --path-ms must be >= 0", file=sys.stderr)
            return 2
        sweep = Sweep(args.workload, args.rate, args.requests, args.fleet, args.servers, args.path_ms / 1000)
        sweep_seeds(replayed, sweep, list(range(1, args.seeds + 1)), out)
        print((out / "seeds.md").read_text())
        return 0
    if args.bench_command == "workers":
        from epp.bench.workersbench import bench_workers

        out = Path(args.out)
        try:
            counts = tuple(int(w) for w in args.workers.split(","))
            tokens = tuple(int(t) for t in args.tokens.split(","))
        except ValueError:
            print(f"epp bench workers: --workers/--tokens: expected numbers like 0,1,2, got {args.workers!r} / "
                  f"{args.tokens!r}", file=sys.stderr)
            return 2
        _run(bench_workers(out, workers=counts, rounds=args.rounds, seconds=args.seconds,
                           connections=args.connections, streams=args.streams, client_nice=args.client_nice,
                           tokens=tokens, observed=args.observed))
        print((out / "workers.md").read_text())
        return 0
    if args.bench_command == "tune":
        from epp.bench.tunebench import TuneBenchOptions, bench_tune
        from epp.tuning.tune import TuneOptions

        out = Path(args.out)
        _run(bench_tune(out, TuneBenchOptions(
            preset=args.profile, servers=args.servers, workload=args.workload, load=args.load, requests=args.requests,
            capacity_rps=args.capacity_rps, capacity_basis=args.capacity_basis, max_seconds=args.max_seconds,
            tune=TuneOptions(objective=args.objective, seeds=args.seeds))))
        print((out / "tune-bench.md").read_text())
        return 0
    if args.bench_command == "routing":
        from epp.bench.routing import CONTENDERS, RoutingOptions, bench_routing
        from epp.bench.workloads import WORKLOADS, WorkloadParams

        configs = {}
        for item in args.epp_config:
            name, sep, path = item.partition("=")
            if not sep or not name or not Path(path).is_file():
                print(f"epp bench routing: --epp-config expects NAME=PATH to a file, got {item!r}", file=sys.stderr)
                return 2
            configs[name] = Path(path)
        # (each --epp-config NAME is the contender epp-NAME; named in --contenders too, it runs once)
        named = (*(c for c in args.contenders.split(",") if c), *(f"epp-{n}" for n in configs))
        contenders = tuple(dict.fromkeys(named))
        bad = [c for c in contenders if c not in CONTENDERS and not c.startswith("epp-")]
        if bad or args.workload not in WORKLOADS:
            print(f"epp bench routing: unknown contender(s) {bad} (known: {', '.join(CONTENDERS)}) or workload "
                  f"{args.workload!r} (known: {', '.join(WORKLOADS)})", file=sys.stderr)
            return 2
        try:
            loads = tuple(float(x) for x in args.loads.split(","))
        except ValueError:
            print(f"epp bench routing: --loads: expected numbers like 0.5,0.9, got {args.loads!r}", file=sys.stderr)
            return 2
        out = Path(args.out)
        _run(bench_routing(out, RoutingOptions(
            preset=args.profile, servers=args.servers, loads=loads, requests=args.requests, workload=args.workload,
            seed=args.seed, contenders=contenders, capacity_seconds=args.capacity_seconds,
            capacity_rps=args.capacity_rps, capacity_basis=args.capacity_basis, max_seconds=args.max_seconds,
            late_limit_ms=args.late_limit_ms, kill_replica_at=args.kill_replica_at,
            trace_file=Path(args.trace) if args.trace else None,
            params=WorkloadParams(groups=args.groups, prefix_tokens=args.prefix_tokens,
                                  output_tokens=args.output_tokens),
            progress=not args.no_progress, epp_configs=configs,
            baseline_src=Path(args.baseline_src) if args.baseline_src else None)))
        print((out / "routing.md").read_text())
        return 0
    if args.bench_command == "overload":
        from epp.bench.overload import SCENARIOS, OverloadOptions, bench_overload
        from epp.bench.workloads import WorkloadParams

        scenarios = tuple(s for s in args.scenarios.split(",") if s)
        bad = [s for s in scenarios if s not in SCENARIOS]
        if bad:
            print(f"epp bench overload: unknown scenario(s) {bad} (known: {', '.join(SCENARIOS)})", file=sys.stderr)
            return 2
        out = Path(args.out)
        _run(bench_overload(out, OverloadOptions(preset=args.profile, servers=args.servers, requests=args.requests,
                                                 seed=args.seed, scenarios=scenarios, peers=not args.no_peers,
                                                 ttl=args.ttl, capacity_rps=args.capacity_rps,
                                                 max_seconds=args.max_seconds, detector=args.detector,
                                                 ordering=args.ordering, workload=args.workload,
                                                 params=WorkloadParams(output_tokens=args.output_tokens))))
        print((out / "overload.md").read_text())
        return 0
    if args.bench_command == "pd":
        from epp.bench.pdbench import PDOptions, bench_pd
        from epp.bench.workloads import WorkloadParams

        if not 0 < args.prefill < args.servers:
            print("epp bench pd: --prefill must leave at least one decode pod", file=sys.stderr)
            return 2
        out = Path(args.out)
        _run(bench_pd(out, PDOptions(preset=args.profile, servers=args.servers, prefill=args.prefill, load=args.load,
                                     requests=args.requests, seed=args.seed, capacity_rps=args.capacity_rps,
                                     params=WorkloadParams(long_tokens=args.prompt_tokens, long_share=1.0,
                                                           output_tokens=args.output_tokens))))
        print((out / "pd.md").read_text())
        return 0
    if args.bench_command == "precise":
        from epp.bench.precisebench import Churn, bench_precise
        from epp.bench.simbench import Workload

        out = Path(args.out)
        _run(bench_precise(out, preset=args.profile, servers=args.servers, load=args.load, requests=args.requests,
                           capacity_seconds=args.capacity_seconds,
                           wl=Workload(groups=args.groups, prefix_tokens=args.prefix_tokens),
                           churn=Churn(args.side_fraction, args.restart_every, args.down_for)))
        print((out / "precise.md").read_text())
        return 0
    return 2


def _add_demo(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("demo", help="local stack: simulated fleet + epp + Envoy, traffic, explained picks")
    p.add_argument("--no-hold", action="store_true", help="exit after the traffic table (for CI)")
    p.add_argument("--log-level", default="warning")


def run_demo(args: argparse.Namespace) -> int:
    from epp.demo import run_demo as demo

    result = {"code": 0}

    async def main() -> None:
        result["code"] = await demo(hold=not args.no_hold)

    _run(main())
    return result["code"]


def _add_sim(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from epp.sim.profiles import PROFILES

    p = sub.add_parser("sim", help="run a simulated vLLM fleet",
                       description="Serve N simulated vLLM servers (OpenAI API, /metrics, KV events).")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--ports", help="ports, e.g. 8001-8004 or 8001,8002")
    where.add_argument("--count", type=int, help="number of servers (with --base-port)")
    p.add_argument("--base-port", type=int, default=8001)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--profile", default="fast", choices=sorted(PROFILES), help="latency/capacity preset")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-parallel", type=int, default=1, metavar="N",
                   help="each N consecutive ports are one pod's data-parallel ranks (any of them hands a request "
                   "to the rank named in x-data-parallel-host-port)")
    p.add_argument("--model", help="model name served")
    p.add_argument("--served-model-name", nargs="+", help="names the model answers to")
    p.add_argument("--lora-adapters", nargs="+", help="LoRA adapter names served")
    p.add_argument("--max-lora", type=int)
    p.add_argument("--block-size", type=int)
    p.add_argument("--num-gpu-blocks", type=int)
    p.add_argument("--max-num-seqs", type=int)
    p.add_argument("--max-num-batched-tokens", type=int)
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--prefill-overhead-ms", type=float)
    p.add_argument("--prefill-per-token-us", type=float)
    p.add_argument("--decode-base-ms", type=float)
    p.add_argument("--decode-per-seq-us", type=float)
    p.add_argument("--default-max-tokens", type=int)
    p.add_argument("--hash-seed", help="emulate PYTHONHASHSEED for the root block hash")
    p.add_argument("--kv-events-config",
                   help="vLLM's JSON; endpoint may use {port}, {port+N}, {index}, e.g. "
                        '\'{"enable_kv_cache_events": true, "publisher": "zmq", '
                        '"endpoint": "tcp://127.0.0.1:{port+1000}", "topic": "kv-events"}\'')
    p.add_argument("--log-level", default="info")


def sim_params(args: argparse.Namespace) -> object:
    from epp.sim.profiles import profile

    def scaled(v: float | None, k: float) -> float | None:
        return None if v is None else v * k

    return profile(args.profile).with_overrides(
        model=args.model,
        served_model_names=tuple(args.served_model_name) if args.served_model_name else None,
        lora_adapters=tuple(args.lora_adapters) if args.lora_adapters else None,
        max_lora=args.max_lora,
        block_size=args.block_size,
        num_gpu_blocks=args.num_gpu_blocks,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        enable_prefix_caching=False if args.no_prefix_caching else None,
        prefill_overhead_s=scaled(args.prefill_overhead_ms, 1e-3),
        prefill_per_token_s=scaled(args.prefill_per_token_us, 1e-6),
        decode_base_s=scaled(args.decode_base_ms, 1e-3),
        decode_per_seq_s=scaled(args.decode_per_seq_us, 1e-6),
        default_max_tokens=args.default_max_tokens,
        hash_seed=args.hash_seed,
    )


def run_sim(args: argparse.Namespace) -> int:
    from epp.sim.fleet import Fleet, parse_ports, serve_forever
    from epp.sim.kvevents import KVEventsConfig
    from epp.sim.profiles import EngineParams

    try:
        if args.ports:
            ports = parse_ports(args.ports)
        else:
            count = args.count or 4
            ports = list(range(args.base_port, args.base_port + count))
        params = sim_params(args)
        assert isinstance(params, EngineParams)
        kv = KVEventsConfig.parse(args.kv_events_config) if args.kv_events_config else None
    except ValueError as e:
        print(f"epp sim: {e}", file=sys.stderr)
        return 2
    fleet = Fleet(ports, params, host=args.host, seed=args.seed, kv_events=kv, data_parallel=args.data_parallel)
    _run(serve_forever(fleet))
    return 0


def _run(coro: Coroutine[Any, Any, object]) -> None:
    """Run on uvloop; SIGTERM (how Kubernetes stops a pod) and SIGINT cancel the main task, so
    servers shut down gracefully and child processes (Envoy in the demo) are stopped."""
    import asyncio
    import signal

    import uvloop

    async def main() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await coro

    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(main())



def _fleet_load_args(p: argparse.ArgumentParser, out: str, requests: int, capacity_seconds: float) -> None:
    """Arguments of the benchmarks that load a simulated fleet at a fraction of its capacity."""
    p.add_argument("--out", default=out)
    p.add_argument("--profile", default="h100-llama8b", help="simulator preset")
    p.add_argument("--servers", type=int, default=4)
    p.add_argument("--load", type=float, default=0.9, help="fraction of round-robin capacity")
    p.add_argument("--requests", type=int, default=requests)
    p.add_argument("--capacity-seconds", type=float, default=capacity_seconds)
    p.add_argument("--groups", type=int, default=120)
    p.add_argument("--prefix-tokens", type=int, default=8000)

def _add_record(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("record", help="write a trace of a running epp's requests (prompt hashes and token counts)")
    p.add_argument("--from", dest="source", required=True, metavar="URL",
                   help="the epp's metrics address, e.g. http://10.0.0.5:9090")
    p.add_argument("--out", required=True, help="the trace file (JSON lines)")
    p.add_argument("--seconds", type=float, default=60.0, help="stop after this long (default 60)")
    p.add_argument("--requests", type=int, default=0, help="stop after this many requests (default: no limit)")
    p.add_argument("--prompts", action="store_true",
                   help="include the prompt text (only from an epp started with --record-prompts)")
    p.add_argument("--token-file", help="bearer token for an epp whose /metrics requires one")


def run_record(args: argparse.Namespace) -> int:
    import asyncio
    from pathlib import Path

    from epp.tuning.record import RecordError, record_trace

    try:
        token = Path(args.token_file).read_text().strip() if args.token_file else None
    except OSError as e:
        print(f"epp record: {args.token_file}: cannot read the token file: {e.strerror}", file=sys.stderr)
        return 2
    try:
        summary = asyncio.run(record_trace(args.source, Path(args.out), seconds=args.seconds, requests=args.requests,
                                           prompts=args.prompts, token=token))
    except RecordError as e:
        print(f"epp record: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # the trace file cannot be written
        print(f"epp record: {args.out}: {e.strerror}", file=sys.stderr)
        return 2
    print(f"epp record: {summary.records} requests in {summary.seconds} s -> {summary.path}")
    return 0


def _add_tune(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("tune", help="replay a recorded trace (epp record) in virtual time against simulated engines "
                                    "and search the config's weights and parameters for the best TTFT")
    p.add_argument("--trace", required=True, help="the trace file (from epp record)")
    p.add_argument("--config", help="the current config (default: epp's default config)")
    p.add_argument("--out", default="tune-results", help="where tune.json, tune.md, tune.png and best-config.yaml go")
    p.add_argument("--axis", action="append", default=[], metavar="PLUGIN.weight=V1,V2|PLUGIN.PARAM=V1,V2",
                   help="something to vary (repeatable; default: every scorer's weight over 0,1,2,3,5)")
    p.add_argument("--candidate", action="append", default=[], metavar="FILE",
                   help="a whole config to compare too (repeatable), e.g. epp/profiles/recommended.yaml")
    p.add_argument("--objective", default="p90", choices=("p50", "p90", "p99", "mean"), help="TTFT to minimise")
    p.add_argument("--search", default="descent", choices=("descent", "grid"),
                   help="coordinate descent from the current config (default) or every combination")
    p.add_argument("--rounds", type=int, default=2, help="descent: passes over the axes (default 2)")
    p.add_argument("--seeds", type=int, default=2, help="replays per config, averaged (default 2)")
    p.add_argument("--confirm-seeds", type=int, default=4,
                   help="more replays of the winner and the current config before the winner is kept (default 4)")
    p.add_argument("--workers", type=int, default=0, help="replay processes (default: one per core)")
    p.add_argument("--engine", default="h100-llama8b",
                   help="the simulator preset the engines start from (its speed is replaced by the trace's)")
    p.add_argument("--speed", default="measured", choices=("measured", "preset"),
                   help="the engines' speed: measured from the trace's responses (default) or the preset's")
    p.add_argument("--servers", type=int, help="engines to replay on (default: the recorded pool's endpoints)")
    p.add_argument("--refresh-metrics-interval", type=parse_duration, default=0.05,
                   help="how often the replay feeds the engines' metrics to the picker, as epp serve's flag "
                        "(default 50ms)")


def run_tune(args: argparse.Namespace) -> int:
    from pathlib import Path

    from epp.config import DEFAULT_CONFIG
    from epp.tuning.replay import ReplayError, ReplayOptions
    from epp.tuning.trace import TraceError
    from epp.tuning.tune import OBJECTIVES, TuneError, TuneOptions, parse_axis, tune

    try:
        if args.config:
            try:
                text, source = Path(args.config).read_text(), args.config
            except OSError as e:
                raise TuneError(f"{args.config}: cannot read the config: {e.strerror}") from None
        else:
            text, source = DEFAULT_CONFIG, "<default config>"
        candidates = []
        for path in args.candidate:
            try:
                candidates.append((Path(path).name, Path(path).read_text()))
            except OSError as e:
                raise TuneError(f"{path}: cannot read the candidate config: {e.strerror}") from None
        if args.seeds < 1 or args.rounds < 1 or args.confirm_seeds < 0:
            raise TuneError("--seeds and --rounds are >= 1, --confirm-seeds >= 0")
        opts = TuneOptions(args.objective, args.search, args.rounds, args.seeds, args.confirm_seeds,
                           args.workers, ReplayOptions(refresh_s=args.refresh_metrics_interval))
        result = tune(Path(args.trace), Path(args.out), text, source, [parse_axis(a) for a in args.axis], opts,
                      args.engine, args.servers, args.speed == "measured",
                      progress=lambda m: print(f"epp tune: {m}", file=sys.stderr), candidates=candidates)
    except (TuneError, TraceError, ReplayError, ValueError) as e:
        print(f"epp tune: {e}", file=sys.stderr)
        return 2
    key = OBJECTIVES[args.objective]
    cur, best = result["current"], result["best"]
    print(f"current: {cur['config']}: TTFT p50 {cur['ttft_p50_s']} s, p90 {cur['ttft_p90_s']} s, "
          f"p99 {cur['ttft_p99_s']} s, hit rate {cur['prefix_hit_rate']}, imbalance {cur['load_imbalance']}")
    print(f"best:    {best['config']}: TTFT p50 {best['ttft_p50_s']} s, p90 {best['ttft_p90_s']} s, "
          f"p99 {best['ttft_p99_s']} s, hit rate {best['prefix_hit_rate']}, imbalance {best['load_imbalance']}")
    change = (best[key] / cur[key] - 1) * 100 if cur[key] else 0.0
    print(f"{args.objective}: {change:+.1f}%; the config -> {Path(args.out) / 'best-config.yaml'} "
          f"(and tune.md, tune.json, tune.png)")
    return 0


def _add_gateway(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("gateway", help="the whole front door: a real Envoy (TLS, retries, timeouts) + the picker "
                                       "(API keys, limits, routing, metering), from one gateway config")
    p.add_argument("-c", "--config", required=True, help="the gateway config (YAML; see the README)")
    p.add_argument("--print-config", action="store_true", help="print the Envoy bootstrap it would run, and exit")
    p.add_argument("--workdir", default=None, help="where the bootstrap, Envoy's log and the EDS file go "
                                                   "(default: a new directory under /tmp)")
    p.add_argument("--timeout-scale", type=float, default=1.0, help=argparse.SUPPRESS)  # tests: 300 s in 3 s
    p.add_argument("--log-level", default="info")


def run_gateway(args: argparse.Namespace) -> int:
    import tempfile
    from pathlib import Path

    from epp.gateway import run
    from epp.gateway.config import load_gateway_config
    from epp.scheduling.types import ConfigError

    try:
        cfg = load_gateway_config(args.config)
        if not 0 < args.timeout_scale <= 1:
            raise ValueError("--timeout-scale: expected a number in (0, 1]")
        if args.timeout_scale != 1:
            cfg = cfg.scaled(args.timeout_scale)
        workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="epp-gateway-"))
        if args.print_config:
            print(run.print_config(cfg, workdir), end="")
            if any(x.tls for x in cfg.listeners):
                print(f"epp gateway: the TLS listeners' SDS files are in {workdir}", file=sys.stderr)
            return 0
        opts = run.serve_options(cfg)
    except (ConfigError, ValueError) as e:
        print(f"epp gateway: {e}", file=sys.stderr)
        return 2
    try:
        _run(run.run_forever(cfg, workdir, opts))
    except (RuntimeError, ValueError, OSError) as e:
        print(f"epp gateway: {e}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="epp", description="Endpoint picker for LLM inference gateways.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve(sub)
    _add_sim(sub)
    _add_config(sub)
    _add_pick(sub)
    _add_bench(sub)
    _add_demo(sub)
    _add_gateway(sub)
    _add_record(sub)
    _add_tune(sub)
    return parser


COMMANDS = ("serve", "sim", "config", "pick", "bench", "demo", "gateway", "record", "tune")


def main(argv: Sequence[str] | None = None) -> int:
    """``epp [serve] FLAGS...``: with no command, or flags first (a container's args), epp serves."""
    given = list(sys.argv[1:] if argv is None else argv)
    if not given or (given[0] not in COMMANDS and given[0] not in ("-h", "--help")):
        given.insert(0, "serve")
    parser = build_parser()
    args = parser.parse_args(given)
    if args.command == "serve":
        from epp.observability.logs import configure, level_of

        try:
            devel = args.zap_devel and args.zap_log_level is None and args.log_level is None
            level = logging.DEBUG if devel else level_of(args.zap_log_level, args.log_level, args.v)
            configure(level, args.zap_encoder, args.zap_time_encoding)
        except ValueError as e:
            print(f"epp serve: {e}", file=sys.stderr)
            return 2
        return run_serve(args)
    logging.basicConfig(level=(getattr(args, "log_level", None) or "info").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "sim":
        return run_sim(args)
    if args.command == "config":
        return run_config(args)
    if args.command == "pick":
        return run_pick(args)
    if args.command == "bench":
        return run_bench(args)
    if args.command == "demo":
        return run_demo(args)
    if args.command == "gateway":
        return run_gateway(args)
    if args.command == "record":
        return run_record(args)
    if args.command == "tune":
        return run_tune(args)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
