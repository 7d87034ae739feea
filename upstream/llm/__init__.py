"""LLM providers behind one small interface.

A provider's `stream(messages)` is an async iterator that yields each piece of the reply as a
`str` as soon as it is known, then exactly one `Usage`, and ends. It raises `LLMUnavailable`
(502) or `LLMTimeout` (504) from `upstream.errors`, before or after the first piece. Closing the
iterator early (the client left) must close the provider's request promptly.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One turn of the conversation as the model sees it."""

    role: Role
    content: str


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of one completion, as the provider reports them."""

    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }


class Provider(Protocol):
    """What the chat handler needs from a model."""

    name: str

    def stream(self, messages: Sequence[ChatMessage]) -> AsyncGenerator[str | Usage, None]: ...
