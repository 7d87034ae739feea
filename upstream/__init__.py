"""PixelCraft upstream: the chat service (aiohttp, asyncpg, streamed LLM answers)."""
