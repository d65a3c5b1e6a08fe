"""A pod's /metrics is untrusted input: bad values, garbage HTTP and huge expositions fail that
pod's scrape with a reason, log one line per change, and change nothing else."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from epp.datastore.endpoint import EndpointState
from epp.datastore.store import Datastore
from epp.signals.httpget import KeepAliveGetter
from epp.signals.mappings import VLLM, single_engine
from epp.signals.promtext import ParseError, TooLarge, ValueRejected, parse_signals
from epp.signals.scraper import Scraper, ScrapeTarget, _Cycle, _Ticks, next_phase_time, phases


def exposition(waiting: str = "1", running: str = "2", kv: str = "0.5", model: str = "m") -> str:
    return (f'vllm:num_requests_waiting{{model_name="{model}"}} {waiting}\n'
            f'vllm:num_requests_running{{model_name="{model}"}} {running}\n'
            f'vllm:kv_cache_usage_perc{{model_name="{model}"}} {kv}\n')


@pytest.mark.parametrize("field,value", [
    ("kv", "-0.1"), ("kv", "-Inf"), ("kv", "+Inf"), ("kv", "NaN"), ("kv", "1.5"), ("kv", "1e400"),
    ("waiting", "-1e6"), ("waiting", "NaN"), ("waiting", "+Inf"), ("waiting", "1e400"), ("waiting", "1e9"),
    ("running", "-1"), ("running", "Inf"),
])
def test_out_of_range_values_are_rejected(field: str, value: str) -> None:
    with pytest.raises(ValueRejected):
        parse_signals(exposition(**{field: value}), VLLM)


def test_good_values_and_the_served_model_are_read() -> None:
    sig = parse_signals(exposition(waiting="0", running="3", kv="1.0"), VLLM)
    assert (sig.waiting, sig.running, sig.kv_usage, sig.models) == (0, 3, 1.0, ("m",))


def test_too_many_series_of_a_wanted_metric() -> None:
    dense = "".join(f'vllm:num_requests_waiting{{engine="{i}"}} 1\n' for i in range(2000)) + exposition()
    with pytest.raises(TooLarge):
        parse_signals(dense, VLLM, max_series=1024)
    assert parse_signals(dense, VLLM, max_series=4096).waiting == 2001


# -- a real TCP server answering /metrics with whatever the test says ----------------------------

Reply = Callable[[int], bytes]  # scrape number -> raw bytes to send


async def serve(reply: Reply) -> tuple[asyncio.Server, str]:
    server, address, _ = await serve_counting(reply)
    return server, address


def http(body: bytes, head: bytes = b"HTTP/1.1 200 OK\r\n") -> bytes:
    return head + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body


GOOD = http(exposition().encode())
GARBAGE = {
    "bad content-length": b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\nxx",
    "bad status line": b"HTTP/1.1 twohundred OK\r\nContent-Length: 0\r\n\r\n",
    "not http": b"\x16\x03\x01\x02\x00garbage\r\n\r\n",
    "bad chunk": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
    "non-utf8": http(b"\xff\xfe" + exposition().encode()),
    "nan kv": http(exposition(kv="NaN").encode()),
    "huge content-length": b"HTTP/1.1 200 OK\r\nContent-Length: 999999999999\r\n\r\n",
    "500": http(b"oops", b"HTTP/1.1 500 Internal Server Error\r\n"),
}


@pytest.fixture
async def store() -> AsyncIterator[Datastore]:
    yield Datastore(staleness=5.0)


async def scrape(store: Datastore, reply: Reply, times: int = 1, **scraper_args: Any) -> EndpointState:
    """Scrape a pod answering ``reply`` ``times`` times; the pod's state afterwards."""
    server, address = await serve(reply)
    store.set_endpoints([address])
    scraper = Scraper(store, single_engine("vllm"), **scraper_args)
    try:
        for _ in range(times):
            await scraper.scrape_once(address)
    finally:
        await scraper.stop()
        server.close()
    state = store.get(address)
    assert state is not None
    return state


@pytest.mark.parametrize("case", sorted(GARBAGE))
async def test_garbage_fails_the_scrape_quietly(case: str, store: Datastore, caplog: pytest.LogCaptureFixture) -> None:
    server, address = await serve(lambda n: GARBAGE[case])
    errors: list[tuple[str, str]] = []
    store.set_endpoints([address])
    scraper = Scraper(store, single_engine("vllm"), interval=0.01, timeout=0.5,
                      on_error=lambda a, r: errors.append((a, r)))
    caplog.set_level(logging.DEBUG)
    try:
        for _ in range(5):
            await scraper.scrape_once(address)
    finally:
        await scraper.stop()
        server.close()
    state = store.get(address)
    assert state is not None and state.error and state.signals is None
    assert len(errors) == 5 and all(a == address for a, _ in errors)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]  # one line per change, no traceback
    assert all(r.exc_info is None for r in caplog.records)


async def test_100_continue_then_the_response_is_read(store: Datastore) -> None:
    state = await scrape(store, lambda n: b"HTTP/1.1 100 Continue\r\n\r\n" + GOOD)
    assert state.error is None and state.signals is not None and state.signals.running == 2


async def test_a_pod_recovers_after_bad_values_and_the_old_signals_are_not_replaced(store: Datastore) -> None:
    replies = [GOOD, http(exposition(waiting="-1e6").encode()), GOOD]
    server, address = await serve(lambda n: replies[min(n, 2)])
    store.set_endpoints([address])
    errors: list[str] = []
    scraper = Scraper(store, single_engine("vllm"), on_error=lambda a, r: errors.append(r))
    try:
        await scraper.scrape_once(address)
        await scraper.scrape_once(address)
        bad = store.get(address)
        assert bad is not None and bad.error is not None and "ValueRejected" in bad.error
        assert bad.signals is not None and bad.signals.waiting == 1  # the bad value never landed
        await scraper.scrape_once(address)
    finally:
        await scraper.stop()
        server.close()
    assert errors == ["ValueRejected"]
    good = store.get(address)
    assert good is not None and good.error is None


async def test_an_exposition_past_the_byte_limit_is_refused(store: Datastore) -> None:
    big = http(exposition().encode() + b"# " + b"x" * 300_000 + b"\n")
    chunked = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
               + b"".join(b"%x\r\n" % 50_000 + b"#" * 50_000 + b"\r\n" for _ in range(10)) + b"0\r\n\r\n")
    for reply in (big, chunked):
        state = await scrape(store, lambda n, r=reply: r, max_bytes=100_000)  # type: ignore[misc]
        assert state.error is not None and "limit" in state.error


def test_parse_error_is_a_value_error() -> None:
    assert issubclass(ValueRejected, ParseError) and issubclass(TooLarge, ParseError)


def test_many_near_miss_names_are_bounded_too() -> None:
    near = "".join(f'vllm:num_requests_waiting_by_reason{{r="{i}"}} 1\n' for i in range(5000))
    with pytest.raises(TooLarge):
        parse_signals(exposition() + near, VLLM, max_series=1024)
    assert parse_signals(exposition() + near[:2000], VLLM).waiting == 1  # a few are fine


async def test_a_large_exposition_is_parsed_off_the_loop_and_read_right(store: Datastore) -> None:
    body = (exposition(waiting="7") + "# padding\n" * 40_000).encode()  # ~440 KB: the thread path
    state = await scrape(store, lambda n: http(body))
    assert state.error is None and state.signals is not None and state.signals.waiting == 7


async def serve_counting(reply: Callable[[int], bytes | None]) -> tuple[asyncio.Server, str, list[int]]:
    """A pod answering request n with ``reply(n)`` (None: never answers that one); the list counts
    [connections, requests]."""
    seen = [0, 0]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen[0] += 1
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                n = seen[1]
                seen[1] += 1
                answer = reply(n)
                if answer is not None:
                    writer.write(answer)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, f"127.0.0.1:{server.sockets[0].getsockname()[1]}", seen


async def until(check: Callable[[], bool], seconds: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "not within the time"
        await asyncio.sleep(0.01)


async def test_the_cycle_scrapes_on_its_interval_over_one_connection(store: Datastore) -> None:
    server, address, seen = await serve_counting(lambda n: http(exposition(waiting=str(n)).encode()))
    store.set_endpoints([address])
    scraper = Scraper(store, single_engine("vllm"), interval=0.01)
    await scraper.start()
    try:
        await until(lambda: seen[1] >= 10)
        state = store.get(address)
        assert state is not None and state.signals is not None and state.signals.waiting >= 8
    finally:
        await scraper.stop()
        server.close()
    assert seen[0] == 1  # kept alive


async def test_a_pod_that_stops_answering_times_out_and_the_cycle_goes_on(store: Datastore) -> None:
    server, address, seen = await serve_counting(lambda n: None if n == 1 else GOOD)
    store.set_endpoints([address])
    errors: list[str] = []
    scraper = Scraper(store, single_engine("vllm"), interval=0.01, timeout=0.2,
                      on_error=lambda a, kind: errors.append(kind))
    await scraper.start()
    try:
        await until(lambda: errors == ["TimeoutError"])
        await until(lambda: (s := store.get(address)) is not None and s.error is None and seen[1] >= 4)
    finally:
        await scraper.stop()
        server.close()
    assert seen[0] == 2  # the connection with the unanswered request was dropped, a new one opened


async def test_a_removed_pod_is_not_scraped_again_and_stop_leaves_nothing_behind(store: Datastore) -> None:
    server, address, seen = await serve_counting(lambda n: GOOD)
    store.set_endpoints([address])
    scraper = Scraper(store, single_engine("vllm"), interval=0.01)
    await scraper.start()
    try:
        await until(lambda: seen[1] >= 3)
        store.set_endpoints([])
        after = seen[1]
        await asyncio.sleep(0.1)
        assert seen[1] <= after + 1  # at most the one already on the wire
        store.set_endpoints([address])
        await until(lambda: seen[1] >= after + 3)  # back: a new cycle
    finally:
        await scraper.stop()
    stopped = seen[1]
    await asyncio.sleep(0.1)
    server.close()
    assert seen[1] == stopped
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("scrape")]


async def test_a_reload_that_moves_the_metrics_port_keeps_the_cycle(store: Datastore) -> None:
    first, address, seen_first = await serve_counting(lambda n: GOOD if n == 0 else None)  # stalls after one
    second, other, seen_second = await serve_counting(lambda n: GOOD)
    store.set_endpoints([address])
    scraper = Scraper(store, single_engine("vllm"), interval=0.01, timeout=5.0)
    await scraper.start()
    try:
        await until(lambda: seen_first[1] >= 2)  # the second request hangs
        scraper.reconfigure(single_engine("vllm"), ScrapeTarget(port=int(other.rpartition(":")[2])), 0.01)
        await until(lambda: seen_second[1] >= 3)  # went on at once, not after the 5 s timeout
    finally:
        await scraper.stop()
        first.close()
        second.close()


async def test_cycles_due_in_one_tick_fire_together_and_one_failing_stops_no_other() -> None:
    fired: list[str] = []

    def fire(cycle: _Cycle) -> None:
        fired.append(cycle.address)
        if cycle.address == "b:1":
            raise RuntimeError("boom")

    ticks = _Ticks(asyncio.get_running_loop(), fire, tick=0.01)
    cycles = [_Cycle(a, KeepAliveGetter(a, "/metrics"), lambda c, r: None) for a in ("a:1", "b:1", "c:1")]
    gone = _Cycle("d:1", KeepAliveGetter("d:1", "/metrics"), lambda c, r: None)
    gone.live = False
    for c in [*cycles, gone]:
        ticks.after(0.001, c)
    late = _Cycle("e:1", KeepAliveGetter("e:1", "/metrics"), lambda c, r: None)
    ticks.after(0.2, late)
    await until(lambda: len(fired) == 3)
    assert fired == ["a:1", "b:1", "c:1"]  # d was removed meanwhile; e is not due yet
    await until(lambda: fired[-1] == "e:1")
    ticks.close()


async def test_a_small_pool_is_scraped_together_each_interval(store: Datastore) -> None:
    loop = asyncio.get_running_loop()
    servers, addresses, times = [], [], []
    for _ in range(8):
        arrivals: list[float] = []
        server, address, _seen = await serve_counting(
            lambda n, arrivals=arrivals: arrivals.append(loop.time()) or GOOD)  # type: ignore[func-returns-value]
        servers.append(server)
        addresses.append(address)
        times.append(arrivals)
    store.set_endpoints(addresses)
    scraper = Scraper(store, single_engine("vllm"), interval=0.05)
    await scraper.start()
    try:
        await until(lambda: all(len(t) >= 4 for t in times))
    finally:
        await scraper.stop()
        for server in servers:
            server.close()
    for k in range(4):  # the k-th scrape of every pod went out in one batch (random phases spread them over 50 ms)
        round_k = [t[k] for t in times]
        assert max(round_k) - min(round_k) < 0.01, round_k
    assert 0.03 < times[0][3] - times[0][2] < 0.08  # and a batch an interval after the one before


def test_phases_hold_at_most_a_batch_and_no_more_than_the_interval_has_ticks() -> None:
    assert [phases(n, 0.05) for n in (0, 1, 8, 9, 16, 17, 80, 1000)] == [1, 1, 1, 2, 2, 3, 10, 10]
    assert phases(1000, 1.0) == 125  # 8 per phase when the interval has room for them
    assert phases(5, 0.001) == 1


@pytest.mark.parametrize("now,phase,gap,expected", [
    (1.00, 0.01, 0.005, 1.01),   # this interval's phase is still ahead
    (1.02, 0.01, 0.005, 1.06),   # passed: the next interval's
    (1.005, 0.01, 0.005, 1.01),  # exactly the gap away
    (1.008, 0.01, 0.005, 1.06),  # nearer than the gap: skipped
    (1.00, 0.26, 0.0, 1.01),     # a phase past the interval is the same grid
])
def test_the_next_phase_time(now: float, phase: float, gap: float, expected: float) -> None:
    assert next_phase_time(now, 0.05, phase, gap) == pytest.approx(expected)


async def test_a_pools_first_round_is_spread_over_its_phases(store: Datastore) -> None:
    loop = asyncio.get_running_loop()
    scraper = Scraper(store, single_engine("vllm"), interval=10.0)  # (nothing fires during the test)
    store.set_endpoints([f"127.0.0.1:{port}" for port in range(20000, 20040)])
    await scraper.start()
    try:
        ticks = scraper._ticks
        assert ticks is not None
        due = sorted((key, len(cycles)) for key, cycles in ticks._due.items())
        assert [n for _key, n in due] == [8] * 5  # 40 endpoints, 5 phases of 8 from the start
        assert all(0 <= key * ticks.tick - loop.time() <= 10.0 + ticks.tick for key, _n in due)
    finally:
        await scraper.stop()
