"""Request schemas (marshmallow): one source for validation now and the OpenAPI document later."""

from __future__ import annotations

from typing import Any

from marshmallow import RAISE, Schema, ValidationError, fields, validate, validates

from upstream.errors import InvalidFields

MAX_MESSAGE_CHARS = 32_000


class ChatRequestSchema(Schema):
    """Body of POST /v1/chat."""

    class Meta:
        unknown = RAISE

    conversation_id = fields.UUID(
        load_default=None,
        allow_none=True,
        metadata={"description": "Continue this conversation; omit to start a new one."},
    )
    message = fields.String(
        required=True,
        validate=validate.Length(min=1, max=MAX_MESSAGE_CHARS),
        metadata={"description": "The user's message, 1 to 32,000 characters."},
    )
    stream = fields.Boolean(
        load_default=True,
        metadata={"description": "Stream Server-Sent Events (default) or answer with JSON."},
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
        metadata={"description": "Page size, 1 to 100."},
    )
    cursor = fields.String(
        load_default=None,
        metadata={"description": "The `next_cursor` of the previous page."},
    )


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
