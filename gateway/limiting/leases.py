"""Caps on requests in flight per user (a policy's `concurrent`), as leases in Redis.

A request that a capped policy applies to holds a lease (`lua/lease.lua`: a sorted set per
policy and identity, scored by expiry) for as long as it runs, streams included. A background
task renews every lease this process holds a third of the way into its lifetime; a gateway that
dies stops renewing, so its leases lapse by themselves within GATEWAY_RATELIMIT_LEASE_SECONDS.
While Redis is unavailable the policy's failure_mode applies: `local` counts leases in this
process (the cap divided like the local buckets), `open` lets everything through, `closed`
refuses.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from typing import Any

from gateway.limiting.scripts import LuaScript
from pixelcraft.aio import cancel

logger = logging.getLogger(__name__)


class LeasesUnavailable(Exception):
    """Redis did not answer the lease script in time."""


@dataclass(slots=True)
class Lease:
    """One held lease: where, and whether Redis or this process keeps it."""

    key: str
    id: str
    local: bool = False


class Leases:
    """Acquire, renew and release leases; `held` is this process's count (a gauge)."""

    def __init__(self, client: Any, *, ttl: float, timeout: float, divisor: int) -> None:
        self.client = client
        self.ttl_ms = max(1, int(ttl * 1000))
        self.timeout = timeout
        self.divisor = divisor
        self.script = LuaScript("lease.lua")
        self._held: dict[str, Lease] = {}
        self._local: dict[str, int] = {}
        self._renewer: asyncio.Task[None] | None = None
        self._prefix = os.urandom(6).hex()
        self._counter = 0

    @property
    def held(self) -> int:
        return len(self._held)

    async def start(self) -> None:
        await self.script.load(self.client)
        self._renewer = asyncio.get_running_loop().create_task(self._renew_forever())

    async def close(self) -> None:
        await cancel(self._renewer)

    async def _call(self, key: str, *args: Any) -> list[int]:
        async with asyncio.timeout(self.timeout):
            reply: list[int] = await self.script.call(self.client, [key], *args)
        return reply

    async def acquire(self, key: str, cap: int) -> tuple[Lease | None, int]:
        """A lease under `cap`, or None; and the leases held now (this one included).
        LeasesUnavailable when Redis does not answer."""
        self._counter += 1
        lease_id = f"{self._prefix}-{self._counter}"
        try:
            granted, held = await self._call(key, "acquire", lease_id, cap, self.ttl_ms)
        except Exception as exc:  # any failure (RedisClusterException is no RedisError)
            raise LeasesUnavailable(f"{type(exc).__name__}: {exc}") from exc
        if not granted:
            return None, held
        lease = Lease(key, lease_id)
        self._held[lease_id] = lease
        return lease, held

    def acquire_local(self, key: str, cap: int) -> tuple[Lease | None, int]:
        """The fallback: leases counted in this process, at the cap's share of it."""
        share = max(1, cap // self.divisor)
        held = self._local.get(key, 0)
        if held >= share:
            return None, held
        self._local[key] = held + 1
        self._counter += 1
        lease = Lease(key, f"{self._prefix}-{self._counter}", local=True)
        self._held[lease.id] = lease
        return lease, held + 1

    async def release(self, lease: Lease) -> None:
        """Give the lease back (best effort: an unanswered release lapses on its own)."""
        self._held.pop(lease.id, None)
        if lease.local:
            left = self._local.get(lease.key, 1) - 1
            if left > 0:
                self._local[lease.key] = left
            else:
                self._local.pop(lease.key, None)
            return
        try:
            await self._call(lease.key, "release", lease.id)
        except Exception as exc:  # whatever it is, the lease lapses on its own
            logger.warning("lease not released (%s); it lapses on its own", exc)

    async def _renew_forever(self) -> None:
        interval = self.ttl_ms / 3000
        while True:
            await asyncio.sleep(interval)
            remote = [lease for lease in self._held.values() if not lease.local]
            if not remote:
                continue
            try:
                async with asyncio.timeout(max(self.timeout, interval / 2)):
                    pipe = self.client.pipeline(transaction=False)
                    for lease in remote:
                        pipe.execute_command("EVALSHA", self.script.sha, 1, lease.key, "renew",
                                             lease.id, 0, self.ttl_ms)  # fmt: skip
                    await pipe.execute(raise_on_error=False)
            except Exception as exc:  # the renewer must outlive any failure
                logger.warning("leases not renewed (%s); retrying in %.1f s", exc, interval)
