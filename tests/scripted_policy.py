"""ScriptedTestPolicy: a test double for the LLM, driven by a JSON script embedded in the task text.

Lives in tests/ only; never a default anywhere. It lets runtime tests say exactly which tool calls
an agent makes, so the runtime's behaviour (parallelism, retries, budgets, cancellation) is what is
being tested. The script is the JSON object between `<<script` and `>>` in the last user message:

  {"steps": [[{"tool": "sleep", "arguments": {"seconds": 0.02}}], ...],   # tool calls per step
   "answer": "text",            # final answer; "{results}" is replaced by the tool results joined
   "think_s": 0.0,              # simulated model latency per call
   "fail_once_file": "/tmp/x",  # raise LLMError on the first call if this file does not exist yet
   "fail_always": false}

Orchestrator scripts (the agent is offered create_subagent/assign_task) use "orchestrate": a list of
stages; each stage is a list of {"agent", "task", "system_prompt"?, "depends_on"?} and becomes one
orchestrator step issuing create_subagent for new agents and assign_task for each entry, all in one
assistant message. After the last stage the orchestrator answers with the tool results joined.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
from typing import Any

from swarm.llm import ChatMessage, ChatResult, LLMError, ToolCall, ToolSpec, Usage

_START = "<<script"


def parse_script(text: str) -> dict[str, Any]:
    # Parsed once per distinct task text (the same script is read at every step of an agent);
    # the result is shared: read it, never change it.
    return _parse_script(text)


@functools.lru_cache(maxsize=4096)
def _parse_script(text: str) -> dict[str, Any]:
    i = text.find(_START)
    if i < 0:
        return {}
    j = text.rfind(">>")
    return json.loads(text[i + len(_START) : j])


def script_task(script: dict[str, Any], prefix: str = "scripted task") -> str:
    return f"{prefix} {_START}{json.dumps(script)}>>"


class ScriptedTestPolicy:
    def __init__(self, default_think_s: float = 0.0) -> None:
        self.default_think_s = default_think_s

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
        user = next(m.content or "" for m in messages if m.role == "user")
        script = parse_script(user)
        think_s = float(script.get("think_s", self.default_think_s))
        if think_s > 0:
            await asyncio.sleep(think_s)
        if script.get("fail_always"):
            raise LLMError("scripted failure (fail_always)")
        marker = script.get("fail_once_file")
        if marker and not os.path.exists(marker):
            open(marker, "w").close()
            raise LLMError("scripted failure (fail_once_file)")
        step = sum(1 for m in messages if m.role == "assistant")
        tool_names = {t.name for t in tools or []}
        results = [m.content or "" for m in messages if m.role == "tool"]
        # About 4 characters a token: cheap, and grows with the conversation as real usage does.
        usage = Usage(prompt_tokens=sum(len(m.content or "") for m in messages) // 4 + 1, completion_tokens=5)

        calls: list[dict[str, Any]] = []
        if "orchestrate" in script and "assign_task" in tool_names:
            stages = script["orchestrate"]
            if step < len(stages):
                created = {
                    json.loads(c.arguments).get("name")
                    for m in messages
                    if m.role == "assistant"
                    for c in m.tool_calls or []
                    if c.name == "create_subagent"
                }
                for entry in stages[step]:
                    if entry["agent"] not in created:
                        calls.append(
                            {
                                "tool": "create_subagent",
                                "arguments": {"name": entry["agent"], "system_prompt": entry.get("system_prompt", "")},
                            }
                        )
                        created.add(entry["agent"])
                for entry in stages[step]:
                    calls.append(
                        {
                            "tool": "assign_task",
                            "arguments": {
                                "agent": entry["agent"],
                                "task": entry["task"],
                                "depends_on": entry.get("depends_on", []),
                            },
                        }
                    )
        elif tools:
            steps = script.get("steps", [])
            if step < len(steps):
                calls = steps[step]
        if calls:
            tcs = [
                ToolCall(id=f"call_{step}_{k}", name=c["tool"], arguments=json.dumps(c.get("arguments", {})))
                for k, c in enumerate(calls)
            ]
            return ChatResult(
                message=ChatMessage(role="assistant", content=None, reasoning_content=f"step {step}", tool_calls=tcs),
                finish_reason="tool_calls",
                usage=usage,
            )
        answer = str(script.get("answer", "{results}")).replace("{results}", " | ".join(results))
        return ChatResult(
            message=ChatMessage(role="assistant", content=answer, reasoning_content="done"),
            finish_reason="stop",
            usage=usage,
        )


def scripted_llm_factory(config: Any) -> ScriptedTestPolicy:
    """An `llm_factory` for the runtime: ignores the job's LLMConfig and returns the test double."""
    return ScriptedTestPolicy()
