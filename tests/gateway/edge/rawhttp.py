"""HTTP/1.1 over a raw socket, for tests that must send what no client library would."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field


@dataclass
class RawResponse:
    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""

    def header(self, name: str) -> str | None:
        values = [v for n, v in self.headers if n.lower() == name.lower()]
        assert len(values) <= 1, f"{name} sent {len(values)} times"
        return values[0] if values else None


async def read_response(reader: asyncio.StreamReader, *, head_only: bool = False) -> RawResponse:
    """One response, framed by its Content-Length or chunked encoding (or the close)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    version, status, *_ = lines[0].split(" ", 2)
    assert version == "HTTP/1.1", lines[0]
    response = RawResponse(int(status))
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            assert name == name.strip(), line
            response.headers.append((name, value.strip()))
    if head_only or response.status in (100, 101, 204, 304):
        return response
    length = response.header("Content-Length")
    if length is not None:
        response.body = await reader.readexactly(int(length))
    elif (response.header("Transfer-Encoding") or "").lower() == "chunked":
        body = bytearray()
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            body += await reader.readexactly(size)
            await reader.readexactly(2)
        response.body = bytes(body)
    else:
        response.body = await reader.read()
    return response


async def connect(
    port: int, host: str = "127.0.0.1", local: str | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(
        host, port, local_addr=(local, 0) if local is not None else None
    )


OPEN = b"<still open>"


async def send(
    port: int, data: bytes, responses: int = 1, *, closes: bool = True, within: float = 10
) -> tuple[list[RawResponse], bytes]:
    """Send `data` on a fresh connection and read `responses` responses. With `closes`, also
    what follows them until the gateway closes the connection (OPEN if it has not within
    `within` s); without, the connection is left at once."""
    reader, writer = await connect(port)
    try:
        writer.write(data)
        await writer.drain()
        out = [await asyncio.wait_for(read_response(reader), within) for _ in range(responses)]
        rest = b""
        if closes:
            try:
                rest = await asyncio.wait_for(reader.read(), within)
            except TimeoutError:
                rest = OPEN
        return out, rest
    finally:
        writer.close()
