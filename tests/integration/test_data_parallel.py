"""data-parallel-profile-handler through a real Envoy: epp picks a pod's data-parallel rank, sends
the gateway to the pod's primary port and names the rank in x-data-parallel-host-port; the
simulated pod hands the request to that rank's engine (both body modes), and the Pick API says
the same."""

from __future__ import annotations

import aiohttp
import grpc
import pytest

from epp.scheduling.plugins import DATA_PARALLEL_HEADER
from epp.stack.local import free_ports, in_process_stack
from epp.v1 import picker_pb2, picker_pb2_grpc

from .conftest import completion_body, post

CONFIG = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: max-score-picker
- type: data-parallel-profile-handler
  parameters: {{primaryPort: {port}}}
schedulingProfiles:
- name: default
  plugins:
  - {{pluginRef: queue-scorer, weight: 1}}
  - {{pluginRef: max-score-picker}}
"""


@pytest.mark.parametrize("template", ["epp-full-duplex", "epp-buffered"])
async def test_each_rank_is_reached_through_the_pods_primary_port(template: str) -> None:
    ports = free_ports(4)  # one pod, four ranks; the first port is the primary one
    async with in_process_stack(ports=ports, servers=4, data_parallel=4, template=template,
                                config_text=CONFIG.format(port=ports[0]), decision_headers=True) as stack, \
            aiohttp.ClientSession() as s:
        primary = stack.addresses[0]
        for i in range(16):
            status, headers, _ = await post(s, f"{stack.url}/v1/completions", completion_body(f"q {i}"),
                                            headers={"content-type": "application/json"})
            assert status == 200
            assert headers["x-epp-endpoint"] == primary  # the gateway always goes to the primary port
        served = {srv.address: sum(srv.engine.stats.finished.values()) for srv in stack.fleet.servers}
        assert sum(served.values()) == 16
        assert sum(1 for n in served.values() if n) >= 3  # the queue scorer spread them over the ranks
        rank_log = [e for srv in stack.fleet.servers[1:] for e in srv.request_log if e.get("via") == primary]
        assert rank_log  # handed over by the primary port, as the pod's sidecar would
        sent = [e["headers"].get(DATA_PARALLEL_HEADER) for e in stack.fleet.servers[0].request_log
                if e["path"] == "/v1/completions"]
        assert len(sent) == 16 and set(sent) <= set(stack.addresses)


async def test_the_pick_api_returns_the_primary_port_and_the_rank_header() -> None:
    ports = free_ports(2)
    async with in_process_stack(ports=ports, servers=2, data_parallel=2,
                                config_text=CONFIG.format(port=ports[0])) as stack:
        assert stack.picker is not None
        async with grpc.aio.insecure_channel(f"127.0.0.1:{stack.picker.bound_ports['grpc']}") as ch:
            stub = picker_pb2_grpc.EndpointPickerStub(ch)
            resp = await stub.Pick(picker_pb2.PickRequest(model="sim-model", prompt="hello"))
        assert resp.endpoint == stack.addresses[0]
        assert resp.request_headers[DATA_PARALLEL_HEADER] in stack.addresses
