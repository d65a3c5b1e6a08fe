"""``precise-prefix-cache-scorer``: prefix affinity from what the pods report they cached.

Per request: token ids from the model's tokenizer (epp.tokenization), vLLM's block keys
(epp.blockhash: chained sha256, LoRA and cache_salt extra keys, the pods' hash seed), then the
longest run of leading blocks each pod holds in the precise index (fed by KV events), divided by
the prompt's full blocks. In ``hybrid`` mode (the default) blocks epp sent to a pod in the last
``pendingTtl`` count too, so a burst sharing a new prefix is not scattered before the pod's
events arrive. The closed loop compares the tokens predicted cached on the chosen pod with the
``cached_tokens`` the response reports (epp.scheduling.precision); while the index is not
trusted, or for a request the tokenizer cannot reproduce, the approximate index scores instead.
Both indexes learn every pick, so switching loses nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

from prometheus_client.core import Metric

from epp.blockhash import BlockHasher
from epp.datastore.endpoint import EndpointState
from epp.datastore.store import Snapshot
from epp.request import InferenceRequest
from epp.scheduling.contract import (
    ExportsMetrics,
    ForgetsEndpoints,
    HoldsPrefixIndex,
    LoadsResources,
    ObservesPicks,
    ObservesUsage,
    Scorer,
    SubscribesKVEvents,
)
from epp.scheduling.params import BLOCK_SIZE_LIMIT, BLOCKS_PER_SERVER_LIMIT, BLOCKS_TO_MATCH_LIMIT, Params
from epp.scheduling.precise_index import PendingBlocks, PreciseIndex
from epp.scheduling.precision import PrecisionTracker, closed_loop_families
from epp.scheduling.prefix_index import ApproximatePrefix
from epp.scheduling.types import CANDIDATE_LOADS, MATCHED_TOKENS, PROMPT_TOKENS, ConfigError, CycleState, Slot
from epp.signals.kvevents import BlockIndex, KVEventsSpec
from epp.tokenization import PromptTokenizer, TokenizerError, load_tokenizer

log = logging.getLogger("epp.precise")

DEFAULT_BLOCK_SIZE = 16


@dataclass(slots=True)
class PreciseCycle:
    """What one scoring pass learnt about a request (for the pick and the closed loop)."""

    now: float
    approx_hashes: list[int]
    hashes: list[int] | None = None  # None: the request could not be tokenized
    block_size: int = 0
    predicted: dict[str, int] = field(default_factory=dict)  # pod -> tokens the index says are cached
    unconfirmed: dict[str, int] = field(default_factory=dict)  # pod -> pending blocks beyond the index's
    used: str = "approximate"


class PrecisePrefixCacheScorer(Scorer, ObservesPicks, ObservesUsage, ForgetsEndpoints, LoadsResources,
                               HoldsPrefixIndex, ExportsMetrics, SubscribesKVEvents):
    type_name: ClassVar[str] = "precise-prefix-cache-scorer"
    produces: ClassVar[tuple[Slot[Any], ...]] = (MATCHED_TOKENS, PROMPT_TOKENS)
    consumes: ClassVar[tuple[Slot[Any], ...]] = (CANDIDATE_LOADS,)  # when a queue scorer runs: after it

    def __init__(self, name: str, params: Params) -> None:
        self.name = name
        self.tokenizer_spec = params.text("tokenizer")
        self._tokenizer_path = f"{params.path}.tokenizer"
        self.tokenizer: PromptTokenizer | None = None  # set by ``load``
        self.cycle_slot: Slot[PreciseCycle] = Slot(f"{name}/cycle")
        self.block_size = params.int("blockSize", 0, minimum=0, maximum=BLOCK_SIZE_LIMIT)
        self.hasher = BlockHasher(params.text("hashSeed"))
        self.lora_paths = params.str_map("loraAdapters")
        self.mode = params.text("mode", "hybrid", choices=("hybrid", "precise"))
        self.max_blocks = params.int("maxBlocksToMatch", 1024, minimum=1, maximum=BLOCKS_TO_MATCH_LIMIT)
        self.index = PreciseIndex(params.int("maxBlocksPerPod", 500_000, minimum=1, maximum=BLOCKS_PER_SERVER_LIMIT))
        self.pending = PendingBlocks(params.duration("pendingTtl", 10.0))
        kv = params.section("kvEvents")
        self.kv_events: KVEventsSpec | None = None
        if kv is not None:
            endpoint = kv.text("endpoint")
            if not endpoint:
                raise ConfigError(f"{params.path}.kvEvents.endpoint", "required (e.g. tcp://{ip}:5557)")
            per_pod: list[tuple[str, str, str | None]] = []
            overrides = kv.section("perEndpoint")  # {"ip:port": {endpoint, replayEndpoint}}
            if overrides is not None:
                for pod in overrides.names():
                    one = overrides.section(pod)
                    ep = one.text("endpoint") if one is not None else None
                    if one is None or not ep:
                        raise ConfigError(f"{params.path}.kvEvents.perEndpoint.{pod}.endpoint", "required")
                    per_pod.append((pod, ep, one.text("replayEndpoint")))
                    one.done()
                overrides.done()
            self.kv_events = KVEventsSpec(endpoint, kv.text("replayEndpoint"), kv.text("topic", "") or "",
                                          tuple(per_pod))
            kv.done()
        fb = params.section("fallback")
        if fb is not None:
            self.tracker = PrecisionTracker(
                window=fb.int("window", 64, minimum=1), min_samples=fb.int("minSamples", 16, minimum=1),
                min_precision=fb.float("minPrecision", 0.5, minimum=0.0, maximum=1.0),
                recover_precision=fb.float("recoverPrecision", 0.7, minimum=0.0, maximum=1.0))
            fb.done()
        else:
            self.tracker = PrecisionTracker()
        self.inject_usage = params.bool("injectUsage", True)
        self.approx = ApproximatePrefix.from_params(params)
        params.done()

    def load(self) -> None:
        """Load the tokenizer (files, a chat template); ConfigError naming the parameter."""
        if not self.tokenizer_spec:
            log.warning("%s: no tokenizer configured: routing on the approximate index", self.name)
            return
        if self.tokenizer is None:
            try:
                self.tokenizer = load_tokenizer(self.tokenizer_spec)
            except TokenizerError as e:
                raise ConfigError(self._tokenizer_path, str(e)) from None

    def usage_wanted(self) -> bool:
        """The closed loop needs each response's cached_tokens."""
        return self.tokenizer is not None

    def usage_injected(self) -> bool:
        return self.inject_usage

    def _block_size(self, candidates: list[EndpointState]) -> int:
        if self.block_size:
            return self.block_size
        for c in candidates:
            if c.signals is not None and c.signals.block_size:
                return c.signals.block_size
        return DEFAULT_BLOCK_SIZE

    def _precise_hashes(self, request: InferenceRequest, block_size: int) -> tuple[list[int], int] | None:
        if self.tokenizer is None or request.body is None:
            return None
        model = request.target_model or request.model
        lora = (model, self.lora_paths[model]) if model in self.lora_paths else None
        salt = request.body.get("cache_salt")
        ids = self.tokenizer.token_ids(request.body, request.chat)
        if ids is None:
            return None
        hashes = self.hasher.hashes(ids, block_size, lora, salt if isinstance(salt, str) else None, self.max_blocks)
        return hashes, len(ids)

    def score(self, request: InferenceRequest, snapshot: Snapshot, candidates: list[EndpointState],
              cycle: CycleState) -> list[float]:
        approx = self.approx.hashes(request)
        st = PreciseCycle(snapshot.now, approx)
        cycle.put(self.cycle_slot, st)
        bs = self._block_size(candidates)
        found = self._precise_hashes(request, bs)
        if found is not None:
            hashes, n_tokens = found
            st.hashes, st.block_size = hashes, bs
            cycle.put(PROMPT_TOKENS, n_tokens)
            held = self.index.match_lengths(hashes) if hashes else {}
            cacheable = max(0, (n_tokens - 1) // bs) * bs  # the server recomputes at least the last token
            st.predicted = {pod: min(blocks * bs, cacheable) for pod, blocks in held.items()}
            matched = held
            if self.mode == "hybrid" and hashes:
                sent = self.pending.match_lengths(hashes, snapshot.now)
                for pod, blocks in sent.items():
                    if blocks > held.get(pod, 0):
                        st.unconfirmed[pod] = blocks
                matched = {pod: max(held.get(pod, 0), sent.get(pod, 0)) for pod in held.keys() | sent.keys()}
            if self.tracker.trusted:
                cycle.put(MATCHED_TOKENS, {pod: blocks * bs for pod, blocks in matched.items()})
                st.used = "precise"
                total = len(hashes)
                if not total:
                    return [0.0] * len(candidates)
                return self.approx.spread([matched.get(c.address, 0) / total for c in candidates], snapshot,
                                          candidates, cycle)
        return self.approx.score(approx, snapshot, candidates, cycle)

    def on_pick(self, endpoint: str, cycle: CycleState) -> None:
        st = cycle.get(self.cycle_slot)
        if st is None:
            return
        if st.approx_hashes:
            self.approx.index.record(endpoint, st.approx_hashes)
        if st.hashes and self.mode == "hybrid":
            self.pending.record(endpoint, st.hashes, st.now)

    def on_usage(self, endpoint: str, cycle: CycleState, cached_tokens: int) -> None:
        """The response of a request routed to ``endpoint`` reported ``cached_tokens``."""
        address = endpoint
        st = cycle.get(self.cycle_slot)
        if st is None or st.hashes is None:
            return
        sent = st.unconfirmed.get(address)
        if sent is not None and self.index.match_lengths(st.hashes[:sent]).get(address, 0) >= sent:
            # Blocks epp had just sent there, reported since: the index was behind, not wrong.
            return
        change = self.tracker.add(st.predicted.get(address, 0), cached_tokens)
        if change:
            log.warning("%s: %s", self.name, change)

    def on_endpoint_removed(self, endpoint: str) -> None:
        self.approx.index.forget(endpoint)
        self.index.clear(endpoint)
        self.pending.forget(endpoint)

    def prefix_index_size(self) -> int:
        return self.approx.index.size()

    def kv_subscription(self) -> tuple[KVEventsSpec, BlockIndex] | None:
        return (self.kv_events, self.index) if self.kv_events is not None else None

    def metric_families(self, pool: str) -> Iterator[Metric]:
        """The closed loop's agreement and mode, and the precise index's size."""
        active = self.tracker.trusted and self.tokenizer is not None
        yield from closed_loop_families(pool, self.name, self.tracker, active, self.index.size())
