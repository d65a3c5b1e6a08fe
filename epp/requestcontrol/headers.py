"""Request headers epp reads, by the reference's current names with their older aliases."""

from __future__ import annotations

from collections.abc import Mapping

OBJECTIVE = "x-llm-d-inference-objective"
MODEL_REWRITE = "x-llm-d-model-name-rewrite"
FAIRNESS_ID = "x-llm-d-inference-fairness-id"
SLO_TTFT_MS = "x-llm-d-slo-ttft-ms"
SLO_TPOT_MS = "x-llm-d-slo-tpot-ms"

# Current name -> the names read, in order (the current one first, then deprecated aliases).
ALIASES: Mapping[str, tuple[str, ...]] = {
    OBJECTIVE: (OBJECTIVE, "x-gateway-inference-objective"),
    MODEL_REWRITE: (MODEL_REWRITE, "x-gateway-model-name-rewrite"),
    FAIRNESS_ID: (FAIRNESS_ID, "x-gateway-inference-fairness-id"),
    SLO_TTFT_MS: (SLO_TTFT_MS, "x-slo-ttft-ms"),
    SLO_TPOT_MS: (SLO_TPOT_MS, "x-slo-tpot-ms"),
}


def header(headers: Mapping[str, str], name: str) -> str:
    """The value of ``name`` (or of its first alias present); "" when none is."""
    for key in ALIASES.get(name, (name,)):
        value = headers.get(key)
        if value is not None:
            return value
    return ""
