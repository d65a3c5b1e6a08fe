"""``context-length-aware`` (the reference's type): pods declare the prompt lengths they are for in
a label (``label``, default ``llm-d.ai/context-length-range``, ``"min-max"`` tokens).

Score: a pod whose range holds the request's prompt scores in (0.3, 1]: 0.3 + 0.7 x (0.7 x
1 / (1 + width / 10,000) + 0.3 x headroom / width), so narrow, specialised ranges win; a pod out of
range scores under 0.3, less the farther the prompt is from its range (0.3 / (1 + distance /
1,000)); a pod without the label 0.5; a label that does not parse 0. With ``enableFiltering``
(default false) it also drops the pods whose range does not hold the prompt (unlabelled ones
stay, unparsable ones go). The prompt's length is epp's token estimate (exact when a plugin
tokenized it, else 4 characters per token, as the reference's estimate backend).
"""

from __future__ import annotations

import logging
from typing import ClassVar

from epp.datastore.endpoint import EndpointState
from epp.datastore.store import Snapshot
from epp.request import InferenceRequest
from epp.scheduling.contract import AlsoFilters, Scorer
from epp.scheduling.params import Params
from epp.scheduling.types import ConfigError, CycleState, prompt_tokens

log = logging.getLogger(__name__)

DEFAULT_LABEL = "llm-d.ai/context-length-range"
FALLBACK = 0.3


def parse_range(text: str) -> tuple[int, int] | None:
    """``"min-max"`` (min <= max), or None."""
    lo, sep, hi = text.partition("-")
    try:
        r = (int(lo.strip()), int(hi.strip())) if sep and "-" not in hi else None
    except ValueError:
        return None
    return r if r is not None and r[0] <= r[1] else None


def range_score(length: int, lo: int, hi: int) -> float:
    if lo <= length <= hi:
        width = hi - lo
        if width == 0:
            return 1.0
        raw = 0.7 / (1.0 + width / 10000.0) + 0.3 * (hi - length) / width
        return FALLBACK + raw * (1.0 - FALLBACK)
    distance = length - hi if length > hi else lo - length
    return FALLBACK / (1.0 + distance / 1000.0)


class ContextLengthAware(Scorer, AlsoFilters):
    type_name: ClassVar[str] = "context-length-aware"

    def __init__(self, name: str, params: Params) -> None:
        self.name = name
        label = params.text("label", DEFAULT_LABEL)
        if not label:
            raise ConfigError(f"{params.path}.label", "must be specified")
        self.label = label
        self.filtering = params.bool("enableFiltering", False)
        params.done()

    def filter(self, request: InferenceRequest, snapshot: Snapshot, candidates: list[EndpointState],
               cycle: CycleState) -> list[EndpointState]:
        if not self.filtering:
            return candidates
        length = prompt_tokens(cycle, request.prompt)
        kept = []
        for c in candidates:
            text = c.labels.get(self.label)
            if text is None:
                kept.append(c)
                continue
            r = parse_range(text)
            if r is not None and r[0] <= length <= r[1]:
                kept.append(c)
        return kept

    def score(self, request: InferenceRequest, snapshot: Snapshot, candidates: list[EndpointState],
              cycle: CycleState) -> list[float]:
        length = prompt_tokens(cycle, request.prompt)
        scores = []
        for c in candidates:
            text = c.labels.get(self.label)
            if text is None:
                scores.append(0.5)
                continue
            r = parse_range(text)
            scores.append(range_score(length, *r) if r is not None else 0.0)
        return scores
