"""The chat routes against the real service, real PostgreSQL and scripted or local models."""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg

from tests.conftest import wait_until
from tests.support.sse import collect, events
from tests.upstream.conftest import ScriptedProvider, UpstreamFactory
from upstream.errors import LLMTimeout, LLMUnavailable
from upstream.keys import pool_key
from upstream.llm import ChatMessage, Usage
from upstream.llm.local import compose_reply


def user() -> dict[str, str]:
    return {"X-User-Id": f"user-{uuid.uuid4().hex[:12]}"}


async def test_chat_streams_deltas_then_done_and_persists(make_upstream: UpstreamFactory) -> None:
    client = await make_upstream()
    alice = user()
    resp = await client.post("/v1/chat", json={"message": "How do I rate limit?"}, headers=alice)
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    assert resp.headers["Cache-Control"] == "no-cache"
    got = await collect(resp)
    names = [name for name, _ in got]
    assert names[-1] == "done" and set(names[:-1]) == {"delta"} and len(names) > 3
    text = "".join(data["content"] for name, data in got if name == "delta")
    assert text == compose_reply([ChatMessage("user", "How do I rate limit?")])
    done = got[-1][1]
    assert done["conversation_id"] == resp.headers["X-Conversation-Id"]
    assert done["usage"]["completion_tokens"] == len(names) - 1
    assert done["usage"]["total_tokens"] == (
        done["usage"]["prompt_tokens"] + done["usage"]["completion_tokens"]
    )

    convo = await (
        await client.get(f"/v1/conversations/{done['conversation_id']}", headers=alice)
    ).json()
    assert convo["title"] == "How do I rate limit?"
    assert [(m["role"], m["content"], m["complete"]) for m in convo["messages"]] == [
        ("user", "How do I rate limit?", True),
        ("assistant", text, True),
    ]
    assert convo["messages"][1]["id"] == done["message_id"]
    assert convo["messages"][1]["completion_tokens"] == done["usage"]["completion_tokens"]


async def test_follow_up_sends_history_to_the_model(
    make_upstream: UpstreamFactory, scripted: ScriptedProvider
) -> None:
    client = await make_upstream(provider=scripted)
    alice = user()
    scripted.send("Hi", " there", Usage(3, 2), None)
    first = await collect(await client.post("/v1/chat", json={"message": "hello"}, headers=alice))
    convo_id = first[-1][1]["conversation_id"]
    scripted.send("Sure", Usage(8, 1), None)
    second = await client.post(
        "/v1/chat", json={"message": "again", "conversation_id": convo_id}, headers=alice
    )
    assert (await collect(second))[-1][0] == "done"
    assert scripted.prompts[1] == [
        ChatMessage("user", "hello"),
        ChatMessage("assistant", "Hi there"),
        ChatMessage("user", "again"),
    ]


async def test_stream_false_returns_json(make_upstream: UpstreamFactory) -> None:
    client = await make_upstream()
    resp = await client.post(
        "/v1/chat", json={"message": "json please", "stream": False}, headers=user()
    )
    assert resp.status == 200
    body = await resp.json()
    assert body["content"] == compose_reply([ChatMessage("user", "json please")])
    assert body["usage"]["completion_tokens"] > 0
    assert isinstance(body["message_id"], int)
    assert body["conversation_id"] == resp.headers["X-Conversation-Id"]


async def test_each_delta_is_flushed_before_the_next_exists(
    make_upstream: UpstreamFactory, scripted: ScriptedProvider
) -> None:
    """The client reads a delta while the model has not produced the next one yet."""
    client = await make_upstream(provider=scripted)
    scripted.send("one")
    resp = await client.post("/v1/chat", json={"message": "stream"}, headers=user())
    reader = events(resp)
    for expected in ("one", " two", " three"):
        name, data = await anext(reader)
        assert (name, data) == ("delta", {"content": expected})
        assert scripted.queue.empty()  # nothing else was available to buffer behind it
        scripted.send(" two" if expected == "one" else " three" if expected == " two" else None)
    scripted.send(Usage(1, 3), None)
    rest = [item async for item in reader]
    assert [name for name, _ in rest] == ["done"]


async def test_client_leaving_cancels_the_model_and_keeps_the_partial_reply(
    make_upstream: UpstreamFactory, scripted: ScriptedProvider, db: asyncpg.Connection
) -> None:
    client = await make_upstream(provider=scripted)
    scripted.send("partial", " answer")
    resp = await client.post("/v1/chat", json={"message": "leave early"}, headers=user())
    convo_id = uuid.UUID(resp.headers["X-Conversation-Id"])
    reader = events(resp)
    assert (await anext(reader))[1] == {"content": "partial"}
    assert (await anext(reader))[1] == {"content": " answer"}
    resp.close()  # the client goes away while the model is still "thinking"
    await wait_until(scripted.closed.is_set, within=2)

    async def stored() -> Any:
        return await db.fetchrow(
            "SELECT content, complete FROM messages"
            " WHERE conversation_id = $1 AND role = 'assistant'",
            convo_id,
        )

    row = await wait_until(stored, within=5)
    assert (row["content"], row["complete"]) == ("partial answer", False)


async def test_model_failure_mid_stream_sends_error_event_and_keeps_partial(
    make_upstream: UpstreamFactory, scripted: ScriptedProvider
) -> None:
    client = await make_upstream(provider=scripted)
    alice = user()
    scripted.send("half", LLMUnavailable("model connection reset"))
    resp = await client.post("/v1/chat", json={"message": "fail midway"}, headers=alice)
    assert resp.status == 200
    got = await collect(resp)
    assert got[0] == ("delta", {"content": "half"})
    name, problem = got[-1]
    assert name == "error" and problem["status"] == 502
    assert problem["detail"] == "model connection reset"
    convo = await (
        await client.get(f"/v1/conversations/{resp.headers['X-Conversation-Id']}", headers=alice)
    ).json()
    assert [(m["role"], m["content"], m["complete"]) for m in convo["messages"]] == [
        ("user", "fail midway", True),
        ("assistant", "half", False),
    ]


async def test_model_failure_before_first_token_is_a_plain_status(
    make_upstream: UpstreamFactory, scripted: ScriptedProvider
) -> None:
    client = await make_upstream(provider=scripted)
    scripted.send(LLMTimeout("the model did not answer within 60 s"))
    resp = await client.post("/v1/chat", json={"message": "slow model"}, headers=user())
    assert resp.status == 504
    assert resp.headers["Content-Type"].startswith("application/problem+json")
    body = await resp.json()
    assert body["title"] == "Gateway Timeout" and body["request_id"] == resp.headers["X-Request-Id"]
    scripted.send(LLMUnavailable("upstream said 500"))
    resp = await client.post("/v1/chat", json={"message": "broken model"}, headers=user())
    assert resp.status == 502


async def test_conversations_belong_to_their_user(make_upstream: UpstreamFactory) -> None:
    client = await make_upstream()
    alice, mallory = user(), user()
    resp = await client.post("/v1/chat", json={"message": "secret plans"}, headers=alice)
    await collect(resp)
    convo_id = resp.headers["X-Conversation-Id"]
    for method, path, body in (
        ("GET", f"/v1/conversations/{convo_id}", None),
        ("DELETE", f"/v1/conversations/{convo_id}", None),
        ("POST", "/v1/chat", {"message": "mine now", "conversation_id": convo_id}),
    ):
        resp = await client.request(method, path, json=body, headers=mallory)
        assert resp.status == 404, (method, path)
    listing = await (await client.get("/v1/conversations", headers=mallory)).json()
    assert listing == {"conversations": [], "next_cursor": None}
    assert (await client.get(f"/v1/conversations/{convo_id}", headers=alice)).status == 200


async def test_delete_removes_conversation_and_messages(
    make_upstream: UpstreamFactory, db: asyncpg.Connection
) -> None:
    client = await make_upstream()
    alice = user()
    resp = await client.post("/v1/chat", json={"message": "to delete"}, headers=alice)
    await collect(resp)
    convo_id = resp.headers["X-Conversation-Id"]
    assert (await client.delete(f"/v1/conversations/{convo_id}", headers=alice)).status == 204
    assert (await client.get(f"/v1/conversations/{convo_id}", headers=alice)).status == 404
    assert (await client.delete(f"/v1/conversations/{convo_id}", headers=alice)).status == 404
    left = await db.fetchval(
        "SELECT count(*) FROM messages WHERE conversation_id = $1", uuid.UUID(convo_id)
    )
    assert left == 0


async def test_listing_pages_newest_first(make_upstream: UpstreamFactory) -> None:
    client = await make_upstream()
    alice = user()
    made = []
    for i in range(5):
        resp = await client.post(
            "/v1/chat", json={"message": f"topic {i}", "stream": False}, headers=alice
        )
        made.append((await resp.json())["conversation_id"])
    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": "2", **({"cursor": cursor} if cursor else {})}
        page = await (await client.get("/v1/conversations", params=params, headers=alice)).json()
        assert len(page["conversations"]) <= 2
        seen += [c["id"] for c in page["conversations"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == made[::-1]


async def test_bad_input_is_a_400_naming_the_field(make_upstream: UpstreamFactory) -> None:
    client = await make_upstream()
    cases: list[tuple[Any, str, dict[str, str] | None]] = [
        (b'{"message": "hi",}', "body", None),
        (b"", "body", None),
        (b"[1, 2]", "body", None),
        ({"message": ""}, "message", None),
        ({"message": "   "}, "message", None),
        ({"message": "x" * 32_001}, "message", None),
        ({}, "message", None),
        ({"message": "hi", "conversation_id": "not-a-uuid"}, "conversation_id", None),
        ({"message": "hi", "stream": "sometimes"}, "stream", None),
        ({"message": "hi", "mesage": "typo"}, "mesage", None),
        ({"message": "hi"}, "X-User-Id", {}),
        ({"message": "hi"}, "X-User-Id", {"X-User-Id": "bad id with spaces"}),
    ]
    for body, field, headers in cases:
        kwargs: dict[str, Any] = {"data": body} if isinstance(body, bytes) else {"json": body}
        resp = await client.post(
            "/v1/chat", headers=user() if headers is None else headers, **kwargs
        )
        assert resp.status == 400, (body, field)
        assert resp.headers["Content-Type"].startswith("application/problem+json")
        problem = await resp.json()
        assert problem["field"] == field, (body, problem)
        assert problem["detail"].startswith(field), problem
    ok = await client.post(
        "/v1/chat", json={"message": "x" * 32_000, "stream": False}, headers=user()
    )
    assert ok.status == 200
    resp = await client.get("/v1/conversations", params={"limit": "500"}, headers=user())
    assert resp.status == 400 and (await resp.json())["field"] == "limit"
    resp = await client.get("/v1/conversations", params={"cursor": "garbage"}, headers=user())
    assert resp.status == 400 and (await resp.json())["field"] == "cursor"
    resp = await client.get("/v1/conversations/not-a-uuid", headers=user())
    assert resp.status == 400 and (await resp.json())["field"] == "id"


async def test_duplicated_user_id_is_rejected(make_upstream: UpstreamFactory) -> None:
    client = await make_upstream()
    resp = await client.get(
        "/v1/conversations", headers=[("X-User-Id", "alice"), ("X-User-Id", "bob")]
    )
    assert resp.status == 400
    assert "more than once" in (await resp.json())["detail"]


async def test_exhausted_pool_answers_503_with_retry_after(make_upstream: UpstreamFactory) -> None:
    client = await make_upstream(
        db_pool_min_size=1, db_pool_max_size=1, db_pool_acquire_timeout=0.2
    )
    pool = client.app[pool_key]
    async with pool.acquire():  # the only connection is busy
        resp = await client.get("/v1/conversations", headers=user())
        assert resp.status == 503
        assert int(resp.headers["Retry-After"]) >= 1
        assert (await resp.json())["status"] == 503
        ready = await client.get("/readyz")
        assert ready.status == 503
    resp = await client.get("/v1/conversations", headers=user())
    assert resp.status == 200


async def test_health_and_unknown_routes(make_upstream: UpstreamFactory) -> None:
    client = await make_upstream()
    assert await (await client.get("/healthz")).json() == {"status": "ok"}
    assert await (await client.get("/readyz")).json() == {"status": "ready", "database": "ok"}
    resp = await client.get("/nope")
    assert resp.status == 404
    assert resp.headers["Content-Type"].startswith("application/problem+json")
    resp = await client.put("/v1/chat")
    assert resp.status == 405 and "POST" in resp.headers["Allow"]
    resp = await client.get("/healthz", headers={"X-Request-Id": "abc-123"})
    assert resp.headers["X-Request-Id"] == "abc-123"
