"""What the scheduler sees of one request (built by ``epp.requestcontrol.parsing``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True, weakref_slot=True)
class InferenceRequest:
    request_id: str
    path: str  # as ``route_path`` normalises it
    model: str = ""
    prompt: str = ""  # the text prefix matching reads (chat messages rendered with their roles)
    headers: Mapping[str, str] = field(default_factory=dict)
    target_model: str = ""  # the model to send the server (an InferenceModelRewrite may change it)
    body: dict[str, Any] | None = None  # the parsed JSON (read-only: the bytes are what is forwarded)
    objective: str = ""  # the x-gateway-inference-objective header (or the API key's tier)
    tenant: str = ""  # the API key's tenant: the flow-control fairness id (overrides the header)
    priority: int = 0  # the objective's priority; negative = sheddable
    token_ids: list[int] | None = None  # the prompt's token ids, when a token producer gave them
    real_tokens: bool = False  # whether those are the model's tokens (not the byte estimate)
    api: str = ""  # what the parser read: chat, completions, messages, embeddings, responses, ... ("": not read)
    arrived: float = 0.0  # perf_counter() when epp received it
    body_bytes: int | None = None  # the request body's size, when known
    prepared: dict[str, object] = field(default_factory=dict)  # what preparing plugins left, by plugin name

    @property
    def chat(self) -> bool:
        return self.path.startswith("/v1/chat/completions")
