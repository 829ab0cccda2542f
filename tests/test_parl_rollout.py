"""Episodes: infrastructure failures are retried (their samples discarded), policy failures are kept,
and an episode's stats come from the job's events and the environment's score."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from planner.envs import get_env
from planner.parl.config import PARLConfig
from planner.parl.rollout import (
    EpisodeFailed,
    EpisodeRequest,
    is_infra_failure,
    run_episode,
)
from planner.parl.samples import OrchestratorSample
from swarm.events import (
    ORCHESTRATOR_ID,
    Event,
    SubAgentCreated,
    SubAgentFinished,
    ToolResult,
)
from swarm.plans import JobMetrics, JobSpec, JobState, JobStatus


class RuntimeTestDouble:
    """Stands in for SwarmRuntime.run_job: plays one scripted outcome per call."""

    def __init__(self, outcomes: list[Any]) -> None:
        self.outcomes = outcomes
        self.specs: list[JobSpec] = []

    async def run_job(self, spec: JobSpec, on_event: Callable[[Event], None] | None = None) -> JobStatus:
        self.specs.append(spec)
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        status, events = outcome
        for ev in events:
            assert on_event is not None
            on_event(ev)
        return status


class PolicyHostTestDouble:
    """Stands in for the PolicyHost actor handle: `take_samples.remote(id)` is awaitable."""

    def __init__(self) -> None:
        self.taken: list[str] = []
        outer = self

        class _Take:
            async def remote(self, episode_id: str) -> list[OrchestratorSample]:
                outer.taken.append(episode_id)
                return [OrchestratorSample("plan", [1, 2], [3, 4], [-0.1, -0.2], version=0)]

        self.take_samples = _Take()


@pytest.fixture(scope="module")
def env_task() -> tuple[Any, Any]:
    env = get_env("widegeo")
    task = next(t for t in env.tasks("train", 10, 0) if len(t.gold) <= 3)
    return env, task


def _gold_table(task: Any) -> str:
    rows = ["| " + " | ".join(task.columns) + " |", "|" + "---|" * len(task.columns)]
    rows += ["| " + " | ".join(str(r[c]) for c in task.columns) + " |" for r in task.gold]
    return "\n".join(rows)


def _status(state: JobState, result: str | None = None, error: str | None = None) -> JobStatus:
    return JobStatus(id="job-x", state=state, result=result, error=error,
                     metrics=JobMetrics(critical_steps=4, subagents=3, tool_calls=5, completion_tokens=99))


EVENTS: list[Event] = [
    SubAgentCreated(agent_id="a-1"), SubAgentCreated(agent_id="b-2"),
    SubAgentCreated(agent_id="c-3", depends_on=["a-1", "b-2"]),
    SubAgentFinished(agent_id="a-1", result="rows"), SubAgentFinished(agent_id="b-2", result="  "),
    SubAgentFinished(agent_id=ORCHESTRATOR_ID, result="final"),
    ToolResult(agent_id="a-1", step=1, call_id="c", tool="search", duration_s=0.25),
]


def _cfg(**kw: Any) -> PARLConfig:
    return PARLConfig(policy_checkpoint="ck", out="o", **kw)


async def test_infra_failures_are_retried_and_their_samples_discarded(env_task: tuple[Any, Any]) -> None:
    env, task = env_task
    runtime = RuntimeTestDouble([
        RuntimeError("job host died"),
        (_status(JobState.failed, error="internal error: boom"), []),
        (_status(JobState.succeeded, result=_gold_table(task)), EVENTS),
    ])
    policy = PolicyHostTestDouble()
    ep = await run_episode(runtime, policy, env, EpisodeRequest(task, group=0, index=1), _cfg(episode_retries=2),
                           "corpus.jsonl", "policy-actor")
    assert ep.attempts == 3 and ep.state == "succeeded"
    ids = [s.metadata["parl_episode"] for s in runtime.specs]
    assert len(set(ids)) == 3 and policy.taken == ids  # each attempt's samples were taken; only the last kept
    assert ep.episode_id == ids[-1] and len(ep.samples) == 1
    spec = runtime.specs[-1]
    assert spec.orchestrator == "plan" and spec.llm.engine_actor == "policy-actor"
    assert spec.llm.model == f"parl-episode:{ep.episode_id}" and spec.limits.max_subagents == 8
    assert ep.item_f1 == pytest.approx(1.0) and ep.stats.score == pytest.approx(1.0)
    assert ep.stats.created == 3 and ep.stats.finished_ok == 1  # an empty result is not a finished subtask
    assert dict(ep.stats.depends_on) == {"a-1": [], "b-2": [], "c-3": ["a-1", "b-2"]}
    assert ep.stats.critical_steps == 4 and ep.tool_time_s == pytest.approx(0.25) and ep.tool_calls == 5


async def test_policy_failures_are_kept_and_scored_as_no_answer(env_task: tuple[Any, Any]) -> None:
    env, task = env_task
    runtime = RuntimeTestDouble([(_status(JobState.failed, error="the planner wrote no valid plan: x"), [])])
    ep = await run_episode(runtime, PolicyHostTestDouble(), env, EpisodeRequest(task, 0, 0), _cfg(),
                           "corpus.jsonl", "policy-actor")
    assert ep.attempts == 1 and ep.state == "failed" and ep.answer == "" and ep.item_f1 == 0.0
    assert ep.stats.created == 0 and len(ep.samples) == 1  # the plan it wrote is still trained on


async def test_an_episode_that_keeps_failing_raises_instead_of_being_dropped(env_task: tuple[Any, Any]) -> None:
    env, task = env_task
    runtime = RuntimeTestDouble([RuntimeError("down"), RuntimeError("still down")])
    with pytest.raises(EpisodeFailed, match="failed 2 time"):
        await run_episode(runtime, PolicyHostTestDouble(), env, EpisodeRequest(task, 0, 0), _cfg(episode_retries=1),
                          "corpus.jsonl", "policy-actor")


def test_infra_failure_classification() -> None:
    assert is_infra_failure(_status(JobState.failed, error="internal error: KeyError"))
    assert is_infra_failure(_status(JobState.failed, error="the planner's model call failed: engine actor 'p' failed after 3 tries"))
    assert not is_infra_failure(_status(JobState.failed, error="the planner wrote no valid plan: bad json"))
    assert not is_infra_failure(_status(JobState.failed, error="sub-agent 'a-1' failed: failed after 1 attempt(s): "
                                                                "engine 's' rejected the request: too long"))
    assert not is_infra_failure(_status(JobState.failed, error="job timed out after 600 s (limits.job_timeout_s)"))
    assert not is_infra_failure(_status(JobState.succeeded, result="ok", error=None))
