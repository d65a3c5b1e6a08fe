"""The gateway's parts without traffic: its config (strict, file and field in every error), the
bootstrap (checked by the real Envoy's validate mode), ejections, metering, /v1/models answers
and the per-key concurrency slot."""

from __future__ import annotations

import asyncio
import gc
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
import yaml
from prometheus_client import CollectorRegistry

from epp.gateway.bootstrap import eds_document, render, timeouts, write_sds
from epp.gateway.config import GatewayConfigError, parse_gateway_config
from epp.requestcontrol.apikeys import ApiKey, digest_of, parse_keys_file
from epp.requestcontrol.ejections import Ejections
from epp.requestcontrol.metering import Metering, UsageRecord
from epp.requestcontrol.models import models_answer
from epp.requestcontrol.ratelimits import RateLimits
from epp.requestcontrol.refused import LocalAnswer, Refused
from epp.server.tls import self_signed
from epp.stack import envoy

STATIC = "servers: {static: [127.0.0.1:8001, 127.0.0.1:8002]}\n"


@pytest.mark.parametrize(("text", "message"), [
    ("listeners: [{port: 80}]\n", "servers: required"),
    ("servers: {static: [a:1], endpointsFile: /x}\n", "give exactly one of static"),
    ("servers: {static: [nohost]}\n", "servers.static[0]"),
    (STATIC + "timeouts: {connect: 10}\n", "timeouts.connect: duration '10' needs a unit"),
    (STATIC + "timeouts: {upstreamIdle: 300s, request: 10s}\n", "timeouts.request: shorter than upstreamIdle"),
    (STATIC + "retries: {attempts: 0}\n", "retries.attempts: expected an integer in [1, 10]"),
    (STATIC + "retries: {statusCodes: [200]}\n", "retries.statusCodes"),
    (STATIC + "listeners: [{port: 8443, tls: {certFile: /nope.crt, keyFile: /nope.key}}]\n",
     "listeners[0].tls.certFile: no such file"),
    (STATIC + "listeners: [{port: 8443, tls: {certFile: /nope.crt}}]\n", "give both certFile and keyFile"),
    (STATIC + "listeners: [{port: 80}, {port: 80}]\n", "two listeners on the same address and port"),
    (STATIC + "circuitBreaker: {consecutiveFailure: 5}\n", "circuitBreaker.consecutiveFailure: unknown field"),
    (STATIC + "colour: blue\n", "colour: unknown field"),
    (STATIC + "metering: {log: 3}\n", "metering.log"),
    ("servers: [\n", "invalid YAML"),
    ("servers: {static: [127.0.0.1:1], apiKeyFile: /nope}\n", "servers.apiKeyFile: no such file"),
])
def test_config_errors_name_the_file_and_field(text: str, message: str) -> None:
    with pytest.raises(GatewayConfigError) as e:
        parse_gateway_config(text, "gw.yaml")
    assert str(e.value).startswith("gw.yaml: ") and message in str(e.value)


def test_config_defaults_are_the_seeds() -> None:
    cfg = parse_gateway_config(STATIC, "gw.yaml")
    t = cfg.timeouts
    assert (t.connect, t.upstream_idle, t.listener_idle, t.request) == (10.0, 300.0, 300.0, 0.0)
    assert (cfg.retries.attempts, cfg.retries.backoff, cfg.retries.status_codes) == (3, 0.1, (502, 503, 504, 429))
    assert (cfg.circuit_breaker.consecutive_failures, cfg.circuit_breaker.ejection_time) == (5, 30.0)
    assert cfg.metering.log == "stdout" and cfg.listeners[0].port == 8080
    scaled = cfg.scaled(0.01)
    assert scaled.timeouts.upstream_idle == pytest.approx(3.0) and scaled.scale == pytest.approx(0.01)


def test_timeout_chain_outlasts_every_attempt_and_the_longest_wait() -> None:
    cfg = parse_gateway_config(STATIC, "gw.yaml")
    chain = timeouts(cfg, longest_wait=60.0)
    assert chain["stream_idle"] >= 60 + 3 * (10 + 300)  # queued, then three silent attempts
    assert chain["picker"] >= chain["stream_idle"] and chain["message"] >= 70


def _validate(tmp_path: Path, bootstrap: dict[str, object]) -> None:
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(bootstrap))
    ok, out = envoy.validate(path)
    assert ok, out


def test_bootstraps_validate_in_the_real_envoy(tmp_path: Path) -> None:
    key, cert = self_signed(("localhost",))
    (tmp_path / "tls.crt").write_bytes(cert)
    (tmp_path / "tls.key").write_bytes(key)
    tls = f"{{certFile: {tmp_path / 'tls.crt'}, keyFile: {tmp_path / 'tls.key'}}}"
    tls_cfg = parse_gateway_config(STATIC + f"listeners: [{{port: 8443, tls: {tls}}}, {{port: 8080, http2: false}}]\n",
                                   "gw.yaml")
    _validate(tmp_path, render(tls_cfg))
    write_sds(tls_cfg, tmp_path)  # certificates through filesystem SDS (reloaded when renewed)
    _validate(tmp_path, render(tls_cfg, sds_dir=tmp_path))
    eds = tmp_path / "eds" / "endpoints.eds.yaml"
    eds.parent.mkdir()
    eds.write_text(eds_document(["127.0.0.1:8001"], 1))
    b = render(parse_gateway_config("servers: {endpointsFile: /etc/epp/endpoints.yaml}\n", "gw.yaml"), eds_path=eds,
               longest_wait=60.0)
    _validate(tmp_path, b)
    pool = next(c for c in b["static_resources"]["clusters"] if c["name"] == "inference_pool")  # type: ignore[index]
    assert pool["type"] == "EDS"
    with pytest.raises(ValueError, match="eds_path"):
        render(parse_gateway_config("servers: {pool: {name: vllm}}\n", "gw.yaml"))


def test_print_config_prints_what_envoy_accepts(tmp_path: Path) -> None:
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(STATIC + "retries: {attempts: 2}\n")
    out = subprocess.run([sys.executable, "-m", "epp.cli", "gateway", "-c", str(cfg), "--print-config",
                          "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    bootstrap = yaml.safe_load(out.stdout)
    route = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"][
        "route_config"]["virtual_hosts"][0]["routes"][0]["route"]
    assert route["retry_policy"]["num_retries"] == 1 and route["retry_policy"]["per_try_idle_timeout"] == "300.000s"
    _validate(tmp_path, bootstrap)
    bad = subprocess.run([sys.executable, "-m", "epp.cli", "gateway", "-c", str(tmp_path / "missing.yaml")],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "cannot read the gateway config" in bad.stderr and "Traceback" not in bad.stderr


def test_ejections_follow_consecutive_failures() -> None:
    now = [0.0]
    e = Ejections(3, 30.0, lambda: now[0])
    e.outcome(["a", "b"], "b", 200)  # a failed over to b
    e.outcome(["a", "b"], "b", 200)
    e.outcome(["a"], "a", 200)  # a success resets a's count
    e.outcome(["a", "b"], "b", 200)
    e.outcome(["a", "b"], "b", 200)
    assert e.excluded() == frozenset()
    e.outcome(["a", "b", "c"], "c", 503)  # a third failure of a; b and c fail once
    assert e.excluded() == {"a"}
    now[0] = 31.0
    assert e.excluded() == frozenset()
    e.forget("b")
    assert "b" not in e.failures


async def test_metering_writes_lines_in_batches(tmp_path: Path) -> None:
    log = tmp_path / "usage.jsonl"
    m = Metering(str(log))
    m.record(UsageRecord("r1", "t", "k", "m", "e", 200))
    m.record(UsageRecord("r2", "t", "k", "m", "e", 200))
    assert log.read_bytes() == b""  # buffered...
    await asyncio.sleep(0.2)
    assert len(log.read_bytes().splitlines()) == 2  # ...for at most 100 ms
    m.record(UsageRecord("r3", "t", "k", "m", "e", 200))
    m.close()  # and flushed at shutdown
    assert len(log.read_bytes().splitlines()) == 3


def test_metering_counts_and_writes_lines(tmp_path: Path) -> None:
    log = tmp_path / "usage.jsonl"
    m = Metering(str(log))
    m.record(UsageRecord("r1", "team", "k1", "llama", "10.0.0.1:8000", 200, 10, 5, 4, 0.05, 0.2, True))
    m.record(UsageRecord("r2", "", "", "", "", 401))
    m.close()
    reg = CollectorRegistry()
    reg.register(m)
    lines = [orjson.loads(x) for x in log.read_bytes().splitlines()]
    assert [x["status"] for x in lines] == [200, 401]
    assert lines[0]["ttft_ms"] == 50.0 and lines[0]["cached_tokens"] == 4 and lines[1]["ttft_ms"] is None
    labels = {"tenant": "team", "key_id": "k1", "model": "llama", "endpoint": "10.0.0.1:8000"}
    assert reg.get_sample_value("epp_usage_prompt_tokens_total", labels) == 10
    assert reg.get_sample_value("epp_usage_requests_total", {**labels, "status": "200"}) == 1


def test_models_answers() -> None:
    listing = [{"id": "org/model-a", "object": "model"}]
    ok = models_answer({":method": "GET"}, "/v1/models?x=1", lambda: listing)
    assert isinstance(ok, LocalAnswer) and orjson.loads(ok.body())["data"] == listing
    one = models_answer({":method": "GET"}, "/v1/models/org%2Fmodel-a", lambda: listing)
    assert one is not None and orjson.loads(one.body())["id"] == "org/model-a"
    with pytest.raises(Refused) as e:
        models_answer({":method": "GET"}, "/v1/models/nope", lambda: listing)
    assert e.value.status == 404
    assert models_answer({":method": "POST"}, "/v1/models", lambda: listing) is None
    assert models_answer({":method": "GET"}, "/v1/chat/completions", lambda: listing) is None


def test_concurrency_slots_are_given_back_exactly_once() -> None:
    limits = RateLimits(lambda: 0.0)
    key = ApiKey("k", digest_of("x" * 16), "t", concurrency=2)

    class Owner:
        pass

    a, b = Owner(), Owner()
    slot_a = limits.acquire(key, a)
    limits.acquire(key, b)
    with pytest.raises(Refused) as e:
        limits.acquire(key, Owner())
    assert e.value.status == 429
    assert slot_a is not None
    slot_a.release()
    slot_a.release()  # idempotent
    assert limits.inflight["k"] == 1
    del b  # a path that forgot to release: the owner going away gives it back
    gc.collect()
    assert "k" not in limits.inflight
    del a


def test_keys_file_reads_concurrency() -> None:
    table = parse_keys_file("keys:\n- {id: a, key: sk-0123456789abcdef, tenant: t, limits: {concurrency: 3}}\n", "k")
    key = next(iter(table.by_digest.values()))
    assert key.concurrency == 3 and key.limited
    with pytest.raises(ValueError, match=r"limits\.parallel: unknown field"):
        parse_keys_file("keys:\n- {id: a, key: sk-0123456789abcdef, tenant: t, limits: {parallel: 3}}\n", "k")
