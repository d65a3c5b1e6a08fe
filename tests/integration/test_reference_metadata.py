"""The gateway's subset hint, set by a real Envoy's set_metadata filter and forwarded to epp by
ext_proc's metadata_options (as an Envoy-based gateway configures it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import orjson

from epp.stack import envoy as envoy_mod
from epp.stack.local import EnvoyProc, free_ports, http_ok, in_process_stack, wait_until

from .conftest import completion_body


async def envoy_with_hint(workdir: Path, epp_port: int, subset: list[str]) -> EnvoyProc:
    listen, admin = free_ports(2)
    cfg: dict[str, Any] = envoy_mod.render("epp-full-duplex", listen_port=listen, admin_port=admin, epp_port=epp_port)
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    ext_proc = hcm["http_filters"][0]["typed_config"]
    ext_proc["metadata_options"]["forwarding_namespaces"] = {"untyped": ["envoy.lb.subset_hint"]}
    hcm["http_filters"].insert(0, {
        "name": "envoy.filters.http.set_metadata",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.set_metadata.v3.Config",
            "metadata": [{"metadata_namespace": "envoy.lb.subset_hint",
                          "value": {"x-gateway-destination-endpoint-subset": subset}}]}})
    path = envoy_mod.write(cfg, workdir / f"envoy-hint-{listen}.yaml")
    ok, out = envoy_mod.validate(path)
    assert ok, out
    proc = envoy_mod.start(path, workdir / f"envoy-hint-{listen}.log")
    ep = EnvoyProc(proc, listen, admin, path, workdir / f"envoy-hint-{listen}.log")
    await wait_until(lambda: http_ok(f"http://127.0.0.1:{admin}/ready", "LIVE"), 20, "Envoy ready")
    return ep


async def test_the_subset_hint_from_a_real_envoy_narrows_or_refuses_the_pick(tmp_path: Path) -> None:
    async with in_process_stack(servers=2) as stack, aiohttp.ClientSession() as s:
        assert stack.picker is not None
        grpc_port = stack.picker.bound_ports["grpc"]
        inside = await envoy_with_hint(tmp_path, grpc_port, ["127.0.0.1:1"])  # the pool's host, any port
        outside = await envoy_with_hint(tmp_path, grpc_port, ["10.9.9.9:8000"])
        try:
            async with s.post(f"http://127.0.0.1:{inside.listen_port}/v1/completions",
                              data=completion_body("in the hint")) as r:
                assert r.status == 200 and r.headers["x-sim-server"] in stack.addresses
            async with s.post(f"http://127.0.0.1:{outside.listen_port}/v1/completions",
                              data=completion_body("outside the hint")) as r:
                body = orjson.loads(await r.read())
                assert r.status == 503 and "subset hint" in body["error"]["message"]
                assert r.headers["x-llm-d-request-dropped-reason"] == "rejected-no-endpoints"
        finally:
            inside.stop()
            outside.stop()
        assert sum(stack.picker.store.inflight.values()) == 0
