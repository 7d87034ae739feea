"""Every AppKey of the upstream app on one screen."""

from __future__ import annotations

import asyncpg
from aiohttp import web

from pixelcraft.aio import Tasks
from upstream.llm import Provider
from upstream.settings import UpstreamSettings

settings_key = web.AppKey("settings", UpstreamSettings)
pool_key = web.AppKey("pool", asyncpg.Pool)
provider_key = web.AppKey("provider", Provider)
tasks_key = web.AppKey("tasks", Tasks)
