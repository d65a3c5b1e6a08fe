"""Loop-owned metrics render exactly as prometheus_client's own classes do."""

from __future__ import annotations

import re

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from epp.observability.loopmetrics import LoopCounter, LoopGauge, LoopHistogram

CREATED = re.compile(rb"^(\w+_created\{?.*?\}?) [0-9.e+]+$", re.M)


def rendered(counter: type[Counter], gauge: type[Gauge], histogram: type[Histogram]) -> bytes:
    r = CollectorRegistry(auto_describe=False)
    c = counter("requests", "Requests.", ["model"], registry=r)
    g = gauge("running", "Running.", ["model"], registry=r)
    h = histogram("latency_seconds", "Latency.", ["model"], buckets=(0.1, 0.5, 1.0), registry=r)
    plain = histogram("plain_seconds", "Unlabelled.", buckets=(1.0, 2.0), registry=r)
    for model, value in (("a", 0.1), ("a", 0.7), ("b", 5.0), ("a", 0.05), ("b", 1.0)):
        c.labels(model).inc()
        c.labels(model).inc(2.5)
        g.labels(model).inc(3)
        g.labels(model).dec()
        h.labels(model).observe(value)  # on a bound, between bounds, past the last
        plain.observe(value * 2)
    g.labels("c").set(7)
    return CREATED.sub(rb"\1 T", generate_latest(r))


def test_loop_owned_metrics_render_as_prometheus_clients_own() -> None:
    mine = rendered(LoopCounter, LoopGauge, LoopHistogram)
    assert mine == rendered(Counter, Gauge, Histogram)
    assert b'latency_seconds_bucket{le="0.1",model="a"} 2.0' in mine  # 0.1 counts in le="0.1"
    assert b'latency_seconds_bucket{le="+Inf",model="b"} 2.0' in mine
    assert b'requests_created{model="a"} T' in mine and b"plain_seconds_created T" in mine


def test_loop_owned_metrics_refuse_what_they_cannot_keep() -> None:
    r = CollectorRegistry(auto_describe=False)
    with pytest.raises(ValueError):
        LoopCounter("c", "C.", registry=r).inc(-1)
    with pytest.raises(ValueError):
        LoopHistogram("h", "H.", registry=r).observe(float("nan"))
