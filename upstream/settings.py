"""UpstreamSettings: the chat service's variables of the contract, validated as a whole."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from pixelcraft.fields import Host, check_url
from pixelcraft.logs import LogFormat, LogLevel

Port = Annotated[int, Field(ge=1, le=65535)]
Seconds = Annotated[float, Field(gt=0)]


class UpstreamSettings(BaseSettings):
    """Upstream chat service configuration from the environment and `.env`."""

    model_config = SettingsConfigDict(
        env_file=".env",
        extra="ignore",
        case_sensitive=False,
        env_ignore_empty=True,
        use_attribute_docstrings=True,  # each variable's meaning: its docstring, below it
    )

    database_url: str
    """PostgreSQL, `postgres://` or `postgresql://` (Supabase: the direct or session-pooler
    URL)"""
    upstream_llm_provider: Literal["openai", "local"] = "openai"
    """`openai` (any OpenAI-compatible API) or `local` (offline, deterministic; for development
    and tests)"""
    openai_api_key: SecretStr | None = Field(default=None, validate_default=True)
    """Bearer key, required when `UPSTREAM_LLM_PROVIDER=openai`; never printed"""
    openai_base_url: str = "https://api.openai.com/v1"
    """Base URL of an OpenAI-compatible API"""
    openai_model: str = Field(default="gpt-4o-mini", min_length=1)
    """Model name sent with each request"""
    openai_connect_timeout: Seconds = 10.0
    """Seconds to connect to the model API (a 504 after retries)"""
    openai_read_timeout: Seconds = 60.0
    """Seconds the model may stay silent before the first token and between tokens (504)"""
    openai_max_retries: Annotated[int, Field(ge=0, le=10)] = 2
    """Extra attempts on 429, 5xx and connection errors, only before the first token"""
    upstream_host: Host = "127.0.0.1"
    """Listen address (only the gateway should reach it)"""
    upstream_port: Port = 8000
    """Listen port (the API, health checks and `/metrics`; keep it private)"""
    upstream_local_token_delay: Annotated[float, Field(ge=0, le=5)] = 0.02
    """Seconds between tokens of the `local` model"""
    upstream_drain_seconds: Annotated[float, Field(ge=0)] = 30.0
    """On SIGTERM, how long in-flight streams may finish"""
    upstream_startup_retry_seconds: Annotated[float, Field(ge=0)] = 15.0
    """How long boot keeps retrying PostgreSQL before exiting 69"""
    upstream_log_level: LogLevel = "INFO"
    """`DEBUG`, `INFO`, `WARNING` or `ERROR`"""
    upstream_log_format: LogFormat = "text"
    """`text` or `json`"""
    db_pool_min_size: Annotated[int, Field(ge=0, le=1000)] = 2
    """Connections opened at boot and kept"""
    db_pool_max_size: Annotated[int, Field(ge=1, le=1000)] = Field(
        default=30, validate_default=True
    )
    """Most connections at once (a SQLAlchemy-style "20 + 10 overflow" is 30 here)"""
    db_pool_acquire_timeout: Seconds = 5.0
    """Seconds a request waits for a free connection before a 503 with `Retry-After`"""
    db_statement_cache_size: Annotated[int, Field(ge=0)] = 100
    """asyncpg's prepared-statement cache; set `0` behind PgBouncer in transaction mode
    (Supabase's port 6543 pooler)"""

    @field_validator("database_url")
    @classmethod
    def _database_scheme(cls, value: str) -> str:
        return check_url(value, ("postgres", "postgresql"))

    @field_validator("openai_base_url")
    @classmethod
    def _openai_scheme(cls, value: str) -> str:
        return check_url(value, ("http", "https")).rstrip("/")

    @field_validator("openai_api_key")
    @classmethod
    def _key_for_openai(cls, key: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        if info.data.get("upstream_llm_provider") == "openai" and key is None:
            raise ValueError("missing: required when UPSTREAM_LLM_PROVIDER=openai")
        return key

    @field_validator("db_pool_max_size")
    @classmethod
    def _max_covers_min(cls, size: int, info: ValidationInfo) -> int:
        low = info.data.get("db_pool_min_size")
        if low is not None and size < low:
            raise ValueError(f"must be at least DB_POOL_MIN_SIZE ({low})")
        return size
