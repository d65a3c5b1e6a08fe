"""Usage metering for billing: per tenant, API key id (never the key), model and pod.

Counters (Prometheus, on the picker's /metrics):
  epp_usage_requests_total{tenant, key_id, model, endpoint, status}
  epp_usage_prompt_tokens_total / _completion_tokens_total / _cached_tokens_total{tenant, key_id, model, endpoint}
and one JSON line per finished request (time, request id, tenant, key id, model, endpoint, status,
tokens, TTFT, duration) to stdout or a file. Refused requests (401, 429, 400...) are lines and
counts too, with no endpoint. Streams are metered whether or not the client asked for usage: the
picker asks the model server for it and removes it from what the client receives.
A request that ended without a response status (the client or the stream went away) has status 0.
Lines are written in batches: within 100 ms of the request's end (or at 64 KiB), and at shutdown;
a process killed outright loses at most that last tenth of a second.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

import orjson
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger("epp.metering")
LABELS = ("tenant", "key_id", "model", "endpoint")
TOKEN_SERIES = (("epp_usage_prompt_tokens", "Prompt tokens (from the responses' usage)."),
                ("epp_usage_completion_tokens", "Completion tokens (from the responses' usage)."),
                ("epp_usage_cached_tokens", "Prompt tokens served from the model server's cache."))
FLUSH_AFTER = 0.1  # seconds a line may wait in the buffer
FLUSH_AT = 64 * 1024  # bytes


@dataclass(slots=True)
class UsageRecord:
    request_id: str
    tenant: str
    key_id: str
    model: str
    endpoint: str
    status: int
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    ttft_s: float | None = None
    duration_s: float = 0.0
    stream: bool = False


class Metering(Collector):
    """Counts and logs every finished request. The sums are plain numbers updated on the loop and
    turned into counter families when /metrics is read (a loop collector: no per-request locks)."""

    def __init__(self, sink: str | None) -> None:
        self._requests: dict[tuple[str, str, str, str, str], int] = {}
        self._tokens: dict[tuple[str, str, str, str], list[int]] = {}  # -> [prompt, completion, cached]
        self._out: IO[bytes] | None = None
        self._own = False
        self._second, self._prefix = -1, ""
        self._buffer = bytearray()
        self._timer: asyncio.TimerHandle | None = None
        if sink == "stdout":
            self._out = sys.stdout.buffer
        elif sink:
            self._out = open(sink, "ab", buffering=0)  # noqa: SIM115 - kept open for the process's life
            self._own = True

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily("epp_usage_requests", "Finished requests by tenant, key, model, endpoint "
                                       "and status.", labels=[*LABELS, "status"])
        for counted, n in self._requests.items():
            requests.add_metric(list(counted), n)
        yield requests
        for i, (name, doc) in enumerate(TOKEN_SERIES):
            family = CounterMetricFamily(name, doc, labels=list(LABELS))
            for series, sums in self._tokens.items():
                family.add_metric(list(series), sums[i])
            yield family

    def record(self, r: UsageRecord) -> None:
        labels = (r.tenant, r.key_id, r.model, r.endpoint)
        counted = (*labels, str(r.status))
        self._requests[counted] = self._requests.get(counted, 0) + 1
        if r.prompt_tokens or r.completion_tokens or r.cached_tokens:
            sums = self._tokens.get(labels)
            if sums is None:
                sums = self._tokens[labels] = [0, 0, 0]
            sums[0] += r.prompt_tokens
            sums[1] += r.completion_tokens
            sums[2] += r.cached_tokens
        out = self._out
        if out is None:
            return
        line = {"time": self._timestamp(),
                "request_id": r.request_id, "tenant": r.tenant, "key_id": r.key_id, "model": r.model,
                "endpoint": r.endpoint, "status": r.status, "stream": r.stream, "prompt_tokens": r.prompt_tokens,
                "completion_tokens": r.completion_tokens, "cached_tokens": r.cached_tokens,
                "ttft_ms": None if r.ttft_s is None else round(r.ttft_s * 1000, 1),
                "duration_ms": round(r.duration_s * 1000, 1)}
        self._buffer += orjson.dumps(line)
        self._buffer += b"\n"
        if len(self._buffer) >= FLUSH_AT:
            self.flush()
        elif self._timer is None:
            try:
                self._timer = asyncio.get_running_loop().call_later(FLUSH_AFTER, self.flush)
            except RuntimeError:  # no event loop (a tool, a test): write now
                self.flush()

    def flush(self) -> None:
        """Write what the buffer holds."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        out, data = self._out, bytes(self._buffer)
        self._buffer.clear()
        if out is None or not data:
            return
        try:
            out.write(data)
            out.flush()
        except OSError as e:  # a full disk must not fail requests
            log.error("cannot write %d bytes of usage lines: %s", len(data), e)

    def _timestamp(self) -> str:
        """ISO 8601 UTC with milliseconds; the part up to the second is formatted once a second."""
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._prefix}.{int((now - second) * 1000):03d}+00:00"

    def close(self) -> None:
        self.flush()
        if self._own and self._out is not None:
            self._out.close()
            self._out = None
