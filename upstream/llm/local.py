"""An offline, deterministic model: plausible replies streamed token by token.

The same conversation always gets the same reply, so tests can assert on it; `delay` paces the
tokens like a real model so streaming is visible with `curl -N`.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import AsyncGenerator, Sequence

from upstream.llm import ChatMessage, Usage

_OPENERS = (
    "Good question.",
    "Here is how I would think about it.",
    "Let me walk through that.",
    "Short answer first, then the details.",
)
_BODY = (
    "Start from the smallest version that works and measure it before adding anything.",
    "Most of the cost hides in the parts that run on every request, so look there first.",
    "Write the failure cases down before the happy path; they shape the design.",
    "Keep state in one place and pass it in explicitly, which makes testing easy.",
    "A limit that users can see in the response headers is a limit they can respect.",
    "When two answers seem equally good, pick the one that is easier to undo.",
    "Streaming the answer makes the first word arrive sooner, even when the total is the same.",
    "Retries belong before the first byte; after it, the client already saw a partial answer.",
)
_CLOSERS = (
    "Does that help?",
    "Happy to go deeper on any part of it.",
    "Tell me more about your setup and I can be more specific.",
)
_WORD = re.compile(r"\S+")


def count_tokens(text: str) -> int:
    """A rough token count (words and punctuation runs), good enough for usage reports."""
    return len(_WORD.findall(text))


def compose_reply(messages: Sequence[ChatMessage]) -> str:
    """The reply, chosen by a hash of the conversation so it is stable across runs."""
    seed = hashlib.sha256("\n".join(m.content for m in messages).encode()).digest()
    last = messages[-1].content.strip() if messages else ""
    topic = " ".join(last.split()[:8])
    parts = [_OPENERS[seed[0] % len(_OPENERS)]]
    if topic:
        parts.append(f'You asked: "{topic}{"..." if len(last.split()) > 8 else ""}".')
    for i in range(2 + seed[1] % 3):
        parts.append(_BODY[seed[2 + i] % len(_BODY)])
    parts.append(_CLOSERS[seed[6] % len(_CLOSERS)])
    return " ".join(parts)


class LocalProvider:
    """Streams `compose_reply` word by word, `delay` seconds apart."""

    name = "local"

    def __init__(self, delay: float = 0.02) -> None:
        self.delay = delay

    async def stream(self, messages: Sequence[ChatMessage]) -> AsyncGenerator[str | Usage, None]:
        reply = compose_reply(messages)
        words = reply.split(" ")
        for i, word in enumerate(words):
            if self.delay:
                await asyncio.sleep(self.delay)
            yield word if i == 0 else f" {word}"
        prompt = sum(count_tokens(m.content) for m in messages)
        yield Usage(prompt_tokens=prompt, completion_tokens=len(words))
