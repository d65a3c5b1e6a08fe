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
from epp.signals.mappings import VLLM, single_engine
from epp.signals.promtext import ParseError, TooLarge, ValueRejected, parse_signals
from epp.signals.scraper import Scraper


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
    count = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal count
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if not head:
                    return
                writer.write(reply(count))
                count += 1
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"127.0.0.1:{port}"


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


async def test_a_scrape_loop_ends_even_if_its_cancel_is_lost(store: Datastore) -> None:
    """Python 3.11's wait_for can swallow a cancel; the loop also checks it is still wanted."""
    server, address = await serve(lambda n: GOOD)
    store.set_endpoints([address])
    scraper = Scraper(store, single_engine("vllm"), interval=0.01)
    await scraper.start()
    try:
        task = scraper._tasks[address]
        del scraper._tasks[address]  # as if removed, with the cancel lost on the way
        await asyncio.wait_for(task, 2)
        assert task.done() and not task.cancelled()
    finally:
        await scraper.stop()
        server.close()
