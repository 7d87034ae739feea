"""The limiter's Lua scripts (`lua/*.lua`): each read once, named by its SHA1, loaded on demand."""

from __future__ import annotations

import hashlib
from importlib import resources
from typing import Any

from redis.exceptions import NoScriptError


class LuaScript:
    """One script of `lua/`: its source, the SHA1 EVALSHA names it by, and how to run it.

    Redis forgets scripts on a restart or a `SCRIPT FLUSH`; `call` answers NOSCRIPT by loading
    the script and calling again, once. Callers that pipeline raw EVALSHA commands (the buckets)
    use `sha`/`sha_bytes` and `load` themselves.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.source = resources.files(__package__).joinpath("lua", name).read_text("utf-8")
        self.sha = hashlib.sha1(self.source.encode(), usedforsecurity=False).hexdigest()
        self.sha_bytes = self.sha.encode()

    async def load(self, client: Any) -> None:
        """Register the script (on every primary of a Cluster); RedisError if Redis refuses."""
        await client.script_load(self.source)

    async def call(self, client: Any, keys: list[str], *args: Any) -> Any:
        """EVALSHA, loading the script first if Redis has forgotten it."""
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            await self.load(client)
            return await client.evalsha(self.sha, len(keys), *keys, *args)
