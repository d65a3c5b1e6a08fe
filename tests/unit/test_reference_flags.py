"""The reference's command line and config dialect: what epp honours, and what it refuses by name."""

from __future__ import annotations

import argparse
import logging
import ssl
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from epp.cli import build_parser, main, parse_size
from epp.config import DEFAULT_CONFIG, parse_config
from epp.datastore.endpoint import EndpointState, EngineSignals
from epp.datastore.store import Snapshot
from epp.observability.logs import JsonFormatter, level_of
from epp.scheduling.types import ConfigError
from epp.server.tls import TLSPolicy


def epp(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "epp.cli", *args], capture_output=True, text=True, timeout=60)


def serve_args(*args: str) -> argparse.Namespace:
    return build_parser().parse_args(["serve", *args])


def test_bool_flags_take_the_bare_form_and_a_value() -> None:
    a = serve_args("--ha-enable-leader-election", "--secure-serving=false", "--emit-endpoint-scores",
                   "--grpc-health-port", "9003")
    assert a.ha_enable_leader_election is True and a.secure_serving is False and a.emit_endpoint_scores is True
    assert a.grpc_health_port == 9003
    assert serve_args().ha_enable_leader_election is False and serve_args().secure_serving is True
    assert serve_args("--ha-enable-leader-election=false").ha_enable_leader_election is False


@pytest.mark.parametrize(("text", "value"), [("4194304", 4194304), ("10Mi", 10 << 20), ("10MiB", 10 << 20),
                                             ("25MB", 25_000_000), ("1e6", 1_000_000), ("64Ki", 65536)])
def test_sizes_are_read_as_the_reference_reads_them(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "x", "-5", "1.5", "10Xi", "0"])
def test_bad_sizes_are_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_size(text)


def test_no_command_means_serve_and_refused_flags_are_named() -> None:
    r = epp("--endpoints", "127.0.0.1:1", "--health-checking=true", "--enable-pprof=true", "--metrics-cert-dir", "/x")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines == [
        "epp serve: --enable-pprof=true is not supported by epp: epp has no pprof endpoint (profile it with py-spy)",
        "epp serve: --health-checking=true is not supported by epp: epp does not health-check the model servers "
        "(a failing scrape takes a pod out)",
        "epp serve: --metrics-cert-dir is not supported by epp: /metrics has no TLS in epp (use a bearer token: "
        "--metrics-token-file)"]
    r = epp("--v=3", "--zap-encoder", "json", "--total-queued-requests-metric", "x")
    assert r.returncode == 2 and "deprecated in the reference" in r.stderr
    r = epp("--help")
    assert r.returncode == 0 and "serve" in r.stdout and "bench" in r.stdout  # the top-level help


def test_config_text_and_config_file_exclude_each_other(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(DEFAULT_CONFIG)
    r = epp("--endpoints", "127.0.0.1:1", "--config-file", str(f), "--config-text", DEFAULT_CONFIG)
    assert r.returncode == 2 and "not both" in r.stderr
    r = epp("--endpoints", "127.0.0.1:1", "--config-text", "plugins: [broken")
    assert r.returncode == 2 and r.stderr.startswith("epp serve: --config-text: line 1")


@pytest.mark.parametrize(("zap", "log_level", "v", "level"), [
    (None, None, None, logging.INFO), (None, None, 4, logging.DEBUG), (None, None, 3, logging.INFO),
    ("debug", None, None, logging.DEBUG), ("error", "debug", 5, logging.ERROR), ("5", None, None, logging.DEBUG),
    (None, "warning", 5, logging.WARNING)])
def test_log_level_from_zap_then_ours_then_klog(zap: str | None, log_level: str | None, v: int | None,
                                                level: int) -> None:
    assert level_of(zap, log_level, v) == level


def test_bad_logging_flags_are_errors_that_name_them() -> None:
    assert main(["--zap-log-level", "loud"]) == 2
    assert main(["--zap-encoder", "xml"]) == 2
    with pytest.raises(ValueError, match="--zap-log-level"):
        level_of("loud", None, None)


def test_json_log_lines_carry_zaps_keys() -> None:
    record = logging.LogRecord("epp.director", logging.WARNING, __file__, 7, "refused %s", ("r1",), None)
    line = orjson.loads(JsonFormatter("iso8601").format(record))
    assert line["level"] == "warn" and line["logger"] == "epp.director" and line["msg"] == "refused r1"
    assert line["ts"].endswith("Z") and line["caller"].endswith(":7")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        record.exc_info = sys.exc_info()
    assert "RuntimeError: boom" in orjson.loads(JsonFormatter().format(record))["error"]


def test_a_json_encoded_epp_logs_json_lines() -> None:
    r = epp("--zap-encoder=json", "--endpoints", "127.0.0.1:1", "--config-file", "/nonexistent.yaml")
    assert r.returncode == 2  # the flag error itself is plain text on stderr; log lines are JSON
    r = subprocess.run([sys.executable, "-c", "import logging, sys\nfrom epp.observability.logs import configure\n"
                        "configure(logging.INFO, 'json')\nlogging.getLogger('epp').info('hello')"],
                       capture_output=True, text=True, timeout=30)
    assert orjson.loads(r.stderr.strip())["msg"] == "hello"


def test_tls_policy_applies_the_minimum_version_and_maps_cipher_names() -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    TLSPolicy("VersionTLS13").apply(ctx)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    TLSPolicy(cipher_suites=("TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256", "TLS_AES_128_GCM_SHA256")).apply(ctx)
    tls12 = {c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"}
    assert tls12 == {"ECDHE-RSA-AES128-GCM-SHA256"}
    with pytest.raises(ValueError, match="--tls-min-version"):
        TLSPolicy("TLS1.3")
    with pytest.raises(ValueError, match="TLS_RSA_WITH_RC4_128_SHA"):
        TLSPolicy(cipher_suites=("TLS_RSA_WITH_RC4_128_SHA",))


# -- config dialect ----------------------------------------------------------------------------------------
CURRENT = DEFAULT_CONFIG.replace("inference.networking.x-k8s.io/v1alpha1", "llm-d.ai/v1alpha1")


def test_the_current_api_version_and_the_older_ones_load() -> None:
    for api in ("llm-d.ai/v1alpha1", "inference.networking.x-k8s.io/v1alpha1", "inference.networking.k8s.io/v1alpha1"):
        assert parse_config(DEFAULT_CONFIG.replace("inference.networking.x-k8s.io/v1alpha1", api)).scorer_refs


@pytest.mark.parametrize(("gates", "message"), [
    ("[haPopulateNonLeaderDatastore=false]", "haPopulateNonLeaderDatastore=false is not supported"),
    ("[bogus]", "feature gate 'bogus' is unknown"),
    ("[flowControl=maybe]", "not a valid value for the feature gate flowControl"),
])
def test_feature_gates_are_validated_against_the_references_names(gates: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(CURRENT + f"featureGates: {gates}\n")


def test_feature_gates_epp_honours_are_accepted() -> None:
    assert parse_config(CURRENT + "featureGates: [haPopulateNonLeaderDatastore, flowControl=false]\n").flow is None
    assert parse_config(CURRENT + "featureGates: [flowControl]\n").flow is not None


@pytest.mark.parametrize("section", ["dataLayer: {peerDiscovery: {pluginRef: d}}", "data: {}",
                                     "requestHandler: {parsers: [{pluginRef: vllmgrpc-parser}]}"])
def test_sections_epp_cannot_honour_are_refused_not_ignored(section: str) -> None:
    with pytest.raises(ConfigError, match="not supported by epp"):
        parse_config(CURRENT + section + "\n")


def test_the_early_2026_threshold_form_is_a_utilization_detector() -> None:
    cfg = parse_config(CURRENT + "saturationDetector: {queueDepthThreshold: 5, metricsStalenessThreshold: 500ms}\n")
    detector = cfg.plugins[cfg.detector_ref].instance
    assert (detector.type_name, detector.queue_depth, detector.staleness) == ("utilization-detector", 5, 0.5)

    def snap(*ages: float) -> Snapshot:
        eps = tuple(EndpointState(f"a{i}", EngineSignals(), scraped_at=10.0 - age) for i, age in enumerate(ages))
        return Snapshot(eps, {}, {}, 10.0, 2.0)

    assert detector.saturation(snap(0.6, 0.7), snap(0.6, 0.7).endpoints) == 1.0  # all stale: fail-closed
    assert detector.saturation(snap(0.6, 0.1), snap(0.6, 0.1).endpoints) == 0.5  # one stale, one idle
    assert detector.saturation(snap(), ()) == 1.0  # an empty pool reads saturated, as the reference's
