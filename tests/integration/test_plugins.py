"""A plugin package written outside epp (tests/plugins/epp-example-plugin), loaded by type name
from the config and routing real requests through Envoy, hot reload included."""

from __future__ import annotations

from collections import Counter

import aiohttp

from epp.config import DEFAULT_CONFIG
from epp.stack.local import in_process_stack, wait_until

from .conftest import completion_body, post

PINNED = """apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: port-range-filter
  parameters: {{min: {low}, max: {high}}}
- type: preferred-port-scorer
  parameters: {{port: {port}}}
- type: queue-scorer
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: port-range-filter
  - pluginRef: preferred-port-scorer
    weight: 100
  - pluginRef: queue-scorer
    weight: 1
"""


async def _served(s: aiohttp.ClientSession, url: str, n: int, tag: str) -> Counter[str]:
    seen: Counter[str] = Counter()
    for i in range(n):
        status, headers, data = await post(s, f"{url}/v1/completions", completion_body(f"{tag} {i}"))
        assert status == 200, data
        seen[headers["x-sim-server"]] += 1
    return seen


async def test_an_installed_plugin_routes_through_envoy_and_reloads_like_a_builtin() -> None:
    async with in_process_stack(servers=3, config_text=DEFAULT_CONFIG) as stack, aiohttp.ClientSession() as s:
        assert stack.config_path is not None and stack.picker is not None
        watcher = stack.picker.config_watcher
        assert watcher is not None
        ports = sorted(int(a.rpartition(":")[2]) for a in stack.addresses)
        by_port = {int(a.rpartition(":")[2]): a for a in stack.addresses}
        assert len(await _served(s, stack.url, 12, "before")) >= 2  # the default profile spreads
        stack.config_path.write_text(PINNED.format(low=ports[0], high=ports[2], port=ports[1]))

        async def reloaded(n: int) -> bool:
            return watcher.reloads >= n

        await wait_until(lambda: reloaded(1), 5, f"the plugin config to be applied ({watcher.last_error})")
        assert await _served(s, stack.url, 10, "pinned") == Counter({by_port[ports[1]]: 10})
        # The filter excludes the preferred pod: the scorer cannot bring it back.
        stack.config_path.write_text(PINNED.format(low=ports[2], high=ports[2], port=ports[1]))

        await wait_until(lambda: reloaded(2), 5, "the filter edit to be applied")
        assert await _served(s, stack.url, 6, "filtered") == Counter({by_port[ports[2]]: 6})
        # A parameter the plugin does not know is refused like any plugin's; routing keeps the last config.
        stack.config_path.write_text(PINNED.format(low=ports[2], high=ports[2], port=ports[1]).replace(
            "{port:", "{prot:"))

        async def rejected() -> bool:
            return "parameters.prot: unknown parameter" in (watcher.last_error or "")

        await wait_until(rejected, 5, "the bad edit to be rejected")
        assert await _served(s, stack.url, 5, "after") == Counter({by_port[ports[2]]: 5})
