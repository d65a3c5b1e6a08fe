"""The simulated engine: vLLM-like continuous batching over a paged, prefix-cached KV cache.

One asyncio task per engine runs steps. A step schedules running requests first (decode: one
token each; prefill: a chunk), then admits waiting requests FCFS while sequences, token budget
and KV blocks allow; a request whose prompt does not fit waits (head-of-line, as vLLM). When a
decoding request needs a block and none is free, the most recently admitted request is preempted
(recompute). The step then sleeps for a modelled duration:

    step = decode_base + decode_per_seq * decoding + [prefill_overhead + prefill_per_token * tokens]

so TTFT = queue wait + prefill of the uncached prompt tokens (shared with concurrent prefills),
and inter-token latency grows with the running batch. Steps follow a modelled clock, so a busy
host delays tokens but does not slow the simulated GPU down (``stats.late_s`` says how far behind
it ran). An idle engine awaits an event: 1,000 idle engines cost nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from epp.blockhash import block_digests, root_hash
from epp.sim.kvcache import KVCache
from epp.sim.profiles import EngineParams
from epp.sim.tokenizer import SimTokenizer


@dataclass(slots=True)
class SimRequest:
    """One generation request inside the engine."""

    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    stop_after: int
    lora_name: str | None = None
    cache_salt: str | None = None
    arrival: float = field(default_factory=time.monotonic)
    output_ids: list[int] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)
    digests: list[bytes] = field(default_factory=list)
    stored_blocks: int = 0
    num_computed: int = 0
    cached_tokens: int = -1
    scheduled_at: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    finish_reason: str | None = None
    aborted: bool = False
    queue: asyncio.Queue[int | None] = field(default_factory=asyncio.Queue)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)


TTFT_KEPT = 100_000


@dataclass(slots=True)
class StepStats:
    """Counters the metrics endpoint reads."""

    prefix_queries: int = 0
    prefix_hits: int = 0
    preemptions: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    steps: int = 0  # timed steps
    busy_s: float = 0.0  # modelled GPU time of the steps run
    prefill_busy_s: float = 0.0  # of which steps that computed prompt tokens
    remote_prefills: int = 0  # requests whose prompt a prefiller computed (P/D), blocks received here
    imported_blocks: int = 0
    late_s: float = 0.0  # summed lateness of timed steps behind the modelled clock (host contention)
    # The engine's own TTFT of recent requests (arrival here to first token): a benchmark tells
    # what routing decided (queue + prefill on the chosen pod) from the router's own delay.
    ttft_s: deque[float] = field(default_factory=lambda: deque(maxlen=TTFT_KEPT))
    finished: dict[str, int] = field(
        default_factory=lambda: {"stop": 0, "length": 0, "abort": 0, "error": 0, "repetition": 0})


Observer = Callable[[str, float], None]

MAX_DEBT_S = 0.25  # at most this much lost host time is made up by shorter step sleeps


class Engine:
    """A single simulated vLLM engine."""

    def __init__(self, params: EngineParams, seed: int = 0, observe: Observer | None = None,
                 publish: Callable[[list[dict[str, Any]]], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.params = params
        self._clock = clock  # request timestamps (the event loop's clock: a virtual one in `epp tune`)
        self.seed = seed
        self.tokenizer = SimTokenizer()
        self.kv = KVCache(params.num_gpu_blocks, params.block_size, params.enable_prefix_caching)
        self.root = root_hash(params.hash_seed)
        self.waiting: deque[SimRequest] = deque()
        self.running: list[SimRequest] = []
        self.stats = StepStats()
        self.extra_step_latency_s = 0.0
        self._observe = observe or (lambda _name, _v: None)
        self._publish = publish
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._ids = itertools.count()

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"engine-{id(self)}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for r in [*self.running, *self.waiting]:
            r.queue.put_nowait(None)
        self.running.clear()
        self.waiting.clear()

    # -- API -----------------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], max_tokens: int, min_tokens: int = 0, ignore_eos: bool = False,
               lora_name: str | None = None, cache_salt: str | None = None) -> SimRequest:
        """Queue a request; its tokens arrive on ``request.queue`` (None marks the end)."""
        if ignore_eos:
            stop_after = max_tokens
        else:
            # A deterministic "EOS" position per (seed, prompt), within [min_tokens, max_tokens].
            h = zlib.crc32(repr((self.seed, prompt_ids[-64:], len(prompt_ids))).encode())
            low = max(1, min(min_tokens, max_tokens))
            stop_after = low + h % (max_tokens - low + 1)
        req = SimRequest(f"{next(self._ids)}", prompt_ids, max_tokens, stop_after, lora_name, cache_salt,
                         arrival=self._clock())
        self.waiting.append(req)
        self._wake.set()
        return req

    def import_blocks(self, prompt_ids: list[int], lora_name: str | None = None, cache_salt: str | None = None) -> int:
        """P/D: the prompt's full blocks arrive computed from a prefiller (a KV connector's
        transfer) and enter this engine's prefix cache; the request submitted next finds them.
        Returns the blocks the cache now holds for it (fewer when the cache is full)."""
        kv, bs = self.kv, self.params.block_size
        lora = (lora_name, lora_name) if lora_name else None
        digests = block_digests(prompt_ids, bs, self.root, lora, cache_salt)[: (len(prompt_ids) - 1) // bs]
        hit = kv.longest_hit(digests)
        need = len(digests) - hit
        if need <= 0 or not kv.prefix_caching:
            return hit
        ids = kv.allocate(min(need, kv.num_free()))
        if not ids:
            return hit
        kv.store(ids, digests[hit : hit + len(ids)], digests[hit - 1] if hit else self.root,
                 prompt_ids[hit * bs : (hit + len(ids)) * bs], lora_name)
        kv.release(ids)
        self.stats.remote_prefills += 1
        self.stats.imported_blocks += len(ids)
        self._flush_events()
        return hit + len(ids)

    def abort(self, req: SimRequest) -> None:
        req.aborted = True
        self._wake.set()

    def reset_prefix_cache(self) -> bool:
        ok = self.kv.reset()
        self._flush_events()
        return ok

    # -- the loop ------------------------------------------------------------------------------
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        clock = loop.time()  # when the modelled GPU finished its last step
        while True:
            if not self.running and not self.waiting:
                self._wake.clear()
                await self._wake.wait()
                clock = loop.time()
            duration, prefills, decodes = self._schedule()
            self._flush_events()
            if duration > 0:
                # Steps are chained on the modelled clock, not on when this task got the CPU: a
                # GPU does not slow down because the host is busy. A step that ended late is made
                # up by shortening the next sleeps (debt capped, so a long stall is not replayed
                # as a burst).
                clock = max(clock, loop.time() - MAX_DEBT_S) + duration + self.extra_step_latency_s
                await asyncio.sleep(max(clock - loop.time(), 0.0))
                late = loop.time() - clock
                self.stats.steps += 1
                self.stats.busy_s += duration
                if prefills:
                    self.stats.prefill_busy_s += duration
                if late > 0:
                    self.stats.late_s += late
            elif not prefills and not decodes:
                # Nothing schedulable (blocked on KV): wait for a change.
                self._wake.clear()
                await self._wake.wait()
                clock = loop.time()
                continue
            else:
                await asyncio.sleep(0)
            self._complete(prefills, decodes)
            self._flush_events()

    def _flush_events(self) -> None:
        events = self.kv.take_events()
        if events and self._publish is not None:
            self._publish(events)

    def _drop_aborted(self) -> None:
        for r in [r for r in self.running if r.aborted]:
            self._finish(r, "abort")
        for r in [r for r in self.waiting if r.aborted]:
            self.waiting.remove(r)
            self._finish(r, "abort")

    def _digests(self, req: SimRequest) -> list[bytes]:
        lora = (req.lora_name, req.lora_name) if req.lora_name else None  # a sim adapter's path is its name
        known = req.digests  # digests of the blocks hashed so far; extend with newly full ones
        parent = known[-1] if known else self.root
        known.extend(block_digests(req.all_ids, self.params.block_size, parent, lora, req.cache_salt,
                                   start_block=len(known)))
        return known

    def _schedule(self) -> tuple[float, list[tuple[SimRequest, int]], list[SimRequest]]:
        p = self.params
        bs = p.block_size
        self._drop_aborted()
        budget = p.max_num_batched_tokens
        prefills: list[tuple[SimRequest, int]] = []
        decodes: list[SimRequest] = []
        # Running requests first, oldest first.
        i = 0
        while i < len(self.running):
            req = self.running[i]
            n_tokens = req.num_tokens
            if req.num_computed < n_tokens - (1 if req.output_ids else 0):
                # (Re)computing the prompt: prefill in chunks.
                chunk = min(n_tokens - req.num_computed, budget)
                if chunk <= 0:
                    i += 1
                    continue
                budget -= chunk
                prefills.append((req, chunk))
                i += 1
                continue
            # Decode: the newest token's KV needs a slot.
            needed = -(-n_tokens // bs) - len(req.block_ids)
            while needed > 0:
                got = self.kv.allocate(needed)
                if got is not None:
                    req.block_ids.extend(got)
                    needed = 0
                    break
                victim = self.running[-1]
                self._preempt(victim)
                if victim is req:
                    break
            if req in self.running and budget > 0:
                budget -= 1
                decodes.append(req)
            if req in self.running:
                i += 1
        # Admit waiting requests FCFS.
        while self.waiting and len(self.running) < p.max_num_seqs and budget > 0:
            req = self.waiting[0]
            ids = req.all_ids
            digests = self._digests(req)
            max_hit_blocks = (len(ids) - 1) // bs
            hit = self.kv.longest_hit(digests[:max_hit_blocks])
            total_blocks = -(-len(ids) // bs)
            new_needed = total_blocks - hit
            if new_needed > self.kv.num_free():
                if not self.running and new_needed > self.kv.num_blocks:
                    self.waiting.popleft()
                    self._finish(req, "abort")  # can never fit
                    continue
                break
            self.waiting.popleft()
            req.block_ids = self.kv.touch(digests[:hit])
            fresh = self.kv.allocate(new_needed)
            assert fresh is not None
            req.block_ids.extend(fresh)
            req.num_computed = hit * bs
            req.stored_blocks = hit
            if req.cached_tokens < 0:
                req.cached_tokens = hit * bs
                self.stats.prefix_queries += len(ids)
                self.stats.prefix_hits += hit * bs
                self.stats.prompt_tokens += len(ids)
            if req.scheduled_at is None:
                req.scheduled_at = self._clock()
                self._observe("queue", req.scheduled_at - req.arrival)
            self.running.append(req)
            chunk = min(req.num_tokens - req.num_computed, budget)
            budget -= chunk
            prefills.append((req, chunk))
        n_prefill_tokens = sum(c for _, c in prefills)
        duration = 0.0
        if decodes or prefills:
            duration = p.decode_base_s + p.decode_per_seq_s * len(decodes)
            if n_prefill_tokens:
                duration += p.prefill_overhead_s + p.prefill_per_token_s * n_prefill_tokens
        return duration, prefills, decodes

    def _preempt(self, req: SimRequest) -> None:
        self.running.remove(req)
        self.kv.release(req.block_ids)
        req.block_ids = []
        req.num_computed = 0
        req.stored_blocks = 0
        self.waiting.appendleft(req)
        self.stats.preemptions += 1

    def _store_full_blocks(self, req: SimRequest, upto_tokens: int) -> None:
        bs = self.params.block_size
        n_full = upto_tokens // bs
        if n_full <= req.stored_blocks:
            return
        ids = req.all_ids
        digests = self._digests(req)[:n_full]
        first = req.stored_blocks
        parent = digests[first - 1] if first > 0 else None
        self.kv.store(req.block_ids[first:n_full], digests[first:n_full], parent, ids[first * bs : n_full * bs],
                      req.lora_name)
        req.stored_blocks = n_full

    def _emit(self, req: SimRequest, now: float) -> None:
        n = len(req.output_ids)
        token = self.tokenizer.output_token(zlib.crc32(repr((self.seed, req.prompt_ids[-8:], n)).encode()))
        req.output_ids.append(token)
        self.stats.generation_tokens += 1
        if req.first_token_at is None:
            req.first_token_at = now
            self.stats.ttft_s.append(now - req.arrival)
            self._observe("ttft", now - req.arrival)
        elif req.last_token_at is not None:
            self._observe("itl", now - req.last_token_at)
        req.last_token_at = now
        req.queue.put_nowait(token)

    def _complete(self, prefills: list[tuple[SimRequest, int]], decodes: list[SimRequest]) -> None:
        now = self._clock()
        for req, chunk in prefills:
            if req not in self.running:
                continue
            req.num_computed += chunk
            self._store_full_blocks(req, req.num_computed)
            if req.num_computed >= req.num_tokens:
                # Prefill done (first time, or a recompute after preemption): sample a token.
                self._emit(req, now)
                self._maybe_finish(req)
        for req in decodes:
            if req not in self.running:
                continue
            req.num_computed = req.num_tokens
            self._emit(req, now)
            self._store_full_blocks(req, req.num_computed)
            self._maybe_finish(req)

    def _maybe_finish(self, req: SimRequest) -> None:
        n = len(req.output_ids)
        if n >= req.stop_after:
            self._finish(req, "length" if n >= req.max_tokens else "stop")

    def _finish(self, req: SimRequest, reason: str) -> None:
        if req in self.running:
            self.running.remove(req)
        if req.block_ids:
            self.kv.release(req.block_ids)
            req.block_ids = []
        req.finish_reason = reason
        self.stats.finished[reason] = self.stats.finished.get(reason, 0) + 1
        if reason != "abort":
            self._observe("e2e", self._clock() - req.arrival)
        req.queue.put_nowait(None)
        self._wake.set()
