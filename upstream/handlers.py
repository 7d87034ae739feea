"""HTTP handlers of the chat service: parse, call storage and the model, render. No SQL here."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg
from aiohttp import web

from pixelcraft.contract import USER_ID_HEADER, user_id_fault
from pixelcraft.openapi import documented
from upstream import apidoc, chats, sse
from upstream.db import acquire
from upstream.errors import BadRequest, DatabaseUnavailable, LLMError, LLMUnavailable, NotFound
from upstream.keys import pool_key, provider_key, settings_key, tasks_key
from upstream.llm import ChatMessage, Usage
from upstream.middlewares import error_body
from upstream.schemas import ChatRequestSchema, ListQuerySchema, load

logger = logging.getLogger(__name__)


def user_id(request: web.Request) -> str:
    """The X-User-Id the gateway forwards: exactly one, well formed."""
    values = request.headers.getall(USER_ID_HEADER, [])
    fault = "missing (the gateway sets it)" if not values else user_id_fault(values)
    if fault is not None:
        raise BadRequest(f"{USER_ID_HEADER}: {fault}", field=USER_ID_HEADER)
    return values[0]


async def read_json(request: web.Request) -> Any:
    raw = await request.read()
    if not raw.strip():
        raise BadRequest("body: missing; send a JSON object", field="body")
    try:
        return json.loads(raw)
    except UnicodeDecodeError:
        raise BadRequest("body: not UTF-8", field="body") from None
    except json.JSONDecodeError as exc:
        detail = f"body: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        raise BadRequest(detail, field="body") from None


def path_id(request: web.Request) -> uuid.UUID:
    try:
        return uuid.UUID(request.match_info["id"])
    except ValueError:
        raise BadRequest("id: must be a conversation UUID", field="id") from None


def encode_cursor(row: asyncpg.Record) -> str:
    raw = f"{row['updated_at'].isoformat()}|{row['id']}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(text: str) -> chats.Cursor:
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()
        stamp, ident = raw.split("|")
        return chats.Cursor(datetime.fromisoformat(stamp), uuid.UUID(ident))
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise BadRequest("cursor: not a cursor this service issued", field="cursor") from None


def conversation_json(row: asyncpg.Record) -> dict[str, Any]:
    return {
        "id": str(row["id"]),
        "title": row["title"],
        "created_at": row["created_at"].isoformat(),
        "updated_at": row["updated_at"].isoformat(),
    }


def message_json(row: asyncpg.Record) -> dict[str, Any]:
    return {
        "id": row["id"],
        "role": row["role"],
        "content": row["content"],
        "prompt_tokens": row["prompt_tokens"],
        "completion_tokens": row["completion_tokens"],
        "complete": row["complete"],
        "created_at": row["created_at"].isoformat(),
    }


@dataclass
class Reply:
    """The assistant's answer as it arrives; saved once, complete or not."""

    conversation_id: uuid.UUID
    parts: list[str] = field(default_factory=list)
    usage: Usage | None = None
    complete: bool = False

    @property
    def text(self) -> str:
        return "".join(self.parts)


async def save_reply(app: web.Application, reply: Reply) -> int | None:
    """Store the reply (nothing when the model produced nothing and did not finish)."""
    if not reply.parts and not reply.complete:
        return None
    settings = app[settings_key]
    try:
        async with acquire(app[pool_key], settings.db_pool_acquire_timeout) as conn:
            return await chats.add_message(
                conn,
                reply.conversation_id,
                "assistant",
                reply.text,
                usage=reply.usage,
                complete=reply.complete,
            )
    except Exception:
        logger.exception("could not store the reply in conversation %s", reply.conversation_id)
        raise


def save_later(app: web.Application, reply: Reply) -> None:
    """Save from a task the cancelled handler does not own; failures are logged there."""
    task = app[tasks_key].spawn(save_reply(app, reply))
    task.add_done_callback(lambda t: t.cancelled() or t.exception())


async def prepend(
    first: str | Usage | None, rest: AsyncIterator[str | Usage]
) -> AsyncIterator[str | Usage]:
    if first is not None:
        yield first
    async for piece in rest:
        yield piece


@documented(**apidoc.CHAT)
async def chat(request: web.Request) -> web.StreamResponse:
    """POST /v1/chat: store the user's message, then stream (or return) the model's reply."""
    user = user_id(request)
    body = load(ChatRequestSchema(), await read_json(request))
    app = request.app
    settings = app[settings_key]
    pool, wait = app[pool_key], settings.db_pool_acquire_timeout
    async with acquire(pool, wait) as conn, conn.transaction():
        if body["conversation_id"] is None:
            convo = await chats.create_conversation(conn, user, chats.title_for(body["message"]))
            history: list[ChatMessage] = []
        else:
            found = await chats.get_conversation(conn, user, body["conversation_id"])
            if found is None:
                raise NotFound("conversation_id: no such conversation")
            convo = found
            history = await chats.recent_history(conn, convo["id"])
        await chats.add_message(conn, convo["id"], "user", body["message"])
    messages = [*history, ChatMessage("user", body["message"])]
    reply = Reply(convo["id"])
    headers = {"X-Conversation-Id": str(convo["id"])}
    response: web.StreamResponse | None = None
    try:
        async with aclosing(app[provider_key].stream(messages)) as pieces:
            # Wait for the model's first piece before committing to a status: a model that
            # fails up front is a plain 502/504, not a 200 stream with an error in it.
            first = await anext(pieces, None)
            if first is None:
                raise LLMUnavailable("the model ended its answer without a word")
            if body["stream"]:
                response = web.StreamResponse(headers={**sse.HEADERS, **headers})
                await response.prepare(request)
            async for piece in prepend(first, pieces):
                if isinstance(piece, Usage):
                    reply.usage = piece
                    continue
                reply.parts.append(piece)
                if response is not None:
                    await response.write(sse.event("delta", {"content": piece}))
        reply.complete = True
    except LLMError as exc:
        logger.warning("model failed in conversation %s: %s", convo["id"], exc.detail)
        if reply.parts:
            await asyncio.shield(app[tasks_key].spawn(save_reply(app, reply)))
        if response is None:
            raise
        await response.write(sse.event("error", error_body(exc)))
        return response
    except ConnectionError:
        if response is None:
            raise
        logger.info("client left conversation %s mid-stream", convo["id"])
        save_later(app, reply)
        return response
    except asyncio.CancelledError:
        logger.info("client left conversation %s; model request cancelled", convo["id"])
        save_later(app, reply)
        raise
    message_id = await asyncio.shield(app[tasks_key].spawn(save_reply(app, reply)))
    done = {
        "conversation_id": str(convo["id"]),
        "message_id": message_id,
        "usage": reply.usage.as_dict() if reply.usage else None,
    }
    if response is None:
        return web.json_response({**done, "content": reply.text}, headers=headers)
    try:
        await response.write(sse.event("done", done))
    except ConnectionError:  # the client left at the very end; the reply is already saved
        logger.info("client left conversation %s before the done event", convo["id"])
    return response


@documented(**apidoc.LIST)
async def list_conversations(request: web.Request) -> web.Response:
    """GET /v1/conversations: the user's conversations, newest activity first."""
    user = user_id(request)
    query = load(ListQuerySchema(), dict(request.query))
    after = decode_cursor(query["cursor"]) if query["cursor"] else None
    app = request.app
    async with acquire(app[pool_key], app[settings_key].db_pool_acquire_timeout) as conn:
        rows = await chats.list_conversations(conn, user, query["limit"] + 1, after)
    page, more = rows[: query["limit"]], len(rows) > query["limit"]
    return web.json_response(
        {
            "conversations": [conversation_json(row) for row in page],
            "next_cursor": encode_cursor(page[-1]) if more else None,
        }
    )


@documented(**apidoc.GET)
async def get_conversation(request: web.Request) -> web.Response:
    """GET /v1/conversations/{id}: one conversation with its messages."""
    user = user_id(request)
    ident = path_id(request)
    app = request.app
    async with acquire(app[pool_key], app[settings_key].db_pool_acquire_timeout) as conn:
        row = await chats.get_conversation(conn, user, ident)
        if row is None:
            raise NotFound("id: no such conversation")
        messages = await chats.list_messages(conn, ident)
    return web.json_response(
        {**conversation_json(row), "messages": [message_json(m) for m in messages]}
    )


@documented(**apidoc.DELETE)
async def delete_conversation(request: web.Request) -> web.Response:
    """DELETE /v1/conversations/{id}: the conversation and its messages."""
    user = user_id(request)
    ident = path_id(request)
    app = request.app
    async with acquire(app[pool_key], app[settings_key].db_pool_acquire_timeout) as conn:
        if not await chats.delete_conversation(conn, user, ident):
            raise NotFound("id: no such conversation")
    return web.Response(status=204)


@documented(**apidoc.HEALTHZ)
async def healthz(request: web.Request) -> web.Response:
    """Alive: the process answers."""
    return web.json_response({"status": "ok"})


@documented(**apidoc.READYZ)
async def readyz(request: web.Request) -> web.Response:
    """Ready: PostgreSQL answers a query through the pool."""
    app = request.app
    timeout = min(app[settings_key].db_pool_acquire_timeout, 2.0)
    try:
        async with acquire(app[pool_key], timeout) as conn:
            await conn.fetchval("SELECT 1")
    except (DatabaseUnavailable, asyncpg.PostgresError) as exc:
        logger.warning("not ready: %s", exc)
        return web.json_response({"status": "unavailable", "database": "down"}, status=503)
    return web.json_response({"status": "ready", "database": "ok"})
