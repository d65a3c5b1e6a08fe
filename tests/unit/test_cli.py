"""The `epp` command line: flags, validation, and `epp sim` from the installed package."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from epp.cli import build_parser, parse_bool, parse_duration
from epp.config import DEFAULT_CONFIG, precise_config
from epp.stack.local import free_port


def epp(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "epp.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_durations_and_booleans() -> None:
    assert parse_duration("50ms") == pytest.approx(0.05)
    assert parse_duration("2s") == 2.0 and parse_duration("1m") == 60.0 and parse_duration("1.5s") == 1.5
    for bad in ("50", "fast", "-1s", "0s"):
        with pytest.raises(Exception, match="duration"):
            parse_duration(bad)
    assert parse_bool("true") and not parse_bool("false")


def test_serve_flags_and_defaults() -> None:
    args = build_parser().parse_args(["serve", "--endpoints", "127.0.0.1:8000"])
    assert (args.grpc_port, args.grpc_health_port, args.metrics_port) == (9002, 9003, 9090)
    assert args.secure_serving is True and args.refresh_metrics_interval == pytest.approx(0.05)
    assert args.metrics_staleness_threshold == 2.0
    args = build_parser().parse_args(["serve", "--endpoints", "a:1", "--secure-serving=false",
                                      "--refresh-metrics-interval", "100ms", "--metrics-staleness-threshold", "5s"])
    assert args.secure_serving is False and args.refresh_metrics_interval == pytest.approx(0.1)


def test_serve_refuses_bad_input_clearly(tmp_path: Path) -> None:
    r = epp("serve", "--endpoints", "not-an-address")
    assert r.returncode == 2 and "HOST:PORT" in r.stderr
    r = epp("serve")
    assert r.returncode == 2 and "--endpoints" in r.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("plugins:\n- type: magic\nschedulingProfiles: [{name: d}]\n")
    r = epp("serve", "--endpoints", "127.0.0.1:1", "--config-file", str(bad))
    assert r.returncode == 2 and f"{bad}: plugins[0].type" in r.stderr
    discovery = tmp_path / "discovery.yaml"
    discovery.write_text("apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n"
                         "- {type: file-discovery, parameters: {path: /tmp/x.yaml}}\n- type: queue-scorer\n"
                         "dataLayer: {discovery: {pluginRef: file-discovery}}\n"
                         "schedulingProfiles: [{name: d, plugins: [{pluginRef: queue-scorer}]}]\n")
    r = epp("serve", "--endpoints", "127.0.0.1:1", "--config-file", str(discovery))
    assert r.returncode == 2 and "dataLayer.discovery and a flag" in r.stderr and "Traceback" not in r.stderr


def test_record_refuses_bad_input_clearly(tmp_path: Path) -> None:
    r = epp("record", "--from", "http://127.0.0.1:1", "--out", str(tmp_path / "t.jsonl"), "--token-file", "/nope")
    assert r.returncode == 2 and "/nope: cannot read the token file" in r.stderr and "Traceback" not in r.stderr
    r = epp("record", "--from", "http://127.0.0.1:1", "--out", str(tmp_path / "t.jsonl"), "--seconds", "1")
    assert r.returncode == 1 and "cannot reach http://127.0.0.1:1/record" in r.stderr and "Traceback" not in r.stderr
    r = epp("serve", "--endpoints", "127.0.0.1:1", "--shadow-config", str(tmp_path / "missing.yaml"))
    assert r.returncode != 0 and "cannot read the shadow config" in r.stderr and "Traceback" not in r.stderr


def test_limits_and_auth_flags(tmp_path: Path) -> None:
    args = build_parser().parse_args(["serve", "--endpoints", "a:1"])
    assert (args.grpc_max_recv_msg_size, args.grpc_max_header_list_size, args.max_scrape_bytes) == (
        64 << 20, 64 << 10, 4 << 20)
    assert args.drain_timeout == 30.0 and args.metrics_endpoint_auth is False
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--endpoints", "a:1", "--max-scrape-series", "0"])
    r = epp("serve", "--endpoints", "127.0.0.1:1", "--metrics-endpoint-auth=true")
    assert r.returncode == 2 and "--metrics-token-file" in r.stderr and "Traceback" not in r.stderr
    r = epp("serve", "--endpoints", "127.0.0.1:1", "--pick-api-token-file", str(tmp_path / "missing"),
            "--secure-serving=false", "--grpc-port", "0", "--grpc-health-port", "0", "--metrics-port", "0")
    assert r.returncode == 2 and "cannot read the token file" in r.stderr and "Traceback" not in r.stderr


def test_config_validate(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(DEFAULT_CONFIG)
    r = epp("config", "validate", str(good))
    assert r.returncode == 0 and "valid" in r.stdout and "prefix-cache-scorer x3" in r.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(DEFAULT_CONFIG.replace("weight: 3", "weight: heavy"))
    r = epp("config", "validate", str(bad))
    assert r.returncode == 1 and "schedulingProfiles[0].plugins[2].weight" in r.stderr


def test_a_tokenizer_that_cannot_load_is_a_one_line_error_for_validate_and_serve(tmp_path: Path) -> None:
    """Parsing does no I/O; the build loads the tokenizer, and its error still names file and field."""
    cfg = tmp_path / "precise.yaml"
    cfg.write_text(precise_config(str(tmp_path / "no-tokenizer"), "tcp://127.0.0.1:1"))
    r = epp("config", "validate", str(cfg))
    assert r.returncode == 1 and f"{cfg}: plugins[2].parameters.tokenizer" in r.stderr, r.stderr
    r = epp("serve", "--endpoints", "127.0.0.1:1", "--config-file", str(cfg), "--secure-serving=false",
            "--grpc-port", "0", "--grpc-health-port", "0", "--metrics-port", "0")
    assert r.returncode == 2 and f"{cfg}: plugins[2].parameters.tokenizer" in r.stderr
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr


def _wait_health(port: int) -> None:
    deadline = time.monotonic() + 20
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                assert r.status == 200
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _two_consecutive_free_ports() -> int:
    import socket

    for _ in range(100):
        base = free_port()
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", base))
                b.bind(("127.0.0.1", base + 1))
            return base
        except OSError:
            continue
    raise RuntimeError("no two consecutive free ports")


def test_sim_runs_from_the_installed_package() -> None:
    port = free_port()
    base = _two_consecutive_free_ports()
    proc = subprocess.Popen([sys.executable, "-m", "epp.cli", "sim", "--ports", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    counted = subprocess.Popen([sys.executable, "-m", "epp.cli", "sim", "--count", "2", "--base-port", str(base)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_health(port)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            assert b"vllm:num_requests_waiting" in r.read()
        _wait_health(base)
        _wait_health(base + 1)
    finally:
        for p in (proc, counted):
            p.terminate()
            p.wait(10)
    r = epp("sim", "--ports", "9-3")
    assert r.returncode == 2 and "bad port range" in r.stderr


def test_serve_stops_gracefully_on_sigterm() -> None:
    import signal

    sim_port, grpc_port, health_port, metrics_port = (free_port() for _ in range(4))
    sim = subprocess.Popen([sys.executable, "-m", "epp.cli", "sim", "--ports", str(sim_port)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    serve = subprocess.Popen([sys.executable, "-m", "epp.cli", "serve", "--endpoints", f"127.0.0.1:{sim_port}",
                              "--secure-serving=false", "--host", "127.0.0.1", "--grpc-port", str(grpc_port),
                              "--grpc-health-port", str(health_port), "--metrics-port", str(metrics_port)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        serve.send_signal(signal.SIGTERM)
        out, _ = serve.communicate(timeout=10)
        assert serve.returncode == 0, out
        assert "Traceback" not in out
    finally:
        for p in (serve, sim):
            if p.poll() is None:
                p.kill()
        sim.wait(5)


def test_metrics_auth_without_a_token_file_needs_kubernetes() -> None:
    r = epp("serve", "--endpoints", "127.0.0.1:1", "--metrics-endpoint-auth")
    assert r.returncode == 2 and "TokenReview" in r.stderr and "--metrics-token-file" in r.stderr


def test_tune_refuses_bad_input_clearly_and_tunes_a_small_trace(tmp_path: Path) -> None:
    from tests.unit.test_tune import write_trace

    r = epp("tune", "--trace", str(tmp_path / "missing.jsonl"))
    assert r.returncode == 2 and "missing.jsonl: cannot read the trace" in r.stderr and "Traceback" not in r.stderr
    trace = write_trace(tmp_path / "t.jsonl", n=60, rate=30)
    r = epp("tune", "--trace", str(trace), "--axis", "prefix-cache-scorer.weight=x")
    assert r.returncode == 2 and "weights are numbers >= 0" in r.stderr and "Traceback" not in r.stderr
    precise = tmp_path / "precise.yaml"
    precise.write_text(precise_config("sim", "tcp://127.0.0.1:5557"))
    r = epp("tune", "--trace", str(trace), "--config", str(precise))
    assert r.returncode == 2 and "precise-prefix-cache-scorer" in r.stderr and "cannot be replayed" in r.stderr
    out = tmp_path / "out"
    r = epp("tune", "--trace", str(trace), "--out", str(out), "--axis", "prefix-cache-scorer.weight=0,3",
            "--seeds", "1", "--workers", "1", timeout=120)
    assert r.returncode == 0, r.stderr
    assert "best:    prefix-cache-scorer.weight=3" in r.stdout and (out / "best-config.yaml").is_file()
    assert "60 requests over" in r.stderr  # progress goes to stderr


def test_tune_and_bench_pool_read_the_refresh_interval_as_serve_does() -> None:
    args = build_parser().parse_args(["tune", "--trace", "t.jsonl", "--refresh-metrics-interval", "100ms"])
    assert args.refresh_metrics_interval == pytest.approx(0.1)
    args = build_parser().parse_args(["bench", "pool", "--refresh-metrics-interval", "2s"])
    assert args.refresh_metrics_interval == 2.0
    with pytest.raises(SystemExit):
        build_parser().parse_args(["tune", "--trace", "t.jsonl", "--refresh-metrics-interval", "0.05"])


def test_a_taken_grpc_port_is_a_one_line_error_with_and_without_workers() -> None:
    import socket

    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        for workers in ("0", "1"):
            r = epp("serve", "--endpoints", "127.0.0.1:1", "--secure-serving=false", "--host", "127.0.0.1",
                    "--grpc-port", str(port), "--grpc-health-port", str(free_port()), "--metrics-port",
                    str(free_port()), "--workers", workers)
            assert r.returncode == 1, r.stderr
            assert "cannot serve" in r.stderr and "Traceback" not in r.stderr
    finally:
        holder.close()
