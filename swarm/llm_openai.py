"""LLMClient for any OpenAI-compatible chat completions endpoint (OpenAI, Moonshot, vLLM, SGLang ...).

Uses the official `openai` AsyncOpenAI client with its own retries switched off: this module retries
429, 5xx and connection errors itself with exponential backoff, so the policy is explicit and
testable, then raises swarm.llm.LLMError. Kimi's non-standard `reasoning_content` is read from the
message's extra fields.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import openai
from openai import AsyncOpenAI

from swarm.llm import ChatMessage, ChatResult, LLMError, ToolCall, ToolSpec, Usage
from swarm.plans import LLMConfig

log = logging.getLogger(__name__)

# Local servers (vLLM, SGLang, llama.cpp) accept any key, but the client refuses to send none.
NO_API_KEY = "EMPTY"


def _retry_after_s(err: openai.APIStatusError) -> float | None:
    """Seconds the server asked us to wait (Retry-After header), if it said so in seconds."""
    try:
        value = err.response.headers.get("retry-after")
        return float(value) if value is not None else None
    except (AttributeError, ValueError):
        return None


def _is_retryable(err: Exception) -> bool:
    if isinstance(err, openai.APIConnectionError):  # includes timeouts
        return True
    if isinstance(err, openai.APIStatusError):
        return err.status_code == 429 or err.status_code >= 500
    return False


def _describe(err: Exception) -> str:
    if isinstance(err, openai.APIStatusError):
        return f"HTTP {err.status_code}: {err.message}"
    if isinstance(err, openai.APITimeoutError):
        return "request timed out"
    if isinstance(err, openai.APIConnectionError):
        return f"connection error: {err.__cause__ or err}"
    return f"{type(err).__name__}: {err}"


def _reasoning_of(message: Any) -> str | None:
    """`reasoning_content` (Kimi, DeepSeek) or `reasoning` (newer vLLM), wherever the SDK put it."""
    extra = getattr(message, "model_extra", None) or {}
    for key in ("reasoning_content", "reasoning"):
        value = extra.get(key, getattr(message, key, None))
        if isinstance(value, str) and value:
            return value
    return None


def _to_result(completion: Any) -> ChatResult:
    if not completion.choices:
        raise LLMError("the model endpoint returned a completion without choices")
    choice = completion.choices[0]
    msg = choice.message
    calls = [
        ToolCall(id=c.id, name=c.function.name, arguments=c.function.arguments or "{}")
        for c in (msg.tool_calls or [])
        if getattr(c, "function", None) is not None  # "custom" tool calls have no function part
    ]
    usage = completion.usage
    return ChatResult(
        message=ChatMessage(
            role="assistant",
            content=msg.content,
            reasoning_content=_reasoning_of(msg),
            tool_calls=calls or None,
        ),
        finish_reason=choice.finish_reason or ("tool_calls" if calls else "stop"),
        usage=Usage(
            prompt_tokens=getattr(usage, "prompt_tokens", 0) or 0,
            completion_tokens=getattr(usage, "completion_tokens", 0) or 0,
        ),
    )


class OpenAIChatClient:
    """swarm.llm.LLMClient over an OpenAI-compatible HTTP endpoint.

    A call is tried up to 1 + config.max_retries times; the n-th retry waits
    min(backoff_s * 2**(n-1), max_backoff_s), or the server's Retry-After if longer (same cap).
    """

    def __init__(self, config: LLMConfig, *, backoff_s: float = 0.5, max_backoff_s: float = 30.0) -> None:
        if not config.base_url:
            raise ValueError("OpenAIChatClient needs LLMConfig.base_url (e.g. https://api.moonshot.ai/v1)")
        if not config.model:
            raise ValueError("OpenAIChatClient needs LLMConfig.model (e.g. kimi-k2-thinking)")
        if backoff_s < 0 or max_backoff_s < 0:
            raise ValueError("backoff_s and max_backoff_s must be >= 0")
        self.config = config
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._client = AsyncOpenAI(
            base_url=config.base_url,
            api_key=config.api_key or NO_API_KEY,
            timeout=config.timeout_s,
            max_retries=0,  # retries are ours, see class doc
        )

    async def aclose(self) -> None:
        await self._client.close()

    def _delay(self, retry: int, err: Exception) -> float:
        delay = self.backoff_s * (2 ** (retry - 1))
        if isinstance(err, openai.APIStatusError):
            asked = _retry_after_s(err)
            if asked is not None:
                delay = max(delay, asked)
        return min(delay, self.max_backoff_s)

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
        if not messages:
            raise ValueError("chat() needs at least one message")
        body: dict[str, Any] = {
            "model": self.config.model,
            "messages": [m.to_openai() for m in messages],
        }
        if tools:
            body["tools"] = [t.to_openai() for t in tools]
            if tool_choice is not None:
                body["tool_choice"] = tool_choice
        temp = temperature if temperature is not None else self.config.temperature
        if temp is not None:
            body["temperature"] = temp
        limit = max_tokens if max_tokens is not None else self.config.max_tokens
        if limit is not None:
            body["max_tokens"] = limit
        if response_format is not None:
            body["response_format"] = response_format

        attempts = 1 + self.config.max_retries
        for attempt in range(1, attempts + 1):
            try:
                completion = await self._client.chat.completions.create(**body)
            except openai.OpenAIError as err:
                if not _is_retryable(err):
                    raise LLMError(
                        f"model call to {self.config.base_url} (model {self.config.model}) failed: {_describe(err)}"
                    ) from err
                if attempt == attempts:
                    raise LLMError(
                        f"model call to {self.config.base_url} (model {self.config.model}) failed after "
                        f"{attempts} attempt(s): {_describe(err)}"
                    ) from err
                delay = self._delay(attempt, err)
                log.warning("model call attempt %d/%d failed (%s); retrying in %.2fs", attempt, attempts, _describe(err), delay)
                await asyncio.sleep(delay)
                continue
            return _to_result(completion)
        raise AssertionError("unreachable: the retry loop returns or raises")
