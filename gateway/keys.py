"""Every AppKey of the gateway app on one screen."""

from __future__ import annotations

from aiohttp import web
from redis.asyncio import Redis

from gateway.accesslog import AccessLog
from gateway.lifecycle import Lifecycle
from gateway.proxy import Proxy
from gateway.settings import GatewaySettings

settings_key = web.AppKey("settings", GatewaySettings)
redis_key = web.AppKey("redis", Redis)
proxy_key = web.AppKey("proxy", Proxy)
lifecycle_key = web.AppKey("lifecycle", Lifecycle)
access_log_key = web.AppKey("access_log", AccessLog)
