"""Tool registry: named tools with pydantic-validated arguments, called the way a model calls them.

A tool is an async function `fn(args, ctx) -> str`. The model writes its arguments as JSON text;
`ToolRegistry.call` parses and validates them against the tool's pydantic model and turns every
failure (bad JSON, invalid arguments, an exception, a timeout) into an error string for the model,
never an exception for the job.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

import orjson
from pydantic import BaseModel, ValidationError

from swarm.llm import ToolSpec

MAX_TOOL_OUTPUT_CHARS = 20_000


@dataclass
class ToolContext:
    """What a tool may know about the call it serves."""

    job_id: str = ""
    agent_id: str = ""
    workdir: Path | None = None
    settings: dict[str, Any] = field(default_factory=dict)


ToolFn = Callable[[Any, ToolContext], Awaitable[str]]


@dataclass
class Tool:
    name: str
    description: str
    args_model: type[BaseModel]
    fn: ToolFn

    def spec(self) -> ToolSpec:
        schema = self.args_model.model_json_schema()
        schema.pop("title", None)
        return ToolSpec(name=self.name, description=self.description, parameters=schema)


@dataclass
class ToolOutcome:
    content: str
    is_error: bool
    duration_s: float


class UnknownToolError(KeyError):
    pass


class ToolRegistry:
    def __init__(self, tools: list[Tool] | None = None) -> None:
        self._tools: dict[str, Tool] = {}
        for t in tools or []:
            self.register(t)

    def register(self, tool: Tool) -> None:
        if tool.name in self._tools:
            raise ValueError(f"tool {tool.name!r} is already registered")
        self._tools[tool.name] = tool

    def names(self) -> list[str]:
        return sorted(self._tools)

    def __contains__(self, name: str) -> bool:
        return name in self._tools

    def get(self, name: str) -> Tool:
        try:
            return self._tools[name]
        except KeyError:
            raise UnknownToolError(f"unknown tool {name!r}; known tools: {', '.join(self.names()) or 'none'}") from None

    def specs(self, names: list[str] | None = None) -> list[ToolSpec]:
        return [self.get(n).spec() for n in (self.names() if names is None else names)]

    async def call(self, name: str, arguments: str, ctx: ToolContext, timeout_s: float) -> ToolOutcome:
        t0 = time.perf_counter()

        def done(content: str, is_error: bool) -> ToolOutcome:
            if len(content) > MAX_TOOL_OUTPUT_CHARS:
                cut = len(content) - MAX_TOOL_OUTPUT_CHARS
                content = content[:MAX_TOOL_OUTPUT_CHARS] + f"\n[... {cut} characters truncated]"
            return ToolOutcome(content, is_error, time.perf_counter() - t0)

        if name not in self._tools:
            return done(f"error: unknown tool {name!r}; available: {', '.join(self.names())}", True)
        tool = self._tools[name]
        try:
            raw = orjson.loads(arguments or "{}")
        except orjson.JSONDecodeError as e:
            return done(f"error: arguments of {name} are not valid JSON ({e}); send a JSON object", True)
        if not isinstance(raw, dict):
            return done(f"error: arguments of {name} must be a JSON object, got {type(raw).__name__}", True)
        try:
            args = tool.args_model.model_validate(raw)
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or '(root)'}: {err['msg']}" for err in e.errors())
            return done(f"error: invalid arguments for {name}: {problems}", True)
        try:
            # asyncio.timeout, unlike wait_for, runs the tool in this task: no task per call.
            async with asyncio.timeout(timeout_s):
                content = await tool.fn(args, ctx)
        except TimeoutError:
            return done(f"error: tool {name} timed out after {timeout_s:g} s", True)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a tool bug goes back to the model, not up the stack
            return done(f"error: {name} failed: {type(e).__name__}: {e}", True)
        return done(str(content), False)
