"""Conversation and message storage: plain SQL functions that take a connection."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from upstream.llm import ChatMessage, Usage

TITLE_CHARS = 80
HISTORY_MESSAGES = 40  # how many earlier turns the model sees


@dataclass(frozen=True, slots=True)
class Cursor:
    """Keyset position in a user's conversation list (newest activity first)."""

    updated_at: datetime
    id: uuid.UUID


def title_for(message: str) -> str:
    """A conversation title from its first message: the first line, shortened on a word."""
    line = " ".join(message.split())
    if len(line) <= TITLE_CHARS:
        return line
    cut = line[:TITLE_CHARS].rsplit(" ", 1)[0] or line[:TITLE_CHARS]
    return f"{cut}…"


async def create_conversation(conn: asyncpg.Connection, user_id: str, title: str) -> asyncpg.Record:
    row = await conn.fetchrow(
        """INSERT INTO conversations (id, user_id, title) VALUES ($1, $2, $3)
           RETURNING id, title, created_at, updated_at""",
        uuid.uuid4(),
        user_id,
        title,
    )
    assert row is not None
    return row


async def get_conversation(
    conn: asyncpg.Connection, user_id: str, conversation_id: uuid.UUID
) -> asyncpg.Record | None:
    """The conversation if it exists and belongs to `user_id`."""
    return await conn.fetchrow(
        """SELECT id, title, created_at, updated_at FROM conversations
           WHERE id = $1 AND user_id = $2""",
        conversation_id,
        user_id,
    )


async def list_conversations(
    conn: asyncpg.Connection, user_id: str, limit: int, after: Cursor | None
) -> list[asyncpg.Record]:
    """Up to `limit` conversations, newest activity first, strictly after the cursor."""
    if after is None:
        return await conn.fetch(
            """SELECT id, title, created_at, updated_at FROM conversations
               WHERE user_id = $1 ORDER BY updated_at DESC, id DESC LIMIT $2""",
            user_id,
            limit,
        )
    return await conn.fetch(
        """SELECT id, title, created_at, updated_at FROM conversations
           WHERE user_id = $1 AND (updated_at, id) < ($2, $3)
           ORDER BY updated_at DESC, id DESC LIMIT $4""",
        user_id,
        after.updated_at,
        after.id,
        limit,
    )


async def list_messages(
    conn: asyncpg.Connection, conversation_id: uuid.UUID
) -> list[asyncpg.Record]:
    return await conn.fetch(
        """SELECT id, role, content, prompt_tokens, completion_tokens, complete, created_at
           FROM messages WHERE conversation_id = $1 ORDER BY id""",
        conversation_id,
    )


async def recent_history(conn: asyncpg.Connection, conversation_id: uuid.UUID) -> list[ChatMessage]:
    """The last HISTORY_MESSAGES turns, oldest first, as the model should see them."""
    rows = await conn.fetch(
        """SELECT role, content FROM (
               SELECT id, role, content FROM messages WHERE conversation_id = $1
               ORDER BY id DESC LIMIT $2
           ) AS recent ORDER BY id""",
        conversation_id,
        HISTORY_MESSAGES,
    )
    return [ChatMessage(row["role"], row["content"]) for row in rows]


async def add_message(
    conn: asyncpg.Connection,
    conversation_id: uuid.UUID,
    role: str,
    content: str,
    *,
    usage: Usage | None = None,
    complete: bool = True,
) -> int:
    """Store one message, touch the conversation, and return the message id."""
    message_id = await conn.fetchval(
        """INSERT INTO messages
               (conversation_id, role, content, prompt_tokens, completion_tokens, complete)
           VALUES ($1, $2, $3, $4, $5, $6) RETURNING id""",
        conversation_id,
        role,
        content,
        usage.prompt_tokens if usage else None,
        usage.completion_tokens if usage else None,
        complete,
    )
    await conn.execute("UPDATE conversations SET updated_at = now() WHERE id = $1", conversation_id)
    return int(message_id)


async def delete_conversation(
    conn: asyncpg.Connection, user_id: str, conversation_id: uuid.UUID
) -> bool:
    """Delete it (messages cascade); False when there was no such conversation for this user."""
    status = await conn.execute(
        "DELETE FROM conversations WHERE id = $1 AND user_id = $2", conversation_id, user_id
    )
    return bool(status == "DELETE 1")
