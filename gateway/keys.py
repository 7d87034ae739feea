"""Every AppKey of the gateway app on one screen."""

from __future__ import annotations

from aiohttp import web
from redis.asyncio import Redis, RedisCluster

from gateway.edge.accesslog import AccessLog
from gateway.edge.plane import DataPlane
from gateway.edge.routes import Routes
from gateway.limiting.limiter import Limiter
from gateway.limiting.policies import Policies
from gateway.openapi import ApiDocument
from gateway.serving.lifecycle import Lifecycle
from gateway.settings import GatewaySettings

settings_key = web.AppKey("settings", GatewaySettings)
redis_key: web.AppKey[Redis | RedisCluster] = web.AppKey("redis")
plane_key = web.AppKey("plane", DataPlane)
routes_key = web.AppKey("routes", Routes)  # the public port's own routes
lifecycle_key = web.AppKey("lifecycle", Lifecycle)
access_log_key = web.AppKey("access_log", AccessLog)
policies_key = web.AppKey("policies", Policies)  # as loaded at boot; the limiter holds the live set
limiter_key = web.AppKey("limiter", Limiter)
api_document_key = web.AppKey("api_document", ApiDocument)
