"""Job hosts: many jobs per long-lived host actor, lookup from any runtime, release, host death and
replacement, job settings sent to workers once, and the leased tool budget staying strict."""

from __future__ import annotations

import asyncio
import sys
import uuid

import pytest
import ray
import ray.cloudpickle

from swarm.events import Event, JobFinished, ToolResult
from swarm.job_host import JOB_HOST_PREFIX
from swarm.plans import JobSpec, JobState, Limits, SubAgentSpec, SwarmPlan, ToolsConfig
from swarm.runtime import JobNotFound, SwarmRuntime
from swarm.worker_pool import SubAgentRun, worker_name
from tests.scripted_policy import script_task, scripted_llm_factory
from tests.runtime_test_tools import wait_file_tool
from workers.agent_loop import BUDGET_EXHAUSTED
from workers.tools import build_registry
from workers.tools.registry import ToolRegistry

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

NAMESPACE = "agent-swarm-test-hosts"


def hosts_test_registry(config: ToolsConfig) -> ToolRegistry:
    """The built-in tools plus a `wait_file` test tool (keeps a job running until a file exists)."""
    registry = build_registry(config)
    registry.register(wait_file_tool())
    return registry


@pytest.fixture(scope="module")
def runtime(ray_local) -> SwarmRuntime:
    rt = SwarmRuntime(
        namespace=NAMESPACE, num_workers=2, num_job_hosts=2, llm_factory=scripted_llm_factory, registry_factory=hosts_test_registry
    )
    rt.warmup()
    yield rt
    rt.shutdown()


def named_actors() -> set[str]:
    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a.get("namespace") == NAMESPACE}


def gated_plan(gate: str, n: int = 1) -> SwarmPlan:
    """Agents that wait in a tool until `gate` exists (so the job stays running)."""
    step = [{"tool": "wait_file", "arguments": {"path": gate}}]
    return SwarmPlan(
        subagents=[SubAgentSpec(id=f"g{i}", task=script_task({"steps": [step], "answer": f"ok{i}"}), tools=["wait_file"]) for i in range(n)]
    )


async def follow_to_end(runtime: SwarmRuntime, job_id: str) -> list[Event]:
    events: list[Event] = []
    while not (events and isinstance(events[-1], JobFinished)):
        events += await runtime.poll_events(job_id, events[-1].seq if events else 0, 1.0)
    return events


async def test_many_jobs_share_the_hosts_and_release_is_immediate(runtime: SwarmRuntime, tmp_path) -> None:
    actors_before = named_actors()
    assert {f"{JOB_HOST_PREFIX}0", f"{JOB_HOST_PREFIX}1", worker_name(0), worker_name(1)} <= actors_before
    gate = str(tmp_path / "gate")
    ids = [f"many-{k}-{uuid.uuid4().hex[:6]}" for k in range(12)]
    for job_id in ids:
        runtime.start_job(job_id, JobSpec(plan=gated_plan(gate)))
    # Twelve running jobs, no new actor: they are objects inside the two hosts.
    assert named_actors() == actors_before
    assert set(ids) <= set(runtime.list_live_jobs())
    hosts = {runtime.host_of(j) for j in ids}
    assert hosts <= {f"{JOB_HOST_PREFIX}0", f"{JOB_HOST_PREFIX}1"}

    # A second runtime (as after a service restart) finds each job on its host.
    other = SwarmRuntime(
        namespace=NAMESPACE, num_job_hosts=2, llm_factory=scripted_llm_factory, registry_factory=hosts_test_registry, warm=False
    )
    assert all(other.has_job(j) for j in ids)
    assert {other.host_of(j) for j in ids} == hosts

    (tmp_path / "gate").touch()
    for job_id in ids:
        events = await follow_to_end(other, job_id)
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
        assert events[-1].state == JobState.succeeded, events[-1].error
    # Released at once: gone from its host on return, for every runtime.
    await runtime.release(ids[0])
    assert not runtime.has_job(ids[0]) and not other.has_job(ids[0])
    assert ids[0] not in other.list_live_jobs()
    with pytest.raises(JobNotFound):
        await other.poll_events(ids[0], 0, 0.1)
    for job_id in ids[1:]:
        await other.release(job_id)
    assert not set(ids) & set(runtime.list_live_jobs())
    await runtime.release(ids[0])  # releasing twice is a no-op


async def test_killed_host_loses_its_jobs_and_is_replaced(runtime: SwarmRuntime, tmp_path) -> None:
    gate = str(tmp_path / "gate")
    job_id = "doomed-" + uuid.uuid4().hex[:8]
    runtime.start_job(job_id, JobSpec(plan=gated_plan(gate)))
    host_name = runtime.host_of(job_id)
    events = await runtime.poll_events(job_id, 0, 1.0)
    assert events and events[0].seq == 1
    killed = ray.get_actor(host_name, namespace=NAMESPACE)
    ray.kill(killed)

    with pytest.raises(JobNotFound):  # a long poll on the dead host ends as "no such job"
        while True:
            await runtime.poll_events(job_id, events[-1].seq, 0.5)
    assert not runtime.has_job(job_id)
    assert job_id not in runtime.list_live_jobs()
    with pytest.raises(JobNotFound):
        await runtime.cancel(job_id)

    # The same job id lands on the same host index: a fresh host is started for it.
    (tmp_path / "gate").touch()
    runtime.start_job(job_id, JobSpec(plan=gated_plan(gate)))
    assert runtime.host_of(job_id) == host_name
    replacement = ray.get_actor(host_name, namespace=NAMESPACE)
    assert replacement._actor_id != killed._actor_id
    events = await follow_to_end(runtime, job_id)
    assert events[-1].state == JobState.succeeded and events[0].seq == 1
    await runtime.release(job_id)


async def test_tool_budget_stays_strict_with_leases_across_many_agents(runtime: SwarmRuntime) -> None:
    calls = [[{"tool": "calculator", "arguments": {"expression": f"{k} * 2"}}] for k in range(5)]
    plan = SwarmPlan(
        subagents=[SubAgentSpec(id=f"c{i}", task=script_task({"steps": calls}), tools=["calculator"], max_steps=10) for i in range(10)]
    )
    events: list[Event] = []
    status = await runtime.run_job(JobSpec(plan=plan, limits=Limits(max_tool_calls=17)), on_event=events.append)

    assert status.state == JobState.succeeded, status.error
    results = [e for e in events if isinstance(e, ToolResult)]
    assert len(results) == 50
    executed = [r for r in results if not r.is_error]
    assert len(executed) == 17  # exactly the budget: leased blocks never overshoot it
    assert all(r.content == BUDGET_EXHAUSTED for r in results if r.is_error)
    assert status.metrics.tool_calls == 17


async def test_unused_leases_return_so_a_later_agent_gets_the_rest(runtime: SwarmRuntime) -> None:
    # `first` uses 1 call of a budget of 20 while alone; `second` runs after it and may use 19.
    one = [[{"tool": "calculator", "arguments": {"expression": "1 + 1"}}]]
    many = [[{"tool": "calculator", "arguments": {"expression": f"{k} + 1"}}] for k in range(25)]
    plan = SwarmPlan(
        subagents=[
            SubAgentSpec(id="first", task=script_task({"steps": one}), tools=["calculator"]),
            SubAgentSpec(id="second", task=script_task({"steps": many}), tools=["calculator"], depends_on=["first"], max_steps=30),
        ]
    )
    events: list[Event] = []
    status = await runtime.run_job(JobSpec(plan=plan, limits=Limits(max_tool_calls=20)), on_event=events.append)

    assert status.state == JobState.succeeded, status.error
    ok = [e for e in events if isinstance(e, ToolResult) and not e.is_error]
    assert [e.agent_id for e in ok].count("first") == 1
    assert [e.agent_id for e in ok].count("second") == 19
    assert status.metrics.tool_calls == 20


async def test_workers_get_job_settings_once_and_drop_them_when_the_job_ends(runtime: SwarmRuntime) -> None:
    plan = SwarmPlan(subagents=[SubAgentSpec(id=f"s{i}", task=script_task({"answer": f"a{i}"})) for i in range(6)])
    job_id = "settings-" + uuid.uuid4().hex[:8]
    status = await runtime.run_job(JobSpec(plan=plan), job_id=job_id)
    assert status.state == JobState.succeeded
    workers = [ray.get_actor(worker_name(i), namespace=NAMESPACE) for i in range(2)]

    async def open_anywhere() -> bool:
        return any([job_id in await w.open_jobs.remote() for w in workers])

    for _ in range(100):  # close_job is sent without waiting for it
        if not await open_anywhere():
            break
        await asyncio.sleep(0.05)
    assert not await open_anywhere()

    # A run for a job the worker does not hold asks to be opened first instead of running blind.
    run = SubAgentRun(job_id=job_id, instance="gone", token="x#1", spec=plan.subagents[0], task_message="t", max_steps=2, tool_timeout_s=5)
    res = await workers[0].run_subagent.remote(run)
    assert res.needs_open and not res.ok


def test_bad_host_count_is_rejected(ray_local) -> None:
    with pytest.raises(ValueError, match="num_job_hosts must be >= 1, got 0"):
        SwarmRuntime(namespace=NAMESPACE, num_job_hosts=0, llm_factory=scripted_llm_factory)
