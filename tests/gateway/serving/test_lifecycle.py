"""The gateway as real processes: drain on SIGTERM, reload on SIGHUP, header deadline, workers."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
from pathlib import Path

import aiohttp

from tests.conftest import GatewayStarter, wait_until
from tests.gateway.conftest import FakeUpstream

Start = GatewayStarter


async def next_event(resp: aiohttp.ClientResponse) -> str:
    block = await resp.content.readuntil(b"\n\n")
    return str(json.loads(block.split(b"data: ")[1]))


async def test_sigterm_drains_a_running_stream_to_completion(
    upstream: FakeUpstream, gateway_process: Start
) -> None:
    gateway = await gateway_process(upstream.url, GATEWAY_DRAIN_SECONDS="20")
    async with aiohttp.ClientSession() as session:
        upstream.state.events.put_nowait("before")
        resp = await session.get(f"{gateway.url}/sse")
        assert await next_event(resp) == "before"

        gateway.proc.send_signal(signal.SIGTERM)

        async def draining() -> bool:
            async with aiohttp.ClientSession() as fresh:  # a new connection: not ready any more
                async with fresh.get(f"{gateway.url}/readyz") as ready:
                    return ready.status == 503 and ready.headers.get("Connection") == "close"

        await wait_until(draining, within=5)
        for item in ("during-1", "during-2"):
            upstream.state.events.put_nowait(item)
            assert await next_event(resp) == item  # the stream keeps flowing while draining
        upstream.state.events.put_nowait(None)
        assert await resp.content.read() == b""  # and ends normally
        resp.release()
    assert await asyncio.wait_for(gateway.proc.wait(), 10) == 0
    await asyncio.wait_for(gateway.reader, 10)  # its last lines may still be in the pipe
    assert any("draining: 1 request(s) in flight" in line for line in gateway.output)


async def test_sighup_reloads_without_dropping_a_stream(
    upstream: FakeUpstream, gateway_process: Start
) -> None:
    gateway = await gateway_process(upstream.url)
    async with aiohttp.ClientSession() as session:
        upstream.state.events.put_nowait("one")
        resp = await session.get(f"{gateway.url}/sse")
        assert await next_event(resp) == "one"
        gateway.proc.send_signal(signal.SIGHUP)
        await wait_until(lambda: any("SIGHUP" in line for line in gateway.output), within=5)
        upstream.state.events.put_nowait("two")
        assert await next_event(resp) == "two"
        upstream.state.events.put_nowait(None)
        assert await resp.content.read() == b""
    assert gateway.proc.returncode is None
    assert await gateway.stop() == 0


async def test_slow_headers_are_cut_off(upstream: FakeUpstream, gateway_process: Start) -> None:
    """Slowloris: a connection that trickles its headers is closed at the header deadline."""
    gateway = await gateway_process(upstream.url, GATEWAY_HEADER_TIMEOUT="0.5")
    host, port = gateway.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    await writer.drain()
    loop = asyncio.get_running_loop()
    started = loop.time()

    async def trickle() -> None:
        for i in range(100):
            await asyncio.sleep(0.1)
            writer.write(f"X-Slow-{i}: y\r\n".encode())
            await writer.drain()

    trickling = asyncio.ensure_future(trickle())
    try:
        assert await asyncio.wait_for(reader.read(), timeout=5) == b""  # closed, no response
    finally:
        trickling.cancel()
        writer.close()
    assert loop.time() - started < 3
    # A well-behaved client on a fresh connection is unaffected.
    async with aiohttp.ClientSession() as session, session.get(f"{gateway.url}/healthz") as resp:
        assert resp.status == 200


async def test_idle_connection_without_a_request_is_closed(
    upstream: FakeUpstream, gateway_process: Start
) -> None:
    gateway = await gateway_process(upstream.url, GATEWAY_HEADER_TIMEOUT="0.5")
    host, port = gateway.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        assert sock.recv(1) == b""


def access_pids(output: list[str]) -> set[str]:
    """Process ids of the access-log lines (the text log format starts with the pid)."""
    return {m.group(1) for line in output if (m := ACCESS_LINE.search(line))}


ACCESS_LINE = re.compile(r" (\d+) INFO gateway\.access ")
LISTENING_LINE = re.compile(r" (\d+) INFO gateway\.serving\.server .* listening on http")


def listening_pids(output: list[str]) -> set[str]:
    return {m.group(1) for line in output if (m := LISTENING_LINE.search(line))}


async def test_two_workers_metrics_add_up(upstream: FakeUpstream, gateway_process: Start) -> None:
    gateway = await gateway_process(upstream.url, GATEWAY_WORKERS="2")
    # /healthz answered by one worker says nothing of the other: wait until both listen.
    await wait_until(lambda: len(listening_pids(gateway.output)) == 2, within=30)
    total = 60
    for _ in range(total):  # a new connection each time: the kernel spreads them over workers
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{gateway.url}/echo", headers={"X-User-Id": "w"}) as resp:
                assert resp.status == 200
    # Both workers served some of them (SO_REUSEPORT hashing makes 60 on one a ~1e-18 event).
    await wait_until(lambda: len(access_pids(gateway.output)) == 2, within=5)
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{gateway.admin_url}/metrics") as resp:
            text = await resp.text()
    found = re.search(
        r'gateway_http_requests_total\{method="GET",route="/echo",status="200"\} (\S+)', text
    )
    assert found is not None and float(found.group(1)) == total
    assert await gateway.stop() == 0


async def test_workers_of_a_killed_supervisor_drain_and_exit(
    upstream: FakeUpstream, gateway_process: Start
) -> None:
    gateway = await gateway_process(upstream.url, GATEWAY_WORKERS="2", GATEWAY_DRAIN_SECONDS="1")
    await wait_until(lambda: len(listening_pids(gateway.output)) == 2, within=30)
    workers = [int(pid) for pid in listening_pids(gateway.output)]
    gateway.proc.kill()  # SIGKILL: the supervisor cannot forward anything
    await gateway.proc.wait()

    def gone() -> bool:
        return not any(Path(f"/proc/{pid}").exists() for pid in workers)

    await wait_until(gone, within=15)
    assert any("supervisor" in line and "is gone" in line for line in gateway.output)
