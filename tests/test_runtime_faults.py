"""SwarmRuntime under faults: retries, final failure, tool budget, job timeout, cancellation, dead workers."""

from __future__ import annotations

import asyncio
import os
import re
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest
import ray
import ray.cloudpickle

from swarm.events import (
    Event,
    JobFinished,
    SubAgentCancelled,
    SubAgentFailed,
    SubAgentFinished,
    SubAgentRetried,
    SubAgentStarted,
    ToolCalled,
    ToolResult,
)
from swarm.plans import JobSpec, JobState, Limits, SubAgentSpec, SwarmPlan, ToolsConfig
from swarm.runtime import SwarmRuntime
from tests.scripted_policy import script_task, scripted_llm_factory
from tests.runtime_test_tools import wait_file_tool
from workers.agent_loop import BUDGET_EXHAUSTED
from workers.tools import build_registry
from workers.tools.registry import ToolRegistry

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

NAMESPACE = "agent-swarm-test-runtime"


def faults_test_registry(config: ToolsConfig) -> ToolRegistry:
    """The real built-in tools (python sandbox, calculator, ...) plus a `wait_file` test tool."""
    registry = build_registry(config)
    registry.register(wait_file_tool())
    return registry


@pytest.fixture(scope="module")
def runtime(ray_local) -> SwarmRuntime:
    rt = SwarmRuntime(
        namespace=NAMESPACE, num_workers=2, llm_factory=scripted_llm_factory, registry_factory=faults_test_registry
    )
    yield rt
    rt.shutdown()


def fast_retries(**kw: Any) -> Limits:
    return Limits(retry_backoff_s=0.01, **kw)


def of(events: list[Event], cls: type, agent_id: str | None = None) -> list[Any]:
    return [e for e in events if isinstance(e, cls) and (agent_id is None or e.agent_id == agent_id)]


def waiter(agent_id: str, path: str, answer: str = "done") -> SubAgentSpec:
    return SubAgentSpec(
        id=agent_id,
        task=script_task({"steps": [[{"tool": "wait_file", "arguments": {"path": path}}]], "answer": answer}),
        tools=["wait_file"],
    )


async def follow(runtime: SwarmRuntime, job_id: str, events: list[Event], until: Any, deadline_s: float = 60.0) -> None:
    """Poll the job's events into `events` until `until(events)` holds."""
    end = time.monotonic() + deadline_s
    while not until(events):
        assert time.monotonic() < end, f"condition not reached; last events: {events[-5:]}"
        events += await runtime.poll_events(job_id, events[-1].seq if events else 0, 0.5)


def finished(events: list[Event]) -> bool:
    return bool(events) and isinstance(events[-1], JobFinished)


async def test_failed_subagent_is_retried_with_backoff(runtime: SwarmRuntime, tmp_path: Path) -> None:
    marker = str(tmp_path / "failed-once")
    plan = SwarmPlan(subagents=[SubAgentSpec(id="flaky", task=script_task({"fail_once_file": marker, "answer": "ok now"}))])
    events: list[Event] = []
    status = await runtime.run_job(JobSpec(plan=plan, limits=fast_retries()), on_event=events.append)

    assert status.state == JobState.succeeded, status.error
    assert status.result == "## flaky\nok now"
    (failed,) = of(events, SubAgentFailed)
    assert failed.will_retry and failed.attempt == 1 and "scripted failure" in failed.error
    (retried,) = of(events, SubAgentRetried)
    assert retried.attempt == 2 and retried.delay_s == pytest.approx(0.01)
    assert [e.attempt for e in of(events, SubAgentStarted)] == [1, 2]
    assert failed.seq < retried.seq < of(events, SubAgentStarted)[1].seq < of(events, SubAgentFinished)[0].seq
    assert status.metrics.retries == 1


async def test_final_failure_fails_the_job_naming_the_agent(runtime: SwarmRuntime, tmp_path: Path) -> None:
    plan = SwarmPlan(
        subagents=[
            SubAgentSpec(id="broken", task=script_task({"fail_always": True})),
            waiter("bystander", str(tmp_path / "never")),
        ]
    )
    events: list[Event] = []
    status = await runtime.run_job(JobSpec(plan=plan, limits=fast_retries(max_retries=2)), on_event=events.append)

    assert status.state == JobState.failed
    assert "'broken'" in (status.error or "") and "scripted failure (fail_always)" in (status.error or "")
    fails = of(events, SubAgentFailed, "broken")
    assert [(f.attempt, f.will_retry) for f in fails] == [(1, True), (2, True), (3, False)]
    assert [r.delay_s for r in of(events, SubAgentRetried, "broken")] == pytest.approx([0.01, 0.02])
    # The rest of the job is stopped, and says so.
    assert len(of(events, SubAgentCancelled, "bystander")) == 1
    assert isinstance(events[-1], JobFinished)


async def test_tool_budget_is_shared_by_all_agents(runtime: SwarmRuntime) -> None:
    calls = [{"tool": "calculator", "arguments": {"expression": f"{k} + 1"}} for k in range(3)]
    plan = SwarmPlan(
        subagents=[SubAgentSpec(id=f"c{i}", task=script_task({"steps": [calls]}), tools=["calculator"]) for i in range(2)]
    )
    events: list[Event] = []
    status = await runtime.run_job(JobSpec(plan=plan, limits=Limits(max_tool_calls=4)), on_event=events.append)

    assert status.state == JobState.succeeded, status.error
    results = of(events, ToolResult)
    assert len(results) == 6
    assert sum(not r.is_error for r in results) == 4
    assert [r.content for r in results if r.is_error] == [BUDGET_EXHAUSTED] * 2
    assert status.metrics.tool_calls == 4


async def test_job_timeout_fails_the_job_and_stops_its_agents(runtime: SwarmRuntime, tmp_path: Path) -> None:
    plan = SwarmPlan(subagents=[waiter("stuck", str(tmp_path / "never"))])
    events: list[Event] = []
    status = await runtime.run_job(JobSpec(plan=plan, limits=Limits(job_timeout_s=2)), on_event=events.append)

    assert status.state == JobState.failed
    assert status.error == "job timed out after 2 s (limits.job_timeout_s)"
    assert len(of(events, SubAgentCancelled, "stuck")) == 1
    assert not of(events, SubAgentFinished)


def _sandbox_children(marker: str) -> list[int]:
    """Pids of python-tool children whose program contains `marker` (found through /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
            cfg = next((orjson.loads(a) for a in args if a.startswith(b"{") and b"code_file" in a), None)
            if cfg and marker in Path(cfg["code_file"]).read_text():
                pids.append(int(entry.name))
        except (OSError, ValueError):
            continue
    return pids


async def test_cancel_stops_running_tools_promptly(runtime: SwarmRuntime, tmp_path: Path) -> None:
    marker = "cancel-marker-" + uuid.uuid4().hex
    code = f"# {marker}\nimport time\ntime.sleep(60)\nprint('slept')"
    plan = SwarmPlan(
        subagents=[
            SubAgentSpec(id="sleeper", task=script_task({"steps": [[{"tool": "python", "arguments": {"code": code}}]]}), tools=["python"]),
            waiter("waiter", str(tmp_path / "never")),
        ]
    )
    spec = JobSpec(plan=plan, tools=ToolsConfig(python_timeout_s=120), limits=Limits(tool_timeout_s=120))
    job_id = "cancel-" + uuid.uuid4().hex[:8]
    runtime.start_job(job_id, spec)
    events: list[Event] = []
    await follow(runtime, job_id, events, lambda ev: len(of(ev, ToolCalled)) == 2)
    end = time.monotonic() + 30
    while not (pids := _sandbox_children(marker)):
        assert time.monotonic() < end, "the python tool's child process never started"
        await asyncio.sleep(0.1)

    t0 = time.monotonic()
    await runtime.cancel(job_id)
    await follow(runtime, job_id, events, finished)
    cancel_s = time.monotonic() - t0
    assert events[-1].state == JobState.cancelled
    assert {e.agent_id for e in of(events, SubAgentCancelled)} == {"sleeper", "waiter"}
    assert not of(events, ToolResult)  # neither tool ran to its end
    assert cancel_s < 30  # far below the 60 s the child would have slept
    end = time.monotonic() + 5
    while any(os.path.exists(f"/proc/{p}") for p in pids):
        assert time.monotonic() < end, f"python tool child {pids} still alive after cancel"
        await asyncio.sleep(0.05)
    await runtime.release(job_id)
    assert not runtime.has_job(job_id)


async def test_killed_worker_reruns_its_agents_elsewhere(runtime: SwarmRuntime, tmp_path: Path) -> None:
    gate = str(tmp_path / "gate")
    plan = SwarmPlan(subagents=[waiter(f"w{i}", gate, answer=f"done-{i}") for i in range(6)])
    job_id = "kill-" + uuid.uuid4().hex[:8]
    runtime.start_job(job_id, JobSpec(plan=plan))
    events: list[Event] = []
    # Every agent is inside its tool call, on one of the two workers.
    await follow(runtime, job_id, events, lambda ev: len(of(ev, ToolCalled)) == 6)
    where = {e.agent_id: e.worker for e in of(events, SubAgentStarted)}
    victim = sorted(set(where.values()))[0]
    doomed = {a for a, w in where.items() if w == victim}
    assert doomed
    killed = ray.get_actor(victim, namespace=NAMESPACE)
    ray.kill(killed)
    await follow(runtime, job_id, events, lambda ev: {r.agent_id for r in of(ev, SubAgentRetried)} == doomed)
    Path(gate).touch()
    await follow(runtime, job_id, events, finished)

    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    final = events[-1]
    assert final.state == JobState.succeeded, final.error
    assert {e.agent_id: e.result for e in of(events, SubAgentFinished)} == {f"w{i}": f"done-{i}" for i in range(6)}
    for agent in doomed:
        (retried,) = of(events, SubAgentRetried, agent)
        assert re.search(rf"worker {victim} died", retried.reason)
        starts = of(events, SubAgentStarted, agent)
        assert [s.attempt for s in starts] == [1, 2]
        # The first attempt's events (its tool call) were kept; the re-run follows the retry.
        assert of(events, ToolCalled, agent)[0].seq < retried.seq < starts[1].seq
    assert not of(events, SubAgentFailed)  # a dead worker is not the agent's failure
    assert final.metrics.retries == len(doomed) and final.metrics.subagents == 6
    # The pool replaced the dead worker under the same name.
    replacement = ray.get_actor(victim, namespace=NAMESPACE)
    assert replacement._actor_id != killed._actor_id
    assert await replacement.ping.remote() == victim
    await runtime.release(job_id)
