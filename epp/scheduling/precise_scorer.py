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
from dataclasses import dataclass, field
from typing import ClassVar

from epp.blockhash import BlockHasher
from epp.datastore.endpoint import EndpointState
from epp.datastore.store import Snapshot
from epp.request import InferenceRequest
from epp.scheduling.balance import spread_hot_prefixes, thresholds_from_params
from epp.scheduling.params import BLOCK_SIZE_LIMIT, BLOCKS_PER_SERVER_LIMIT, BLOCKS_TO_MATCH_LIMIT, Params
from epp.scheduling.precise_index import PendingBlocks, PreciseIndex
from epp.scheduling.precision import PrecisionTracker
from epp.scheduling.prefill_load import MATCHED_TOKENS, PROMPT_TOKENS
from epp.scheduling.prefix_index import index_from_params
from epp.scheduling.types import ConfigError, CycleState
from epp.signals.kvevents import KVEventsSpec
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


class PrecisePrefixCacheScorer:
    type_name: ClassVar[str] = "precise-prefix-cache-scorer"

    def __init__(self, name: str, params: Params) -> None:
        self.name = name
        spec = params.text("tokenizer")
        try:
            self.tokenizer: PromptTokenizer | None = load_tokenizer(spec) if spec else None
        except TokenizerError as e:
            raise ConfigError(f"{params.path}.tokenizer", str(e)) from None
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
        self.balance_abs, self.balance_rel = thresholds_from_params(params)
        self.approx = index_from_params(params)
        params.done()
        if self.tokenizer is None:
            log.warning("%s: no tokenizer configured: routing on the approximate index", name)

    @property
    def wants_usage(self) -> bool:
        """The closed loop needs each response's cached_tokens."""
        return self.tokenizer is not None

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
        approx = self.approx.hashes(request.model, request.prompt) if request.prompt else []
        st = PreciseCycle(snapshot.now, approx)
        cycle.data[self.name] = st
        bs = self._block_size(candidates)
        found = self._precise_hashes(request, bs)
        if found is not None:
            hashes, n_tokens = found
            st.hashes, st.block_size = hashes, bs
            cycle.data[PROMPT_TOKENS] = n_tokens
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
                cycle.data[MATCHED_TOKENS] = {pod: blocks * bs for pod, blocks in matched.items()}
                st.used = "precise"
                total = len(hashes)
                if not total:
                    return [0.0] * len(candidates)
                return self._spread([matched.get(c.address, 0) / total for c in candidates], snapshot, candidates)
        if not approx:
            return [0.0] * len(candidates)
        matches = self.approx.match_lengths(approx)
        cycle.data[MATCHED_TOKENS] = self.approx.matched_tokens(matches)
        return self._spread([matches.get(c.address, 0) / len(approx) for c in candidates], snapshot, candidates)

    def _spread(self, scores: list[float], snapshot: Snapshot, candidates: list[EndpointState]) -> list[float]:
        return spread_hot_prefixes(scores, snapshot, candidates, self.balance_abs, self.balance_rel)

    def record(self, address: str, cycle: CycleState) -> None:
        st = cycle.data.get(self.name)
        if not isinstance(st, PreciseCycle):
            return
        if st.approx_hashes:
            self.approx.record(address, st.approx_hashes)
        if st.hashes and self.mode == "hybrid":
            self.pending.record(address, st.hashes, st.now)

    def observe(self, address: str, cycle: CycleState, cached_tokens: int) -> None:
        """The response of a request routed to ``address`` reported ``cached_tokens``."""
        st = cycle.data.get(self.name)
        if not isinstance(st, PreciseCycle) or st.hashes is None:
            return
        sent = st.unconfirmed.get(address)
        if sent is not None and self.index.match_lengths(st.hashes[:sent]).get(address, 0) >= sent:
            # Blocks epp had just sent there, reported since: the index was behind, not wrong.
            return
        change = self.tracker.add(st.predicted.get(address, 0), cached_tokens)
        if change:
            log.warning("%s: %s", self.name, change)

    def forget(self, address: str) -> None:
        self.approx.forget(address)
        self.index.clear(address)
        self.pending.forget(address)
