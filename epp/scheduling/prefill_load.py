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
matter and a cold long prompt in the way does. It consumes the prefix scorers' MATCHED_TOKENS
and PROMPT_TOKENS slots, so the scheduler runs it after them.
"""

from __future__ import annotations

from typing import Any, ClassVar

from epp.datastore.endpoint import EndpointState
from epp.datastore.store import Snapshot
from epp.request import InferenceRequest
from epp.scheduling.contract import ForgetsEndpoints, ObservesPicks, ObservesPrefill, Scorer
from epp.scheduling.params import Params
from epp.scheduling.types import CHARS_PER_TOKEN, MATCHED_TOKENS, PROMPT_TOKENS, CycleState, Slot


class PrefillLoadScorer(Scorer, ObservesPicks, ObservesPrefill, ForgetsEndpoints):
    type_name: ClassVar[str] = "prefill-load-scorer"
    consumes: ClassVar[tuple[Slot[Any], ...]] = (MATCHED_TOKENS, PROMPT_TOKENS)

    def __init__(self, name: str, params: Params) -> None:
        self.name = name
        self.scale = params.float("scaleTokens", 1024.0, minimum=1.0)
        self.interference = params.float("interference", 3.0, minimum=0.0)
        self.traffic = TrafficShare(params.int("trafficWindow", 64, minimum=1))
        params.done()
        self.pending: dict[str, float] = {}
        self._prompt: Slot[float] = Slot(f"{name}/prompt-tokens")  # this request's, from ``score``
        self._charged: Slot[tuple[str, float]] = Slot(f"{name}/charged")  # (pod, tokens) until prefill ends

    def score(self, request: InferenceRequest, snapshot: Snapshot, candidates: list[EndpointState],
              cycle: CycleState) -> list[float]:
        exact = cycle.get(PROMPT_TOKENS)
        prompt = float(exact) if exact else len(request.prompt) / CHARS_PER_TOKEN
        cycle.put(self._prompt, prompt)
        pending = self.pending
        matched = cycle.get(MATCHED_TOKENS) or {}
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

    def on_pick(self, endpoint: str, cycle: CycleState) -> None:
        self.traffic.add(endpoint)
        tokens = cycle.pop(self._prompt) or 0.0
        matched = cycle.get(MATCHED_TOKENS)
        if matched:
            tokens = max(0.0, tokens - matched.get(endpoint, 0))
        if tokens <= 0:
            return
        self.pending[endpoint] = self.pending.get(endpoint, 0.0) + tokens
        cycle.put(self._charged, (endpoint, tokens))

    def on_prefill_done(self, endpoint: str, cycle: CycleState) -> None:
        """The pod finished this pick's prefill (first response bytes), or the request ended."""
        entry = cycle.pop(self._charged)
        if entry is None:
            return
        address, tokens = entry
        left = self.pending.get(address, 0.0) - tokens
        if left > 0.5:
            self.pending[address] = left
        else:
            self.pending.pop(address, None)

    def on_endpoint_removed(self, endpoint: str) -> None:
        self.pending.pop(endpoint, None)
        self.traffic.forget(endpoint)


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
