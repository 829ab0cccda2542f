"""Operator settings: where the job store lives, where the API listens, which model to call.

Sources, later ones winning: built-in defaults, a YAML file (`load_settings(path)` or
$SWARM_CONFIG), then environment variables (ENV_VARS below). A bad value is reported with the
field and the place it came from (file or variable), so the operator knows what to fix.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from swarm.placement import PlacementConfig
from swarm.plans import LLMConfig

DEFAULT_DB_PATH = "~/.swarm/swarm.sqlite"
CONFIG_ENV = "SWARM_CONFIG"

# Environment variable -> settings field path. For the LLM, the SWARM_ name wins over the OPENAI_
# fallback (the names the official OpenAI client reads).
ENV_VARS: dict[str, tuple[str, ...]] = {
    "SWARM_DB": ("db_path",),
    "SWARM_HOST": ("host",),
    "SWARM_PORT": ("port",),
    "SWARM_API_TOKEN": ("api_token",),
    "SWARM_RAY_ADDRESS": ("ray_address",),
    "SWARM_NUM_WORKERS": ("num_workers",),
    "SWARM_MAX_BODY_BYTES": ("max_body_bytes",),
    "SWARM_MAX_RUNNING_JOBS": ("max_running_jobs",),
    "SWARM_LLM_BACKEND": ("llm", "backend"),
    "OPENAI_BASE_URL": ("llm", "base_url"),
    "SWARM_LLM_BASE_URL": ("llm", "base_url"),
    "OPENAI_API_KEY": ("llm", "api_key"),
    "SWARM_LLM_API_KEY": ("llm", "api_key"),
    "SWARM_LLM_MODEL": ("llm", "model"),
}


class ConfigError(ValueError):
    """The settings file or an environment variable holds something unusable."""


def _env(name: str) -> str | None:
    value = os.environ.get(name)
    return value if value else None  # an empty variable counts as unset


def _default_db_path() -> str:
    return str(Path(_env("SWARM_DB") or DEFAULT_DB_PATH).expanduser())


def _default_llm() -> LLMConfig:
    return LLMConfig(
        base_url=_env("SWARM_LLM_BASE_URL") or _env("OPENAI_BASE_URL"),
        api_key=_env("SWARM_LLM_API_KEY") or _env("OPENAI_API_KEY"),
        model=_env("SWARM_LLM_MODEL"),
    )


class Settings(BaseModel):
    """Everything an operator configures for the API server, the CLI and the runtime."""

    model_config = ConfigDict(extra="forbid")

    db_path: str = Field(default_factory=_default_db_path, description="SQLite job store")
    host: str = "127.0.0.1"
    port: int = Field(8321, ge=0, le=65535)
    api_token: str | None = Field(None, description="bearer token the REST API requires; None = no auth")
    ray_address: str | None = Field(None, description="Ray cluster to join; None = start an embedded local Ray")
    num_workers: int = Field(2, ge=1, le=1024, description="async worker actors that host sub-agents")
    llm: LLMConfig = Field(default_factory=_default_llm)
    max_body_bytes: int = Field(1 << 20, ge=1, description="largest accepted HTTP request body")
    # Cluster placement (swarm.placement) and admission: jobs beyond max_running_jobs wait in state
    # "queued" and start in submission order as running ones finish; None = no limit.
    placement: PlacementConfig = Field(default_factory=PlacementConfig)
    max_running_jobs: int | None = Field(None, ge=1, description="jobs running at once; the rest stay queued")


def read_yaml_mapping(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The mapping a YAML config file holds ({} for an empty file); ConfigError names what is wrong."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping of settings, got {type(data).__name__}")
    return data


def _env_overlay(data: dict[str, Any]) -> dict[tuple[str, ...], str]:
    """Write set environment variables into `data`; return which variable set each field path."""
    origin: dict[tuple[str, ...], str] = {}
    for name, path in ENV_VARS.items():  # dict order: SWARM_ names come after their fallbacks
        value = _env(name)
        if value is None:
            continue
        target = data
        for key in path[:-1]:
            sub = target.get(key)
            if sub is None:
                sub = target[key] = {}
            elif not isinstance(sub, dict):
                raise ConfigError(f"setting {key!r} must be a mapping, got {type(sub).__name__}")
            target = sub
        target[path[-1]] = value
        origin[path] = name
    return origin


def load_settings(path: str | None = None) -> Settings:
    """Settings from defaults, the YAML file at `path` (else $SWARM_CONFIG, if set) and env vars."""
    path = path or _env(CONFIG_ENV)
    data = read_yaml_mapping(path) if path else {}
    origin = _env_overlay(data)
    try:
        settings = Settings.model_validate(data)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            loc = tuple(str(x) for x in err["loc"])
            field = ".".join(loc) or "(root)"
            if loc in origin:
                where = f"environment variable {origin[loc]}"
            else:
                where = f"config file {path!r}" if path else "settings"
            problems.append(f"{where}: field {field!r}: {err['msg']}")
        raise ConfigError("invalid settings: " + "; ".join(problems)) from None
    settings.db_path = str(Path(settings.db_path).expanduser())
    return settings
