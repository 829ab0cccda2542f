"""workers.agent_loop.run_agent driven by test-double policies over the real built-in tools."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import orjson
import pytest

from swarm.events import SubAgentStep, ToolCalled, ToolResult, _Event
from swarm.llm import ChatMessage, ChatResult, ToolCall, ToolSpec, Usage
from swarm.plans import ToolsConfig
from tests.scripted_policy import ScriptedTestPolicy, script_task
from workers.agent_loop import BUDGET_EXHAUSTED, STEP_CAP_NOTICE, run_agent
from workers.tools import BUILTIN_TOOLS, build_registry, known_tool_names
from workers.tools.registry import ToolRegistry

DOCS = [
    {"id": "fr", "title": "France", "text": "The capital of France is Paris."},
    {"id": "jp", "title": "Japan", "text": "The capital of Japan is Tokyo."},
]


class RecordingReplayTestPolicy:
    """Test double: replays fixed assistant messages in order and records what each call was offered."""

    def __init__(self, replies: list[ChatMessage]) -> None:
        self.replies = list(replies)
        self.offered: list[list[str] | None] = []
        self.seen: list[list[ChatMessage]] = []

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
        self.offered.append(None if tools is None else [t.name for t in tools])
        self.seen.append(list(messages))
        msg = self.replies.pop(0)
        return ChatResult(
            message=msg,
            finish_reason="tool_calls" if msg.tool_calls else "stop",
            usage=Usage(prompt_tokens=10, completion_tokens=3),
        )


@pytest.fixture
def registry(tmp_path: Path) -> ToolRegistry:
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_bytes(b"\n".join(orjson.dumps(d) for d in DOCS))
    return build_registry(ToolsConfig(search_corpus=str(corpus), python_timeout_s=10.0, python_memory_mb=256))


async def test_tool_round_trip_in_openai_format_with_events(registry: ToolRegistry) -> None:
    events: list[_Event] = []
    task = script_task(
        {
            "steps": [
                [
                    {"tool": "calculator", "arguments": {"expression": "6 * 7"}},
                    {"tool": "search", "arguments": {"query": "capital Japan", "k": 1}},
                ]
            ],
            "answer": "found: {results}",
        }
    )
    out = await run_agent(
        agent_id="a1",
        system_prompt="You are a careful researcher.",
        task=task,
        llm=ScriptedTestPolicy(),
        registry=registry,
        tool_names=["calculator", "search"],
        max_steps=10,
        emit=events.append,
    )
    assert out.steps == 2 and out.tool_calls == 2 and not out.hit_step_cap
    assert out.result.startswith("found: 42 | [1] id=jp | Japan")

    roles = [m.role for m in out.messages]
    assert roles == ["system", "user", "assistant", "tool", "tool", "assistant"]
    call_msg = out.messages[2].to_openai()
    assert call_msg["content"] is None and call_msg["reasoning_content"] == "step 0"
    assert [c["function"]["name"] for c in call_msg["tool_calls"]] == ["calculator", "search"]
    assert all(c["type"] == "function" for c in call_msg["tool_calls"])
    assert json.loads(call_msg["tool_calls"][0]["function"]["arguments"]) == {"expression": "6 * 7"}
    ids = [c["id"] for c in call_msg["tool_calls"]]
    tool_msgs = [m.to_openai() for m in out.messages[3:5]]
    assert [t["tool_call_id"] for t in tool_msgs] == ids
    assert [t["name"] for t in tool_msgs] == ["calculator", "search"]
    assert tool_msgs[0]["content"] == "42"
    # Reasoning stays apart from content on the final answer too.
    final = out.messages[-1]
    assert final.reasoning_content == "done" and "done" not in (final.content or "")

    assert [type(e).__name__ for e in events] == [
        "SubAgentStep", "ToolCalled", "ToolCalled", "ToolResult", "ToolResult", "SubAgentStep"
    ]
    s1, c1, c2, r1, r2, s2 = events
    assert isinstance(s1, SubAgentStep) and (s1.agent_id, s1.step, s1.content, s1.reasoning) == ("a1", 1, None, "step 0")
    assert s1.completion_tokens == 5 and s1.prompt_tokens > 0
    assert isinstance(c1, ToolCalled) and (c1.call_id, c1.tool, c1.step) == (ids[0], "calculator", 1)
    assert json.loads(c1.arguments) == {"expression": "6 * 7"}
    assert isinstance(c2, ToolCalled) and (c2.call_id, c2.tool) == (ids[1], "search")
    assert isinstance(r1, ToolResult) and (r1.call_id, r1.tool, r1.content, r1.is_error) == (ids[0], "calculator", "42", False)
    assert isinstance(r2, ToolResult) and r2.call_id == ids[1] and "Tokyo" in r2.content and r2.duration_s > 0
    assert isinstance(s2, SubAgentStep) and (s2.step, s2.content, s2.reasoning) == (2, out.result, "done")
    assert out.prompt_tokens == s1.prompt_tokens + s2.prompt_tokens and out.completion_tokens == 10


async def test_bad_calls_come_back_as_tool_messages_and_the_loop_continues(registry: ToolRegistry) -> None:
    policy = RecordingReplayTestPolicy(
        [
            ChatMessage(
                role="assistant",
                tool_calls=[
                    ToolCall(id="c1", name="calculator", arguments='{"expression": "1 +'),
                    ToolCall(id="c2", name="calculator", arguments='{"expr": "1 + 1"}'),
                    ToolCall(id="c3", name="teleport", arguments="{}"),
                    ToolCall(id="c4", name="python", arguments='{"code": "print(1)"}'),
                    ToolCall(id="c5", name="calculator", arguments="[1, 2]"),
                ],
            ),
            ChatMessage(role="assistant", tool_calls=[ToolCall(id="c6", name="calculator", arguments='{"expression": "1 + 1"}')]),
            ChatMessage(role="assistant", content="two"),
        ]
    )
    events: list[_Event] = []
    out = await run_agent(
        agent_id="a2",
        system_prompt="",
        task="add one and one",
        llm=policy,
        registry=registry,
        tool_names=["calculator", "search"],
        max_steps=10,
        emit=events.append,
    )
    assert out.result == "two" and out.steps == 3
    tool_msgs = {m.tool_call_id: m.content or "" for m in out.messages if m.role == "tool"}
    assert "not valid JSON" in tool_msgs["c1"]
    assert "invalid arguments for calculator: expression: Field required" in tool_msgs["c2"]
    assert "tool 'teleport' is not available to this agent (allowed: calculator, search)" in tool_msgs["c3"]
    assert "tool 'python' is not available to this agent" in tool_msgs["c4"]
    assert "must be a JSON object, got list" in tool_msgs["c5"]
    assert tool_msgs["c6"] == "2"
    # Calls refused before the registry (c3, c4) never ran; c1, c2, c5 and c6 reached it and count.
    assert out.tool_calls == 4
    results = [e for e in events if isinstance(e, ToolResult)]
    assert [r.is_error for r in results] == [True, True, True, True, True, False]
    # The model saw every error before its next step.
    assert [m.tool_call_id for m in policy.seen[1] if m.role == "tool"] == ["c1", "c2", "c3", "c4", "c5"]
    assert policy.offered[0] == ["calculator", "search"]
    assert out.messages[0].role == "user"  # no system prompt given, none sent


async def test_step_cap_forces_a_final_answer(registry: ToolRegistry) -> None:
    calc = [{"tool": "calculator", "arguments": {"expression": "2 + 3"}}]
    task = script_task({"steps": [calc] * 10, "answer": "partial: {results}"})
    out = await run_agent(
        agent_id="a3", system_prompt="", task=task, llm=ScriptedTestPolicy(), registry=registry,
        tool_names=["calculator"], max_steps=3,
    )
    assert out.steps == 3 and out.tool_calls == 2 and out.hit_step_cap
    assert out.result == "partial: 5 | 5"
    assert out.messages[-2].role == "user" and out.messages[-2].content == STEP_CAP_NOTICE

    # The last call is offered no tools.
    policy = RecordingReplayTestPolicy(
        [ChatMessage(role="assistant", tool_calls=[ToolCall(id=f"c{i}", name="calculator", arguments='{"expression": "1"}')]) for i in range(2)]
        + [ChatMessage(role="assistant", content="final")]
    )
    out = await run_agent(
        agent_id="a3", system_prompt="", task="t", llm=policy, registry=registry, tool_names=["calculator"], max_steps=3
    )
    assert policy.offered == [["calculator"], ["calculator"], None]
    assert out.result == "final" and out.hit_step_cap


async def test_answering_before_the_cap_is_not_a_cap_hit(registry: ToolRegistry) -> None:
    task = script_task({"steps": [], "answer": "direct"})
    out = await run_agent(
        agent_id="a4", system_prompt="", task=task, llm=ScriptedTestPolicy(), registry=registry,
        tool_names=["calculator"], max_steps=5,
    )
    assert (out.result, out.steps, out.tool_calls, out.hit_step_cap) == ("direct", 1, 0, False)


async def test_job_tool_budget_exhaustion(registry: ToolRegistry) -> None:
    budget = {"left": 2}

    async def acquire() -> bool:
        if budget["left"] <= 0:
            return False
        budget["left"] -= 1
        return True

    calc = {"tool": "calculator", "arguments": {"expression": "1 + 1"}}
    task = script_task({"steps": [[calc, calc, calc], [calc]], "answer": "{results}"})
    events: list[_Event] = []
    out = await run_agent(
        agent_id="a5", system_prompt="", task=task, llm=ScriptedTestPolicy(), registry=registry,
        tool_names=["calculator"], max_steps=10, emit=events.append, acquire_tool_call=acquire,
    )
    assert out.tool_calls == 2 and budget["left"] == 0
    results = [e for e in events if isinstance(e, ToolResult)]
    assert [r.content for r in results] == ["2", "2", BUDGET_EXHAUSTED, BUDGET_EXHAUSTED]
    assert [r.is_error for r in results] == [False, False, True, True]
    assert out.steps == 3 and out.result == f"2 | 2 | {BUDGET_EXHAUSTED} | {BUDGET_EXHAUSTED}"


def _sandbox_pids() -> set[int]:
    pids = set()
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                cmd = Path(f"/proc/{name}/cmdline").read_bytes()
            except OSError:
                continue
            if b"swarm-py-" in cmd:
                pids.add(int(name))
    return pids


async def test_cancelling_an_agent_kills_its_python_child(registry: ToolRegistry) -> None:
    before = _sandbox_pids()
    task = script_task({"steps": [[{"tool": "python", "arguments": {"code": "import time\ntime.sleep(60)"}}]]})
    agent = asyncio.create_task(
        run_agent(
            agent_id="a6", system_prompt="", task=task, llm=ScriptedTestPolicy(), registry=registry,
            tool_names=["python"], max_steps=5,
        )
    )
    new: set[int] = set()
    for _ in range(250):
        await asyncio.sleep(0.02)
        new = _sandbox_pids() - before
        if new:
            break
    assert new, "the sandbox child never started"
    agent.cancel()
    with pytest.raises(asyncio.CancelledError):  # generous: a loaded 2-core machine is slow to reap
        await asyncio.wait_for(agent, timeout=20.0)
    assert not (_sandbox_pids() & new)


def test_builtin_registry_offers_documented_tools(registry: ToolRegistry) -> None:
    assert registry.names() == sorted(BUILTIN_TOOLS)
    assert known_tool_names(ToolsConfig()) == list(BUILTIN_TOOLS)
    for spec in registry.specs(list(BUILTIN_TOOLS)):
        fn = spec.to_openai()["function"]
        assert len(fn["description"]) > 80, spec.name
        props = fn["parameters"]["properties"]
        assert props and all(p.get("description") for p in props.values()), spec.name
        assert fn["parameters"]["required"], spec.name
    # http_get tells the model it is disabled when the allowlist is empty, and names allowed hosts otherwise.
    assert "disabled" in registry.get("http_get").description
    allowed = build_registry(ToolsConfig(http_allowlist=["example.org"]))
    assert "example.org" in allowed.get("http_get").description
