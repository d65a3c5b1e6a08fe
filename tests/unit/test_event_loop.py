import asyncio

import uvloop


async def test_async_tests_run_on_uvloop_like_production() -> None:
    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
