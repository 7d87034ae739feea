"""What /openapi.json says about each route: applied to the handlers with aiohttp-apispec's
`docs` decorator (handlers.py), schemas from schemas.py, so documentation and validation share
their source."""

from __future__ import annotations

from typing import Any

from pixelcraft.contract import ANONYMOUS_PREFIX, USER_ID_HEADER, USER_ID_PATTERN
from pixelcraft.problems import PROBLEM_JSON
from upstream.schemas import (
    ChatReplySchema,
    ChatRequestSchema,
    ConversationDetailSchema,
    ConversationPageSchema,
    HealthSchema,
    ListQuerySchema,
    ProblemSchema,
    ReadySchema,
)

USER = {
    "in": "header",
    "name": USER_ID_HEADER,
    "required": True,
    "description": "The user, as the gateway resolved it: a verified JWT `sub`, an X-User-Id it "
    f"believes, or `{ANONYMOUS_PREFIX}<address>` for an anonymous client (a namespace no client "
    "can claim: the gateway refuses such ids in headers and tokens). Conversations are private "
    "to it.",
    "schema": {"type": "string", "pattern": USER_ID_PATTERN, "example": "alice"},
}
CONVERSATION = {
    "in": "path",
    "name": "id",
    "required": True,
    "description": "The conversation's id.",
    "schema": {
        "type": "string",
        "format": "uuid",
        "example": "3fa85f64-5717-4562-b3fc-2c963f66afa6",
    },
}


def problem(description: str, example: dict[str, Any] | None = None) -> dict[str, Any]:
    media: dict[str, Any] = {"schema": ProblemSchema}
    if example is not None:
        media["example"] = example
    return {"description": description, "content": {PROBLEM_JSON: media}}


BAD_REQUEST = problem(
    "Malformed input: `field` names the header, query parameter or body field at fault, "
    "`errors` lists every invalid body field.",
    {
        "type": "about:blank",
        "title": "Bad Request",
        "status": 400,
        "detail": "message: Shorter than minimum length 1.",
        "field": "message",
        "errors": {"message": ["Shorter than minimum length 1."]},
        "request_id": "9f1c2d3e4b5a69788796a5b4c3d2e1f0",
    },
)
NOT_FOUND = problem("No such conversation for this user (another user's included).")
UNAVAILABLE = {
    **problem("PostgreSQL is down or its pool is exhausted; retry after Retry-After seconds."),
    "headers": {"Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}}},
}

SSE_DESCRIPTION = """\
Stores the message, asks the model, and answers as it writes.

**Streaming (default, `"stream": true`)**: `text/event-stream`, one event per piece of the
answer as the model produces it, never buffered:

- `event: delta` with `data: {"content": "<text>"}`: the next piece of the answer;
- `event: done` with `data: {"conversation_id", "message_id", "usage"}`: the end; `usage` has
  `prompt_tokens`, `completion_tokens`, `total_tokens` (or is null);
- `event: error` with a problem object as data: the model failed mid-answer; the partial answer
  is stored with `complete: false`.

The `X-Conversation-Id` response header names the conversation before the first event.

**JSON (`"stream": false`)**: one object with the whole answer.

A model that fails before its first word is a plain 502 (refused, reset, error) or 504 (no answer
in time), not a stream. If the client disconnects, the model request is cancelled and the partial
answer is stored.
"""

SSE_EVENT = {
    "type": "object",
    "description": "One event of the stream (each is `event: <name>` and one `data:` line).",
    "properties": {
        "event": {
            "type": "string",
            "enum": ["delta", "done", "error"],
            "description": "delta: a piece of the answer; done: the end; error: the model "
            "failed mid-answer.",
            "example": "delta",
        },
        "data": {
            "type": "string",
            "description": 'JSON: {"content"} for delta; {"conversation_id", "message_id", '
            '"usage"} for done; a problem object for error.',
            "example": '{"content":"Turn off"}',
        },
    },
    "required": ["event", "data"],
}

CONVERSATION_HEADER = {
    "X-Conversation-Id": {
        "description": "The conversation (new or continued), sent before the first event.",
        "schema": {"type": "string", "format": "uuid"},
    }
}

CHAT: dict[str, Any] = {
    "tags": ["chat"],
    "summary": "Send a message and stream the answer",
    "description": SSE_DESCRIPTION,
    "parameters": [USER],
    "requestBody": {
        "required": True,
        "description": "The message, and optionally the conversation to continue.",
        "content": {"application/json": {"schema": ChatRequestSchema}},
    },
    "responses": {
        "200": {
            "description": 'The answer: an SSE stream, or JSON with `"stream": false`.',
            "headers": CONVERSATION_HEADER,
            "content": {
                "text/event-stream": {
                    "schema": SSE_EVENT,
                    "example": 'event: delta\ndata: {"content":"Turn off"}\n\n'
                    'event: delta\ndata: {"content":" buffering."}\n\n'
                    'event: done\ndata: {"conversation_id":"3fa85f64-5717-4562-b3fc-'
                    '2c963f66afa6","message_id":14,"usage":{"prompt_tokens":42,'
                    '"completion_tokens":67,"total_tokens":109}}\n\n',
                },
                "application/json": {"schema": ChatReplySchema},
            },
        },
        "400": BAD_REQUEST,
        "404": problem("`conversation_id` names no conversation of this user."),
        "502": problem("The model refused, reset or failed before its first word."),
        "503": UNAVAILABLE,
        "504": problem("The model did not connect or answer in time."),
    },
}

LIST: dict[str, Any] = {
    "tags": ["conversations"],
    "summary": "List conversations",
    "description": "The user's conversations, most recent activity first, a page at a time "
    "(keyset pagination: pass `next_cursor` back as `cursor`).",
    "parameters": [USER, {"in": "query", "schema": ListQuerySchema}],
    "responses": {
        "200": {
            "description": "One page.",
            "content": {"application/json": {"schema": ConversationPageSchema}},
        },
        "400": BAD_REQUEST,
        "503": UNAVAILABLE,
    },
}

GET: dict[str, Any] = {
    "tags": ["conversations"],
    "summary": "Get a conversation with its messages",
    "description": "One conversation of the user and all of its messages, oldest first.",
    "parameters": [USER, CONVERSATION],
    "responses": {
        "200": {
            "description": "The conversation.",
            "content": {"application/json": {"schema": ConversationDetailSchema}},
        },
        "400": BAD_REQUEST,
        "404": NOT_FOUND,
        "503": UNAVAILABLE,
    },
}

DELETE: dict[str, Any] = {
    "tags": ["conversations"],
    "summary": "Delete a conversation",
    "description": "Deletes the conversation and its messages. Not undoable.",
    "parameters": [USER, CONVERSATION],
    "responses": {
        "204": {"description": "Deleted."},
        "400": BAD_REQUEST,
        "404": NOT_FOUND,
        "503": UNAVAILABLE,
    },
}

HEALTHZ: dict[str, Any] = {
    "tags": ["operations"],
    "summary": "Liveness",
    "description": "200 while the process answers; dependencies are /readyz's business.",
    "responses": {
        "200": {"description": "Alive.", "content": {"application/json": {"schema": HealthSchema}}}
    },
}

READYZ: dict[str, Any] = {
    "tags": ["operations"],
    "summary": "Readiness",
    "description": "200 when PostgreSQL answers a query through the pool, else 503.",
    "responses": {
        "200": {"description": "Ready.", "content": {"application/json": {"schema": ReadySchema}}},
        "503": {
            "description": "The database is down.",
            "content": {"application/json": {"schema": ReadySchema}},
        },
    },
}
