"""OpenAIProvider against the fake OpenAI API, over real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpRawServer

from devtools.services import free_port
from tests.fakes.openai_server import (
    FakeOpenAIServer,
    cut_after,
    fail_after,
    rate_limited,
    reply,
    stall_after,
    stall_before_first_byte,
    status,
)
from upstream.errors import LLMError, LLMTimeout, LLMUnavailable
from upstream.llm import ChatMessage, Usage
from upstream.llm.local import count_tokens
from upstream.llm.openai import OpenAIProvider, make_session

API_KEY = "sk-test-PixelCraft-0123456789abcdef"
MESSAGES = [ChatMessage("system", "Be brief."), ChatMessage("user", "Say hello to the team")]

ProviderFactory = Callable[..., OpenAIProvider]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    session = make_session(connect_timeout=1.0, read_timeout=1.0)
    yield session
    await session.close()


@pytest.fixture
async def short_read_session() -> AsyncIterator[aiohttp.ClientSession]:
    session = make_session(connect_timeout=1.0, read_timeout=0.2)
    yield session
    await session.close()


@pytest.fixture
def make_provider(session: aiohttp.ClientSession, fake_openai: FakeOpenAIServer) -> ProviderFactory:
    def make(**options: Any) -> OpenAIProvider:
        return OpenAIProvider(
            options.pop("session", session),
            base_url=options.pop("base_url", fake_openai.base_url),
            api_key=API_KEY,
            model="gpt-4o-mini",
            **{"retry_base_delay": 0.01, "retry_max_delay": 0.05, **options},
        )

    return make


async def collect(provider: OpenAIProvider) -> tuple[list[str], Usage]:
    *pieces, usage = [item async for item in provider.stream(MESSAGES)]
    assert all(isinstance(piece, str) for piece in pieces)
    assert isinstance(usage, Usage)
    return [str(piece) for piece in pieces], usage


async def failure(provider: OpenAIProvider, pieces: list[str] | None = None) -> LLMError:
    """The error the stream ends with; the pieces before it go into `pieces`."""
    with pytest.raises(LLMError) as info:
        async for item in provider.stream(MESSAGES):
            assert isinstance(item, str), "no Usage after a failure"
            if pieces is not None:
                pieces.append(item)
    assert_no_key(info.value)
    return info.value


def assert_no_key(exc: BaseException | None) -> None:
    """Neither the error nor anything in its cause chain mentions the key."""
    while exc is not None:
        assert API_KEY not in str(exc) and API_KEY not in repr(exc)
        assert API_KEY[-8:] not in str(exc)
        exc = exc.__cause__ or exc.__context__


async def test_tokens_arrive_in_order_and_usage_is_the_servers(
    make_provider: ProviderFactory, fake_openai: FakeOpenAIServer
) -> None:
    fake_openai.state.push(reply(["Hel", "lo", ", ", "wörld", " 👋"]))
    pieces, usage = await collect(make_provider())
    assert pieces == ["Hel", "lo", ", ", "wörld", " 👋"]
    sent = fake_openai.state.requests[0].usage
    assert sent is not None
    assert usage == Usage(sent["prompt_tokens"], sent["completion_tokens"])
    assert usage.total_tokens == sent["total_tokens"]


async def test_request_is_a_streaming_chat_completion(
    make_provider: ProviderFactory, fake_openai: FakeOpenAIServer
) -> None:
    await collect(make_provider())
    (request,) = fake_openai.state.requests
    assert request.headers["Authorization"] == f"Bearer {API_KEY}"
    assert request.headers["Accept"] == "text/event-stream"
    assert request.headers["Content-Type"].startswith("application/json")
    assert request.body == {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Say hello to the team"},
        ],
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def test_each_event_reaches_the_consumer_before_the_next_is_sent(
    make_provider: ProviderFactory, fake_openai: FakeOpenAIServer
) -> None:
    fake_openai.state.push(reply(["one", " two", " three"], delay=0.2))
    async with contextlib.aclosing(make_provider().stream(MESSAGES)) as stream:
        assert await anext(stream) == "one"
        record = fake_openai.state.requests[0]
        assert record.sent == ["one"], "the server still holds the rest"
        assert await anext(stream) == " two"
        assert record.sent == ["one", " two"]
        rest = [item async for item in stream]
    assert rest[0] == " three" and isinstance(rest[1], Usage)


async def test_missing_usage_is_estimated(
    make_provider: ProviderFactory, fake_openai: FakeOpenAIServer
) -> None:
    fake_openai.state.push(reply(["Hello", " there", " friend"], usage=False))
    pieces, usage = await collect(make_provider())
    assert pieces == ["Hello", " there", " friend"]
    assert usage == Usage(sum(count_tokens(m.content) for m in MESSAGES), 3)


async def test_429_with_retry_after_then_success(
    make_provider: ProviderFactory, fake_openai: FakeOpenAIServer, caplog: pytest.LogCaptureFixture
) -> None:
    fake_openai.state.push(rate_limited(retry_after=0), reply(["ok"]))
    with caplog.at_level(logging.WARNING, logger="upstream.llm.openai"):
        pieces, _ = await collect(make_provider())
    assert pieces == ["ok"]
    assert [r.status for r in fake_openai.state.requests] == [429, 200]
    (record,) = caplog.records
    assert "attempt 1 of 3" in record.getMessage() and "429" in record.getMessage()
    assert API_KEY not in caplog.text


async def test_retry_after_is_capped_by_retry_max_delay(
    make_provider: ProviderFactory, fake_openai: FakeOpenAIServer
) -> None:
    fake_openai.state.push(rate_limited(retry_after=3600), reply(["ok"]))
    loop = asyncio.get_running_loop()
    started = loop.time()
    pieces, _ = await collect(make_provider(retry_max_delay=0.05))
    assert pieces == ["ok"]
    assert loop.time() - started < 2


async def test_500_twice_then_success_within_two_retries(
    make_provider: ProviderFactory, fake_openai: FakeOpenAIServer
) -> None:
    fake_openai.state.push(status(500), status(502), reply(["fine"]))
    pieces, _ = await collect(make_provider(max_retries=2))
    assert pieces == ["fine"]
    assert [r.status for r in fake_openai.state.requests] == [500, 502, 200]


async def test_500_without_retries_is_unavailable_with_the_status_and_message(
    make_provider: ProviderFactory, fake_openai: FakeOpenAIServer
) -> None:
    fake_openai.state.push(status(500))
    exc = await failure(make_provider(max_retries=0))
    assert isinstance(exc, LLMUnavailable)
    assert "HTTP 500" in str(exc) and "Sorry about that" in str(exc)
    assert len(fake_openai.state.requests) == 1


async def test_retries_run_out_on_503(
    make_provider: ProviderFactory, fake_openai: FakeOpenAIServer
) -> None:
    fake_openai.state.push(*[status(503, headers={"Retry-After": "0"})] * 3)
    exc = await failure(make_provider(max_retries=2))
    assert isinstance(exc, LLMUnavailable)
    assert "HTTP 503" in str(exc) and "3 attempts" in str(exc)
    assert len(fake_openai.state.requests) == 3


async def test_401_is_not_retried_and_the_key_is_not_echoed(
    make_provider: ProviderFactory, fake_openai: FakeOpenAIServer
) -> None:
    body = {"error": {"message": f"Incorrect API key provided: {API_KEY}.", "type": "x"}}
    fake_openai.state.push(status(401, body))
    exc = await failure(make_provider())
    assert isinstance(exc, LLMUnavailable)
    assert "HTTP 401" in str(exc) and "Incorrect API key provided" in str(exc)
    assert len(fake_openai.state.requests) == 1


async def test_wrong_key_gets_openais_masked_401(
    make_provider: ProviderFactory, fake_openai: FakeOpenAIServer
) -> None:
    fake_openai.state.api_key = "sk-the-right-key-0000"
    exc = await failure(make_provider())
    assert "HTTP 401" in str(exc)
    assert len(fake_openai.state.requests) == 1


async def test_long_error_messages_are_truncated(
    make_provider: ProviderFactory, fake_openai: FakeOpenAIServer
) -> None:
    fake_openai.state.push(status(400, {"error": {"message": "x" * 5000}}))
    exc = await failure(make_provider())
    assert "HTTP 400" in str(exc) and str(exc).count("x") == 200


async def test_cut_mid_stream_keeps_earlier_tokens_and_is_not_retried(
    make_provider: ProviderFactory, fake_openai: FakeOpenAIServer
) -> None:
    fake_openai.state.push(cut_after(["a", "b", "c", "d"], 2))
    pieces: list[str] = []
    exc = await failure(make_provider(), pieces)
    assert pieces == ["a", "b"]
    assert isinstance(exc, LLMUnavailable) and "before [DONE]" in str(exc)
    assert len(fake_openai.state.requests) == 1


async def test_error_event_mid_stream_is_unavailable(
    make_provider: ProviderFactory, fake_openai: FakeOpenAIServer
) -> None:
    fake_openai.state.push(fail_after(["a", "b"], 1))
    pieces: list[str] = []
    exc = await failure(make_provider(), pieces)
    assert pieces == ["a"]
    assert isinstance(exc, LLMUnavailable) and "mid-stream" in str(exc)
    assert len(fake_openai.state.requests) == 1


async def test_no_first_byte_within_read_timeout_is_a_timeout(
    make_provider: ProviderFactory,
    fake_openai: FakeOpenAIServer,
    short_read_session: aiohttp.ClientSession,
) -> None:
    fake_openai.state.push(stall_before_first_byte(5))
    exc = await failure(make_provider(session=short_read_session))
    assert isinstance(exc, LLMTimeout)
    assert len(fake_openai.state.requests) == 1
    await fake_openai.state.wait_for_disconnect(within=2)


async def test_silence_mid_stream_is_a_timeout(
    make_provider: ProviderFactory,
    fake_openai: FakeOpenAIServer,
    short_read_session: aiohttp.ClientSession,
) -> None:
    fake_openai.state.push(stall_after(1, 5, ["a", "b"]))
    pieces: list[str] = []
    exc = await failure(make_provider(session=short_read_session), pieces)
    assert pieces == ["a"]
    assert isinstance(exc, LLMTimeout)
    assert len(fake_openai.state.requests) == 1


async def test_connection_refused_is_unavailable(make_provider: ProviderFactory) -> None:
    base_url = f"http://127.0.0.1:{free_port()}/v1"
    exc = await failure(make_provider(base_url=base_url, max_retries=1))
    assert isinstance(exc, LLMUnavailable)
    assert "could not reach OpenAI" in str(exc) and "2 attempts" in str(exc)


async def test_closing_the_stream_early_disconnects_from_the_model(
    make_provider: ProviderFactory, fake_openai: FakeOpenAIServer
) -> None:
    fake_openai.state.push(reply(["tok"] * 50, delay=0.05))
    stream = make_provider().stream(MESSAGES)
    assert await anext(stream) == "tok"
    await stream.aclose()
    await fake_openai.state.wait_for_disconnect(within=2)
    (record,) = fake_openai.state.requests
    assert record.disconnected and not record.completed


async def test_cancelling_the_consumer_disconnects_from_the_model(
    make_provider: ProviderFactory, fake_openai: FakeOpenAIServer
) -> None:
    fake_openai.state.push(reply(["tok"] * 50, delay=0.05))
    first = asyncio.Event()

    async def consume() -> None:
        async for _ in make_provider().stream(MESSAGES):
            first.set()

    task = asyncio.create_task(consume())
    await first.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await fake_openai.state.wait_for_disconnect(within=2)
    assert fake_openai.state.disconnects == 1


def sse_body(*events: object, eol: str = "\n") -> bytes:
    """Events as `data:` lines; a str event is sent as is (comments, other fields)."""
    out = []
    for event in events:
        text = event if isinstance(event, str) else f"data: {json.dumps(event)}"
        out.append(text.replace("\n", eol) + eol + eol)
    return "".join(out).encode()


def delta(content: str) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}]}


async def test_crlf_comments_and_other_fields_are_tolerated(
    make_provider: ProviderFactory, aiohttp_raw_server: AiohttpRawServer
) -> None:
    body = sse_body(
        ": keep-alive",
        delta("A"),
        f"event: message\nid: 7\ndata:{json.dumps(delta('B'))}",
        {"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 2}},
        "data: [DONE]",
        eol="\r\n",
    )

    async def handler(request: web.BaseRequest) -> web.Response:
        return web.Response(body=body, content_type="text/event-stream")

    server = await aiohttp_raw_server(handler)
    pieces, usage = await collect(make_provider(base_url=str(server.make_url("/v1"))))
    assert pieces == ["A", "B"]
    assert usage == Usage(11, 2)


async def test_clean_end_of_body_without_done_is_unavailable(
    make_provider: ProviderFactory, aiohttp_raw_server: AiohttpRawServer
) -> None:
    async def handler(request: web.BaseRequest) -> web.Response:
        return web.Response(body=sse_body(delta("A")), content_type="text/event-stream")

    server = await aiohttp_raw_server(handler)
    pieces: list[str] = []
    exc = await failure(make_provider(base_url=str(server.make_url("/v1"))), pieces)
    assert pieces == ["A"]
    assert isinstance(exc, LLMUnavailable) and "before [DONE]" in str(exc)


async def test_openais_whole_stream_gives_only_the_content_and_the_reported_usage(
    make_provider: ProviderFactory, fake_openai: FakeOpenAIServer
) -> None:
    """The fake streams what OpenAI streams: a role chunk with empty content, obfuscation
    padding, a finish chunk with an empty delta, a usage chunk with no choices, [DONE]. The
    provider yields the content alone and the usage the server reported (numbers no estimate
    would give), after reading the stream to its end."""
    fake_openai.state.push(reply(["Hi", "!"], prompt_tokens=123, completion_tokens=7))
    pieces, usage = await collect(make_provider())
    assert pieces == ["Hi", "!"]
    assert usage == Usage(123, 7)
    (request,) = fake_openai.state.requests
    assert request.completed and not request.disconnected
