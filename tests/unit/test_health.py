"""grpc.health.v1 on epp's HTTP/2 server, driven by grpcio's own client (as probes and gateways are)."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from epp.server import h2grpc
from epp.server.health import NOT_SERVING, SERVING, HealthState


async def test_check_and_watch() -> None:
    state = HealthState()
    state.set("liveness", SERVING)
    state.set("readiness", NOT_SERVING)
    server = h2grpc.H2GrpcServer(state.h2_services())
    port = await server.start("127.0.0.1", 0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            resp = await stub.Check(health_pb2.HealthCheckRequest(service="liveness"), timeout=2)
            assert resp.status == SERVING
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=2)
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
            call = stub.Watch(health_pb2.HealthCheckRequest(service="readiness"), timeout=5)
            first = await call.read()
            assert first.status == NOT_SERVING
            state.set("readiness", SERVING)  # outside any read: the update must still go out
            assert (await asyncio.wait_for(call.read(), 2)).status == SERVING
            call.cancel()
            unknown = stub.Watch(health_pb2.HealthCheckRequest(service="later"), timeout=5)
            assert (await unknown.read()).status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
            unknown.cancel()
    finally:
        await server.stop(0.1)


async def test_closed_watch_streams_leave_nothing_behind() -> None:
    state = HealthState()
    server = h2grpc.H2GrpcServer(state.h2_services())
    port = await server.start("127.0.0.1", 0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            for i in range(30):
                call = stub.Watch(health_pb2.HealthCheckRequest(service=f"svc-{i}-" + "x" * 200), timeout=5)
                assert (await call.read()).status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
                call.cancel()
            huge = stub.Watch(health_pb2.HealthCheckRequest(service="y" * 256 * 1024), timeout=5)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await huge.read()
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        for _ in range(50):  # the resets arrive with the channel's close
            if not state._watchers:
                break
            await asyncio.sleep(0.02)
        assert state._watchers == {} and state.watched() == 0
    finally:
        await server.stop(0.1)
