"""--enable-cert-reload: new handshakes get the certificate written to --cert-path since."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

from epp.config import load_config
from epp.datastore.store import Datastore
from epp.observability.metrics import PickerMetrics
from epp.requestcontrol.director import Director
from epp.server import h2grpc
from epp.server.extproc import ExtProcStream
from epp.server.pickapi import PickAPI
from epp.server.serving import GrpcServing
from epp.server.tls import TLSPolicy, self_signed


def write_pair(d: Path, hostname: str) -> bytes:
    key, crt = self_signed((hostname,))
    (d / "tls.key").write_bytes(key)
    (d / "tls.crt").write_bytes(crt)
    return crt


async def served_cert(port: int, max_version: ssl.TLSVersion | None = None) -> bytes:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    if max_version is not None:
        ctx.maximum_version = max_version
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    return ssl.DER_cert_to_PEM_cert(der).encode()


def serving() -> GrpcServing:
    store = Datastore()
    scheduler, _ = load_config(None).build()
    director = Director(store, scheduler, PickerMetrics(store))
    return GrpcServing(lambda: ExtProcStream(director), PickAPI(director).h2_services(), h2grpc.Limits())


async def test_the_certificate_is_reloaded_when_its_files_change(tmp_path: Path) -> None:
    first = write_pair(tmp_path, "one.example")
    g = serving()
    port = await g.start("127.0.0.1", 0, True, str(tmp_path), cert_reload=True, reload_interval=0.05)
    try:
        assert await served_cert(port) == first
        (tmp_path / "tls.key").write_text("not a key")  # half-written: the old pair stays
        await asyncio.sleep(0.3)
        assert await served_cert(port) == first and g.cert_reloads == 0
        second = write_pair(tmp_path, "two.example")
        for _ in range(100):
            if g.cert_reloads:
                break
            await asyncio.sleep(0.05)
        assert await served_cert(port) == second
    finally:
        await g.stop(0.1)


async def test_the_minimum_tls_version_is_enforced(tmp_path: Path) -> None:
    write_pair(tmp_path, "x.example")
    g = serving()
    port = await g.start("127.0.0.1", 0, True, str(tmp_path), TLSPolicy("VersionTLS13"))
    try:
        assert await served_cert(port)
        try:
            await served_cert(port, max_version=ssl.TLSVersion.TLSv1_2)
        except (ssl.SSLError, ConnectionResetError):
            pass
        else:
            raise AssertionError("a TLS 1.2 client was accepted with --tls-min-version=VersionTLS13")
    finally:
        await g.stop(0.1)
