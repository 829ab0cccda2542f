"""LLMClient backed by an in-cluster model_shards engine: a named Ray actor, no HTTP in between.

The client sends OpenAI-format messages and tools to the EngineHost actor
(`model_shards.shards.launch_engine_actor`, named by `LLMConfig.engine_actor`), which renders them
with Kimi K2's chat template (model_shards.chat_template.encode_chat, next to its tokenizer) and
generates; the client parses the completion back into content, reasoning and tool calls.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from model_shards import chat_template
from model_shards.engine_api import Constraint, GenerationResult, SamplingParams
from model_shards.structured import tool_call_grammar
from swarm.llm import ChatMessage, ChatResult, LLMError, ToolCall, ToolSpec, Usage
from swarm.plans import LLMConfig

DEFAULT_MAX_TOKENS = 1024


def response_format_constraint(response_format: dict[str, Any] | None) -> Constraint | None:
    """OpenAI `response_format` -> engine constraint."""
    if not response_format:
        return None
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint(kind="json")
    if kind == "json_schema":
        js = response_format.get("json_schema") or {}
        schema = js.get("schema")
        if not isinstance(schema, dict):
            raise ValueError("response_format json_schema needs a 'json_schema': {'schema': {...}} object")
        return Constraint(kind="json_schema", spec=json.dumps(schema))
    raise ValueError(f"unsupported response_format type {kind!r} (use 'text', 'json_object' or 'json_schema')")


class EngineChatClient:
    """swarm.llm.LLMClient over the EngineHost actor named `config.engine_actor`."""

    def __init__(self, config: LLMConfig) -> None:
        if config.backend != "engine":
            raise ValueError(f"EngineChatClient needs LLMConfig.backend == 'engine', got {config.backend!r}")
        if not config.engine_actor:
            raise ValueError("LLMConfig.engine_actor (the Ray actor name of the engine) is required for backend 'engine'")
        self.config = config
        self._actor: Any = None

    def _handle(self) -> Any:
        if self._actor is None:
            import ray

            try:
                self._actor = ray.get_actor(self.config.engine_actor)
            except ValueError as e:
                raise LLMError(f"no engine actor named {self.config.engine_actor!r} in this Ray namespace: {e}") from e
        return self._actor

    def _request(
        self,
        messages: list[ChatMessage],
        tools: list[ToolSpec] | None,
        tool_choice: str | dict[str, Any] | None,
        temperature: float | None,
        max_tokens: int | None,
        response_format: dict[str, Any] | None,
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None, SamplingParams, Constraint | None]:
        offered = tools if tools and tool_choice != "none" else None
        constraint = response_format_constraint(response_format)
        if isinstance(tool_choice, dict) or tool_choice == "required":
            # Forcing a call: the grammar writes the call's frame and arguments matching its schema.
            if not offered:
                raise ValueError(f"tool_choice={tool_choice!r} but no tools were offered")
            constraint = tool_call_grammar([t.to_openai() for t in offered], tool_choice)
        elif offered and constraint is None:
            # "auto": text or calls, as the model chooses, but any call it starts is well-formed.
            constraint = tool_call_grammar([t.to_openai() for t in offered], "auto")
        chat = [m.to_openai() for m in messages]
        tool_defs = [t.to_openai() for t in offered] if offered else None
        temp = temperature if temperature is not None else self.config.temperature
        params = SamplingParams(
            temperature=1.0 if temp is None else temp,
            max_tokens=max_tokens or self.config.max_tokens or DEFAULT_MAX_TOKENS,
        )
        return chat, tool_defs, params, constraint

    async def chat(
        self,
        messages: list[ChatMessage],
        tools: list[ToolSpec] | None = None,
        *,
        tool_choice: str | dict[str, Any] | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
        response_format: dict[str, Any] | None = None,
    ) -> ChatResult:
        try:
            chat, tool_defs, params, constraint = self._request(messages, tools, tool_choice, temperature, max_tokens, response_format)
        except ValueError as e:  # a bad schema or tool_choice: the call cannot succeed, say why
            raise LLMError(f"invalid request for engine {self.config.engine_actor!r}: {e}") from e
        from ray.exceptions import RayActorError, RayTaskError

        last: Exception | None = None
        for attempt in range(self.config.max_retries + 1):
            try:
                ref = self._handle().complete_chat.remote(chat, tool_defs, params, constraint)
                res: GenerationResult = await asyncio.wait_for(ref, timeout=self.config.timeout_s)
                return to_chat_result(res)
            except (RayActorError, asyncio.TimeoutError) as e:
                last = e
                self._actor = None  # look the actor up again (it may have been restarted)
                await asyncio.sleep(min(2.0, 0.1 * 2**attempt))
            except RayTaskError as e:  # the engine rejected the request (too long, bad ids): no retry
                raise LLMError(f"engine {self.config.engine_actor!r} rejected the request: {e.cause!r}") from e
        raise LLMError(f"engine actor {self.config.engine_actor!r} failed after {self.config.max_retries + 1} tries: {last!r}")


def to_chat_result(res: GenerationResult) -> ChatResult:
    """Parse an engine completion into content, reasoning_content and tool calls."""
    content, reasoning, calls = chat_template.parse_assistant(res.text)
    tool_calls = [ToolCall(id=c["id"], name=c["name"], arguments=c["arguments"]) for c in calls]
    if tool_calls:
        finish = "tool_calls"
    else:
        finish = "length" if res.finish_reason == "length" else "stop"
    return ChatResult(
        message=ChatMessage(
            role="assistant", content=content or None, reasoning_content=reasoning, tool_calls=tool_calls or None
        ),
        finish_reason=finish,
        usage=Usage(prompt_tokens=res.prompt_tokens, completion_tokens=res.completion_tokens),
    )
