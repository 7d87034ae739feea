"""Per-user overrides of a policy, kept in Redis so that every gateway applies the same ones.

An operator lifts or tightens one user's limit now, without a deploy (`python -m gateway limits
set`, or the admin port's `/limits` API): the override changes a policy's rate, burst, token
budget or concurrency for that user (PLAN_KEYS, as a plan does), optionally until a time, with a
reason. It wins over the user's plan and runs on the plan's own bucket, so setting and removing
it never resets what the user has used.

Redis layout, under GATEWAY_REDIS_KEY_PREFIX (one hash tag: a Cluster keeps them in one slot):
- `{<prefix>rl:ov}`: a hash, field `<user> <policy>` (neither holds a space), value JSON;
- `{<prefix>rl:ov}:version`: a counter raised by every change;
- `{<prefix>rl:ov}:audit`: a stream, one entry per change (who, what, when, why), the last
  AUDIT_KEPT kept.

Each gateway holds every override in memory (`Overrides`) and checks the version every
GATEWAY_RATELIMIT_OVERRIDES_REFRESH_SECONDS: a request costs no Redis round trip for them, and
with none set, one dictionary test.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from gateway.auth.identity import Identity
from gateway.limiting.policies import Policy, PolicyError, override
from pixelcraft.aio import cancel
from pixelcraft.contract import anonymous

logger = logging.getLogger(__name__)

AUDIT_KEPT = 10_000


def user_of(identity: Identity) -> str:
    """The user an override names: the id the gateway forwards in X-User-Id."""
    return anonymous(identity.value) if identity.kind == "ip" else identity.value


@dataclass(frozen=True, slots=True)
class Override:
    """One user's override of one policy."""

    user: str
    policy: str
    values: dict[str, Any]  # PLAN_KEYS: rate, burst, tokens, tokens_burst, concurrent
    until: float | None  # Unix time it lapses at; None: until removed
    reason: str
    by: str
    at: float  # when it was set

    def live(self, now: float) -> bool:
        return self.until is None or now < self.until

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class OverrideStore:
    """The overrides and their audit trail in Redis (gateways, the CLI and the admin API)."""

    def __init__(self, client: Any, prefix: str) -> None:
        self.client = client  # redis.asyncio.Redis or RedisCluster
        self.hash = f"{{{prefix}rl:ov}}"
        self.version_key = f"{self.hash}:version"
        self.audit_key = f"{self.hash}:audit"

    async def version(self) -> int:
        return int(await self.client.get(self.version_key) or 0)

    async def all(self) -> dict[tuple[str, str], Override]:
        raw = await self.client.hgetall(self.hash)
        found: dict[tuple[str, str], Override] = {}
        for field, value in raw.items():
            try:
                entry = Override(**json.loads(value))
            except (TypeError, ValueError) as exc:
                logger.warning("override %r unreadable, ignored: %s", field, exc)
                continue
            found[(entry.user, entry.policy)] = entry
        return found

    async def set(self, entry: Override) -> None:
        await self._change(
            "set", entry.user, entry.policy, entry.by, entry.reason, entry.to_json(), entry
        )

    async def unset(self, user: str, policy: str, *, by: str, reason: str) -> bool:
        """Remove one override; False when there was none."""
        existed = bool(await self.client.hexists(self.hash, f"{user} {policy}"))
        if existed:
            await self._change("unset", user, policy, by, reason, {}, None)
        return existed

    async def record(
        self, action: str, user: str, policy: str, *, by: str, reason: str, detail: Any
    ) -> None:
        """An audit entry for a change that is not an override (a reset)."""
        await self.client.xadd(
            self.audit_key,
            self._audit_fields(action, user, policy, by, reason, detail),
            maxlen=AUDIT_KEPT,
            approximate=True,
        )

    async def audit(self, count: int = 100) -> list[dict[str, Any]]:
        """The last `count` changes, oldest first."""
        entries = await self.client.xrevrange(self.audit_key, count=count)
        out = []
        for entry_id, fields in reversed(entries):
            text = {_text(k): _text(v) for k, v in fields.items()}
            item: dict[str, Any] = {**text, "id": _text(entry_id)}
            item["detail"] = json.loads(text.get("detail", "null"))
            item["at"] = float(text.get("at", 0))
            out.append(item)
        return out

    async def _change(
        self,
        action: str,
        user: str,
        policy: str,
        by: str,
        reason: str,
        detail: Any,
        entry: Override | None,
    ) -> None:
        pipe = self.client.pipeline(transaction=False)
        field = f"{user} {policy}"
        if entry is None:
            pipe.hdel(self.hash, field)
        else:
            pipe.hset(self.hash, field, json.dumps(entry.to_json()))
        pipe.xadd(
            self.audit_key,
            self._audit_fields(action, user, policy, by, reason, detail),
            maxlen=AUDIT_KEPT,
            approximate=True,
        )
        pipe.incr(self.version_key)  # last: a gateway that sees it also sees the change
        await pipe.execute()

    @staticmethod
    def _audit_fields(
        action: str, user: str, policy: str, by: str, reason: str, detail: Any
    ) -> dict[str, str]:
        return {
            "action": action,
            "user": user,
            "policy": policy,
            "by": by,
            "reason": reason,
            "at": repr(time.time()),
            "detail": json.dumps(detail),
        }


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Overrides:
    """Every override, held in memory and refreshed when the version in Redis moves."""

    def __init__(
        self,
        store: OverrideStore,
        refresh: float,
        clock: Callable[[], float] = time.time,
        on_load: Callable[[int], None] | None = None,
    ) -> None:
        self.store = store
        self.on_load = on_load  # told how many overrides each load brought
        self.refresh_seconds = refresh
        self.clock = clock
        self.entries: dict[tuple[str, str], Override] = {}
        self.version = -1
        self._derived: dict[tuple[str, Policy], Policy | None] = {}
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.get_running_loop().create_task(self._refresh_forever())

    async def close(self) -> None:
        await cancel(self._task)

    async def refresh(self) -> bool:
        """Reload when the version moved; False (the last set kept) when Redis fails."""
        try:
            version = await self.store.version()
            if version != self.version:
                entries = await self.store.all()
                self.entries, self._derived, self.version = entries, {}, version
                if self.on_load is not None:
                    self.on_load(len(entries))
                logger.info("rate-limit overrides: %d (version %d)", len(entries), version)
        except Exception as exc:  # keep the last set: Redis trouble is the limiter's to report
            if not self._failing:
                logger.warning("rate-limit overrides not refreshed, keeping the last (%s)", exc)
            self._failing = True
            return False
        self._failing = False
        return True

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_seconds)
            await self.refresh()

    def apply(self, policy: Policy, user: str) -> Policy:
        """`policy` as it applies to `user`: overridden while an override is live."""
        entry = self.entries.get((user, policy.name))
        if entry is None or not entry.live(self.clock()):
            return policy
        key = (user, policy)
        if key in self._derived:
            derived = self._derived[key]
        else:
            try:
                derived = override(policy, entry.values)
            except PolicyError as exc:  # written by an older CLI, or by hand
                logger.warning("override of %s for %r ignored: %s", policy.name, user, exc)
                derived = None
            self._derived[key] = derived
        return policy if derived is None else derived
