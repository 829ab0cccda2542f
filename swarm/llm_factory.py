"""Build the LLMClient a job's LLMConfig asks for."""

from __future__ import annotations

import importlib

from swarm.config import Settings, load_settings
from swarm.llm import LLMClient
from swarm.plans import LLMConfig

_ENGINE_MODULE = "swarm.llm_engine"


class LLMConfigError(ValueError):
    """The LLM backend cannot be built from the given config and settings."""


_OPENAI_HELP = (
    "set SWARM_LLM_BASE_URL, SWARM_LLM_API_KEY and SWARM_LLM_MODEL (or put them under 'llm:' in the "
    "settings file), e.g. SWARM_LLM_BASE_URL=https://api.moonshot.ai/v1 SWARM_LLM_API_KEY=sk-... "
    "SWARM_LLM_MODEL=kimi-k2-thinking; for a local vLLM server: SWARM_LLM_BASE_URL=http://127.0.0.1:8000/v1 "
    "SWARM_LLM_MODEL=<served model name>"
)


def make_llm(config: LLMConfig, settings: Settings | None = None) -> LLMClient:
    """An LLMClient for `config`. Fields left None in an "openai" config come from `settings`
    (default: load_settings(), i.e. $SWARM_CONFIG and the SWARM_LLM_* / OPENAI_* env vars)."""
    if config.backend == "openai":
        from swarm.llm_openai import OpenAIChatClient

        if not (config.base_url and config.api_key and config.model):
            fallback = (settings or load_settings()).llm
            config = config.model_copy(
                update={
                    "base_url": config.base_url or fallback.base_url,
                    "api_key": config.api_key or fallback.api_key,
                    "model": config.model or fallback.model,
                }
            )
        missing = [name for name, v in (("base_url", config.base_url), ("model", config.model)) if not v]
        if missing:
            raise LLMConfigError(f"no model endpoint configured (missing {' and '.join(missing)}): {_OPENAI_HELP}")
        return OpenAIChatClient(config)
    if config.backend == "engine":
        try:
            module = importlib.import_module(_ENGINE_MODULE)
        except ModuleNotFoundError as e:
            if e.name != _ENGINE_MODULE:
                raise  # the module exists but one of its own imports is missing: show that
            raise LLMConfigError(
                f"backend 'engine' needs {_ENGINE_MODULE}, which is not installed in this build; "
                "use backend 'openai' with an OpenAI-compatible endpoint instead"
            ) from None
        return module.EngineChatClient(config)
    raise LLMConfigError(f"unknown LLM backend {config.backend!r}; expected 'openai' or 'engine'")
