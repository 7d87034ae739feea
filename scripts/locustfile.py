"""Locust users of the PixelCraft API, as `scripts/loadtest` runs them (also usable alone:
`locust -f scripts/locustfile.py --host http://127.0.0.1:8080`).

Each simulated user is a person with an `X-User-Id` of their own who, between pauses of
`--think-time` seconds, does one of (weights in brackets):
- (6) streams a chat answer (`POST /v1/chat`, SSE), continuing their latest conversation half of
  the time: the stream is read to its `done` event. Locust's row "POST /v1/chat (stream)" times
  the whole stream; the time from sending the request to the first event is recorded as a
  custom entry of its own, type `SSE`, name "time to first event". A stream that ends without
  `done`, or with an `error` event, is a failure;
- (1) asks for a whole answer as JSON (`"stream": false`);
- (2) lists their conversations (`GET /v1/conversations`);
- (1) opens one of their conversations (`GET /v1/conversations/{id}`).
After `--session-actions` actions the person leaves and a new one (a new id, no conversations)
takes the place, so a run sees many more user ids than simulated users.

`--client-addresses` gives each person an address of their own in `X-Forwarded-For`, one /64 of
the IPv6 documentation prefix 2001:db8::/32 each (a header value only: nothing is sent there).
A gateway with GATEWAY_TRUSTED_PROXIES=127.0.0.1/32 believes it, so its per-address `[ip]`
ceiling applies per person, as behind a load balancer, rather than to the whole load at once.

`--warmup S` resets every statistic S seconds after the last user was spawned, so that the
figures leave out the ramp and the first burst (every new person acts at once, and the database
pool grows); the counting restarts then (with `--summary-file PATH`, PATH + ".measuring" is
written at that moment). `--summary-file PATH` writes, when the test stops, a JSON summary that
locust's CSV cannot give: figures over all HTTP requests without the custom SSE entry, over reads
(list and get) together, and the count of each status code.
"""

from __future__ import annotations

import itertools
import json
import random
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import gevent
from locust import FastHttpUser, events, task
from locust.env import Environment
from locust.stats import StatsEntry

STREAM = "POST /v1/chat (stream)"
JSON_CHAT = "POST /v1/chat (json)"
LIST = "GET /v1/conversations"
GET = "GET /v1/conversations/{id}"
TTFE = "time to first event"
SSE = "SSE"
READS = (LIST, GET)
PROMPTS = (
    "How should I rate limit an API?",
    "Explain token buckets with an example.",
    "What is a good timeout for an upstream call?",
    "Summarise the trade-offs of server-sent events versus WebSockets.",
    "How do I size a PostgreSQL connection pool?",
    "Write a haiku about latency.",
    "What should I monitor on a reverse proxy?",
    "Why does p99 latency matter more than the average?",
)
_people = itertools.count(1)
_statuses: Counter[str] = Counter()


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    parser.add_argument(
        "--think-time",
        default="1,3",
        help="seconds a person pauses between actions, MIN,MAX uniformly (default 1,3)",
    )
    parser.add_argument(
        "--session-actions",
        type=int,
        default=20,
        help="actions before a person leaves and a new user id takes the place (default 20)",
    )
    parser.add_argument(
        "--user-prefix",
        default=f"lt-{uuid.uuid4().hex[:6]}",
        help="prefix of the X-User-Id values (default lt-<random>)",
    )
    parser.add_argument(
        "--client-addresses",
        action="store_true",
        help="a distinct X-Forwarded-For address per person (2001:db8::/32, one /64 each)",
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=0.0,
        help="seconds after the last user is spawned before statistics restart (default 0)",
    )
    parser.add_argument("--summary-file", default="", help="write a JSON summary here at the end")


@events.request.add_listener
def _count_status(request_type: str, response: Any = None, **_: Any) -> None:
    if request_type != SSE:
        _statuses[str(getattr(response, "status_code", 0) or 0)] += 1


@events.test_start.add_listener
def _started(environment: Environment, **_: Any) -> None:
    options = environment.parsed_options
    if options is None:
        return

    def measure(user_count: int) -> None:
        environment.stats.reset_all()
        _statuses.clear()
        if options.summary_file:
            path = Path(options.summary_file)
            path.with_name(path.name + ".measuring").write_text(
                json.dumps({"users": user_count, "at": time.time()})
            )

    def spawned(user_count: int, **_: Any) -> None:
        gevent.spawn_later(max(0.0, options.warmup), measure, user_count)

    environment.events.spawning_complete.add_listener(spawned)


def merged(environment: Environment, name: str, include: Any) -> StatsEntry:
    entry = StatsEntry(environment.stats, name, "")
    for (entry_name, method), other in environment.stats.entries.items():
        if include(entry_name, method):
            entry.extend(other)
    return entry


def figures(entry: StatsEntry, window: float) -> dict[str, float]:
    ok = entry.num_requests - entry.num_none_requests
    return {
        "requests": entry.num_requests,
        "failures": entry.num_failures,
        "rps": entry.num_requests / window if window > 0 else 0.0,
        "p50_ms": entry.get_response_time_percentile(0.5) if ok else 0,
        "p95_ms": entry.get_response_time_percentile(0.95) if ok else 0,
        "p99_ms": entry.get_response_time_percentile(0.99) if ok else 0,
        "max_ms": entry.max_response_time,
    }


@events.test_stop.add_listener
def _summary(environment: Environment, **_: Any) -> None:
    options = environment.parsed_options
    if options is None or not options.summary_file:
        return
    stats = environment.stats
    start, last = stats.start_time, stats.last_request_timestamp
    window = (last - start) if start and last else 0.0
    groups = {
        "http": merged(environment, "http", lambda name, method: method != SSE),
        "streams": merged(environment, STREAM, lambda name, method: name == STREAM),
        "json_chats": merged(environment, JSON_CHAT, lambda name, method: name == JSON_CHAT),
        "reads": merged(environment, "reads", lambda name, method: name in READS),
        "ttfe": merged(environment, TTFE, lambda name, method: method == SSE),
    }
    errors = sorted(stats.errors.values(), key=lambda e: e.occurrences, reverse=True)
    summary = {
        "window_s": window,
        "users": environment.runner.user_count if environment.runner else 0,
        **{key: figures(entry, window) for key, entry in groups.items()},
        "status": dict(_statuses),
        "errors": [
            {"name": e.name, "error": str(e.error), "occurrences": e.occurrences}
            for e in errors[:5]
        ],
    }
    Path(options.summary_file).write_text(json.dumps(summary, indent=1))


class ChatUser(FastHttpUser):
    """One person at a time (see the module docstring)."""

    def on_start(self) -> None:
        options = self.environment.parsed_options
        low, _, high = (options.think_time if options else "1,3").partition(",")
        self.think = (float(low), float(high or low))
        self.session_actions = options.session_actions if options else 20
        self.prefix = options.user_prefix if options else "lt"
        self.addresses = bool(options and options.client_addresses)
        self.arrive()

    def arrive(self) -> None:
        """A new person: new id (and address), no conversations yet."""
        number = next(_people)
        self.headers = {"X-User-Id": f"{self.prefix}-{number}"}
        if self.addresses:
            self.headers["X-Forwarded-For"] = f"2001:db8:{number >> 16:x}:{number & 0xFFFF:x}::1"
        self.conversations: list[str] = []
        self.actions = 0

    def wait_time(self) -> float:
        self.actions += 1
        if self.actions >= self.session_actions:
            self.arrive()
        return random.uniform(*self.think)  # noqa: S311 (think time, not a secret)

    def message(self) -> dict[str, Any]:
        body: dict[str, Any] = {"message": f"{random.choice(PROMPTS)} ({random.randrange(10**6)})"}  # noqa: S311
        if self.conversations and random.random() < 0.5:  # noqa: S311
            body["conversation_id"] = self.conversations[-1]
        return body

    def remember(self, conversation_id: Any) -> None:
        if isinstance(conversation_id, str) and conversation_id not in self.conversations:
            self.conversations.append(conversation_id)

    @task(6)
    def chat_stream(self) -> None:
        headers = {**self.headers, "Accept": "text/event-stream"}
        started = time.perf_counter()
        with self.client.post(
            "/v1/chat",
            json=self.message(),
            headers=headers,
            name=STREAM,
            stream=True,
            catch_response=True,
        ) as resp:
            if resp.status_code != 200:
                resp.content  # noqa: B018 (read the problem body so the connection can be reused)
                resp.failure(f"status {resp.status_code}")
                return
            first: float | None = None
            event, done, size = "", None, 0
            error: str | None = None
            # geventhttpclient's readline(sep) returns each line as soon as it arrives; the public
            # read()/iter_content() wait for a whole chunk_size, which would delay the first event.
            reader = resp._response
            try:
                while line := reader.readline(b"\n"):
                    size += len(line)
                    if line.startswith(b"event:"):
                        event = line[6:].strip().decode()
                        if first is None:
                            first = time.perf_counter()
                    elif line.startswith(b"data:") and event == "done":
                        done = json.loads(line[5:])
                    elif line.startswith(b"data:") and event == "error":
                        error = line[5:].strip().decode()
            except (OSError, ValueError) as exc:
                error = f"stream broken: {exc!r}"
            resp.request_meta["response_time"] = (time.perf_counter() - started) * 1000
            resp.request_meta["response_length"] = size
            if error is not None or done is None:
                resp.failure(error or "stream ended without a done event")
                return
            self.remember(done.get("conversation_id"))
        if first is not None:
            self.environment.events.request.fire(
                request_type=SSE,
                name=TTFE,
                response_time=(first - started) * 1000,
                response_length=0,
                exception=None,
                context={},
            )

    @task(1)
    def chat_json(self) -> None:
        body = {**self.message(), "stream": False}
        with self.client.post(
            "/v1/chat", json=body, headers=self.headers, name=JSON_CHAT, catch_response=True
        ) as resp:
            if resp.status_code == 200:
                self.remember(resp.json().get("conversation_id"))

    @task(2)
    def list_conversations(self) -> None:
        with self.client.get(
            "/v1/conversations?limit=20", headers=self.headers, name=LIST, catch_response=True
        ) as resp:
            if resp.status_code == 200:
                for convo in resp.json().get("conversations", [])[:5]:
                    self.remember(convo.get("id"))

    @task(1)
    def get_conversation(self) -> None:
        if not self.conversations:
            self.list_conversations()
            return
        ident = random.choice(self.conversations)  # noqa: S311
        self.client.get(f"/v1/conversations/{ident}", headers=self.headers, name=GET)
