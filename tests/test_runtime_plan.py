"""SwarmRuntime in plan mode on a real local Ray cluster: scale, dependencies, eager start, aggregation."""

from __future__ import annotations

import sys
import uuid
from typing import Any

import pytest
import ray
import ray.cloudpickle

from swarm.dag import PlanValidationError
from swarm.events import (
    Event,
    JobFinished,
    JobSubmitted,
    SubAgentCreated,
    SubAgentFinished,
    SubAgentStarted,
    ToolResult,
)
from swarm.plans import ForEach, ForRange, JobSpec, JobState, Limits, LLMConfig, SubAgentSpec, SwarmPlan, ToolsConfig
from swarm.row_filter import RowFilter
from swarm.runtime import JobNotFound, SwarmRuntime
from tests.scripted_policy import script_task
from tests.runtime_test_tools import echo_llm_factory, touch_tool, wait_file_tool
from workers.tools.calculator import make_calculator_tool
from workers.tools.registry import ToolRegistry

# Functions and classes of this module travel to Ray workers by value (workers need not import tests/).
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

NAMESPACE = "agent-swarm-test-runtime"


def runtime_test_registry(config: ToolsConfig) -> ToolRegistry:
    """Test-only registry: the real calculator plus `wait_file` and `touch` test tools."""
    return ToolRegistry([make_calculator_tool(), wait_file_tool(), touch_tool()])


@pytest.fixture(scope="module")
def runtime(ray_local) -> SwarmRuntime:
    rt = SwarmRuntime(
        namespace=NAMESPACE, num_workers=2, llm_factory=echo_llm_factory, registry_factory=runtime_test_registry
    )
    yield rt
    rt.shutdown()


def assert_dense(events: list[Event]) -> None:
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert isinstance(events[0], JobSubmitted)
    assert isinstance(events[-1], JobFinished)
    assert sum(isinstance(e, JobFinished) for e in events) == 1


def first(events: list[Event], cls: type, agent_id: str) -> Any:
    return next(e for e in events if isinstance(e, cls) and getattr(e, "agent_id", None) == agent_id)


async def test_plan_of_100_subagents_with_tool_calls(runtime: SwarmRuntime) -> None:
    agents = [
        SubAgentSpec(
            id=f"a{i}",
            task=script_task(
                {
                    "steps": [
                        [
                            {"tool": "calculator", "arguments": {"expression": f"{i} * 1000 + 7"}},
                            {"tool": "calculator", "arguments": {"expression": "2 ** 10"}},
                        ]
                    ],
                    "answer": "got {results}",
                }
            ),
            tools=["calculator"],
        )
        for i in range(100)
    ]
    spec = JobSpec(name="hundred", plan=SwarmPlan(subagents=agents))
    events: list[Event] = []
    status = await runtime.run_job(spec, on_event=events.append)

    assert status.state == JobState.succeeded, status.error
    assert_dense(events)
    finished = {e.agent_id: e for e in events if isinstance(e, SubAgentFinished)}
    assert set(finished) == {f"a{i}" for i in range(100)}
    for i in range(100):
        assert finished[f"a{i}"].result == f"got {i * 1000 + 7} | 1024"
        assert f"## a{i}\ngot {i * 1000 + 7} | 1024" in (status.result or "")
    m = status.metrics
    assert (m.subagents, m.tool_calls, m.total_steps, m.orchestrator_steps) == (100, 200, 200, 0)
    assert m.critical_steps == 2  # all parallel: the longest agent took 2 model calls
    assert m.retries == 0 and m.completion_tokens == 5 * 200
    assert sum(isinstance(e, ToolResult) and not e.is_error for e in events) == 200
    assert not runtime.has_job(status.id)  # run_job released the actor


async def test_dependencies_get_results_and_nodes_start_eagerly(runtime: SwarmRuntime, tmp_path) -> None:
    flag = str(tmp_path / "flag")
    plan = SwarmPlan(
        subagents=[
            # `slow` can only finish after `c` ran; c depends on b, b on a. With a stage barrier
            # (b waits for all of a's stage, including slow) this job could never finish.
            SubAgentSpec(
                id="slow",
                task=script_task({"steps": [[{"tool": "wait_file", "arguments": {"path": flag}}]], "answer": "slow done"}),
                tools=["wait_file"],
            ),
            SubAgentSpec(id="a", name="alpha", task=script_task({"answer": "alpha-result-42"})),
            SubAgentSpec(id="b", task=script_task({"echo_task": True}), depends_on=["a"]),
            SubAgentSpec(
                id="c",
                task=script_task({"steps": [[{"tool": "touch", "arguments": {"path": flag}}]], "answer": "c done"}),
                tools=["touch"],
                depends_on=["b"],
            ),
            SubAgentSpec(id="join", task=script_task({"echo_task": True}), depends_on=["slow", "c"]),
        ]
    )
    spec = JobSpec(plan=plan, limits=Limits(job_timeout_s=120))
    events: list[Event] = []
    status = await runtime.run_job(spec, on_event=events.append)

    assert status.state == JobState.succeeded, status.error
    assert_dense(events)
    # Eager start: c started (and so b and a finished) while slow was still running.
    assert first(events, SubAgentStarted, "c").seq < first(events, SubAgentFinished, "slow").seq
    for dep, node in [("a", "b"), ("b", "c"), ("slow", "join"), ("c", "join")]:
        assert first(events, SubAgentFinished, dep).seq < first(events, SubAgentStarted, node).seq
    b_result = first(events, SubAgentFinished, "b").result
    assert "### Result of a (alpha)\nalpha-result-42" in b_result
    join_result = first(events, SubAgentFinished, "join").result
    assert "### Result of slow\nslow done" in join_result and "### Result of c\nc done" in join_result
    assert "alpha-result-42" not in join_result  # only direct dependencies are passed on
    created = {e.agent_id: e for e in events if isinstance(e, SubAgentCreated)}
    assert created["join"].depends_on == ["slow", "c"] and created["join"].stage == 1
    # chain a -> b -> c -> join: 1 + 1 + 2 + 1 model calls
    assert status.metrics.critical_steps == 5


async def test_llm_aggregate_is_one_orchestrator_step(runtime: SwarmRuntime) -> None:
    plan = SwarmPlan(
        subagents=[
            SubAgentSpec(id="x", task=script_task({"answer": "x-says-hi"})),
            SubAgentSpec(id="y", task=script_task({"answer": "y-says-yo"})),
        ],
        aggregate="llm",
        aggregate_prompt=script_task({"echo_task": True}, prefix="merge these"),
    )
    status = await runtime.run_job(JobSpec(plan=plan))
    assert status.state == JobState.succeeded, status.error
    result = status.result or ""
    assert result.startswith("ECHO:merge these")
    assert "### Result of x\nx-says-hi" in result and "### Result of y\ny-says-yo" in result
    assert status.metrics.orchestrator_steps == 1
    assert status.metrics.critical_steps == 2 and status.metrics.total_steps == 3


async def test_subagent_llm_serves_the_agents_and_llm_the_orchestrator(runtime: SwarmRuntime) -> None:
    llms = {"llm": LLMConfig(model="orch"), "subagent_llm": LLMConfig(model="subs")}
    echo = SwarmPlan(subagents=[SubAgentSpec(id="x", task=script_task({"echo_task": True}, prefix="agent x"))])
    status = await runtime.run_job(JobSpec(plan=echo, **llms))
    assert status.state == JobState.succeeded, status.error
    assert "ECHO@subs:agent x" in (status.result or "")  # the agent: the sub-agents' model
    merge = SwarmPlan(subagents=[SubAgentSpec(id="y", task=script_task({"answer": "y-says-yo"}))], aggregate="llm",
                      aggregate_prompt=script_task({"echo_task": True}, prefix="merge"))
    status = await runtime.run_job(JobSpec(plan=merge, **llms))
    assert (status.result or "").startswith("ECHO@orch:merge")  # the aggregation call: the orchestrator's model
    assert "y-says-yo" in (status.result or "")
    # Without subagent_llm, the agents use llm too.
    status = await runtime.run_job(JobSpec(plan=echo, llm=LLMConfig(model="orch")))
    assert "ECHO@orch:agent x" in (status.result or "")


async def test_invalid_plan_is_rejected_before_anything_starts(runtime: SwarmRuntime) -> None:
    plan = SwarmPlan(
        subagents=[
            SubAgentSpec(id="p", task="t", tools=["no_such_tool"]),
            SubAgentSpec(id="q", task="t", depends_on=["missing"]),
        ]
    )
    job_id = "bad-" + uuid.uuid4().hex[:8]
    with pytest.raises(PlanValidationError) as err:
        runtime.start_job(job_id, JobSpec(plan=plan))
    assert any("no_such_tool" in p for p in err.value.problems)
    assert any("'missing'" in p for p in err.value.problems)
    assert not runtime.has_job(job_id)
    with pytest.raises(JobNotFound):
        await runtime.poll_events(job_id, 0, 0.1)


async def test_second_runtime_in_one_process_shares_ray(runtime: SwarmRuntime) -> None:
    other = SwarmRuntime(
        namespace=NAMESPACE, num_workers=1, llm_factory=echo_llm_factory, registry_factory=runtime_test_registry
    )
    job_id = "twice-" + uuid.uuid4().hex[:8]
    other.start_job(job_id, JobSpec(plan=SwarmPlan(subagents=[SubAgentSpec(id="solo", task=script_task({"answer": "ok"}))])))
    assert runtime.has_job(job_id) and job_id in runtime.list_live_jobs()
    with pytest.raises(ValueError, match=job_id):
        runtime.start_job(job_id, JobSpec(task="again"))
    # The first runtime can follow a job the second one started (as after a service restart).
    seen: list[Event] = []
    while not (seen and isinstance(seen[-1], JobFinished)):
        seen += await runtime.poll_events(job_id, seen[-1].seq if seen else 0, 1.0)
    assert_dense(seen)
    assert seen[-1].state == JobState.succeeded and seen[-1].result == "## solo\nok"
    assert await runtime.poll_events(job_id, seen[-1].seq, 0.1) == []
    await other.release(job_id)
    assert job_id not in runtime.list_live_jobs()
    other.shutdown()
    assert ray.is_initialized()  # it did not start Ray, so it does not stop it


async def test_step_cap_and_tool_timeout(runtime: SwarmRuntime, tmp_path) -> None:
    calc = [{"tool": "calculator", "arguments": {"expression": "1 + 1"}}]
    plan = SwarmPlan(
        subagents=[
            # Five tool steps scripted, but capped at 3 model calls: the last one is offered no tools.
            SubAgentSpec(id="capped", task=script_task({"steps": [calc] * 5, "answer": "capped: {results}"}),
                         tools=["calculator"], max_steps=3),
            SubAgentSpec(
                id="patient",
                task=script_task({"steps": [[{"tool": "wait_file", "arguments": {"path": str(tmp_path / "never")}}]],
                                  "answer": "gave up: {results}"}),
                tools=["wait_file"],
            ),
        ]
    )
    events: list[Event] = []
    status = await runtime.run_job(JobSpec(plan=plan, limits=Limits(tool_timeout_s=0.3)), on_event=events.append)
    assert status.state == JobState.succeeded, status.error
    capped = first(events, SubAgentFinished, "capped")
    assert (capped.steps, capped.tool_calls, capped.result) == (3, 2, "capped: 2 | 2")
    patient = first(events, SubAgentFinished, "patient")
    assert patient.result == "gave up: error: tool wait_file timed out after 0.3 s"
    assert status.metrics.critical_steps == 3 and status.metrics.total_steps == 5


async def test_run_job_stops_the_job_when_its_caller_fails(runtime: SwarmRuntime, tmp_path) -> None:
    plan = SwarmPlan(
        subagents=[
            SubAgentSpec(
                id="long",
                task=script_task({"steps": [[{"tool": "wait_file", "arguments": {"path": str(tmp_path / "never")}}]]}),
                tools=["wait_file"],
            )
        ]
    )
    job_id = "caller-fails-" + uuid.uuid4().hex[:8]

    def on_event(ev: Event) -> None:
        if isinstance(ev, SubAgentStarted):
            raise RuntimeError("display broke")

    with pytest.raises(RuntimeError, match="display broke"):
        await runtime.run_job(JobSpec(plan=plan), on_event=on_event, job_id=job_id)
    assert not runtime.has_job(job_id)  # cancelled and released, not left running in the cluster


async def test_a_fan_out_node_runs_one_copy_per_chunk_of_its_sources_list(runtime: SwarmRuntime) -> None:
    lister = SubAgentSpec(id="lister", task=script_task({"answer": "Countries: Peru; Chile; Bolivia; Brazil; Guyana"}))
    filler = SubAgentSpec(id="filler", task=script_task({"echo_task": True}, prefix="look up"),
                          depends_on=["lister"], for_each=ForEach(source="lister", chunk=2))
    events: list[Event] = []
    status = await runtime.run_job(JobSpec(plan=SwarmPlan(subagents=[lister, filler])), on_event=events.append)

    assert status.state == JobState.succeeded, status.error
    assert_dense(events)
    copies = [e for e in events if isinstance(e, SubAgentCreated) and e.fan_out_of == "filler"]
    assert [c.agent_id for c in copies] == ["filler.1", "filler.2", "filler.3"]
    assert all(c.depends_on == ["lister"] for c in copies)
    shown = {c.agent_id: first(events, SubAgentFinished, c.agent_id).result for c in copies}
    # Each copy sees only its chunk, with the list's label.
    assert "### Result of lister\nCountries: Peru; Chile\n" in shown["filler.1"]
    assert "### Result of lister\nCountries: Bolivia; Brazil\n" in shown["filler.2"]
    assert "### Result of lister\nCountries: Guyana\n" in shown["filler.3"] and "Peru" not in shown["filler.3"]
    merged = first(events, SubAgentFinished, "filler").result
    assert all(text in merged for text in shown.values())
    assert status.result is not None and "## filler" in status.result and "Guyana" in status.result
    # The copies run in parallel: lister (1 step) then one copy (1 step); the node itself adds none.
    assert status.metrics.critical_steps == 2
    assert status.metrics.subagents == 4 and status.metrics.total_steps == 4


async def test_max_parallel_runs_a_fan_outs_copies_in_lanes(runtime: SwarmRuntime) -> None:
    """max_parallel 2: copy k starts after copy k-2 has ended, and the DAG and CriticalSteps say so;
    a copy still sees only its own chunk, not the result of the copy it waited for."""
    lister = SubAgentSpec(id="lister", task=script_task({"answer": "Countries: Peru; Chile; Bolivia; Brazil; Guyana"}))
    filler = SubAgentSpec(id="filler", task=script_task({"echo_task": True}, prefix="look up"),
                          depends_on=["lister"], for_each=ForEach(source="lister", chunk=1, max_parallel=2))
    events: list[Event] = []
    status = await runtime.run_job(JobSpec(plan=SwarmPlan(subagents=[lister, filler])), on_event=events.append)

    assert status.state == JobState.succeeded, status.error
    created = {e.agent_id: e.depends_on for e in events if isinstance(e, SubAgentCreated) and e.fan_out_of == "filler"}
    assert created == {"filler.1": ["lister"], "filler.2": ["lister"], "filler.3": ["lister", "filler.1"],
                       "filler.4": ["lister", "filler.2"], "filler.5": ["lister", "filler.3"]}
    for k in (3, 4, 5):
        assert first(events, SubAgentStarted, f"filler.{k}").seq > first(events, SubAgentFinished, f"filler.{k - 2}").seq
    shown = first(events, SubAgentFinished, "filler.3").result
    assert "Countries: Bolivia" in shown and "Result of filler.1" not in shown and "Peru" not in shown
    # lister 1 step, then three waves of one-step copies (5 copies, 2 lanes).
    assert status.metrics.critical_steps == 1 + 3 and status.metrics.subagents == 6

    cities = SubAgentSpec(id="cities", task=script_task({"echo_task": True}, prefix="ranks {start} to {end}"),
                          for_range=ForRange(start=1, end=40, chunk=10, max_parallel=1))
    status = await runtime.run_job(JobSpec(plan=SwarmPlan(subagents=[cities])))
    assert status.state == JobState.succeeded, status.error
    assert status.metrics.critical_steps == 4 and status.metrics.subagents == 4  # serial: 4 windows in a row


async def test_a_fan_out_splits_the_merged_lists_of_another_fan_out(runtime: SwarmRuntime) -> None:
    """parts -> a lister per part -> a filler per listed item: the part listers' lists, one label,
    merge into one list (repeats included), which the filler splits without its repeats."""
    parts = SubAgentSpec(id="parts", task=script_task({"answer": "Parts: first; second; third"}))
    lister = SubAgentSpec(id="lister", task=script_task({"answer": "Countries: Peru; Chile"}), depends_on=["parts"],
                          for_each=ForEach(source="parts", chunk=1))
    filler = SubAgentSpec(id="filler", task=script_task({"echo_task": True}, prefix="look up"),
                          depends_on=["lister"], for_each=ForEach(source="lister", chunk=1))
    events: list[Event] = []
    status = await runtime.run_job(JobSpec(plan=SwarmPlan(subagents=[parts, lister, filler])), on_event=events.append)

    assert status.state == JobState.succeeded, status.error
    assert first(events, SubAgentFinished, "lister").result == "Countries: Peru; Chile; Peru; Chile; Peru; Chile"
    copies = [e.agent_id for e in events if isinstance(e, SubAgentCreated) and e.fan_out_of == "filler"]
    assert copies == ["filler.1", "filler.2"]
    assert "### Result of lister\nCountries: Peru\n" in first(events, SubAgentFinished, "filler.1").result
    assert "### Result of lister\nCountries: Chile\n" in first(events, SubAgentFinished, "filler.2").result
    assert status.metrics.critical_steps == 3 and status.metrics.subagents == 1 + 3 + 2


async def test_a_fan_out_fails_clearly_on_an_empty_list_or_too_many_copies(runtime: SwarmRuntime) -> None:
    def plan(answer: str, chunk: int) -> SwarmPlan:
        return SwarmPlan(subagents=[
            SubAgentSpec(id="lister", task=script_task({"answer": answer})),
            SubAgentSpec(id="filler", task=script_task({"answer": "x"}), depends_on=["lister"],
                         for_each=ForEach(source="lister", chunk=chunk)),
        ])

    status = await runtime.run_job(JobSpec(plan=plan("   ", 2)))
    assert status.state == JobState.failed and "holds no list items" in (status.error or "")
    status = await runtime.run_job(JobSpec(plan=plan("A; B; C; D; E", 1), limits=Limits(max_subagents=4)))
    assert status.state == JobState.failed
    assert "need 5 copies" in (status.error or "") and "max_subagents=4" in (status.error or "")
    # A looping list fans out once per distinct item: 3 copies, within the limit.
    status = await runtime.run_job(JobSpec(plan=plan("A; B; C; A; B; C; A", 1), limits=Limits(max_subagents=4)))
    assert status.state == JobState.succeeded, status.error
    assert status.metrics.subagents == 4  # the lister and 3 copies
    status = await runtime.run_job(JobSpec(plan=plan("A; B; C; D; A; E", 1), limits=Limits(max_subagents=4)))
    assert "5 items (and 1 repeated items, dropped)" in (status.error or "")
    with pytest.raises(PlanValidationError, match="not among its dependencies"):
        await runtime.run_job(JobSpec(plan=SwarmPlan(subagents=[
            SubAgentSpec(id="lister", task="t"),
            SubAgentSpec(id="filler", task="u", for_each=ForEach(source="lister")),
        ])))


async def test_keep_rows_filters_each_agents_table_before_its_dependents_see_it(runtime: SwarmRuntime) -> None:
    table = ("| country | population |\n|---|---|\n| Peru | 31,989,256 |\n| Guyana | 779,004 |\n"
             "| Chile | 18,729,160 |")
    keep = RowFilter(column="population", op=">", value="5,000,000")
    lister = SubAgentSpec(id="lister", task=script_task({"answer": "Countries: Peru; Guyana; Chile; Brazil"}))
    filler = SubAgentSpec(id="filler", task=script_task({"answer": table}), depends_on=["lister"],
                          for_each=ForEach(source="lister", chunk=2), keep_rows=keep)
    reader = SubAgentSpec(id="reader", task=script_task({"echo_task": True}), depends_on=["filler"])
    events: list[Event] = []
    status = await runtime.run_job(JobSpec(plan=SwarmPlan(subagents=[lister, filler, reader])), on_event=events.append)

    assert status.state == JobState.succeeded, status.error
    for copy in ("filler.1", "filler.2"):  # each copy's table is filtered, and the event says how
        done = first(events, SubAgentFinished, copy)
        assert "Peru" in done.result and "Chile" in done.result and "Guyana" not in done.result
        assert done.filter_note == "keep_rows (population > 5,000,000): kept 2 of 3 rows"
    assert "Guyana" not in first(events, SubAgentFinished, "filler").result
    assert "Guyana" not in first(events, SubAgentFinished, "reader").result  # the dependent saw the filtered table
    assert first(events, SubAgentFinished, "lister").filter_note == ""
    assert status.result is not None and "| Guyana |" not in status.result and "| Peru |" in status.result


async def test_a_range_fan_out_runs_one_copy_per_window_with_its_bounds_in_the_task(runtime: SwarmRuntime) -> None:
    cities = SubAgentSpec(id="cities", task=script_task({"echo_task": True}, prefix="ranks {start} to {end}"),
                          for_range=ForRange(start=1, end=50, chunk=15),
                          keep_rows=RowFilter(column="rank", op="<=", value="50"))
    events: list[Event] = []
    status = await runtime.run_job(JobSpec(plan=SwarmPlan(subagents=[cities])), on_event=events.append)

    assert status.state == JobState.succeeded, status.error
    copies = [e for e in events if isinstance(e, SubAgentCreated) and e.fan_out_of == "cities"]
    assert [c.agent_id for c in copies] == ["cities.1", "cities.2", "cities.3", "cities.4"]
    for copy, (s, e) in zip(copies, [(1, 15), (16, 30), (31, 45), (46, 50)]):
        assert f"ranks {s} to {e}" in first(events, SubAgentFinished, copy.agent_id).result
    assert status.metrics.critical_steps == 1 and status.metrics.subagents == 4
    # The copies are counted against max_subagents when the plan is checked, before anything runs.
    with pytest.raises(PlanValidationError, match=r"5 sub-agents \(counting 4 range copies\)"):
        await runtime.run_job(JobSpec(plan=SwarmPlan(subagents=[cities, SubAgentSpec(id="x", task="t")]),
                                      limits=Limits(max_subagents=4)))
    with pytest.raises(PlanValidationError, match=r"names neither \{start\} nor \{end\}"):
        await runtime.run_job(JobSpec(plan=SwarmPlan(subagents=[
            SubAgentSpec(id="same", task="t", for_range=ForRange(start=1, end=3, chunk=1))])))
