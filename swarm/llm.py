"""The one small interface between agents and models: OpenAI-style chat messages in, one message out.

Backends (`swarm.llm_openai` for any OpenAI-compatible endpoint, `swarm.llm_engine` for an
in-cluster model_shards replica) implement `LLMClient`. Agents never see which one they talk to.
"""

from __future__ import annotations

from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field


class ToolCall(BaseModel):
    """An assistant's request to run a tool; `arguments` is the raw JSON text the model wrote."""

    model_config = ConfigDict(extra="ignore")

    id: str
    name: str
    arguments: str = "{}"


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = None
    # Thinking text, kept apart from `content` (Kimi's `reasoning_content`).
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None

    def to_openai(self) -> dict[str, Any]:
        """The dict the OpenAI chat API expects (no None fields, tool calls in its nesting)."""
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in self.tool_calls
            ]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None and self.role == "tool":
            out["name"] = self.name
        if self.reasoning_content is not None and self.role == "assistant":
            out["reasoning_content"] = self.reasoning_content
        return out


class ToolSpec(BaseModel):
    """A tool as the model sees it: name, description and a JSON schema for its arguments."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})

    def to_openai(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class ChatResult(BaseModel):
    message: ChatMessage
    finish_reason: str = "stop"  # "stop" | "tool_calls" | "length"
    usage: Usage = Field(default_factory=Usage)


class LLMError(RuntimeError):
    """A model call failed after the backend's own retries; the agent loop reports it."""


@runtime_checkable
class LLMClient(Protocol):
    async def chat(
        self,
        messages: list[ChatMessage],
        tools: list[ToolSpec] | None = None,
        *,
        tool_choice: str | dict[str, Any] | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
        response_format: dict[str, Any] | None = None,
    ) -> ChatResult: ...
