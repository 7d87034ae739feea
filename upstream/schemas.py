"""Schemas (marshmallow): request validation and the OpenAPI document come from the same classes.

Request schemas validate what handlers accept (`load`); response and problem schemas describe
what they send. Every field has a description and an example, which /docs shows.
"""

from __future__ import annotations

from typing import Any

from marshmallow import INCLUDE, RAISE, Schema, ValidationError, fields, validate, validates

from upstream.errors import InvalidFields

MAX_MESSAGE_CHARS = 32_000
CONVERSATION_ID = "3fa85f64-5717-4562-b3fc-2c963f66afa6"
USAGE_EXAMPLE = {"prompt_tokens": 42, "completion_tokens": 67, "total_tokens": 109}


class ChatRequestSchema(Schema):
    """Body of POST /v1/chat."""

    class Meta:
        unknown = RAISE

    conversation_id = fields.UUID(
        load_default=None,
        allow_none=True,
        metadata={
            "description": "Continue this conversation; omit (or null) to start a new one.",
            "example": CONVERSATION_ID,
        },
    )
    message = fields.String(
        required=True,
        validate=validate.Length(min=1, max=MAX_MESSAGE_CHARS),
        metadata={
            "description": "The user's message, 1 to 32,000 characters, not only whitespace.",
            "example": "How do I keep a streamed answer flowing through nginx?",
        },
    )
    stream = fields.Boolean(
        load_default=True,
        metadata={
            "description": "true (default): Server-Sent Events; false: one JSON answer.",
            "example": True,
        },
    )

    @validates("message")
    def _not_blank(self, value: str, **_: Any) -> None:
        if value and not value.strip():
            raise ValidationError("Must contain more than whitespace.")


class ListQuerySchema(Schema):
    """Query of GET /v1/conversations."""

    class Meta:
        unknown = RAISE

    limit = fields.Integer(
        load_default=20,
        validate=validate.Range(min=1, max=100),
        metadata={"description": "Page size, 1 to 100 (default 20).", "example": 20},
    )
    cursor = fields.String(
        load_default=None,
        metadata={
            "description": "The `next_cursor` of the previous page; omit for the first page.",
            "example": "MjAyNi0xMS0yOFQxMDowMDowMCswMDowMHwzZmE4NWY2NA",
        },
    )


# --- responses -----------------------------------------------------------------------------


def _out(description: str, example: Any, **kwargs: Any) -> dict[str, Any]:
    return {"required": True, "metadata": {"description": description, "example": example},
            **kwargs}  # fmt: skip


class UsageSchema(Schema):
    """Tokens the model reported for one answer."""

    prompt_tokens = fields.Integer(**_out("Tokens of the prompt (history included).", 42))
    completion_tokens = fields.Integer(**_out("Tokens of the answer.", 67))
    total_tokens = fields.Integer(**_out("prompt_tokens + completion_tokens.", 109))


class ChatReplySchema(Schema):
    """POST /v1/chat with "stream": false."""

    conversation_id = fields.UUID(**_out("The conversation, new or continued.", CONVERSATION_ID))
    message_id = fields.Integer(**_out("Id of the stored assistant message.", 14))
    usage = fields.Nested(
        UsageSchema,
        allow_none=True,
        **_out("Token counts, null when the model reported none.", USAGE_EXAMPLE),
    )
    content = fields.String(**_out("The whole answer.", "Turn off proxy buffering."))


class ConversationSchema(Schema):
    """A conversation, without its messages."""

    id = fields.UUID(**_out("The conversation's id.", CONVERSATION_ID))
    title = fields.String(**_out("The start of its first message.", "How do I keep a stream"))
    created_at = fields.DateTime(**_out("When it started (ISO 8601).", "2026-11-28T10:00:00+00:00"))
    updated_at = fields.DateTime(
        **_out("When its last message was added (ISO 8601).", "2026-11-28T10:05:00+00:00")
    )


class MessageSchema(Schema):
    """One message of a conversation."""

    id = fields.Integer(**_out("The message's id, increasing within a conversation.", 14))
    role = fields.String(
        validate=validate.OneOf(["user", "assistant"]),
        **_out("Who wrote it: user or assistant.", "assistant"),
    )
    content = fields.String(**_out("Its text.", "Turn off proxy buffering."))
    prompt_tokens = fields.Integer(
        allow_none=True, **_out("Prompt tokens (assistant messages), else null.", 42)
    )
    completion_tokens = fields.Integer(
        allow_none=True, **_out("Answer tokens (assistant messages), else null.", 67)
    )
    complete = fields.Boolean(
        **_out("false when the answer was cut short (client left, model failed).", True)
    )
    created_at = fields.DateTime(
        **_out("When it was stored (ISO 8601).", "2026-11-28T10:05:00+00:00")
    )


class ConversationDetailSchema(ConversationSchema):
    """GET /v1/conversations/{id}: the conversation and its messages, oldest first."""

    messages = fields.List(fields.Nested(MessageSchema), **_out("Its messages, oldest first.", []))


class ConversationPageSchema(Schema):
    """GET /v1/conversations: one page, newest activity first."""

    conversations = fields.List(
        fields.Nested(ConversationSchema), **_out("This page's conversations.", [])
    )
    next_cursor = fields.String(
        allow_none=True,
        **_out("Pass as `cursor` for the next page; null on the last page.", None),
    )


class ProblemSchema(Schema):
    """An RFC 9457 problem (application/problem+json): every error of this API."""

    class Meta:
        unknown = INCLUDE

    type = fields.String(**_out("A URI naming the problem type.", "about:blank"))
    title = fields.String(**_out("The status's reason phrase.", "Bad Request"))
    status = fields.Integer(**_out("The HTTP status.", 400))
    detail = fields.String(
        **_out("What went wrong, naming the field.", "message: Shorter than minimum length 1.")
    )
    request_id = fields.String(
        **_out("The X-Request-Id of the request, for the logs.", "9f1c2d3e4b5a69788796a5b4c3d2e1f0")
    )
    field = fields.String(
        required=False,
        metadata={"description": "The header, query or body field at fault (400).",
                  "example": "message"},
    )  # fmt: skip
    errors = fields.Dict(
        keys=fields.String(),
        values=fields.List(fields.String()),
        required=False,
        metadata={"description": "Every invalid field with its messages (400).",
                  "example": {"message": ["Shorter than minimum length 1."]}},
    )  # fmt: skip


class HealthSchema(Schema):
    status = fields.String(**_out("Always ok while the process answers.", "ok"))


class ReadySchema(Schema):
    status = fields.String(**_out("ready, or unavailable.", "ready"))
    database = fields.String(**_out("ok, or down.", "ok"))


def load(schema: Schema, data: Any) -> dict[str, Any]:
    """Validate `data`; every bad field becomes part of one 400 naming it."""
    try:
        result: dict[str, Any] = schema.load(data)
    except ValidationError as exc:
        raise InvalidFields(flatten(exc.messages)) from exc
    return result


def flatten(messages: Any, prefix: str = "") -> dict[str, list[str]]:
    """marshmallow's nested message dict as `{"field.sub": [messages]}`."""
    out: dict[str, list[str]] = {}
    if isinstance(messages, dict):
        for key, value in messages.items():
            name = "body" if key == "_schema" else f"{prefix}{key}"
            for sub, msgs in flatten(value, "").items():
                out[f"{name}.{sub}" if sub else name] = msgs
    elif isinstance(messages, list) and all(isinstance(m, str) for m in messages):
        out[prefix.rstrip(".")] = [str(m) for m in messages]
    else:
        out[prefix.rstrip(".")] = [str(messages)]
    return out
