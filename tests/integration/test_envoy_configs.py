"""Every Envoy bootstrap we ship passes `envoy --mode validate`."""

from pathlib import Path

import pytest

from epp.stack import envoy


@pytest.mark.parametrize("template", envoy.TEMPLATES)
@pytest.mark.parametrize("tls", [False, True])
def test_bootstrap_validates(template: str, tls: bool, tmp_path: Path) -> None:
    cfg = envoy.render(template, listen_port=10000, admin_port=10001, epp_port=9002,
                       endpoints=["127.0.0.1:8001", "127.0.0.1:8002"], epp_tls=tls)
    ok, out = envoy.validate(envoy.write(cfg, tmp_path / "envoy.yaml"))
    assert ok, out


def test_full_duplex_config_has_what_gateways_need() -> None:
    cfg = envoy.render("epp-full-duplex", listen_port=1, admin_port=2, epp_port=3)
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    ext = hcm["http_filters"][0]["typed_config"]
    mode = ext["processing_mode"]
    assert mode["request_body_mode"] == mode["response_body_mode"] == "FULL_DUPLEX_STREAMED"
    assert mode["request_trailer_mode"] == "SEND"
    assert ext["metadata_options"]["receiving_namespaces"]["untyped"] == ["envoy.lb"]
    route = hcm["route_config"]["virtual_hosts"][0]["routes"][0]["route"]
    assert int(route["timeout"].rstrip("s")) >= 300 and int(hcm["stream_idle_timeout"].rstrip("s")) >= 300
