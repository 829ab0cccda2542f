"""SwarmRuntime in orchestrator mode (K2.5): the DAG grows through create_subagent / assign_task."""

from __future__ import annotations

import asyncio
import sys
import uuid
from typing import Any

import pytest
import networkx as nx
import orjson
import ray.cloudpickle

from swarm.events import (
    ORCHESTRATOR_ID,
    Event,
    JobFinished,
    SubAgentCancelled,
    SubAgentCreated,
    SubAgentFinished,
    SubAgentStep,
    ToolCalled,
    ToolResult,
)
from swarm.llm import ChatMessage, ChatResult, ToolCall
from swarm.orchestrator import Orchestrator, SubAgentOutcome, orchestrator_system_prompt, orchestrator_tools
from swarm.plans import JobSpec, JobState, Limits, LLMConfig, SubAgentSpec, ToolsConfig
from swarm.runtime import SwarmRuntime
from tests.scripted_policy import script_task
from tests.runtime_test_tools import block_tool, echo_llm_factory, echo_tool
from workers.tools.registry import ToolRegistry

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

NAMESPACE = "agent-swarm-test-runtime"


def orchestrator_test_registry(config: ToolsConfig) -> ToolRegistry:
    """Test-only registry: `echo` (its output marks a sub-agent's trace) and `block` (never returns)."""
    return ToolRegistry([echo_tool(), block_tool()])


@pytest.fixture(scope="module")
def runtime(ray_local) -> SwarmRuntime:
    rt = SwarmRuntime(
        namespace=NAMESPACE, num_workers=2, llm_factory=echo_llm_factory, registry_factory=orchestrator_test_registry
    )
    yield rt
    rt.shutdown()


def orch_results(events: list[Event]) -> list[str]:
    """The orchestrator's tool results in the order of its calls: exactly what its model was shown."""
    mine = [e for e in events if getattr(e, "agent_id", None) == ORCHESTRATOR_ID]
    results = {(e.step, e.call_id): e.content for e in mine if isinstance(e, ToolResult)}
    calls = [(e.step, e.call_id) for e in mine if isinstance(e, ToolCalled)]
    assert set(calls) == set(results)  # every call got exactly one result
    return [results[c] for c in calls]


async def test_dag_grows_over_steps_and_orchestrator_sees_only_final_results(runtime: SwarmRuntime) -> None:
    secret = "TRACE-SECRET-7731"
    finder_task = script_task({"steps": [[{"tool": "echo", "arguments": {"text": secret}}]], "answer": "fact-one"})
    task = script_task(
        {
            "orchestrate": [
                [
                    {"agent": "finder", "task": finder_task, "system_prompt": "You find facts."},
                    {"agent": "finder", "task": script_task({"answer": "fact-two"})},
                ],
                [{"agent": "writer", "task": script_task({"echo_task": True}), "depends_on": ["finder-1", "finder-2"]}],
                [{"agent": "writer", "task": script_task({"answer": "polished"}), "depends_on": ["writer"]}],
            ]
        },
        prefix="research and write",
    )
    events: list[Event] = []
    status = await runtime.run_job(JobSpec(task=task, subagent_tools=["echo"]), on_event=events.append)

    assert status.state == JobState.succeeded, status.error
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    created = {e.agent_id: e for e in events if isinstance(e, SubAgentCreated)}
    assert list(created) == ["finder-1", "finder-2", "writer-1", "writer-2"]
    assert [created[i].stage for i in created] == [1, 1, 2, 3]
    assert created["finder-1"].system_prompt == "You find facts." and created["finder-1"].tools == ["echo"]
    assert created["writer-1"].depends_on == ["finder-1", "finder-2"]
    assert created["writer-2"].depends_on == ["writer-1"]  # an agent name stands for its assignments

    # The sub-agent really used its tool, but its trace never reaches the orchestrator.
    assert any(isinstance(e, ToolResult) and e.agent_id == "finder-1" and e.content == secret for e in events)
    shown = orch_results(events)
    assert not any(secret in text for text in shown)
    assert secret not in (status.result or "")
    assert "[finder-1] final answer:\nfact-one" in shown
    # writer-1 received both dependencies' final results, labelled.
    writer1 = next(e.result for e in events if isinstance(e, SubAgentFinished) and e.agent_id == "writer-1")
    assert "### Result of finder-1 (finder)\nfact-one" in writer1 and "### Result of finder-2 (finder)\nfact-two" in writer1
    assert "polished" in (status.result or "")

    orch_steps = [e for e in events if isinstance(e, SubAgentStep) and e.agent_id == ORCHESTRATOR_ID]
    assert len(orch_steps) == 4  # three stages, then the answer
    m = status.metrics
    assert (m.orchestrator_steps, m.subagents, m.tool_calls) == (4, 4, 1)
    assert m.total_steps == 4 + 2 + 1 + 1 + 1
    assert m.critical_steps == 4 + 2 + 1 + 1  # each stage adds its longest chain
    # Two assignments of step 1 were issued in the same step and ran concurrently.
    calls_step1 = [e for e in events if isinstance(e, ToolCalled) and e.agent_id == ORCHESTRATOR_ID and e.step == 1]
    assert [c.tool for c in calls_step1] == ["create_subagent", "assign_task", "assign_task"]


async def test_invalid_assignments_return_errors_and_the_job_goes_on(runtime: SwarmRuntime) -> None:
    task = script_task(
        {
            "orchestrate": [
                [
                    {"agent": "w", "task": script_task({"answer": "first"})},
                    {"agent": "w", "task": script_task({"answer": "never"}), "depends_on": ["nope"]},
                    {"agent": "w", "task": script_task({"answer": "second"})},
                    {"agent": "w", "task": script_task({"answer": "third"})},
                ]
            ]
        }
    )
    spec = JobSpec(task=task, subagent_tools=["echo"], limits=Limits(max_subagents=2))
    bad_tool = JobSpec(task=script_task({"orchestrate": [[{"agent": "v", "task": "x"}]]}), subagent_tools=["no_such_tool"])
    events: list[Event] = []
    events2: list[Event] = []
    status, status2 = await asyncio.gather(
        runtime.run_job(spec, on_event=events.append), runtime.run_job(bad_tool, on_event=events2.append)
    )

    assert status.state == JobState.succeeded, status.error
    shown = orch_results(events)
    assert shown[0].startswith("created sub-agent 'w'")
    assert shown[1] == "[w-1] final answer:\nfirst"
    assert shown[2].startswith("error: assign_task rejected, nothing was started:") and "unknown agent 'nope'" in shown[2]
    assert shown[3] == "[w-2] final answer:\nsecond"
    assert shown[4].startswith("error: assign_task rejected, nothing was started:") and "max_subagents=2" in shown[4]
    assert status.metrics.subagents == 2
    assert [e.agent_id for e in events if isinstance(e, SubAgentCreated)] == ["w-1", "w-2"]

    assert status2.state == JobState.succeeded, status2.error
    shown2 = orch_results(events2)
    assert "unknown tool 'no_such_tool'" in shown2[1] and shown2[1].startswith("error:")
    assert status2.metrics.subagents == 0


async def test_failed_subagent_comes_back_as_a_tool_result(runtime: SwarmRuntime) -> None:
    task = script_task({"orchestrate": [[{"agent": "f", "task": script_task({"fail_always": True})}]]})
    spec = JobSpec(task=task, subagent_tools=[], limits=Limits(max_retries=1, retry_backoff_s=0.01))
    events: list[Event] = []
    status = await runtime.run_job(spec, on_event=events.append)
    assert status.state == JobState.succeeded, status.error
    shown = orch_results(events)
    assert shown[1].startswith("error: [f-1] failed after 2 attempt(s): LLMError: scripted failure")
    assert status.metrics.retries == 1


async def test_step_cap_withdraws_tools_on_the_last_step(runtime: SwarmRuntime) -> None:
    stage = lambda n: [{"agent": f"s{n}", "task": script_task({"answer": f"r{n}"})}]  # noqa: E731
    task = script_task({"orchestrate": [stage(1), stage(2), stage(3)]})
    events: list[Event] = []
    status = await runtime.run_job(
        JobSpec(task=task, subagent_tools=[], limits=Limits(orchestrator_max_steps=2)), on_event=events.append
    )
    assert status.state == JobState.succeeded, status.error
    assert status.metrics.orchestrator_steps == 2 and status.metrics.subagents == 1
    assert status.result == "created sub-agent 's1'; give it work with assign_task(agent='s1', task=...) | [s1-1] final answer:\nr1"
    assert isinstance(events[-1], JobFinished)


def test_system_prompt_and_tools_describe_the_swarm() -> None:
    spec = JobSpec(task="t", subagent_tools=["search", "python"], orchestrator_prompt="Answer in French.",
                   limits=Limits(max_subagents=42, orchestrator_max_steps=9))
    prompt = orchestrator_system_prompt(spec)
    for needle in ("create_subagent", "assign_task", "same time", "only each sub-agent's final answer",
                   "search, python", "42 task assignments", "9 steps", "Answer in French."):
        assert needle in prompt, needle
    names = [t.name for t in orchestrator_tools()]
    assert names == ["create_subagent", "assign_task"]
    assign = orchestrator_tools()[1].parameters
    assert set(assign["properties"]) == {"agent", "task", "depends_on"} and set(assign["required"]) == {"agent", "task"}


async def test_cancel_in_orchestrator_mode_stops_agents_and_orchestrator(runtime: SwarmRuntime) -> None:
    blocked = script_task({"steps": [[{"tool": "block", "arguments": {"text": "x"}}]]})
    task = script_task({"orchestrate": [[{"agent": "b", "task": blocked}, {"agent": "b", "task": blocked}]]})
    job_id = "orch-cancel-" + uuid.uuid4().hex[:8]
    runtime.start_job(job_id, JobSpec(task=task, subagent_tools=["block"]))
    events: list[Event] = []
    while sum(isinstance(e, ToolCalled) and e.tool == "block" for e in events) < 2:
        events += await runtime.poll_events(job_id, events[-1].seq if events else 0, 0.5)
    await runtime.cancel(job_id)
    while not isinstance(events[-1], JobFinished):
        events += await runtime.poll_events(job_id, events[-1].seq, 0.5)
    assert events[-1].state == JobState.cancelled
    cancelled = [e.agent_id for e in events if isinstance(e, SubAgentCancelled)]
    assert sorted(cancelled) == ["b-1", "b-2", ORCHESTRATOR_ID]
    assert events[-1].metrics.orchestrator_steps == 1 and events[-1].metrics.tool_calls == 2
    await runtime.release(job_id)


def broken_llm_factory(config: Any) -> Any:
    raise ValueError(f"no endpoint configured for model {config.model!r}")


async def test_unbuildable_model_client_fails_the_job_clearly(ray_local) -> None:
    rt = SwarmRuntime(namespace=NAMESPACE, llm_factory=broken_llm_factory, registry_factory=orchestrator_test_registry)
    spec = JobSpec(task="anything", llm=LLMConfig(model="kimi-x", api_key="sk-very-secret"))
    events: list[Event] = []
    status = await rt.run_job(spec, on_event=events.append)
    assert status.state == JobState.failed
    assert status.error == "cannot build the model client: ValueError: no endpoint configured for model 'kimi-x'"
    assert events[0].spec["llm"]["api_key"] == "***"  # events are stored and served: no secrets
    assert [type(e).__name__ for e in events if getattr(e, "agent_id", None) == ORCHESTRATOR_ID] == [
        "SubAgentStarted",
        "SubAgentFailed",
    ]
    assert not any("sk-very-secret" in e.model_dump_json() for e in events)
    rt.shutdown()


# ---- the orchestrator's tool handling, without Ray ------------------------------------------------


class ToolCallsTestPolicy:
    """Test double LLM: returns the given raw tool calls, one list per step, then a final answer."""

    def __init__(self, steps: list[list[tuple[str, str]]]) -> None:
        self.steps = steps
        self.seen: list[list[ChatMessage]] = []

    async def chat(self, messages: list[ChatMessage], tools: Any = None, **kwargs: Any) -> ChatResult:
        self.seen.append(list(messages))
        step = sum(m.role == "assistant" for m in messages)
        if tools and step < len(self.steps):
            calls = [ToolCall(id=f"c{step}_{k}", name=n, arguments=a) for k, (n, a) in enumerate(self.steps[step])]
            return ChatResult(message=ChatMessage(role="assistant", tool_calls=calls), finish_reason="tool_calls")
        return ChatResult(message=ChatMessage(role="assistant", content="final"))


class SwarmHostTestDouble:
    """Test double of the job (swarm.job_host.Job) the orchestrator runs in: records launched nodes and completes them at once."""

    def __init__(self, budget: int = 100) -> None:
        self.graph = nx.DiGraph()
        self.events: list[Any] = []
        self.launched: list[tuple[SubAgentSpec, int]] = []
        self.budget = budget

    def emit(self, event: Any) -> None:
        self.events.append(event)

    def launch(self, spec: SubAgentSpec, stage: int) -> asyncio.Future[SubAgentOutcome]:
        self.graph.add_node(spec.id, spec=spec)
        self.launched.append((spec, stage))
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(SubAgentOutcome(True, f"answer of {spec.id}"))
        return fut

    def tool_budget_left(self) -> int:
        return self.budget


def _args(**kw: Any) -> str:
    return orjson.dumps(kw).decode()


async def test_orchestrator_tool_errors_are_clear_tool_results() -> None:
    policy = ToolCallsTestPolicy(
        [
            [
                ("create_subagent", "{not json"),
                ("create_subagent", _args(name="bad name!")),
                ("assign_task", _args(agent="r", task="early")),  # creates of a step come first
                ("create_subagent", _args(name="r", system_prompt="You research.")),
                ("create_subagent", _args(name="r")),
                ("assign_task", _args(agent="ghost", task="t")),
                ("assign_task", _args(agent="r", task="")),
                ("browse", _args(url="x")),
            ],
            [("assign_task", _args(agent="r", task="second", depends_on=["r", "r-1"]))],
        ]
    )
    host = SwarmHostTestDouble()
    spec = JobSpec(task="do it", subagent_tools=["echo"])
    out = await Orchestrator(spec, policy, host, known_tools={"echo"}).run()

    assert out.answer == "final" and out.steps == 3
    results = [m.content or "" for m in policy.seen[1] if m.role == "tool"]
    assert results[0].startswith("error: arguments of create_subagent are not valid JSON")
    assert results[1].startswith("error: invalid sub-agent name 'bad name!'")
    assert results[2] == "[r-1] final answer:\nanswer of r-1"
    assert results[3].startswith("created sub-agent 'r'")
    assert results[4].startswith("error: a sub-agent named 'r' already exists")
    assert results[5].startswith("error: unknown sub-agent 'ghost'") and "created: r" in results[5]
    assert results[6].startswith("error: invalid arguments for assign_task: task:")
    assert results[7].startswith("error: unknown tool 'browse'")
    (second,) = [m.content for m in policy.seen[2] if m.role == "tool" and m.tool_call_id == "c1_0"]
    assert second == "[r-2] final answer:\nanswer of r-2"
    specs = {s.id: (s, stage) for s, stage in host.launched}
    assert specs["r-1"][0].system_prompt == "You research." and specs["r-1"][1] == 1
    assert specs["r-2"][0].depends_on == ["r-1"] and specs["r-2"][1] == 2  # agent name and id, deduplicated
    assert policy.seen[0][0].role == "system" and "assign_task" in (policy.seen[0][0].content or "")


async def test_orchestrator_refuses_new_agents_when_the_tool_budget_is_spent() -> None:
    policy = ToolCallsTestPolicy([[("create_subagent", _args(name="a")), ("assign_task", _args(agent="a", task="t"))]])
    host = SwarmHostTestDouble(budget=0)
    await Orchestrator(JobSpec(task="x", subagent_tools=["echo"], limits=Limits(max_tool_calls=7)), policy, host, {"echo"}).run()
    results = [m.content or "" for m in policy.seen[1] if m.role == "tool"]
    assert results[1].startswith("error: the job's tool-call budget (7 calls) is spent")
    assert host.launched == []
