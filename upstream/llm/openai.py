"""OpenAI Chat Completions as a streaming provider: one POST, its server-sent events read live.

Retries (tenacity, exponential backoff with jitter, `Retry-After` honoured) happen only before the
first byte of a 200: on 429, 5xx, connection errors and connect timeouts. Once the stream has
started a failure is final, because the consumer has already seen part of the reply. Every library
error becomes `LLMUnavailable` (502) or `LLMTimeout` (504) here, and no message carries the key.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import AsyncGenerator, Mapping, Sequence
from typing import Any

import aiohttp
from aiohttp.http_exceptions import HttpProcessingError
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_random_exponential,
)

from upstream.errors import LLMError, LLMTimeout, LLMUnavailable
from upstream.llm import ChatMessage, Usage
from upstream.llm.local import count_tokens

logger = logging.getLogger(__name__)

_DONE = "[DONE]"
_ERROR_BODY_LIMIT = 64 * 1024
_MESSAGE_LIMIT = 200
# OpenAI echoes a masked key in 401 messages ("sk-proj-****abcd"); drop anything key-shaped.
_KEY_LIKE = re.compile(r"\bsk-[\w*.-]+")


def make_session(connect_timeout: float, read_timeout: float) -> aiohttp.ClientSession:
    """A session for `OpenAIProvider`; call it inside the running loop and close it on exit.

    There is no total limit, so a long reply that keeps arriving is never cut; `sock_read` bounds
    the wait for the first byte and every gap between chunks.
    """
    timeout = aiohttp.ClientTimeout(
        total=None,
        connect=connect_timeout,
        sock_connect=connect_timeout,
        sock_read=read_timeout,
    )
    return aiohttp.ClientSession(timeout=timeout)


class _Retry(Exception):
    """A failure before the first byte that another attempt may fix; `error` if none does."""

    def __init__(self, error: LLMError, retry_after: float | None = None) -> None:
        super().__init__(error.detail)
        self.error = error
        self.retry_after = retry_after


class _SSEDecoder:
    """Server-sent events reduced to their `data` field (WHATWG HTML, 9.2.6 "Interpreting an event
    stream"): `data` lines accumulate, a blank line dispatches, `:` lines are comments."""

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> str | None:
        """Take one line without its terminator; return the event's data when the line ends one."""
        if not line:
            return self.flush()
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value.removeprefix(" "))
        return None

    def flush(self) -> str | None:
        """The data of the event in progress, if any, which ends it."""
        if not self._data:
            return None
        data = "\n".join(self._data)
        self._data.clear()
        return data


class OpenAIProvider:
    """Streams `POST {base_url}/chat/completions` on a shared session (see `make_session`)."""

    name = "openai"

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        base_url: str,
        api_key: str,
        model: str,
        max_retries: int = 2,
        retry_base_delay: float = 0.5,
        retry_max_delay: float = 8.0,
    ) -> None:
        self._session = session
        self._url = f"{base_url}/chat/completions"
        self._api_key = api_key
        self.model = model
        self.max_retries = max_retries
        self.retry_max_delay = retry_max_delay
        # "Full jitter": uniform in [0, min(max, base * 2**n)], which spreads retrying clients.
        self._backoff = wait_random_exponential(multiplier=retry_base_delay, max=retry_max_delay)

    async def stream(self, messages: Sequence[ChatMessage]) -> AsyncGenerator[str | Usage, None]:
        """Yield the reply's pieces as they arrive, then one `Usage`.

        Close the iterator (`aclose()`, or `contextlib.aclosing`) to stop early: the response is
        released at once, which drops the connection and stops the generation.
        """
        payload = {
            "model": self.model,
            "messages": [{"role": m.role, "content": m.content} for m in messages],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        pieces: list[str] = []
        usage: Usage | None = None
        async with await self._connect(payload) as resp:
            sse = _SSEDecoder()
            while True:
                line = await self._read_line(resp)
                if line is None:
                    # EOF: a last event without its blank line still counts if it was [DONE].
                    if sse.flush() == _DONE:
                        break
                    raise LLMUnavailable("OpenAI stream ended before [DONE] (connection closed)")
                data = sse.feed(line)
                if data is None:
                    continue
                if data == _DONE:
                    break
                chunk = self._parse(data)
                if (reported := _usage(chunk.get("usage"))) is not None:
                    usage = reported
                if text := _delta_text(chunk):
                    pieces.append(text)
                    yield text
        if usage is None:
            logger.info("OpenAI stream carried no usage; estimating it")
            usage = Usage(
                prompt_tokens=sum(count_tokens(m.content) for m in messages),
                completion_tokens=count_tokens("".join(pieces)),
            )
        yield usage

    async def _connect(self, payload: Mapping[str, Any]) -> aiohttp.ClientResponse:
        """POST until a 200 arrives or the retries run out; the 200's body is left unread."""
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.max_retries + 1),
            wait=self._wait,
            retry=retry_if_exception_type(_Retry),
            before_sleep=self._log_retry,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    return await self._attempt(payload)
        except _Retry as exc:
            attempts = retrying.statistics.get("attempt_number", 1)
            detail = exc.error.detail
            if attempts > 1:
                detail = f"{detail} ({attempts} attempts)"
            raise type(exc.error)(detail) from exc.__cause__
        raise AssertionError("unreachable: tenacity either returns or raises")

    async def _attempt(self, payload: Mapping[str, Any]) -> aiohttp.ClientResponse:
        headers = {"Authorization": f"Bearer {self._api_key}", "Accept": "text/event-stream"}
        try:
            resp = await self._session.post(self._url, json=payload, headers=headers)
        except aiohttp.ConnectionTimeoutError as exc:
            # The request never left, so trying again costs nothing.
            raise _Retry(LLMTimeout("OpenAI did not accept the connection in time")) from exc
        except TimeoutError as exc:
            # The request was sent and may be running (and billed): not retried.
            raise LLMTimeout("OpenAI sent no response within the read timeout") from exc
        except aiohttp.ClientError as exc:
            raise _Retry(LLMUnavailable(f"could not reach OpenAI: {self._describe(exc)}")) from exc
        if resp.status == 200:
            return resp
        async with resp:
            message = await self._error_message(resp)
        error = LLMUnavailable(f"OpenAI answered HTTP {resp.status}{message}")
        if resp.status == 429 or resp.status >= 500:
            retry_after = _retry_after(resp.headers) if resp.status in (429, 503) else None
            raise _Retry(error, retry_after)
        raise error

    async def _read_line(self, resp: aiohttp.ClientResponse) -> str | None:
        """The next line without its terminator, or None at the end of the body."""
        try:
            raw = await resp.content.readline()
        except TimeoutError as exc:
            raise LLMTimeout("OpenAI stream stalled longer than the read timeout") from exc
        except aiohttp.ClientError as exc:
            raise LLMUnavailable(
                f"OpenAI stream ended before [DONE] ({self._describe(exc)})"
            ) from exc
        except (HttpProcessingError, ValueError) as exc:  # a line beyond aiohttp's buffer limit
            raise LLMUnavailable("OpenAI sent an oversized stream line") from exc
        if not raw:
            return None
        return raw.decode("utf-8", errors="replace").rstrip("\r\n")

    def _parse(self, data: str) -> dict[str, Any]:
        try:
            chunk = json.loads(data)
        except ValueError as exc:
            raise LLMUnavailable("OpenAI sent a malformed stream event") from exc
        if not isinstance(chunk, dict):
            raise LLMUnavailable("OpenAI sent a stream event that is not an object")
        if (error := chunk.get("error")) is not None:
            raise LLMUnavailable(f"OpenAI reported an error mid-stream{self._message_of(error)}")
        return chunk

    async def _error_message(self, resp: aiohttp.ClientResponse) -> str:
        """': <error.message>' from an OpenAI error body, or '' when there is none."""
        body = bytearray()
        try:
            while len(body) < _ERROR_BODY_LIMIT:
                part = await resp.content.read(_ERROR_BODY_LIMIT - len(body))
                if not part:
                    break
                body += part
            parsed = json.loads(body)
        except (TimeoutError, aiohttp.ClientError, ValueError):
            return ""
        return self._message_of(parsed.get("error")) if isinstance(parsed, dict) else ""

    def _message_of(self, error: object) -> str:
        message = error.get("message") if isinstance(error, dict) else None
        if not isinstance(message, str) or not message:
            return ""
        return f": {self._redact(message)[:_MESSAGE_LIMIT]}"

    def _describe(self, exc: BaseException) -> str:
        return self._redact(f"{type(exc).__name__}: {exc}")[:_MESSAGE_LIMIT]

    def _redact(self, text: str) -> str:
        if self._api_key:
            text = text.replace(self._api_key, "***")
        return _KEY_LIKE.sub("sk-***", text)

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, _Retry) and exc.retry_after is not None:
            return min(exc.retry_after, self.retry_max_delay)
        return self._backoff(state)

    def _log_retry(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        delay = state.next_action.sleep if state.next_action else 0.0
        logger.warning(
            "OpenAI attempt %d of %d failed (%s); retrying in %.2fs",
            state.attempt_number,
            self.max_retries + 1,
            exc,
            delay,
        )


def _delta_text(chunk: Mapping[str, Any]) -> str:
    choices = chunk.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return ""
    delta = choices[0].get("delta")
    content = delta.get("content") if isinstance(delta, dict) else None
    return content if isinstance(content, str) else ""


def _usage(value: object) -> Usage | None:
    if not isinstance(value, dict):
        return None
    prompt, completion = value.get("prompt_tokens"), value.get("completion_tokens")
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    return Usage(prompt_tokens=prompt, completion_tokens=completion)


def _retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds from `retry-after-ms` (OpenAI's) or `Retry-After` (RFC 9110, 10.2.3, delta form)."""
    for name, scale in (("retry-after-ms", 0.001), ("Retry-After", 1.0)):
        try:
            seconds = float(headers.get(name, "")) * scale
        except ValueError:
            continue
        if math.isfinite(seconds) and seconds >= 0:
            return seconds
    return None
