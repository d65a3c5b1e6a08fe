"""A recorded trace (``epp record``) read back for a replay: its pool, its requests, prompts made
from block hashes, and the engine speed its responses show.

A trace holds no prompt text, only the chained hashes of each prompt's 64-character blocks; two
prompts that share a prefix share its leading hashes. ``prompt_text`` turns each hash into the
same made-up text wherever it appears, so replayed prompts share exactly the prefixes the live
ones did, at the live prompts' token counts.
"""

from __future__ import annotations

import random
import statistics
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import orjson

from epp.requestcontrol.recorder import BLOCK_CHARS
from epp.sim.profiles import EngineParams

LETTERS = "abcdefghijklmnopqrstuvwxyz"


class TraceError(ValueError):
    """The trace cannot be read (the message names the file and the line)."""


@dataclass(frozen=True, slots=True)
class PoolMember:
    """One endpoint of the recorded pool, as its metrics described its KV cache."""

    address: str
    block_size: int | None = None
    num_gpu_blocks: int | None = None
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class TracedRequest:
    """One finished request of the trace."""

    t: float
    model: str
    blocks: tuple[str, ...]
    prompt_chars: int
    prompt_tokens: int
    completion_tokens: int
    max_tokens: int | None
    stream: bool
    cached_tokens: int | None
    ttft_s: float | None
    duration_s: float
    status: int
    endpoint: str
    priority: int = 0  # the objective's priority (flow control's band)
    flow: str | None = None  # the fairness flow, hashed (None: the default flow)


@dataclass(slots=True)
class RecordedTrace:
    path: str
    pool: list[PoolMember]
    requests: list[TracedRequest]

    @property
    def seconds(self) -> float:
        return self.requests[-1].t if self.requests else 0.0

    def first_seen_share(self) -> float:
        """The share of requests most of whose prompt blocks no earlier request carried: cold
        wherever they go (compulsory misses), whatever the routing."""
        seen: set[str] = set()
        cold = 0
        for r in self.requests:
            if r.blocks and sum(b in seen for b in r.blocks) * 2 < len(r.blocks):
                cold += 1
            seen.update(r.blocks)
        return cold / len(self.requests) if self.requests else 0.0

    def tokens_per_block(self) -> int:
        """Prompt tokens per 64-character block (the live tokenizer's ratio, median over requests)."""
        ratios = [r.prompt_tokens / r.prompt_chars for r in self.requests if r.prompt_chars >= BLOCK_CHARS
                  and r.prompt_tokens > 0]
        return max(1, min(BLOCK_CHARS, round(BLOCK_CHARS * statistics.median(ratios)))) if ratios else 16


_FIELDS: dict[str, tuple[type[Any], ...]] = {
    "t": (int, float), "model": (str,), "blocks": (list,), "prompt_chars": (int,), "prompt_tokens": (int,),
    "completion_tokens": (int,), "status": (int,), "duration_ms": (int, float)}


def load_trace(path: Path) -> RecordedTrace:
    """Read ``path``; TraceError names the line of anything it cannot use."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise TraceError(f"{path}: cannot read the trace: {e.strerror}") from None
    pool: list[PoolMember] = []
    requests: list[TracedRequest] = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            rec = orjson.loads(line)
        except orjson.JSONDecodeError as e:
            raise TraceError(f"{where}: not JSON ({e})") from None
        if not isinstance(rec, dict):
            raise TraceError(f"{where}: expected a JSON object")
        if "pool" in rec:
            pool = _pool(rec["pool"], where)
            continue
        for name, types in _FIELDS.items():
            value = rec.get(name)
            if not isinstance(value, types) or isinstance(value, bool):
                raise TraceError(f"{where}.{name}: expected {' or '.join(t.__name__ for t in types)}, got {value!r}")
        ttft = rec.get("ttft_ms")
        requests.append(TracedRequest(
            float(rec["t"]), rec["model"], tuple(str(b) for b in rec["blocks"]), rec["prompt_chars"],
            rec["prompt_tokens"], rec["completion_tokens"], _opt_int(rec.get("max_tokens")),
            rec.get("stream") is True, _opt_int(rec.get("cached_tokens")),
            float(ttft) / 1000 if isinstance(ttft, (int, float)) else None, float(rec["duration_ms"]) / 1000,
            rec["status"], str(rec.get("endpoint") or ""), _opt_int(rec.get("priority")) or 0,
            str(rec["flow"]) if isinstance(rec.get("flow"), str) and rec["flow"] else None))
    if not requests:
        raise TraceError(f"{path}: the trace holds no request")
    requests.sort(key=lambda r: r.t)
    return RecordedTrace(str(path), pool, requests)


def _pool(value: Any, where: str) -> list[PoolMember]:
    if not isinstance(value, list):
        raise TraceError(f"{where}.pool: expected a list")
    out = []
    for i, p in enumerate(value):
        if not isinstance(p, dict) or not isinstance(p.get("address"), str):
            raise TraceError(f"{where}.pool[{i}]: expected an object with an address")
        labels = p.get("labels")
        labels = labels if isinstance(labels, dict) else {}
        out.append(PoolMember(p["address"], _opt_int(p.get("block_size")), _opt_int(p.get("num_gpu_blocks")),
                              {str(k): str(v) for k, v in labels.items()}))
    return out


def _opt_int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class PromptMaker:
    """Made-up prompt text with the trace's prefix structure: one run of pieces per block hash,
    the same wherever the hash appears, and a tail of pieces of the request's own."""

    def __init__(self, tokens_per_block: int) -> None:
        self.tokens_per_block = tokens_per_block
        self._blocks: dict[str, str] = {}

    def block(self, digest: str) -> str:
        text = self._blocks.get(digest)
        if text is None:
            text = self._blocks[digest] = _pieces(random.Random(digest), self.tokens_per_block)
        return text

    def prompt(self, request: TracedRequest, index: int) -> str:
        head = "".join(self.block(b) for b in request.blocks)
        tail = max(1, request.prompt_tokens - len(request.blocks) * self.tokens_per_block)
        return head + _pieces(random.Random(f"tail {index}"), tail)


def _pieces(rng: random.Random, n: int) -> str:
    """``n`` pieces of 4 characters (" xyz"): one token each for the simulator's tokenizer."""
    return "".join(" " + "".join(rng.choices(LETTERS, k=3)) for _ in range(n))


# -- engine speed ------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class SpeedFit:
    """What the trace's responses say about the engines' speed (None: too few samples)."""

    prefill_per_token_s: float | None
    first_token_overhead_s: float | None
    decode_step_s: float | None
    samples: int

    def applied(self, base: EngineParams) -> EngineParams:
        """``base`` with this speed: prefill per token and overhead, decode steps scaled to match."""
        p = base
        if self.prefill_per_token_s is not None and self.first_token_overhead_s is not None:
            p = replace(p, prefill_per_token_s=self.prefill_per_token_s,
                        prefill_overhead_s=max(0.0, self.first_token_overhead_s - p.decode_base_s))
        if self.decode_step_s is not None:
            scale = self.decode_step_s / (p.decode_base_s + p.decode_per_seq_s)
            p = replace(p, decode_base_s=p.decode_base_s * scale, decode_per_seq_s=p.decode_per_seq_s * scale)
        return p


MIN_SAMPLES = 20


def measure_speed(requests: list[TracedRequest]) -> SpeedFit:
    """Fit TTFT = overhead + per-token x uncached prompt tokens along the fastest responses of each
    size (the lower envelope: requests that waited least; sizes binned in powers of two), and the
    decode step from the fastest streams' time per output token."""
    points = sorted((r.prompt_tokens - (r.cached_tokens or 0), r.ttft_s) for r in requests
                    if r.status == 200 and r.ttft_s is not None and r.cached_tokens is not None and r.stream)
    per_token = overhead = None
    if len(points) >= MIN_SAMPLES:
        bins: dict[int, list[tuple[int, float]]] = {}
        for u, t in points:  # by size, in powers of two: a few long prompts are a bin of their own
            bins.setdefault(max(0, u).bit_length(), []).append((u, t))
        xs, ys = [], []
        for part in bins.values():
            if len(part) < 3:
                continue
            ttfts = sorted(t for _, t in part)
            xs.append(statistics.median(u for u, _ in part))
            ys.append(ttfts[len(ttfts) // 10])  # the ones that waited least
        if len(xs) >= 2 and max(xs) >= 2 * max(1, min(xs)):
            slope, intercept = statistics.linear_regression(xs, ys)
            if slope > 0:
                per_token, overhead = slope, max(0.0, intercept)
    steps = sorted((r.duration_s - r.ttft_s) / (r.completion_tokens - 1) for r in requests
                   if r.status == 200 and r.stream and r.ttft_s is not None and r.completion_tokens >= 8)
    decode = steps[len(steps) // 10] if len(steps) >= MIN_SAMPLES else None
    return SpeedFit(per_token, overhead, decode, len(points))
