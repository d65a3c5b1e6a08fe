import asyncio
import time

from epp.sim.engine import Engine, SimRequest
from epp.sim.profiles import EngineParams, profile


async def drain(req: SimRequest) -> list[int]:
    out = []
    while (t := await req.queue.get()) is not None:
        out.append(t)
    return out


def params(**kw: object) -> EngineParams:
    return profile("fast").with_overrides(**kw)


async def test_generates_exactly_max_tokens_with_ignore_eos_and_caches_prefix() -> None:
    e = Engine(params(block_size=4, num_gpu_blocks=64))
    e.start()
    try:
        prompt = list(range(40))
        r1 = e.submit(prompt, max_tokens=7, ignore_eos=True)
        assert len(await drain(r1)) == 7 and r1.finish_reason == "length"
        assert r1.cached_tokens == 0
        r2 = e.submit([*prompt, 1000, 1001], max_tokens=3, ignore_eos=True)
        await drain(r2)
        assert r2.cached_tokens == 40  # 10 full blocks of the shared prompt
        r3 = e.submit(prompt, max_tokens=2, ignore_eos=True)
        await drain(r3)
        assert r3.cached_tokens == 36  # the last prompt token is always recomputed
        assert e.stats.prefix_queries == 40 + 42 + 40 and e.stats.prefix_hits == 76
    finally:
        await e.stop()


async def test_eos_position_is_deterministic_within_min_and_max() -> None:
    lengths = []
    for _ in range(2):
        e = Engine(params(), seed=7)
        e.start()
        r = e.submit(list(range(30)), max_tokens=50, min_tokens=10)
        lengths.append(len(await drain(r)))
        await e.stop()
    assert lengths[0] == lengths[1] and 10 <= lengths[0] <= 50


async def test_max_num_seqs_makes_requests_wait() -> None:
    e = Engine(params(max_num_seqs=1, decode_base_s=0.002))
    e.start()
    try:
        reqs = [e.submit(list(range(i, i + 20)), max_tokens=5, ignore_eos=True) for i in range(3)]
        await asyncio.sleep(0)
        await asyncio.sleep(0.003)
        assert len(e.running) == 1 and len(e.waiting) == 2
        await asyncio.gather(*(drain(r) for r in reqs))
        assert reqs[2].scheduled_at is not None and reqs[0].scheduled_at is not None
        assert reqs[2].scheduled_at > reqs[0].first_token_at  # type: ignore[operator]
    finally:
        await e.stop()


async def test_kv_exhaustion_blocks_admission_and_preempts_decode() -> None:
    # 6 blocks of 4 tokens; two requests of 8 prompt tokens that each grow to 20 tokens.
    e = Engine(params(block_size=4, num_gpu_blocks=6, decode_base_s=0.001, enable_prefix_caching=False))
    e.start()
    try:
        a = e.submit(list(range(8)), max_tokens=12, ignore_eos=True)
        b = e.submit(list(range(100, 108)), max_tokens=12, ignore_eos=True)
        out = await asyncio.gather(drain(a), drain(b))
        assert [len(o) for o in out] == [12, 12]
        assert e.stats.preemptions >= 1
        assert e.kv.usage() == 0.0
    finally:
        await e.stop()


async def test_ttft_grows_with_uncached_prompt_tokens() -> None:
    e = Engine(params(prefill_per_token_s=0.00005, decode_base_s=0.001, max_num_batched_tokens=100000))
    e.start()
    try:
        t0 = time.monotonic()
        short = e.submit(list(range(10)), max_tokens=1, ignore_eos=True)
        await drain(short)
        t_short = time.monotonic() - t0
        t0 = time.monotonic()
        long = e.submit(list(range(10000, 14000)), max_tokens=1, ignore_eos=True)
        await drain(long)
        t_long = time.monotonic() - t0
        assert t_long > t_short + 0.1  # 4,000 tokens x 50 us = 0.2 s of modelled prefill
    finally:
        await e.stop()


async def test_inter_token_latency_grows_with_the_running_batch() -> None:
    itl: list[float] = []

    def observe(name: str, v: float) -> None:
        if name == "itl":
            itl.append(v)

    e = Engine(params(decode_base_s=0.002, decode_per_seq_s=0.001), observe=observe)
    e.start()
    try:
        await drain(e.submit(list(range(10)), max_tokens=10, ignore_eos=True))
        alone = sorted(itl)[len(itl) // 2]
        itl.clear()
        reqs = [e.submit(list(range(i * 100, i * 100 + 10)), max_tokens=10, ignore_eos=True) for i in range(20)]
        await asyncio.gather(*(drain(r) for r in reqs))
        batched = sorted(itl)[len(itl) // 2]
        # Modelled: 2 ms + 1 ms x running -> ~3 ms alone, ~22 ms with 20 running.
        assert batched > 3 * alone
    finally:
        await e.stop()


async def test_a_busy_host_delays_steps_but_does_not_slow_the_modelled_gpu() -> None:
    # 40 decode steps of 10 ms: 0.4 s of modelled GPU time. Another task holds the event loop for
    # 20 ms out of every 30 ms. Steps that ran late are made up by shorter sleeps, so the request
    # still finishes close to its modelled time (naive sleeps would take 40 x ~20 ms = 0.8 s+).
    e = Engine(params(decode_base_s=0.01, decode_per_seq_s=0.0, prefill_overhead_s=0.0, prefill_per_token_s=0.0))
    e.start()
    stop = False

    async def hog() -> None:
        while not stop:
            time.sleep(0.02)  # noqa: ASYNC251 - blocking the loop is the point: a busy host
            await asyncio.sleep(0.01)

    hog_task = asyncio.get_running_loop().create_task(hog())
    try:
        t0 = time.monotonic()
        r = e.submit(list(range(16)), max_tokens=40, ignore_eos=True)
        assert len(await drain(r)) == 40
        elapsed = time.monotonic() - t0
        assert elapsed < 0.6, elapsed
        assert e.stats.steps >= 40 and e.stats.late_s > 0
    finally:
        stop = True
        await hog_task
        await e.stop()
