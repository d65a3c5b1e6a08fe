"""The event loop's lag is measured, and a stall is logged once per window."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from epp.observability.looplag import LoopLag


def stall(seconds: float) -> None:
    """Hold the event loop, as a blocking call in a callback would."""
    time.sleep(seconds)


async def test_a_blocked_loop_is_measured_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    registry = CollectorRegistry(auto_describe=False)
    lag = LoopLag(registry, interval=0.01, warn_after=0.1)
    lag.start()
    await asyncio.sleep(0.05)
    with caplog.at_level(logging.WARNING, logger="epp.loop"):
        stall(0.3)  # a stall of the loop (the tick due 10 ms in runs ~300 ms late)
        await asyncio.sleep(0.05)
        stall(0.3)  # a second one inside the same log window: counted, not logged again
        await asyncio.sleep(0.05)
    lag.stop()
    assert lag.stalls >= 2 and lag.worst >= 0.25
    assert len([r for r in caplog.records if "ran" in r.getMessage()]) == 1
    text = generate_latest(registry).decode()
    assert 'epp_event_loop_lag_seconds_bucket{le="0.1"}' in text
    count = float(next(line.split()[1] for line in text.splitlines()
                       if line.startswith("epp_event_loop_lag_seconds_count")))
    below = float(next(line.split()[1] for line in text.splitlines()
                       if line.startswith('epp_event_loop_lag_seconds_bucket{le="0.2"}')))
    assert count - below >= 2 and count >= 8  # the two stalls past 0.2 s, among every tick
