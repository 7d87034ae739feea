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
        env_file=".env", extra="ignore", case_sensitive=False, env_ignore_empty=True
    )

    database_url: str
    upstream_llm_provider: Literal["openai", "local"] = "openai"
    openai_api_key: SecretStr | None = Field(default=None, validate_default=True)
    openai_base_url: str = "https://api.openai.com/v1"
    openai_model: str = Field(default="gpt-4o-mini", min_length=1)
    openai_connect_timeout: Seconds = 10.0
    openai_read_timeout: Seconds = 60.0
    openai_max_retries: Annotated[int, Field(ge=0, le=10)] = 2
    upstream_host: Host = "127.0.0.1"
    upstream_port: Port = 8000
    upstream_local_token_delay: Annotated[float, Field(ge=0, le=5)] = 0.02
    upstream_drain_seconds: Annotated[float, Field(ge=0)] = 30.0
    upstream_startup_retry_seconds: Annotated[float, Field(ge=0)] = 15.0
    upstream_log_level: LogLevel = "INFO"
    upstream_log_format: LogFormat = "text"
    db_pool_min_size: Annotated[int, Field(ge=0, le=1000)] = 2
    db_pool_max_size: Annotated[int, Field(ge=1, le=1000)] = Field(
        default=30, validate_default=True
    )
    db_pool_acquire_timeout: Seconds = 5.0
    db_statement_cache_size: Annotated[int, Field(ge=0)] = 100

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
