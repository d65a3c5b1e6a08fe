"""The virtual-clock event loop: sleeps take no wall time, timers keep their order, sockets work."""

from __future__ import annotations

import asyncio
import time

from epp.sim.virtualtime import VirtualClockLoop


def test_an_hour_of_sleeps_takes_no_wall_time_and_ends_in_order() -> None:
    order: list[tuple[str, float]] = []

    async def sleeper(name: str, delay: float) -> None:
        await asyncio.sleep(delay)
        order.append((name, asyncio.get_running_loop().time()))

    async def main() -> None:
        await asyncio.gather(sleeper("hour", 3600), sleeper("second", 1), sleeper("ms", 0.001))

    t0 = time.perf_counter()
    VirtualClockLoop().run(main())
    assert time.perf_counter() - t0 < 1.0
    assert order == [("ms", 0.001), ("second", 1.0), ("hour", 3600.0)]


def test_the_clock_moves_only_through_timers() -> None:
    async def main() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        before = loop.time()
        sum(range(200_000))  # real work: no virtual time
        after_work = loop.time()
        await asyncio.sleep(0.25)
        return after_work - before, loop.time() - before

    work, slept = VirtualClockLoop().run(main())
    assert work == 0.0 and slept == 0.25


def test_sockets_still_work_on_the_virtual_loop() -> None:
    async def main() -> bytes:
        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(await reader.readline())
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"ping\n")
        line = await asyncio.wait_for(reader.readline(), 5)
        writer.close()
        server.close()
        await server.wait_closed()
        return line

    assert VirtualClockLoop().run(main()) == b"ping\n"
