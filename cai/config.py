"""Settings read from the environment (`CAI_*`), overridable by CLI flags."""

from __future__ import annotations

import os
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_DATABASE_URL = "sqlite:///cai.db"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CAI_", extra="ignore")

    database_url: str = Field(DEFAULT_DATABASE_URL, description="SQLAlchemy URL of the store")
    judge_base_url: str | None = Field(None, description="OpenAI-compatible endpoint; unset = in-process")
    judge_model: str | None = None
    judge_api_key: str | None = None
    templates_dir: str | None = Field(None, description="directory of *.jinja overriding the shipped ones")
    cache_dir: str | None = Field(None, description="where converted models are cached")

    def resolved_judge_api_key(self) -> str | None:
        return self.judge_api_key or os.environ.get("OPENAI_API_KEY")


def load_settings(**overrides: Any) -> Settings:
    """Environment first, then any non-None CLI override."""
    return Settings(**{k: v for k, v in overrides.items() if v is not None})
