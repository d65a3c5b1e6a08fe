"""Many /metrics endpoints answering one fixed exposition, as cheaply as a socket allows.

``epp bench pool`` uses it to find what scraping costs epp at the full rate: the simulator's
fleet (aiohttp, one process) serves ~7,000 scrapes/s on this machine, less than 1,000 pods at
50 ms ask for, so epp's loop idles between its answers. These servers answer the exposition a
simulated pod sent (the same bytes to parse) fast enough that epp is the one at work.

    python -m epp.bench.cannedmetrics --count 1000 --body FILE --addresses-out FILE
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import cast

import uvloop


class _Answer(asyncio.Protocol):
    def __init__(self, response: bytes) -> None:
        self.response = response
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while (end := self.buf.find(b"\r\n\r\n")) >= 0:
            self.buf = self.buf[end + 4 :]
            assert self.transport is not None
            self.transport.write(self.response)


def response_for(body: bytes) -> bytes:
    return (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)) + body


async def serve(count: int, body: bytes, addresses_out: Path) -> None:
    loop = asyncio.get_running_loop()
    response = response_for(body)
    addresses = []
    for _ in range(count):
        server = await loop.create_server(lambda: _Answer(response), "127.0.0.1", 0)
        addresses.append(f"127.0.0.1:{server.sockets[0].getsockname()[1]}")
    tmp = addresses_out.with_suffix(".tmp")
    tmp.write_text(json.dumps(addresses))
    tmp.rename(addresses_out)  # whole, or not there
    await asyncio.Event().wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--body", type=Path, required=True, help="the exposition to answer")
    p.add_argument("--addresses-out", type=Path, required=True, help="where to write the JSON list of addresses")
    a = p.parse_args()
    uvloop.run(serve(a.count, a.body.read_bytes(), a.addresses_out))


if __name__ == "__main__":
    main()
