"""The live dashboard in a real browser: headless Chromium (Debian's package, `make chromium`)
loads /dashboard from a running stack, and what it renders changes as traffic flows; plus the
event stream's content and its bound on viewers, without a browser.

With EPP_DASHBOARD_SCREENSHOT=PATH the browser test also saves a screenshot there (the README's)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from epp.stack.local import Stack, free_port, in_process_stack, wait_until

from .conftest import chat_body, post

SUPPORT = "You are ACME's support assistant. " * 20


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


class Browser:
    """One headless Chromium page, driven over the DevTools protocol."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self._id = 0

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._id += 1
        await self.ws.send_json({"id": self._id, "method": method, "params": params})
        while True:
            msg = orjson.loads((await self.ws.receive()).data)
            if msg.get("id") == self._id:
                assert "error" not in msg, msg
                result: dict[str, Any] = msg["result"]
                return result

    async def evaluate(self, expression: str) -> Any:
        out = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return out["result"].get("value")


def launch(binary: str, port: int, profile: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                             f"--remote-debugging-port={port}", "--remote-debugging-address=127.0.0.1",
                             f"--user-data-dir={profile}", "--window-size=1400,900", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Chromium and its helper processes (its own process group): terminated, then killed."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(10)
            break
        except subprocess.TimeoutExpired:
            continue
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # (helpers that outlived the browser)


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    binary = chromium()
    if binary is None:
        pytest.skip("Chromium is not installed (make chromium installs Debian's package)")
    port = free_port()
    # (Chromium's helper processes may still write the profile as it goes: removed after they
    # are all gone, and a file one of them left does not fail the test.)
    with tempfile.TemporaryDirectory(prefix="epp-chromium-", ignore_cleanup_errors=True) as profile:
        proc = launch(binary, port, profile)
        try:
            async with aiohttp.ClientSession() as s:
                pages: list[dict[str, Any]] = []

                async def listening() -> bool:
                    nonlocal pages
                    async with s.get(f"http://127.0.0.1:{port}/json/list") as r:
                        pages = [p for p in await r.json() if p.get("type") == "page"]
                        return bool(pages)

                await wait_until(listening, 30, "Chromium's DevTools endpoint")
                async with s.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=64 * 1024 * 1024) as ws:
                    yield Browser(ws)
        finally:
            stop(proc)


def dashboard_url(stack: Stack) -> str:
    assert stack.picker is not None
    return f"http://127.0.0.1:{stack.picker.bound_ports['metrics']}/dashboard"


PICKS = "[...document.querySelectorAll('#pods tbody td.picks')].reduce((n, td) => n + Number(td.textContent), 0)"


async def test_the_page_renders_the_pool_and_follows_traffic(browser: Browser) -> None:
    async with in_process_stack(servers=3) as stack, aiohttp.ClientSession() as s:
        await browser.call("Page.navigate", url=dashboard_url(stack))

        async def rendered() -> bool:
            return await browser.evaluate("document.querySelectorAll('#pods tbody tr').length") == 3

        await wait_until(rendered, 15, "the pods table")
        assert await browser.evaluate("document.getElementById('status').textContent.startsWith('live')")
        before = await browser.evaluate(PICKS)
        for i in range(12):
            status, _, _ = await post(s, f"{stack.url}/v1/chat/completions",
                                      chat_body(f"{SUPPORT} question {i}", max_tokens=4))
            assert status == 200

        async def followed() -> bool:
            return await browser.evaluate(PICKS) == before + 12

        await wait_until(followed, 10, "the page to count the new picks")
        decisions = await browser.evaluate("document.querySelectorAll('#decisions tbody tr').length")
        assert decisions == 12
        reason = await browser.evaluate("document.querySelector('#decisions tbody td.reason').textContent")
        assert "prefix-cache-scorer=" in reason and "total=" in reason
        hit = await browser.evaluate("[...document.querySelectorAll('#pods tbody tr')]"
                                     ".map(r => r.cells[5].textContent).find(t => t !== '0.0%' && t !== '\\u2013')")
        assert hit is not None and hit.endswith("%")  # the shared prefix was served from a pod's cache
        shot = os.environ.get("EPP_DASHBOARD_SCREENSHOT")
        if shot:
            data = await browser.call("Page.captureScreenshot", format="png")
            await asyncio.to_thread(Path(shot).write_bytes, base64.b64decode(data["data"]))


async def test_events_are_one_view_a_tick_whatever_the_viewers() -> None:
    async with in_process_stack(servers=2) as stack, aiohttp.ClientSession() as s:
        url = dashboard_url(stack) + "/events"
        picker = stack.picker
        assert picker is not None and picker.dashboard is not None
        responses = [await s.get(url) for _ in range(3)]
        try:
            first = orjson.loads((await responses[0].content.readline())[len(b"data: "):])
            assert [p["address"] for p in first["pods"]] == sorted(stack.addresses) or \
                sorted(p["address"] for p in first["pods"]) == sorted(stack.addresses)
            built = picker.dashboard.views
            await asyncio.sleep(2.2)
            assert picker.dashboard.views - built <= 3  # one view a tick (1 s), shared by the three pages
        finally:
            for r in responses:
                r.close()

        async def idle() -> bool:
            return not picker.dashboard._viewers if picker.dashboard else True

        await wait_until(idle, 5, "the closed pages to be dropped")
        views = picker.dashboard.views
        await asyncio.sleep(1.5)
        assert picker.dashboard.views == views  # no page open: nothing is built


async def test_the_dashboard_can_be_turned_off() -> None:
    async with in_process_stack(servers=1, serve={"dashboard": False}) as stack, aiohttp.ClientSession() as s, \
            s.get(dashboard_url(stack)) as r:
        assert r.status == 404


async def test_the_view_shows_flow_controls_queues() -> None:
    """With flow control on, requests held in epp appear in the view by flow, with the saturation."""
    from .test_flow_control import flow_config, slow, until_queued

    async with in_process_stack(servers=1, config_text=flow_config(max_concurrency=1)) as stack, \
            aiohttp.ClientSession() as s:
        await slow(stack, 40)
        url = f"{stack.url}/v1/chat/completions"
        sent = [asyncio.create_task(post(s, url, chat_body(f"held {i}", max_tokens=20),
                                         headers={"x-llm-d-inference-fairness-id": "team-q"})) for i in range(4)]
        await until_queued(stack, 2)
        async with s.get(dashboard_url(stack) + "/events") as r:
            view = orjson.loads((await r.content.readline())[len(b"data: "):])
        flow = view["flow_control"]
        assert flow is not None and flow["saturation"]
        held = {q["fairness"]: q["requests"] for q in flow["queues"]}
        assert held.get("team-q", 0) >= 2, flow
        assert [st for st, _, _ in await asyncio.gather(*sent)] == [200] * 4
