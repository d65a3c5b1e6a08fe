"""Engine parameters and presets.

Presets take their shape from public figures for Llama-3.1-8B (bf16) served by vLLM:
- H100 80 GB: ~6-7 ms inter-token latency at small batch rising ~0.1 ms per extra running
  sequence; prefill ~25k tokens/s; ~55 GB left for KV at 128 KiB/token -> ~450k tokens.
- A100 80 GB: ~1.5x slower decode, ~2x slower prefill, a similar KV budget.
They are shapes to make benchmarks resemble GPUs, not measurements of any particular card.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class EngineParams:
    """Every knob of one simulated engine (all are also `epp sim` flags)."""

    model: str = "meta-llama/Llama-3.1-8B-Instruct"
    served_model_names: tuple[str, ...] = ()
    lora_adapters: tuple[str, ...] = ()
    max_lora: int = 4
    block_size: int = 16
    num_gpu_blocks: int = 28000
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = 131072
    enable_prefix_caching: bool = True
    # Timing model (seconds).
    prefill_overhead_s: float = 0.004
    prefill_per_token_s: float = 0.00004
    decode_base_s: float = 0.0065
    decode_per_seq_s: float = 0.0001
    default_max_tokens: int = 256
    # Python-hash-seed emulation for vLLM's root block hash (None: vLLM 0.32's fixed root).
    hash_seed: str | None = None
    data_parallel_rank: int = 0
    # P/D: what a decode pod pays to receive a prompt's KV blocks from its prefiller (llama-8B in
    # bf16 holds 128 KiB per token: 32 layers x 8 KV heads x 128 x 2 (K and V) x 2 bytes).
    kv_bytes_per_token: int = 131072
    kv_transfer_gbytes_per_s: float = 20.0

    def names(self) -> tuple[str, ...]:
        return self.served_model_names or (self.model,)

    def with_overrides(self, **overrides: object) -> EngineParams:
        clean = {k: v for k, v in overrides.items() if v is not None}
        return dataclasses.replace(self, **clean)  # type: ignore[arg-type]


PROFILES: dict[str, EngineParams] = {
    "h100-llama8b": EngineParams(),
    "a100-llama8b": EngineParams(
        num_gpu_blocks=26000,
        prefill_overhead_s=0.006,
        prefill_per_token_s=0.00008,
        decode_base_s=0.0095,
        decode_per_seq_s=0.00015,
    ),
    # A generation 2.5x slower than the H100 in every step, with 2.5x less KV cache (mixed fleets).
    "slow-llama8b": EngineParams(
        num_gpu_blocks=11200,
        prefill_overhead_s=0.010,
        prefill_per_token_s=0.0001,
        decode_base_s=0.01625,
        decode_per_seq_s=0.00025,
    ),
    # A small card: KV pressure and queueing arrive early (useful for eviction scenarios).
    "l4-llama8b": EngineParams(
        num_gpu_blocks=2500,
        max_num_seqs=64,
        max_num_batched_tokens=2048,
        prefill_overhead_s=0.010,
        prefill_per_token_s=0.00025,
        decode_base_s=0.030,
        decode_per_seq_s=0.0004,
    ),
    # Near-zero latency for protocol tests.
    "fast": EngineParams(
        model="sim-model",
        num_gpu_blocks=4096,
        prefill_overhead_s=0.0,
        prefill_per_token_s=0.0000002,
        decode_base_s=0.0005,
        decode_per_seq_s=0.0,
        default_max_tokens=16,
    ),
}


def profile(name: str) -> EngineParams:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown profile {name!r}; choose one of {', '.join(sorted(PROFILES))}") from None


def fleet_params(spec: str, servers: int) -> list[EngineParams]:
    """One preset for ``servers`` servers (``h100-llama8b``), or a mixed fleet that gives its own
    counts (``h100-llama8b*4,slow-llama8b*4``; ``servers`` is then ignored)."""
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if len(parts) == 1 and "*" not in parts[0]:
        return [profile(parts[0])] * servers
    out: list[EngineParams] = []
    for part in parts:
        name, _, count = part.partition("*")
        try:
            n = int(count) if count else 1
        except ValueError:
            raise ValueError(f"bad fleet part {part!r}: expected PRESET*COUNT") from None
        if n < 1:
            raise ValueError(f"bad fleet part {part!r}: the count must be >= 1")
        out += [profile(name.strip())] * n
    models = {p.names()[0] for p in out}
    if len(models) > 1:
        raise ValueError(f"a fleet serves one model; {spec!r} mixes {', '.join(sorted(models))}")
    return out
