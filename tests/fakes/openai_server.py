"""A fake OpenAI Chat Completions API that streams api.openai.com's exact server-sent events.

`POST /v1/chat/completions` answers like the real endpoint: with `stream: true`, a role chunk, one
chunk per content delta, a `finish_reason: "stop"` chunk, the usage chunk (`choices: []`) when
`stream_options.include_usage` asks for it, then `data: [DONE]`; each event is written and flushed
on its own. Without `stream`, one `chat.completion` object.

Tests script it through the `FakeOpenAI` stored under `fake_openai_key`: each request takes the
next `Step` from `script` (see `reply`, `status`, `rate_limited`, `cut_after`, `fail_after`,
`stall_before_first_byte`, `stall_after`); an empty script answers with `default`. Every request
is recorded in `requests`, with what was sent back and whether the client left mid-answer.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import string
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from multidict import CIMultiDictProxy

DEFAULT_TOKENS: tuple[str, ...] = ("Hello", "!", " How", " can", " I", " help", " you", "?")

_ALPHABET = string.ascii_letters + string.digits


@dataclass(frozen=True, slots=True)
class Reply:
    """A 200: streamed when the request says `stream: true`, else one `chat.completion` object."""

    tokens: tuple[str, ...] = DEFAULT_TOKENS
    delay: float = 0.0
    """Seconds between consecutive events of the stream."""
    usage: bool | None = None
    """Send the usage chunk: None follows `stream_options.include_usage`; False never sends it."""
    prompt_tokens: int | None = None
    """Reported prompt tokens; None counts the request's messages."""
    completion_tokens: int | None = None
    """Reported completion tokens; None is `len(tokens)`."""
    stall_before: float = 0.0
    """Seconds to wait before the response headers (no first byte)."""
    stall_after: tuple[int, float] | None = None
    """(n, seconds): pause that long after the n-th content chunk."""
    cut_after: int | None = None
    """Abort the connection after this many content chunks: no finish chunk, no [DONE]."""
    fail_after: int | None = None
    """Send OpenAI's mid-stream `{"error": ...}` event after this many content chunks, then end."""


@dataclass(frozen=True, slots=True)
class Status:
    """A non-200 answer; `body` None means OpenAI's own error body for that status."""

    code: int
    body: Mapping[str, Any] | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


Step = Reply | Status


def reply(
    tokens: Sequence[str] = DEFAULT_TOKENS,
    delay: float = 0.0,
    usage: bool | None = None,
    *,
    prompt_tokens: int | None = None,
    completion_tokens: int | None = None,
) -> Reply:
    """Stream `tokens`, `delay` seconds apart."""
    return Reply(tuple(tokens), delay, usage, prompt_tokens, completion_tokens)


def status(
    code: int, body: Mapping[str, Any] | None = None, headers: Mapping[str, str] | None = None
) -> Status:
    """Answer `code` with `body` (default: OpenAI's error object) and extra `headers`."""
    return Status(code, body, dict(headers or {}))


def rate_limited(retry_after: float | None = 0) -> Status:
    """OpenAI's 429, with `Retry-After: <retry_after>` unless it is None."""
    headers = {} if retry_after is None else {"Retry-After": f"{retry_after:g}"}
    return Status(429, None, headers)


def cut_after(tokens: Sequence[str], n: int, delay: float = 0.0) -> Reply:
    """Stream the first `n` of `tokens`, then drop the connection mid-stream."""
    return Reply(tuple(tokens), delay, cut_after=n)


def fail_after(tokens: Sequence[str], n: int) -> Reply:
    """Stream the first `n` of `tokens`, then an `{"error": ...}` event and the end of the body."""
    return Reply(tuple(tokens), fail_after=n)


def stall_before_first_byte(seconds: float, tokens: Sequence[str] = DEFAULT_TOKENS) -> Reply:
    """Send nothing for `seconds`, then answer normally (if the client is still there)."""
    return Reply(tuple(tokens), stall_before=seconds)


def stall_after(n_tokens: int, seconds: float, tokens: Sequence[str] = DEFAULT_TOKENS) -> Reply:
    """Stream `n_tokens` content chunks, go silent for `seconds`, then finish normally."""
    return Reply(tuple(tokens), stall_after=(n_tokens, seconds))


@dataclass(eq=False)
class RecordedRequest:
    """One request as the fake saw it, and what it sent back."""

    headers: CIMultiDictProxy[str]
    body: dict[str, Any]
    status: int = 200
    sent: list[str] = field(default_factory=list)
    """Content deltas written so far, in order."""
    usage: dict[str, Any] | None = None
    """The usage object sent (in the usage chunk or the completion), if any."""
    completed: bool = False
    """The whole answer went out (for a stream: `data: [DONE]`)."""
    disconnected: bool = False
    """The client left before the answer was complete."""


@dataclass(eq=False)
class FakeOpenAI:
    """The fake's script and its record of what happened."""

    script: list[Step] = field(default_factory=list)
    default: Reply = field(default_factory=Reply)
    api_key: str | None = None
    """When set, any other bearer token gets OpenAI's 401 `invalid_api_key` (and no step)."""
    model: str | None = None
    """The model named in answers; None echoes the request's."""
    requests: list[RecordedRequest] = field(default_factory=list)
    disconnects: int = 0
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)

    def push(self, *steps: Step) -> None:
        """Queue `steps` for the next requests, one each, in order."""
        self.script.extend(steps)

    def next_step(self) -> Step:
        return self.script.pop(0) if self.script else self.default

    async def wait_for_disconnect(self, within: float = 2.0) -> None:
        """Return once a client has left mid-answer; TimeoutError after `within` seconds."""
        async with asyncio.timeout(within):
            await self.disconnected.wait()

    def _record_disconnect(self, record: RecordedRequest) -> None:
        record.disconnected = True
        self.disconnects += 1
        self.disconnected.set()


fake_openai_key = web.AppKey("fake_openai", FakeOpenAI)


def create_fake_openai(state: FakeOpenAI | None = None) -> web.Application:
    """The fake API; its state is `app[fake_openai_key]`."""
    app = web.Application()
    app[fake_openai_key] = state if state is not None else FakeOpenAI()
    app.router.add_post("/v1/chat/completions", chat_completions)
    return app


@dataclass(frozen=True, slots=True)
class FakeOpenAIServer:
    """A running fake: point a client at `base_url`, script and inspect `state`."""

    base_url: str
    state: FakeOpenAI


async def chat_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[fake_openai_key]
    try:
        body = await request.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        return _error(400, _error_body(400, "We could not parse the JSON body of your request."))
    record = RecordedRequest(headers=request.headers, body=body)
    state.requests.append(record)
    if state.api_key is not None:
        given = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if given != state.api_key:
            record.status = 401
            return _error(401, _error_body(401, key=given))
    step = state.next_step()
    if isinstance(step, Status):
        record.status = step.code
        return _error(step.code, step.body or _error_body(step.code), step.headers)
    try:
        if step.stall_before:
            await asyncio.sleep(step.stall_before)
        if body.get("stream"):
            return await _stream(request, record, step, state.model)
        return _completion(record, step, state.model)
    except (asyncio.CancelledError, ConnectionResetError):
        # aiohttp's test server cancels the handler when the client leaves (handler_cancellation);
        # other servers surface it as a failed write.
        state._record_disconnect(record)
        raise


async def _stream(
    request: web.Request, record: RecordedRequest, step: Reply, model: str | None
) -> web.StreamResponse:
    options = record.body.get("stream_options") or {}
    include_usage = bool(options.get("include_usage")) if step.usage is None else step.usage
    obfuscate = options.get("include_obfuscation", True) is not False
    base = _base(record.body, model, "chat.completion.chunk")
    resp = web.StreamResponse(headers=_headers())
    resp.content_type = "text/event-stream"
    resp.charset = "utf-8"
    await resp.prepare(request)
    first = True

    async def send(data: bytes) -> None:
        nonlocal first
        if step.delay and not first:
            await asyncio.sleep(step.delay)
        first = False
        await resp.write(b"data: " + data + b"\n\n")

    def chunk(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> bytes:
        event: dict[str, Any] = {**base, "choices": choices}
        if include_usage:
            event["usage"] = usage
        if obfuscate:
            event["obfuscation"] = _random_text(secrets.randbelow(16) + 1)
        return _compact(event)

    def choice(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

    async def checkpoint() -> bool:
        """Apply the step's stall, failure or cut after `len(record.sent)` chunks; False: stop."""
        if step.stall_after is not None and step.stall_after[0] == len(record.sent):
            await asyncio.sleep(step.stall_after[1])
        if step.fail_after == len(record.sent):
            await send(_compact(_error_body(500)))
            return False
        if step.cut_after == len(record.sent):
            assert request.transport is not None
            request.transport.abort()
            return False
        return True

    await send(chunk([choice({"role": "assistant", "content": "", "refusal": None})]))
    for token in step.tokens:
        if not await checkpoint():
            return resp
        await send(chunk([choice({"content": token})]))
        record.sent.append(token)
    if not await checkpoint():
        return resp
    await send(chunk([choice({}, "stop")]))
    if include_usage:
        record.usage = _usage(record.body, step)
        await send(chunk([], record.usage))
    await send(b"[DONE]")
    record.completed = True
    return resp


def _completion(record: RecordedRequest, step: Reply, model: str | None) -> web.Response:
    record.sent.extend(step.tokens)
    record.usage = _usage(record.body, step)
    message = {"role": "assistant", "content": "".join(step.tokens), "refusal": None}
    body = {
        **_base(record.body, model, "chat.completion"),
        "choices": [
            {
                "index": 0,
                "message": {**message, "annotations": []},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": record.usage,
    }
    record.completed = True
    # The real API pretty-prints non-streamed answers.
    text = json.dumps(body, indent=2, ensure_ascii=False)
    return web.Response(text=text, content_type="application/json", headers=_headers())


def _base(body: Mapping[str, Any], model: str | None, obj: str) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{_random_text(29)}",
        "object": obj,
        "created": int(time.time()),
        "model": model or str(body.get("model", "gpt-4o-mini")),
        "service_tier": "default",
        "system_fingerprint": f"fp_{secrets.token_hex(5)}",
    }


def _usage(body: Mapping[str, Any], step: Reply) -> dict[str, Any]:
    prompt = step.prompt_tokens
    if prompt is None:
        # Roughly OpenAI's accounting: a few tokens of framing per message, words as tokens.
        messages = body.get("messages") or []
        prompt = 3 + sum(4 + len(str(m.get("content", "")).split()) for m in messages)
    completion = len(step.tokens) if step.completion_tokens is None else step.completion_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


_ERRORS: dict[int, tuple[str, str, str | None]] = {
    400: ("invalid_request_error", "Invalid request.", None),
    401: (
        "invalid_request_error",
        "Incorrect API key provided: {key}. You can find your API key at "
        "https://platform.openai.com/account/api-keys.",
        "invalid_api_key",
    ),
    403: ("invalid_request_error", "Country, region, or territory not supported", None),
    404: (
        "invalid_request_error",
        "The model does not exist or you do not have access to it.",
        "model_not_found",
    ),
    429: (
        "requests",
        "Rate limit reached for requests. Please try again in 1s. "
        "Visit https://platform.openai.com/account/rate-limits to learn more.",
        "rate_limit_exceeded",
    ),
    500: (
        "server_error",
        "The server had an error while processing your request. Sorry about that!",
        None,
    ),
    503: ("server_error", "The engine is currently overloaded, please try again later.", None),
}


def _error_body(code: int, message: str | None = None, key: str = "") -> dict[str, Any]:
    kind, default, error_code = _ERRORS.get(code, ("server_error", f"HTTP {code}", None))
    # OpenAI masks all but the ends of a wrong key.
    masked = f"{key[:3]}{'*' * max(len(key) - 7, 0)}{key[-4:]}" if len(key) > 7 else key
    text = (message or default).replace("{key}", masked)
    return {"error": {"message": text, "type": kind, "param": None, "code": error_code}}


def _error(
    code: int, body: Mapping[str, Any], headers: Mapping[str, str] | None = None
) -> web.Response:
    text = json.dumps(body, indent=2, ensure_ascii=False)
    return web.Response(
        status=code,
        text=text,
        content_type="application/json",
        headers={**_headers(), **(headers or {})},
    )


def _headers() -> dict[str, str]:
    return {
        "openai-version": "2020-10-01",
        "openai-processing-ms": str(secrets.randbelow(400) + 50),
        "x-request-id": f"req_{secrets.token_hex(16)}",
    }


def _compact(event: Mapping[str, Any]) -> bytes:
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()


def _random_text(length: int) -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(length))
