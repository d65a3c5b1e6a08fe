"""``precise-prefix-cache-producer`` (the reference's): the prefix match of a request on each
candidate from what the pods report they cached (KV events), for the scorers that name it
(``prefix-cache-scorer`` with ``prefixMatchInfoProducerName``, ``no-hit-lru-scorer``).

It reads the request's token ids from the ``token-producer`` (the reference's split pipeline:
token-producer -> this -> prefix-cache-scorer) and keys their blocks as the engine does
(epp.blockhash: the engine's own block hashes, so ``tokenProcessorConfig.hashSeed`` must be the
pods' PYTHONHASHSEED and ``blockSizeTokens`` their block size), then takes each pod's leading
run of blocks from the index. Parameters, with the reference's names and defaults:
- ``tokenProcessorConfig``: ``blockSizeTokens`` (16; the deprecated ``blockSize`` maps into it),
  ``hashSeed`` (""); ``hashAlgorithm`` is refused (epp keys blocks by the engine's hashes).
- ``kvEventsConfig``: ``zmqEndpoint`` (one socket epp binds, every pod's publisher connects to it;
  the pod is named in the topic ``kv@<pod>@<model>``), ``topicFilter`` ("kv@"),
  ``discoverPods`` (true: subscribe to each endpoint of the pool at
  ``tcp://<pod>:<podDiscoveryConfig.socketPort>``, 5557, with ``replaySocketPort`` for gaps),
  ``engineType`` (vllm; sglang refused). ``concurrency`` and the reconciler's
  ``podLabelSelector`` / ``podNamespace`` are read and have no effect, as in the reference's
  producer (events are applied in order on one loop; the pool's endpoints are what is subscribed).
- ``indexerConfig.kvBlockIndexConfig``: ``enableMetrics`` (the reference's index series),
  ``metricsLoggingInterval`` (a log line with them, at most this often; nanoseconds or a
  duration). Redis, cost-aware and sized in-memory backends, tier weights and the deprecated
  ``tokenizersPoolConfig`` are refused.
- ``speculativeIndexing`` (false) and ``speculativeTTL`` (2s): blocks just sent to a pod count as
  held there until its events confirm them (a burst on a new prefix is not scattered).
epp's own: ``loraAdapters`` (model -> adapter path, the engine's LoRA block keys) and the closed
loop of the precise scorer (epp.scheduling.precision): the predicted cached tokens on the chosen
pod are compared with the ``cached_tokens`` its response reports; while they disagree, or for a
request without real token ids (no token producer, the byte estimate, a render that failed), the
match comes from an approximate index instead, which learns every pick either way.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any, ClassVar

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

from epp.blockhash import BlockHasher
from epp.datastore.endpoint import EndpointState
from epp.durations import parse_duration
from epp.request import InferenceRequest
from epp.scheduling.contract import (
    ExportsMetrics,
    ForgetsEndpoints,
    HoldsPrefixIndex,
    ObservesUsage,
    PrefixProducer,
    SubscribesKVEvents,
)
from epp.scheduling.params import BLOCK_SIZE_LIMIT, BLOCKS_TO_MATCH_LIMIT, Params
from epp.scheduling.precise_index import PendingBlocks, PreciseIndex
from epp.scheduling.precision import PrecisionTracker, closed_loop_families
from epp.scheduling.prefix_producer import REFERENCE_DEFAULTS, ApproxPrefixProducer
from epp.scheduling.types import MATCHED_TOKENS, PROMPT_TOKENS, ConfigError, CycleState, PrefixMatch, Slot
from epp.signals.kvevents import BlockIndex, KVEventsSpec

log = logging.getLogger("epp.precise")

LOOKUP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)  # Prometheus' defaults
MAX_BLOCKS_PER_POD = 500_000


class CountingIndex:
    """The precise index as KV events reach it, counting admissions and evictions."""

    def __init__(self, index: PreciseIndex) -> None:
        self.index = index
        self.admissions = 0
        self.evictions = 0

    def apply(self, pod: str, events: Any) -> None:
        before = self.index.blocks_of(pod)
        stored = 0
        for e in events:
            if e.get("type") == "BlockStored":
                stored += len(e.get("block_hashes") or ())
        self.index.apply(pod, events)
        self.admissions += stored
        self.evictions += max(0, before + stored - self.index.blocks_of(pod))

    def clear(self, pod: str) -> None:
        self.evictions += self.index.blocks_of(pod)
        self.index.clear(pod)


class Lookups:
    """The reference's index series (enableMetrics): lookups, the best pod's leading hits, latency."""

    def __init__(self) -> None:
        self.requests = 0
        self.hits = 0
        self.buckets = [0] * (len(LOOKUP_BUCKETS) + 1)
        self.seconds = 0.0

    def add(self, best: int, seconds: float) -> None:
        self.requests += 1
        self.hits += best
        self.seconds += seconds
        i = next((k for k, b in enumerate(LOOKUP_BUCKETS) if seconds <= b), len(LOOKUP_BUCKETS))
        self.buckets[i] += 1


class PrecisePrefixProducer(PrefixProducer, ObservesUsage, ForgetsEndpoints, HoldsPrefixIndex, ExportsMetrics,
                            SubscribesKVEvents):
    type_name: ClassVar[str] = "precise-prefix-cache-producer"
    produces: ClassVar[tuple[Slot[Any], ...]] = (MATCHED_TOKENS, PROMPT_TOKENS)

    def __init__(self, name: str, params: Params) -> None:
        self.name = name
        tp = params.section("tokenProcessorConfig") or Params({}, f"{params.path}.tokenProcessorConfig")
        block = tp.int("blockSizeTokens", 0, minimum=0, maximum=BLOCK_SIZE_LIMIT)
        deprecated = tp.int("blockSize", 0, minimum=0, maximum=BLOCK_SIZE_LIMIT)
        self.block_size = block or deprecated or 16
        self.hasher = BlockHasher(tp.text("hashSeed") or None)
        tp.refuse("hashAlgorithm", "epp keys blocks by the engine's own block hashes")
        tp.done()
        self.kv_events = self._kv_events(params)
        self.metrics_enabled, self.log_every = self._indexer(params)
        self.speculative = params.bool("speculativeIndexing", False)
        ttl = params.duration("speculativeTTL", 2.0)
        self.pending = PendingBlocks(ttl)
        self.lora_paths = params.str_map("loraAdapters")
        params.done()
        self.max_blocks = BLOCKS_TO_MATCH_LIMIT
        self.index = PreciseIndex(MAX_BLOCKS_PER_POD)
        self.events = CountingIndex(self.index)
        self.tracker = PrecisionTracker()
        self.approx = ApproxPrefixProducer.with_limits(f"{name}/approximate", REFERENCE_DEFAULTS)
        self.lookups = Lookups()
        self.used = {"precise": 0, "approximate": 0}
        self._logged_at = time.monotonic()
        self._warned_block_size = False
        self._match: Slot[PrefixMatch] = Slot(f"{name}/match")
        self._state: Slot[tuple[list[int], dict[str, int], float]] = Slot(f"{name}/precise")
        self._recorded: Slot[bool] = Slot(f"{name}/recorded")

    @staticmethod
    def _kv_events(params: Params) -> KVEventsSpec:
        kv = params.section("kvEventsConfig") or Params({}, f"{params.path}.kvEventsConfig")
        shared = kv.text("zmqEndpoint") or None
        topic = kv.text("topicFilter", "kv@") or ""
        concurrency = kv.int("concurrency", 4, minimum=1, maximum=1024)
        engine = kv.text("engineType", "vllm") or "vllm"
        if engine == "sglang":
            raise ConfigError(f"{kv.path}.engineType", "'sglang' is not supported by epp (SGLang's KV events)")
        if engine != "vllm":
            raise ConfigError(f"{kv.path}.engineType", f"must be vllm or sglang, got {engine!r}")
        discover = kv.bool("discoverPods", True)
        pd = kv.section("podDiscoveryConfig") or Params({}, f"{kv.path}.podDiscoveryConfig")
        pd.text("podLabelSelector")  # not read by the reference's producer either: the pool is subscribed
        pd.text("podNamespace")
        port = pd.int("socketPort", 5557, minimum=1, maximum=65535)
        replay = pd.int("replaySocketPort", 0, minimum=0, maximum=65535)
        pd.done()
        kv.done()
        if concurrency != 4:
            log.info("%s.concurrency: epp applies KV events in order on one loop (no worker pool to size)", kv.path)
        if shared and not shared.startswith("tcp://"):
            raise ConfigError(f"{kv.path}.zmqEndpoint", f"expected tcp://host:port, got {shared!r}")
        endpoint = f"tcp://*:{port}" if discover else ""
        replay_endpoint = f"tcp://*:{replay}" if discover and replay > 0 else None
        return KVEventsSpec(endpoint, replay_endpoint, topic, shared=shared)

    @staticmethod
    def _indexer(params: Params) -> tuple[bool, float]:
        ix = params.section("indexerConfig")
        if ix is None:
            return False, 0.0
        ix.refuse("tokenizersPoolConfig", "configure a token-producer instead, as the reference requires")
        ix.refuse("kvCacheBackendConfigs", "epp counts blocks of every cache tier alike")
        kb = ix.section("kvBlockIndexConfig")
        ix.done()
        if kb is None:
            return False, 0.0
        for key, why in (("redisConfig", "a shared Redis index"), ("costAwareMemoryConfig", "the cost-aware index"),
                         ("inMemoryConfig", f"epp's index is bounded per pod ({MAX_BLOCKS_PER_POD:,} blocks)")):
            kb.refuse(key, why)
        enabled = kb.bool("enableMetrics", False)
        raw = kb.value("metricsLoggingInterval", 0)
        kb.done()
        path = f"{kb.path}.metricsLoggingInterval"
        if isinstance(raw, bool) or not isinstance(raw, int | str):
            raise ConfigError(path, "expected nanoseconds (an integer) or a duration like '1m'")
        try:
            every = parse_duration(raw) if isinstance(raw, str) else raw / 1e9
        except ValueError as e:
            raise ConfigError(path, str(e)) from None
        if every < 0:
            raise ConfigError(path, "must be >= 0")
        if every and not enabled:
            log.warning("%s has no effect without enableMetrics: true (as in the reference)", path)
            every = 0.0
        return enabled, every

    # -- the match -------------------------------------------------------------------------------
    def match(self, request: InferenceRequest, candidates: list[EndpointState], cycle: CycleState) -> PrefixMatch:
        done = cycle.get(self._match)
        if done is not None:
            return done
        approx = self.approx.match(request, candidates, cycle)  # learns every pick, for the fallback
        ids = request.token_ids if request.real_tokens else None
        if not ids:
            self.used["approximate"] += 1
            cycle.put(self._match, approx)
            return approx
        self._check_block_size(candidates)
        bs = self.block_size
        model = request.target_model or request.model
        lora = (model, self.lora_paths[model]) if model in self.lora_paths else None
        salt = request.body.get("cache_salt") if request.body is not None else None
        t0 = time.perf_counter()
        hashes = self.hasher.hashes(ids, bs, lora, salt if isinstance(salt, str) else None, self.max_blocks)
        held = self.index.match_lengths(hashes) if hashes else {}
        now = time.monotonic()
        blocks = held
        if self.speculative and hashes:
            sent = self.pending.match_lengths(hashes, now)
            blocks = {pod: max(held.get(pod, 0), sent.get(pod, 0)) for pod in held.keys() | sent.keys()}
        if self.metrics_enabled:
            self.lookups.add(max(held.values(), default=0), time.perf_counter() - t0)
            self._maybe_log(now)
        cacheable = max(0, (len(ids) - 1) // bs) * bs  # the server recomputes at least the last token
        cycle.put(self._state, (hashes, {p: min(n * bs, cacheable) for p, n in held.items()}, now))
        cycle.put(PROMPT_TOKENS, len(ids))
        if not self.tracker.trusted:
            self.used["approximate"] += 1
            cycle.put(self._match, approx)
            return approx
        self.used["precise"] += 1
        m = PrefixMatch(hashes, blocks, bs)
        cycle.put(self._match, m)
        cycle.put(MATCHED_TOKENS, {a: n * bs for a, n in blocks.items()})
        return m

    def _check_block_size(self, candidates: list[EndpointState]) -> None:
        if self._warned_block_size:
            return
        for c in candidates:
            s = c.signals
            if s is not None and s.block_size and s.block_size != self.block_size:
                self._warned_block_size = True
                log.warning("%s: blockSizeTokens is %d but %s reports blocks of %d tokens: no block will match",
                            self.name, self.block_size, c.address, s.block_size)
                return

    def record(self, endpoint: str, cycle: CycleState) -> None:
        if cycle.get(self._recorded):
            return
        cycle.put(self._recorded, True)
        self.approx.record(endpoint, cycle)
        state = cycle.get(self._state)
        if self.speculative and state is not None and state[0]:
            self.pending.record(endpoint, state[0], state[2])

    # -- the closed loop -----------------------------------------------------------------------
    def usage_wanted(self) -> bool:
        return True

    def usage_injected(self) -> bool:
        return True

    def on_usage(self, endpoint: str, cycle: CycleState, cached_tokens: int) -> None:
        state = cycle.get(self._state)
        if state is None:
            return
        change = self.tracker.add(state[1].get(endpoint, 0), cached_tokens)
        if change:
            log.warning("%s: %s", self.name, change)

    # -- the process -----------------------------------------------------------------------------
    def on_endpoint_removed(self, endpoint: str) -> None:
        self.index.clear(endpoint)
        self.pending.forget(endpoint)
        self.approx.on_endpoint_removed(endpoint)

    def prefix_index_size(self) -> int:
        return self.approx.prefix_index_size()

    def kv_subscription(self) -> tuple[KVEventsSpec, BlockIndex] | None:
        spec = self.kv_events
        return (spec, self.events) if spec.endpoint or spec.shared else None

    def _maybe_log(self, now: float) -> None:
        if self.log_every and now - self._logged_at >= self.log_every:
            self._logged_at = now
            lk = self.lookups
            log.info("%s: kv-block index: admissions %d, evictions %d, lookups %d, hits %d, blocks %d", self.name,
                     self.events.admissions, self.events.evictions, lk.requests, lk.hits, self.index.size())

    def metric_families(self, pool: str) -> Iterator[Metric]:
        labels, values = ["name", "plugin"], [pool, self.name]
        yield from closed_loop_families(pool, self.name, self.tracker, self.tracker.trusted, self.index.size())
        used = CounterMetricFamily("epp_prefix_match_source", "Requests matched on the precise index or, falling "
                                   "back, on the approximate one.", labels=[*labels, "index"])
        for source, n in sorted(self.used.items()):
            used.add_metric([*values, source], n)
        yield used
        if self.metrics_enabled:
            yield from self._reference_series()

    def _reference_series(self) -> Iterator[Metric]:
        """The reference's kv-block index series, under its current and deprecated names."""
        lk, ev = self.lookups, self.events
        for new, old, help_text, value in (
                ("kv_cache_index_admissions", "index_admissions", "Total number of KV-block admissions",
                 ev.admissions),
                ("kv_cache_index_evictions", "index_evictions", "Total number of KV-block evictions", ev.evictions),
                ("kv_cache_index_lookup_requests", "index_lookup_requests", "Total number of lookup calls",
                 lk.requests),
                ("kv_cache_index_lookup_hits", "index_lookup_hits",
                 "Contiguous prefix blocks matched by the best pod per lookup", lk.hits),
                ("kv_cache_index_max_pod_hit_count", "index_max_pod_hit_count",
                 "Longest contiguous per-pod prefix chain observed per lookup", lk.hits)):
            for metric, text in ((f"llm_d_epp_{new}", help_text), (f"kvcache_{old}", f"Deprecated: use "
                                                                    f"llm_d_epp_{new}_total. {help_text}")):
                fam = CounterMetricFamily(metric, text)
                fam.add_metric([], value)
                yield fam
        for metric in ("llm_d_epp_kv_cache_index_lookup_latency_seconds", "kvcache_index_lookup_latency_seconds"):
            cum, buckets = 0, []
            for bound, n in zip((*LOOKUP_BUCKETS, float("inf")), lk.buckets, strict=True):
                cum += n
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), cum))
            hist = HistogramMetricFamily(metric, "Latency of Lookup calls in seconds")
            hist.add_metric([], buckets, lk.seconds)
            yield hist
