"""Settings read from the environment (`CAI_*`), overridable by CLI flags; config files (YAML or
JSON) read into pydantic models."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from cai.errors import BadInput

ConfigT = TypeVar("ConfigT", bound=BaseModel)

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


def config_from_file(
    config_class: type[ConfigT], path: Path | None, name: str, overrides: dict[str, Any]
) -> ConfigT:
    """`config_class` from a YAML or JSON file with `overrides` on top (overrides that are None are ignored, so a CLI can pass its unset options through); BadInput
    naming the file and every bad field."""
    where = str(path) if path is not None else name
    values: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except OSError as e:
            raise BadInput(f"{path}: cannot read: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise BadInput(f"{path}: not valid YAML or JSON: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise BadInput(f"{path}: expected a mapping of settings, got {type(loaded).__name__}")
        values = dict(loaded or {})
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return config_class(**values)
    except ValidationError as e:
        problems = [
            f"{where}: {'.'.join(str(p) for p in err['loc']) or '(config)'}: {err['msg']}"
            for err in e.errors()
        ]
        raise BadInput("\n".join(problems), problems) from None
