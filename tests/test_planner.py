"""The planner: the plan-writing repair loop (Planner, PlannerActor) against a real HTTP endpoint
(the OpenAITestServer test double), plan-orchestrator jobs through the real Ray runtime, and that
the engine's structured decoding with the plan schema always yields a valid plan from the tiny
random-weight model."""

from __future__ import annotations

import asyncio

import pytest

from planner.plan_schema import (
    CompactAgent,
    CompactPlan,
    PlanParseError,
    compact_plan_format,
    compact_plan_json,
    parse_plan,
    plan_json_schema,
)
from planner.planner import Planner, PlannerActor, PlanRepairError
from planner.prompts import PLAN_MODE_PROMPT
from swarm.events import ORCHESTRATOR_ID, SubAgentCreated, SubAgentFailed, SubAgentFinished, SubAgentStep
from swarm.llm import ChatResult
from swarm.llm_openai import OpenAIChatClient
from swarm.plan_writer import PlanFormat, load_plan_format
from swarm.plans import JobSpec, JobState, Limits, LLMConfig
from swarm.runtime import SwarmRuntime
from tests.openai_test_server import ErrorReply, OpenAITestServer, completion

NAMESPACE = "agent-swarm-test-planner"
# Agent 1 depends on agent 2: the positional form of a cycle / an unknown dependency.
FORWARD_REF = '{"agents": [{"name": "lister", "task": "List it", "depends_on": [2]}, ' \
              '{"name": "filler", "task": "Fill it", "depends_on": [1]}], "aggregate": "concat"}'
VALID = compact_plan_json(CompactPlan(
    agents=[CompactAgent(name="lister", task="List the three largest countries of Europe."),
            CompactAgent(name="filler", task="Give the capital of each country you receive.", depends_on=[1])],
    aggregate="llm", aggregate_prompt="Merge into one table with columns: country, capital."))


def exact_error(text: str) -> str:
    with pytest.raises(PlanParseError) as e:
        parse_plan(text, tools=["calculator"])
    return str(e.value)


def llm_config(server: OpenAITestServer) -> LLMConfig:
    return LLMConfig(base_url=server.url, model="test-model", api_key="k", max_retries=0)


# ---- the Planner on its own --------------------------------------------------------------------

def test_the_compact_format_is_installed_for_the_runtime() -> None:
    fmt = load_plan_format("compact")
    assert fmt.system_prompt == PLAN_MODE_PROMPT
    assert fmt.schema(Limits(max_subagents=7)) == plan_json_schema(7)
    with pytest.raises(LookupError, match="no plan format 'nope'"):
        load_plan_format("nope")


async def test_planner_repairs_with_the_exact_error_then_returns_the_plan() -> None:
    with OpenAITestServer() as server:
        server.enqueue(completion("{not json", prompt_tokens=10, completion_tokens=4),
                       completion(VALID, prompt_tokens=20, completion_tokens=30))
        client = OpenAIChatClient(llm_config(server))
        result = await Planner(client, max_repairs=2).write_plan("Which capitals?", ["search"], Limits(max_subagents=5))
    assert result.attempts == 2
    assert (result.prompt_tokens, result.completion_tokens) == (30, 34)
    assert [s.id for s in result.plan.subagents] == ["lister-1", "filler-2"]
    assert result.plan.subagents[1].depends_on == ["lister-1"]
    first, second = server.requests
    # Constrained decoding is asked for, with the schema bounded by the job's limit.
    assert first["response_format"] == {"type": "json_schema",
                                        "json_schema": {"name": "swarm_plan", "schema": plan_json_schema(5)}}
    assert first["messages"][0] == {"role": "system", "content": PLAN_MODE_PROMPT}
    assert first["messages"][1]["content"] == "Which capitals?"
    # The repair request carries the invalid text and the exact validation error.
    assert second["messages"][2] == {"role": "assistant", "content": "{not json"}
    with pytest.raises(PlanParseError) as e:
        parse_plan("{not json")
    assert str(e.value) in second["messages"][3]["content"]


async def test_planner_gives_up_with_the_last_error() -> None:
    with OpenAITestServer() as server:
        server.enqueue(completion("[]"), completion(FORWARD_REF))
        client = OpenAIChatClient(llm_config(server))
        with pytest.raises(PlanRepairError) as e:
            await Planner(client, max_repairs=1).write_plan("task", ["search"])
    assert e.value.attempts == 2 and len(server.requests) == 2
    assert e.value.last_error == exact_error(FORWARD_REF)
    assert "agent 1 ('lister') depends on 2" in str(e.value)


async def test_planner_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="max_repairs"):
        Planner(OpenAIChatClient(LLMConfig(base_url="http://127.0.0.1:1/v1", model="m", api_key="k")), max_repairs=-1)
    planner = Planner(OpenAIChatClient(LLMConfig(base_url="http://127.0.0.1:1/v1", model="m", api_key="k")))
    with pytest.raises(ValueError, match="non-empty task"):
        await planner.write_plan("  ", ["search"])
    with pytest.raises(ValueError, match="tools"):
        await planner.write_plan("task", [])


async def test_planner_actor_writes_plans_in_its_own_process(ray_local) -> None:
    with OpenAITestServer() as server:
        server.enqueue(completion(VALID), completion("nope"), completion("still nope"))
        actor = PlannerActor.remote(llm_config(server), 1)
        result = await actor.write_plan.remote("Which capitals?", ["search"], Limits())
        assert result.attempts == 1 and [s.name for s in result.plan.subagents] == ["lister", "filler"]
        with pytest.raises(PlanRepairError) as e:  # the error keeps its type across the process boundary
            await actor.write_plan.remote("again", ["search"], Limits())
        assert "not valid JSON" in e.value.last_error
        ray_local.kill(actor)


# ---- plan-orchestrator jobs in the runtime -----------------------------------------------------

@pytest.fixture(scope="module")
def runtime(ray_local) -> SwarmRuntime:
    rt = SwarmRuntime(namespace=NAMESPACE, num_workers=2)
    yield rt
    rt.shutdown()


def plan_job(server: OpenAITestServer, **kw) -> JobSpec:
    return JobSpec(task="Which are the three largest countries of Europe, with their capitals?",
                   orchestrator="plan", subagent_tools=["calculator"], llm=llm_config(server),
                   limits=Limits(max_retries=0), **kw)


async def test_plan_job_repairs_runs_the_dag_and_counts_planner_steps(runtime: SwarmRuntime) -> None:
    events = []
    with OpenAITestServer() as server:
        server.enqueue(
            completion(FORWARD_REF),  # planner call 1: invalid
            completion(VALID),  # planner call 2: repaired
            completion("Russia; Ukraine; France"),  # lister-1
            completion("| country | capital |\n|---|---|\n| France | Paris |"),  # filler-2 (after lister-1)
            completion("FINAL TABLE"),  # the aggregation call
        )
        status = await runtime.run_job(plan_job(server), on_event=events.append)
    assert status.state == JobState.succeeded, status.error
    assert status.result == "FINAL TABLE"
    reqs = server.requests
    assert len(reqs) == 5
    assert exact_error(FORWARD_REF) in reqs[1]["messages"][-1]["content"]
    # The filler received the lister's result; the aggregation got the plan's prompt and both results.
    assert "Russia; Ukraine; France" in reqs[3]["messages"][-1]["content"]
    agg = reqs[4]["messages"][-1]["content"]
    assert agg.startswith("Merge into one table") and "### Result of filler-2 (filler)" in agg
    created = [e for e in events if isinstance(e, SubAgentCreated)]
    assert [(e.agent_id, e.stage, e.depends_on) for e in created] == [("lister-1", 1, []), ("filler-2", 1, ["lister-1"])]
    steps = [e.step for e in events if isinstance(e, SubAgentStep) and e.agent_id == ORCHESTRATOR_ID]
    assert steps == [1, 2, 3]
    m = status.metrics
    # 2 planner calls + 1 aggregation, then the chain lister-1 -> filler-2 of 1 step each.
    assert (m.orchestrator_steps, m.critical_steps, m.subagents) == (3, 5, 2)


async def test_plan_job_with_only_invalid_plans_fails_and_runs_nothing(runtime: SwarmRuntime) -> None:
    events = []
    with OpenAITestServer() as server:
        server.enqueue(completion("{"), completion("[1]"), completion(FORWARD_REF), completion("never asked"))
        status = await runtime.run_job(plan_job(server), on_event=events.append)
    assert status.state == JobState.failed
    assert exact_error(FORWARD_REF) in status.error and "no valid plan after 3 attempt(s)" in status.error
    assert len(server.requests) == 3
    assert not [e for e in events if isinstance(e, SubAgentCreated)]
    assert (status.metrics.orchestrator_steps, status.metrics.critical_steps) == (3, 3)


async def test_plan_job_aggregate_prompt_overrides_a_concat_plan(runtime: SwarmRuntime) -> None:
    concat = compact_plan_json(CompactPlan(agents=[CompactAgent(name="a", task="Say A"),
                                                   CompactAgent(name="b", task="Say B")]))
    with OpenAITestServer() as server:
        server.enqueue(completion(concat))  # the two agents and the aggregation get echoes
        status = await runtime.run_job(plan_job(server, plan_aggregate_prompt="Columns: letter."))
    assert status.state == JobState.succeeded, status.error
    assert status.result.startswith("echo: Columns: letter.")
    assert status.metrics.critical_steps == 2 + 1  # planner + aggregation + the parallel agents' 1 step


async def test_plan_job_fails_with_its_subagent_and_the_orchestrator_says_so(runtime: SwarmRuntime) -> None:
    events = []
    one = compact_plan_json(CompactPlan(agents=[CompactAgent(name="a", task="Say A")]))
    with OpenAITestServer() as server:
        server.enqueue(completion(one), ErrorReply(400, "bad request for the sub-agent"))
        status = await runtime.run_job(plan_job(server), on_event=events.append)
    assert status.state == JobState.failed and "sub-agent 'a-1' failed" in status.error
    mine = [e for e in events if getattr(e, "agent_id", None) == ORCHESTRATOR_ID]
    assert isinstance(mine[-1], SubAgentFailed) and "a-1" in mine[-1].error
    assert not any(isinstance(e, SubAgentFinished) for e in mine)


def test_plan_orchestrator_needs_a_task() -> None:
    from swarm.plans import SubAgentSpec, SwarmPlan

    with pytest.raises(ValueError, match="orchestrator 'plan' writes the plan from 'task'"):
        JobSpec(plan=SwarmPlan(subagents=[SubAgentSpec(id="a", task="t")]), orchestrator="plan")


# ---- structured decoding with the real engine --------------------------------------------------

class InProcessEngineClient:
    """swarm.llm.LLMClient over an in-process LLMEngine: the EngineHost's exact path (chat template,
    response_format -> constraint, completion parsing) without the Ray actor around it."""

    def __init__(self, engine, seed: int) -> None:
        self.engine, self.seed = engine, seed

    async def chat(self, messages, tools=None, *, tool_choice=None, temperature=None, max_tokens=None,
                   response_format=None) -> ChatResult:
        from model_shards.chat_template import encode_chat
        from model_shards.engine_api import GenerationRequest, SamplingParams
        from swarm.llm_engine import response_format_constraint, to_chat_result

        ids = encode_chat(self.engine.tokenizer, [m.to_openai() for m in messages], None)
        params = SamplingParams(temperature=temperature if temperature is not None else 1.0, seed=self.seed,
                                max_tokens=max_tokens or 1800)
        res = await self.engine.complete(GenerationRequest(f"plan-{self.seed}", ids, params,
                                                           response_format_constraint(response_format)))
        return to_chat_result(res)


async def test_structured_decoding_always_yields_a_valid_plan_from_the_tiny_random_model() -> None:
    from model_shards.engine import LLMEngine
    from model_shards.model_runner import LocalRunnerGroup, RunnerSpec
    from model_shards.tokenizer import ByteTokenizer

    base = compact_plan_format()
    # Short text bounds keep the worst case inside the context; the rules that make a plan valid
    # (positional dependencies, bounded agent count) are the production schema's.
    fmt = PlanFormat("compact-short", base.system_prompt,
                     lambda limits: plan_json_schema(limits.max_subagents, max_task_chars=60, max_aggregate_prompt_chars=60),
                     base.parse)
    runners = LocalRunnerGroup.build(RunnerSpec(preset="tiny", seed=0, num_slots=12, max_len=2560))
    engine = LLMEngine(runners, ByteTokenizer(), "tiny-random")
    limits = Limits(max_subagents=3)
    try:
        planners = [Planner(InProcessEngineClient(engine, seed), max_repairs=0, plan_format=fmt, temperature=1.0)
                    for seed in range(12)]
        results = await asyncio.gather(*(p.write_plan("Plan: capitals of France and Spain.", ["search"], limits)
                                         for p in planners))
    finally:
        await engine.close()
    shapes = set()
    for r in results:  # max_repairs=0: each first answer was valid (write_plan raises otherwise)
        assert r.attempts == 1 and 1 <= len(r.plan.subagents) <= 3
        assert parse_plan(r.text, limits=limits).subagents == r.plan.subagents
        shapes.add((len(r.plan.subagents), tuple(tuple(s.depends_on) for s in r.plan.subagents)))
    assert len({r.text for r in results}) == 12  # really sampled, not one text
    # the constraint was exercised: some plans have dependencies (only ever on earlier agents)
    assert len(shapes) >= 2 and any(deps for _, dep_lists in shapes for deps in dep_lists)
