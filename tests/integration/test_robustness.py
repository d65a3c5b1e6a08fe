"""Bad input through a real Envoy and on epp's own ports: a clear answer, nothing held, no growth."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import grpc
import orjson
import pytest

from epp.stack.local import Stack, in_process_stack
from epp.v1 import picker_pb2, picker_pb2_grpc

from .conftest import completion_body


def pod_requests(stack: Stack) -> int:
    return sum(len(s.request_log) for s in stack.fleet.servers)


@pytest.mark.parametrize("template", ["epp-full-duplex", "epp-buffered"])
async def test_an_empty_body_is_refused_by_the_picker_not_the_pod(template: str) -> None:
    async with in_process_stack(servers=2, template=template) as stack, aiohttp.ClientSession() as s:
        before = pod_requests(stack)
        for chunked in (False, True):
            kw = {"chunked": True} if chunked else {"headers": {"content-length": "0"}}
            async with s.post(f"{stack.url}/v1/chat/completions", data=b"", **kw) as r:  # type: ignore[arg-type]
                body = await r.read()
                assert r.status == 400, body
                err = orjson.loads(body)["error"]
                assert err["code"] == 400 and "body is empty" in err["message"]
        for path in ("//v1/completions", "/V1/Completions"):  # odd paths get the same checks
            async with s.post(f"{stack.url}{path}", data=orjson.dumps({"model": "sim-model", "prompt": 42})) as r:
                assert r.status == 400 and orjson.loads(await r.read())["error"]["param"] == "prompt"
        assert pod_requests(stack) == before


async def test_long_model_names_do_not_grow_metrics() -> None:
    async with in_process_stack(servers=2) as stack, aiohttp.ClientSession() as s:
        assert stack.picker is not None
        url = f"http://127.0.0.1:{stack.picker.bound_ports['metrics']}/metrics"
        async with s.get(url) as r:
            before = len(await r.read())
        for i in range(150):
            body = orjson.dumps({"model": f"m{i}-" + "x" * 2048, "prompt": "hi", "max_tokens": 1})
            async with s.post(f"{stack.url}/v1/completions", data=body) as r:
                await r.read()
        async with s.get(url) as r:
            text = (await r.read()).decode()
        assert len(text) < before + 64 * 1024, len(text)
        assert 'model_name="other"' in text


async def test_pick_api_token_outstanding_limit_and_no_prompt_kept(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    serve = {"pick_api_token_file": str(token), "pick_api_max_outstanding": 3}
    async with in_process_stack(servers=2, serve=serve) as stack:
        assert stack.picker is not None and stack.picker.pick_api is not None
        api = stack.picker.pick_api
        auth = (("authorization", "Bearer s3cret"),)
        big = "long prompt " * 100_000  # 1.2 MB
        async with grpc.aio.insecure_channel(f"127.0.0.1:{stack.picker.bound_ports['grpc']}") as ch:
            stub = picker_pb2_grpc.EndpointPickerStub(ch)
            for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", "s3cret"),)):
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await stub.Pick(picker_pb2.PickRequest(model="sim-model", prompt="x"), metadata=metadata)
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            picks = [await stub.Pick(picker_pb2.PickRequest(model="sim-model", prompt=big), metadata=auth)
                     for _ in range(3)]
            assert all(p.endpoint in stack.addresses for p in picks)
            assert all(o.pick.request.prompt == "" and o.pick.request.body is None for o in api._open.values())
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.Pick(picker_pb2.PickRequest(model="sim-model", prompt="x"), metadata=auth)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "Release" in (e.value.details() or "")
            assert sum(stack.picker.store.inflight.values()) == 3
            assert (await stub.Release(picker_pb2.ReleaseRequest(pick_id=picks[0].pick_id), metadata=auth)).released
            again = await stub.Pick(picker_pb2.PickRequest(model="sim-model", prompt="x"), metadata=auth)
            assert again.endpoint in stack.addresses
            for p in (*picks[1:], again):
                await stub.Release(picker_pb2.ReleaseRequest(pick_id=p.pick_id), metadata=auth)
        assert api.outstanding == 0 and sum(stack.picker.store.inflight.values()) == 0


async def test_metrics_endpoint_auth(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("prom-token")
    async with in_process_stack(servers=1, serve={"metrics_token_file": str(token)}) as stack, \
            aiohttp.ClientSession() as s:
        assert stack.picker is not None
        url = f"http://127.0.0.1:{stack.picker.bound_ports['metrics']}/metrics"
        async with s.get(url) as r:
            assert r.status == 401 and (await r.json())["error"]["code"] == 401
        async with s.get(url, headers={"Authorization": "Bearer nope"}) as r:
            assert r.status == 401
        async with s.get(url, headers={"Authorization": "Bearer prom-token"}) as r:
            assert r.status == 200 and "inference_pool_ready_pods" in await r.text()
        async with s.post(f"{stack.url}/v1/completions", data=completion_body("still routed")) as r:
            assert r.status == 200
