"""An endpoint's state as the scheduler sees it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class EngineSignals:
    """One scrape of a model server's metrics (summed over engines)."""

    waiting: float = 0.0
    running: float = 0.0
    kv_usage: float = 0.0
    block_size: int | None = None
    num_gpu_blocks: int | None = None
    models: tuple[str, ...] = ()  # the model_name labels of the queue series (what the pod serves)
    # LoRA adapters (vllm:lora_requests_info, its latest sample): running, waiting, and how many fit
    active_adapters: frozenset[str] = frozenset()
    waiting_adapters: frozenset[str] = frozenset()
    max_adapters: int = 0


@dataclass(frozen=True, slots=True)
class EndpointState:
    """Immutable view of one endpoint, replaced on every scrape."""

    address: str
    signals: EngineSignals | None = None
    scraped_at: float = 0.0  # monotonic time of the last successful scrape
    error: str | None = None  # last scrape error, None when the last scrape succeeded
    labels: dict[str, str] = field(default_factory=dict)
    name: str = ""  # namespace/name as the reference names it (its pod's, "-rank-N"), with discovery
    attributes: Mapping[str, float] = field(default_factory=dict)  # "Attribute/producer" -> value (GPU use...)

    @property
    def pod(self) -> str:
        """The pod's own name (without the namespace and the rank suffix), when discovered."""
        return self.name.rpartition("/")[2].rpartition("-rank-")[0] if "-rank-" in self.name else \
            self.name.rpartition("/")[2]

    def fresh(self, now: float, staleness: float) -> bool:
        return self.signals is not None and self.error is None and now - self.scraped_at <= staleness
