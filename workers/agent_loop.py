"""The sub-agent loop: call the model, run the tool calls it asks for, feed results back, repeat.

OpenAI chat format throughout: an assistant message with `tool_calls` is followed by one
`role: tool` message per call, carrying its `tool_call_id`. Reasoning stays in
`reasoning_content`, apart from `content`. The loop ends when the model answers without tool calls,
or at the step cap, where the last step is offered no tools so the agent must answer.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Awaitable, Callable

from swarm.events import SubAgentStep, ToolCalled, ToolResult, _Event
from swarm.llm import ChatMessage, ChatResult, LLMClient, ToolSpec
from workers.tools.registry import ToolContext, ToolRegistry

Emit = Callable[[_Event], None]
# Takes one call from the job-wide tool budget; False when the budget is spent.
AcquireToolCall = Callable[[], Awaitable[bool]]

BUDGET_EXHAUSTED = "error: the job's tool-call budget is exhausted; answer now with what you have"
STEP_CAP_NOTICE = "Step limit reached: no more tool calls are possible. Give your final answer now with what you have."


@dataclass
class AgentOutcome:
    result: str
    steps: int
    tool_calls: int
    prompt_tokens: int
    completion_tokens: int
    hit_step_cap: bool
    messages: list[ChatMessage]


async def _unlimited() -> bool:
    return True


def step_event(agent_id: str, step: int, res: ChatResult) -> SubAgentStep:
    """The event of one model call of an agent (the orchestrator's included)."""
    return SubAgentStep(
        agent_id=agent_id,
        step=step,
        content=res.message.content,
        reasoning=res.message.reasoning_content,
        prompt_tokens=res.usage.prompt_tokens,
        completion_tokens=res.usage.completion_tokens,
    )


async def run_agent(
    *,
    agent_id: str,
    system_prompt: str,
    task: str,
    llm: LLMClient,
    registry: ToolRegistry,
    tool_names: list[str],
    max_steps: int,
    emit: Emit = lambda e: None,
    ctx: ToolContext | None = None,
    tool_timeout_s: float = 60.0,
    acquire_tool_call: AcquireToolCall = _unlimited,
    temperature: float | None = None,
    max_tokens: int | None = None,
) -> AgentOutcome:
    """Run one agent to its final answer. Raises `swarm.llm.LLMError` if the model fails."""
    ctx = ctx or ToolContext(agent_id=agent_id)
    specs: list[ToolSpec] = registry.specs(tool_names) if tool_names else []
    messages: list[ChatMessage] = []
    if system_prompt:
        messages.append(ChatMessage(role="system", content=system_prompt))
    messages.append(ChatMessage(role="user", content=task))
    steps = tool_calls = prompt_tokens = completion_tokens = 0
    while True:
        steps += 1
        last = steps >= max_steps
        # Cut off mid-work: tools are withheld now, so say why (a model seeing tool results but no
        # tools may otherwise try to write a call as text).
        cut_off = last and bool(specs) and steps > 1
        if cut_off:
            messages.append(ChatMessage(role="user", content=STEP_CAP_NOTICE))
        res = await llm.chat(
            messages,
            tools=None if (last or not specs) else specs,
            temperature=temperature,
            max_tokens=max_tokens,
        )
        msg = res.message
        prompt_tokens += res.usage.prompt_tokens
        completion_tokens += res.usage.completion_tokens
        emit(step_event(agent_id, steps, res))
        messages.append(msg)
        if not msg.tool_calls or last:
            return AgentOutcome(
                result=msg.content or "",
                steps=steps,
                tool_calls=tool_calls,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                hit_step_cap=cut_off or (last and bool(msg.tool_calls)),
                messages=messages,
            )
        # Calls of one step run concurrently; results go back in the order they were asked.
        for call in msg.tool_calls:
            emit(ToolCalled(agent_id=agent_id, step=steps, call_id=call.id, tool=call.name, arguments=call.arguments))

        async def run_one(call) -> tuple[str, bool, float, bool]:
            """(content, is_error, duration, executed): only executed calls count against budgets."""
            if call.name not in tool_names:
                allowed = ", ".join(tool_names) or "none"
                return f"error: tool {call.name!r} is not available to this agent (allowed: {allowed})", True, 0.0, False
            if not await acquire_tool_call():
                return BUDGET_EXHAUSTED, True, 0.0, False
            out = await registry.call(call.name, call.arguments, ctx, tool_timeout_s)
            return out.content, out.is_error, out.duration_s, True

        if len(msg.tool_calls) == 1:  # the common case: no task to spawn
            outcomes = [await run_one(msg.tool_calls[0])]
        else:
            outcomes = await asyncio.gather(*(run_one(c) for c in msg.tool_calls))
        for call, (content, is_error, dur, executed) in zip(msg.tool_calls, outcomes):
            tool_calls += executed
            emit(
                ToolResult(
                    agent_id=agent_id,
                    step=steps,
                    call_id=call.id,
                    tool=call.name,
                    content=content,
                    is_error=is_error,
                    duration_s=dur,
                )
            )
            messages.append(ChatMessage(role="tool", content=content, tool_call_id=call.id, name=call.name))
