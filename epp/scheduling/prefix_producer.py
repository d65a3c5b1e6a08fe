"""``approx-prefix-cache-producer``: the approximate prefix index as its own plugin, read by the
``prefix-cache-scorer`` (and, later, filters) that name it (the reference's data producer).

Parameters, with the reference's names and defaults: ``autoTune`` (true: the block size is the
pods' own, from their ``cache_config_info``, and each pod's index holds as many blocks as the pod
has GPU blocks), ``blockSizeTokens`` (16; the deprecated ``blockSize`` maps into it),
``maxPrefixTokensToMatch`` (131,072; it wins when > 0), ``maxPrefixBlocksToMatch`` (2,048,
used when the token cap is 0; both 0 match the whole prompt), ``lruCapacityPerServer`` (31,250).
As in the reference, a block is never smaller than 64 tokens (one index entry per pod and block:
a small block size would multiply the index's memory).

The early-2026 form, the index parameters on the ``prefix-cache-scorer`` itself (or a bare scorer
in a document of the older apiVersions), is ``EARLY_2026``: 16-token blocks kept as given, 256
blocks matched, the same autoTune.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric

from epp.datastore.endpoint import EndpointState, EngineSignals
from epp.request import InferenceRequest
from epp.scheduling.contract import (
    ExportsMetrics,
    ForgetsEndpoints,
    HoldsPrefixIndex,
    PrefixProducer,
    SharesPrefixIndex,
)
from epp.scheduling.params import BLOCK_SIZE_LIMIT, BLOCKS_PER_SERVER_LIMIT, BLOCKS_TO_MATCH_LIMIT, Params
from epp.scheduling.prefix_index import PrefixIndex
from epp.scheduling.types import MATCHED_TOKENS, CycleState, PrefixMatch, Slot

log = logging.getLogger(__name__)

MIN_BLOCK_TOKENS = 64  # the reference's floor (llm-d-router#1158)
TOKEN_CAP_LIMIT = BLOCKS_TO_MATCH_LIMIT * 64
SIZED_PER_PICK = 32  # candidates whose KV cache size one pick re-reads (autoTune)


@dataclass(frozen=True, slots=True)
class Limits:
    auto_tune: bool
    block_tokens: int
    max_tokens: int  # 0: use max_blocks
    max_blocks: int  # 0 (with max_tokens 0): the whole prompt
    lru_capacity: int
    min_block_tokens: int


REFERENCE_DEFAULTS = Limits(True, 16, 131072, 2048, 31250, MIN_BLOCK_TOKENS)
EARLY_2026 = Limits(True, 16, 0, 256, 31250, 1)


RATIO_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # the reference's
BYTES_BUCKETS = (0, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
BYTES_PER_TOKEN = 4  # the reference reports matches as a byte estimate


class HitStats:
    """The reference's prefix_indexer_hit_ratio / _hit_bytes histograms (at each pick)."""

    def __init__(self) -> None:
        self.ratio = [0] * (len(RATIO_BUCKETS) + 1)
        self.ratio_sum = 0.0
        self.bytes = [0] * (len(BYTES_BUCKETS) + 1)
        self.bytes_sum = 0.0

    def add(self, matched_bytes: int, total_bytes: int) -> None:
        self.bytes[bisect.bisect_left(BYTES_BUCKETS, matched_bytes)] += 1
        self.bytes_sum += matched_bytes
        if total_bytes > 0:
            r = matched_bytes / total_bytes
            self.ratio[bisect.bisect_left(RATIO_BUCKETS, r)] += 1
            self.ratio_sum += r

    def families(self, plugin: tuple[str, str]) -> Iterator[Metric]:
        for suffix, bounds, counts, total, help_text in (
                ("hit_ratio", RATIO_BUCKETS, self.ratio, self.ratio_sum,
                 "Ratio of prefix length matched to total prefix length in the cache lookup."),
                ("hit_bytes", BYTES_BUCKETS, self.bytes, self.bytes_sum,
                 "Length of the prefix match in number of bytes in the cache lookup.")):
            cum, buckets = 0, []
            for bound, n in zip((*bounds, float("inf")), counts, strict=True):
                cum += n
                buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), cum))
            for name, labels in ((f"llm_d_epp_prefix_indexer_{suffix}", list(plugin)),
                                 (f"inference_extension_prefix_indexer_{suffix}", [])):
                fam = HistogramMetricFamily(name, help_text, labels=["plugin_name", "plugin_type"] if labels else [])
                fam.add_metric(labels, buckets, total)
                yield fam


class ApproxPrefixProducer(PrefixProducer, ForgetsEndpoints, HoldsPrefixIndex, SharesPrefixIndex, ExportsMetrics):
    type_name: ClassVar[str] = "approx-prefix-cache-producer"
    produces: ClassVar[tuple[Slot[Any], ...]] = (MATCHED_TOKENS,)

    def __init__(self, name: str, params: Params) -> None:
        self.name = name
        auto = params.bool("autoTune", True)
        block = params.int("blockSizeTokens", 16, minimum=1, maximum=BLOCK_SIZE_LIMIT)
        deprecated = params.int("blockSize", 0, minimum=0, maximum=BLOCK_SIZE_LIMIT)
        if deprecated:
            log.warning("%s.blockSize is deprecated; use blockSizeTokens", params.path)
            if block == 16:
                block = deprecated
        limits = Limits(auto, block, params.int("maxPrefixTokensToMatch", 131072, minimum=0, maximum=TOKEN_CAP_LIMIT),
                        params.int("maxPrefixBlocksToMatch", 2048, minimum=0, maximum=BLOCKS_TO_MATCH_LIMIT),
                        params.int("lruCapacityPerServer", 31250, minimum=1, maximum=BLOCKS_PER_SERVER_LIMIT),
                        MIN_BLOCK_TOKENS)
        params.done()
        if block < MIN_BLOCK_TOKENS and not auto:
            log.warning("%s.blockSizeTokens %d is below the minimum: %d-token blocks are used", params.path,
                        block, MIN_BLOCK_TOKENS)
        self._setup(limits)

    @classmethod
    def with_limits(cls, name: str, limits: Limits) -> ApproxPrefixProducer:
        """A producer the loader makes (no config entry of its own)."""
        self = cls.__new__(cls)
        self.name = name
        self._setup(limits)
        return self

    @classmethod
    def early_2026(cls, name: str, params: Params) -> ApproxPrefixProducer:
        """The index parameters as the early-2026 ``prefix-cache-scorer`` took them."""
        e = EARLY_2026
        limits = Limits(params.bool("autoTune", e.auto_tune),
                        params.int("blockSizeTokens", e.block_tokens, minimum=1, maximum=BLOCK_SIZE_LIMIT), 0,
                        params.int("maxPrefixBlocksToMatch", e.max_blocks, minimum=1, maximum=BLOCKS_TO_MATCH_LIMIT),
                        params.int("lruCapacityPerServer", e.lru_capacity, minimum=1, maximum=BLOCKS_PER_SERVER_LIMIT),
                        e.min_block_tokens)
        return cls.with_limits(name, limits)

    def _setup(self, limits: Limits) -> None:
        self.limits = limits
        self.hits = HitStats()
        self.index = self._index(max(limits.block_tokens, limits.min_block_tokens))
        self._sized: dict[str, EngineSignals] = {}  # the signals each endpoint's capacity was set from
        self._size_cursor = 0  # where the next pick's sizing starts in a large pool
        self._match: Slot[PrefixMatch] = Slot(f"{self.name}/match")
        self._recorded: Slot[bool] = Slot(f"{self.name}/recorded")

    def _index(self, block_tokens: int) -> PrefixIndex:
        lim = self.limits
        # The token cap wins; both caps 0 match the whole prompt.
        blocks = lim.max_tokens // block_tokens if lim.max_tokens else lim.max_blocks or BLOCKS_TO_MATCH_LIMIT
        return PrefixIndex(block_tokens, blocks, lim.lru_capacity)

    def block_tokens(self, candidates: list[EndpointState]) -> int:
        """The block size in use: the pods' own with autoTune (the first candidate that reports
        one), else the configured one; never under the floor."""
        lim = self.limits
        size = lim.block_tokens
        if lim.auto_tune:
            for c in candidates:
                if c.signals is not None and c.signals.block_size:
                    size = c.signals.block_size
                    break
        return max(size, lim.min_block_tokens)

    def match(self, request: InferenceRequest, candidates: list[EndpointState], cycle: CycleState) -> PrefixMatch:
        """The request's match (once per cycle, however many scorers read it); it also puts
        MATCHED_TOKENS (endpoint -> estimated cached prompt tokens)."""
        done = cycle.get(self._match)
        if done is not None:
            return done
        size = self.block_tokens(candidates)
        index = self.index
        if size != index.block_tokens:
            log.info("%s: prefix blocks of %d tokens from now on (was %d): the index starts over", self.name,
                     size, index.block_tokens)
            journal = index.journal
            index = self.index = self._index(size)
            index.journal = None if journal is None else []  # (what the old index journalled is of no use now)
            self._sized.clear()
        if self.limits.auto_tune:
            # The pod's KV cache in the index's blocks: its GPU blocks of its own block size, in
            # blocks of the index's (at least 64 tokens). The reference sizes the index in the
            # pod's GPU blocks whatever the index's block size, which with 16-token pods believes
            # 4x what the pod holds (and routes to prefixes it evicted long ago).
            caps, sized = index.capacities, self._sized
            for c in self._to_size(candidates):
                s = c.signals
                if s is not None and s.num_gpu_blocks and sized.get(c.address) is not s:
                    sized[c.address] = s  # (a scrape replaces the signals: sized again only then)
                    n = max(1, s.num_gpu_blocks * (s.block_size or size) // size)
                    if caps.get(c.address) != n:
                        caps[c.address] = min(n, BLOCKS_PER_SERVER_LIMIT)
        hashes = index.hashes(request.model, request.prompt) if request.prompt else []
        blocks = index.match_lengths(hashes) if hashes else {}
        m = PrefixMatch(hashes, blocks, size)
        cycle.put(self._match, m)
        cycle.put(MATCHED_TOKENS, {a: n * size for a, n in blocks.items()})
        return m

    def _to_size(self, candidates: list[EndpointState]) -> list[EndpointState]:
        """The candidates whose capacity this pick re-reads: all of a small pool, ``SIZED_PER_PICK``
        of a large one in turn (a pass over 1,000 candidates on every pick cost ~0.2 ms; a pod's
        KV cache size changes when it restarts, and each is read again within a few picks)."""
        n = len(candidates)
        if n <= SIZED_PER_PICK:
            return candidates
        start = self._size_cursor % n
        self._size_cursor = start + SIZED_PER_PICK
        return candidates[start:start + SIZED_PER_PICK] + candidates[:max(0, start + SIZED_PER_PICK - n)]

    def record(self, endpoint: str, cycle: CycleState) -> None:
        """The request went to ``endpoint``: its blocks are cached there now (once per cycle)."""
        m = cycle.get(self._match)
        if m is not None and m.hashes and not cycle.get(self._recorded):
            cycle.put(self._recorded, True)
            per_block = m.block_tokens * BYTES_PER_TOKEN
            self.hits.add(m.blocks.get(endpoint, 0) * per_block, m.total * per_block)
            self.index.record(endpoint, m.hashes)

    def on_endpoint_removed(self, endpoint: str) -> None:
        self.index.forget(endpoint)
        self.index.capacities.pop(endpoint, None)
        self._sized.pop(endpoint, None)

    def prefix_index_size(self) -> int:
        return self.index.size()

    def take_prefix_records(self) -> tuple[int, list[tuple[str, list[int]]]]:
        index = self.index
        records, index.journal = index.journal or [], []
        return index.block_tokens, records

    def add_peer_prefix_records(self, block_tokens: int, records: Iterable[tuple[str, list[int]]]) -> None:
        index = self.index
        if block_tokens == index.block_tokens:
            for endpoint, hashes in records:
                index.record_peer(endpoint, hashes)

    def metric_families(self, pool: str) -> Iterator[Metric]:
        """The reference's prefix indexer series (its size per plugin, the hit histograms)."""
        size = GaugeMetricFamily("llm_d_epp_prefix_indexer_size", "Size of the prefix indexer.",
                                 labels=["plugin_name", "plugin_type"])
        size.add_metric([self.name, self.type_name], self.index.size())
        yield size
        yield from self.hits.families((self.name, self.type_name))
