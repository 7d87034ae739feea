"""Every AppKey of the upstream app on one screen."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
from aiohttp import web

from upstream.llm import Provider
from upstream.settings import UpstreamSettings

settings_key = web.AppKey("settings", UpstreamSettings)
pool_key = web.AppKey("pool", asyncpg.Pool)
provider_key = web.AppKey("provider", Provider)
tasks_key = web.AppKey("tasks", set[asyncio.Task[Any]])
