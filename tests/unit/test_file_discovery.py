"""file-discovery (dataLayer.discovery): the reference's endpoints file, read once or watched,
through a running epp; and its config surface."""

from __future__ import annotations

from pathlib import Path

import pytest

from epp.config import parse_config
from epp.datastore.sources import parse_endpoints_yaml
from epp.scheduling.types import ConfigError
from epp.server.app import PickerServer, ServeOptions
from epp.stack.local import free_ports, wait_until

REFERENCE_FILE = """endpoints:
- {name: vllm-0, namespace: llm, address: 10.0.0.1, port: "8000", labels: {llm-d.ai/role: decode}}
- {name: vllm-1, address: 10.0.0.2, port: 8000}
"""


def test_the_references_entries_read_with_names_labels_and_ports() -> None:
    found = parse_endpoints_yaml(REFERENCE_FILE, "f")
    assert found.addresses == ["10.0.0.1:8000", "10.0.0.2:8000"]
    assert found.names == {"10.0.0.1:8000": "llm/vllm-0", "10.0.0.2:8000": "default/vllm-1"}
    assert found.labels == {"10.0.0.1:8000": {"llm-d.ai/role": "decode"}}
    with pytest.raises(ValueError, match=r"f\[0\]\.port: expected a port number"):
        parse_endpoints_yaml("endpoints: [{address: 10.0.0.1, port: eighty}]", "f")


def config(path: Path, watch: bool) -> str:
    return f"""apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: file-discovery
  parameters: {{path: "{path}", watchFile: {str(watch).lower()}}}
- type: queue-scorer
dataLayer:
  discovery: {{pluginRef: file-discovery}}
schedulingProfiles:
- name: default
  plugins: [{{pluginRef: queue-scorer}}]
"""


@pytest.mark.parametrize("watch", [True, False])
async def test_epp_takes_its_endpoints_from_the_file_and_watches_it_when_asked(tmp_path: Path, watch: bool) -> None:
    f = tmp_path / "endpoints.yaml"
    f.write_text(REFERENCE_FILE)
    ports = free_ports(3)
    server = PickerServer(ServeOptions(config=parse_config(config(f, watch)), host="127.0.0.1", grpc_port=ports[0],
                                       grpc_health_port=ports[1], metrics_port=ports[2], secure_serving=False,
                                       config_poll_interval=0.05))
    await server.start()
    try:
        states = {e.address: e for e in server.store.snapshot().endpoints}
        assert sorted(states) == ["10.0.0.1:8000", "10.0.0.2:8000"]
        assert states["10.0.0.1:8000"].name == "llm/vllm-0" and states["10.0.0.1:8000"].pod == "vllm-0"
        f.write_text("endpoints:\n- {name: vllm-9, address: 10.0.0.9, port: 8000}\n")

        async def moved() -> bool:
            return server.store.addresses() == ["10.0.0.9:8000"]

        if watch:
            await wait_until(moved, 5, "the edited file's endpoints")
        else:
            with pytest.raises(TimeoutError):
                await wait_until(moved, 0.5, "nothing: watchFile is false")
    finally:
        await server.stop(grace=0.1)


def test_a_listed_discovery_plugin_must_be_named_and_needs_a_path(tmp_path: Path) -> None:
    text = config(tmp_path / "e.yaml", True)
    with pytest.raises(ConfigError, match=r"plugins\[0\]: 'file-discovery' is not named by dataLayer\.discovery"):
        parse_config(text.replace("dataLayer:\n  discovery: {pluginRef: file-discovery}\n", ""))
    with pytest.raises(ConfigError, match=r"plugins\[0\]\.parameters\.path: required"):
        parse_config(text.replace(f'path: "{tmp_path / "e.yaml"}", ', ""))
