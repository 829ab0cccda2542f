"""Test doubles shared by the runtime tests: test-only tools and an echoing scripted policy.

They travel to Ray workers by value (tests/conftest.py registers this module for pickling by value).
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from pydantic import BaseModel

from swarm.llm import ChatMessage, ChatResult
from tests.scripted_policy import ScriptedTestPolicy, parse_script
from workers.tools.registry import Tool


class PathArgs(BaseModel):
    path: str


class TextArgs(BaseModel):
    text: str


async def _wait_file(args: PathArgs, ctx: Any) -> str:
    while not os.path.exists(args.path):
        await asyncio.sleep(0.02)
    return f"{args.path} exists"


async def _touch(args: PathArgs, ctx: Any) -> str:
    open(args.path, "w").close()
    return f"created {args.path}"


async def _echo(args: TextArgs, ctx: Any) -> str:
    return args.text


async def _block(args: TextArgs, ctx: Any) -> str:
    await asyncio.sleep(3600)  # only ever ends by cancellation
    return args.text


def wait_file_tool() -> Tool:
    """Keeps an agent busy until a file exists: the test decides when a node may finish."""
    return Tool("wait_file", "test tool: wait until a file exists", PathArgs, _wait_file)


def touch_tool() -> Tool:
    return Tool("touch", "test tool: create a file", PathArgs, _touch)


def echo_tool() -> Tool:
    return Tool("echo", "test tool: returns its text", TextArgs, _echo)


def block_tool() -> Tool:
    return Tool("block", "test tool: never returns", TextArgs, _block)


class EchoTaskTestPolicy(ScriptedTestPolicy):
    """ScriptedTestPolicy that, for scripts with "echo_task", answers with its whole user message,
    so a test can see exactly what an agent was given (its dependencies' results). The answer starts
    "ECHO:", or "ECHO@<model>:" when the job's LLMConfig names a model (which config a call used)."""

    def __init__(self, model: str | None = None) -> None:
        super().__init__()
        self.prefix = f"ECHO@{model}:" if model else "ECHO:"

    async def chat(self, messages: list[ChatMessage], tools: Any = None, **kwargs: Any) -> ChatResult:
        user = next(m.content or "" for m in messages if m.role == "user")
        if parse_script(user).get("echo_task"):
            # Defuse the echoed script so an agent depending on this one still finds its own.
            return ChatResult(message=ChatMessage(role="assistant", content=self.prefix + user.replace("<<script", "<<echoed")))
        return await super().chat(messages, tools, **kwargs)


def echo_llm_factory(config: Any) -> EchoTaskTestPolicy:
    return EchoTaskTestPolicy(config.model)
