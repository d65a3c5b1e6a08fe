"""``prefill-load-scorer``: avoid pods that are busy prefilling what epp already sent them.

A long uncached prompt holds its pod's next steps for its whole prefill (a 6k-token prompt is
~0.25 s on an H100 running llama-8b), and every request scheduled there meanwhile waits for
it. Request counts (the queue scorer, hot-prefix spreading) cannot tell that pod from one
serving short cached prompts; the servers' metrics do not say either. So epp keeps its own
account: each pick adds the prompt tokens the pod will have to compute (the prompt minus the
prefix a prefix scorer of the same profile matched there), and the response's first body bytes
(prefill done) or its end take them off again.

Cost of a candidate: its pending tokens plus this request's own uncached tokens there (an
estimate of the prefill work before this request's first token), plus what this request's
prefill costs the requests that will arrive at that pod meanwhile: its own uncached tokens times
``interference`` times the pod's share of recent picks relative to an even share (picks decay
over about ``trafficWindow`` picks). A cold long prompt so goes to a quiet pod rather than to the
pod serving a hot prefix; a short cached request hardly notices the term. Score:
``1 / (1 + (cost - min cost) / scaleTokens)``, so a few hundred tokens of difference barely
matter and a cold long prompt in the way does. The scheduler runs this scorer after the prefix
scorers, whose matches it reads.
"""

from __future__ import annotations

from typing import ClassVar

from epp.datastore.endpoint import EndpointState
from epp.datastore.store import Snapshot
from epp.request import InferenceRequest
from epp.scheduling.params import Params
from epp.scheduling.prefix_index import CHARS_PER_TOKEN
from epp.scheduling.types import CycleState

# Prefix scorers leave {address: matched prompt tokens} here for the rest of the cycle, and the
# prompt's exact token count when they tokenized it.
MATCHED_TOKENS = "prefix-matched-tokens"
PROMPT_TOKENS = "prompt-tokens"


class PrefillLoadScorer:
    type_name: ClassVar[str] = "prefill-load-scorer"
    reads_other_scores: ClassVar[bool] = True

    def __init__(self, name: str, params: Params) -> None:
        self.name = name
        self.scale = params.float("scaleTokens", 1024.0, minimum=1.0)
        self.interference = params.float("interference", 3.0, minimum=0.0)
        self.traffic = TrafficShare(params.int("trafficWindow", 64, minimum=1))
        params.done()
        self.pending: dict[str, float] = {}

    def score(self, request: InferenceRequest, snapshot: Snapshot, candidates: list[EndpointState],
              cycle: CycleState) -> list[float]:
        prompt = cycle.data.get(PROMPT_TOKENS) or len(request.prompt) / CHARS_PER_TOKEN
        cycle.data[self.name] = prompt  # taken over by ``record``
        pending = self.pending
        matched = cycle.data.get(MATCHED_TOKENS) or {}
        # Work ahead of this request, its own uncached part, and the delay that part brings to the
        # pod's next arrivals, per candidate.
        relative = self.traffic.relative([c.address for c in candidates]) if self.interference else None
        loads = []
        for i, c in enumerate(candidates):
            own = max(0.0, prompt - matched.get(c.address, 0))
            extra = own * self.interference * relative[i] if relative is not None else 0.0
            loads.append(pending.get(c.address, 0.0) + own + extra)
        floor = min(loads, default=0.0)
        scale = self.scale
        return [1.0 / (1.0 + (x - floor) / scale) for x in loads]

    def record(self, address: str, cycle: CycleState) -> None:
        self.traffic.add(address)
        tokens = cycle.data.pop(self.name, 0.0)
        matched = cycle.data.get(MATCHED_TOKENS)
        if matched:
            tokens = max(0.0, tokens - matched.get(address, 0))
        if tokens <= 0:
            return
        self.pending[address] = self.pending.get(address, 0.0) + tokens
        cycle.data[self.name] = (address, tokens)

    def prefill_done(self, cycle: CycleState) -> None:
        """The pod finished this pick's prefill (first response bytes), or the request ended."""
        entry = cycle.data.pop(self.name, None)
        if entry is None:
            return
        address, tokens = entry
        left = self.pending.get(address, 0.0) - tokens
        if left > 0.5:
            self.pending[address] = left
        else:
            self.pending.pop(address, None)

    def forget(self, address: str) -> None:
        self.pending.pop(address, None)
        self.traffic.forget(address)


class TrafficShare:
    """Each pod's share of recent picks, the older ones fading by ``1 - 1/window`` per pick.

    The fade is applied lazily: each pick counts ``weight``, which grows by ``1/decay`` per pick,
    and everything is rescaled before the numbers get large."""

    def __init__(self, window: int) -> None:
        self.decay = 1.0 - 1.0 / window
        self.weight = 1.0
        self.counts: dict[str, float] = {}

    def add(self, address: str) -> None:
        self.counts[address] = self.counts.get(address, 0.0) + self.weight
        self.weight /= self.decay
        if self.weight > 1e100:
            self.counts = {a: c / self.weight for a, c in self.counts.items()}
            self.weight = 1.0

    def relative(self, addresses: list[str]) -> list[float]:
        """Each address's recent picks over the mean of the given addresses' (1.0 = an even share)."""
        counts = [self.counts.get(a, 0.0) for a in addresses]
        total = sum(counts)
        if total <= 0:
            return [0.0] * len(addresses)
        mean = total / len(addresses)
        return [c / mean for c in counts]

    def forget(self, address: str) -> None:
        self.counts.pop(address, None)
