"""Seeded request traces for routing benchmarks (``epp bench routing``).

A trace is a list of sessions, each starting at a time offset and sending one or more chat
turns in order (a turn waits for the previous answer, then ``think_s``; the answer joins the
history, so a multi-turn chat's prompt grows and its prefix is the previous turn's). Workloads:

- ``zipf``: shared system prompts in ``groups`` groups with Zipf popularity, one question each;
- ``hot``: one system prompt takes ``hot_share`` of the traffic: more than one server can serve;
- ``multiturn``: chats of ``turns`` turns whose history grows;
- ``long``: a mix of long (``long_tokens``) and short prompts;
- ``mix``: zipf + hot + multiturn (the target scenario);
- ``bursty``: the mix, with arrivals in on/off bursts instead of Poisson.

Arrivals are open-loop at ``rate`` requests/s (sessions start at rate / mean turns). Traces can
be saved and replayed as JSON.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

WORKLOADS = ("mix", "zipf", "hot", "multiturn", "long", "bursty")


@dataclass
class Session:
    start_s: float
    system: str
    questions: list[str]
    max_tokens: int
    think_s: float = 0.0
    kind: str = "zipf"
    headers: dict[str, str] = field(default_factory=dict)  # sent with every turn (objective, fairness id)


@dataclass
class Trace:
    workload: str
    seed: int
    rate: float
    sessions: list[Session] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return sum(len(s.questions) for s in self.sessions)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps({"workload": self.workload, "seed": self.seed, "rate": self.rate,
                                    "sessions": [asdict(s) for s in self.sessions]}))

    def first_seen_share(self) -> float:
        """Share of requests whose system prompt no earlier request carried: no router can find
        it cached (compulsory misses), so at least this share computes the whole prefix."""
        return len({s.system for s in self.sessions}) / self.requests if self.requests else 0.0

    @classmethod
    def load(cls, path: Path) -> Trace:
        raw = json.loads(path.read_text())
        return cls(raw["workload"], raw["seed"], raw["rate"], [Session(**s) for s in raw["sessions"]])


@dataclass(frozen=True)
class WorkloadParams:
    groups: int = 128  # x prefix_tokens: more than one h100 server's KV cache, less than 8 servers'
    prefix_tokens: int = 6000
    question_tokens: int = 40
    output_tokens: int = 64
    zipf_alpha: float = 1.1
    hot_share: float = 0.25
    turns: int = 4
    think_s: float = 0.5
    long_tokens: int = 12000
    long_share: float = 0.2


def _text(rng: random.Random, tokens: int, tag: str) -> str:
    # " wNNN" is about one simulator token per 2.5 characters; close enough for sizing.
    return tag + "".join(f" w{rng.randrange(1000):03d}" for _ in range(max(1, tokens // 2)))


def _zipf_weights(n: int, alpha: float) -> list[float]:
    return [1.0 / (k + 1) ** alpha for k in range(n)]


def build(workload: str, n_requests: int, rate: float, seed: int = 1, p: WorkloadParams | None = None) -> Trace:
    """A trace of about ``n_requests`` requests arriving at ``rate`` requests/s."""
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r} (one of {', '.join(WORKLOADS)})")
    p = p or WorkloadParams()
    rng = random.Random(seed)
    systems = [_text(random.Random(seed * 7919 + g), p.prefix_tokens, f"group {g}:") for g in range(p.groups)]
    hot_system = _text(random.Random(seed * 31 + 5), p.prefix_tokens, "hot:")
    weights = _zipf_weights(p.groups, p.zipf_alpha)
    kinds: list[tuple[str, float]]
    if workload in ("mix", "bursty"):
        kinds = [("zipf", 0.55), ("hot", p.hot_share), ("multiturn", 0.45 - p.hot_share)]
    elif workload == "long":
        kinds = [("long", p.long_share), ("zipf", 1 - p.long_share)]
    else:
        kinds = [(workload, 1.0)]
    trace = Trace(workload, seed, rate)
    session_rate = rate / (1 + (p.turns - 1) * sum(w for k, w in kinds if k == "multiturn"))
    active = 0.0  # Poisson time; bursty maps it to 2 s on at 3x the rate, 4 s off (the same mean)
    made = 0
    while made < n_requests:
        t = active + 4.0 * (active // 2.0) if workload == "bursty" else active
        kind = rng.choices([k for k, _ in kinds], [w for _, w in kinds])[0]
        q = _text(rng, p.question_tokens, f"question {made}:")
        if kind == "zipf":
            s = Session(t, rng.choices(systems, weights)[0], [q], p.output_tokens, kind=kind)
        elif kind == "hot":
            s = Session(t, hot_system, [q], p.output_tokens, kind=kind)
        elif kind == "multiturn":
            turns = [_text(rng, p.question_tokens, f"turn {i} of chat {made}:") for i in range(p.turns)]
            s = Session(t, rng.choices(systems, weights)[0], turns, p.output_tokens, p.think_s, kind=kind)
        else:  # long
            s = Session(t, _text(rng, p.long_tokens, f"document {made}:"), [q], p.output_tokens, kind=kind)
        trace.sessions.append(s)
        made += len(s.questions)
        active += rng.expovariate(session_rate * (3.0 if workload == "bursty" else 1.0))
    return trace
