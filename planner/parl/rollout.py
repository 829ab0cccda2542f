"""Rollouts: one episode = one plan-mode swarm job on an environment task, through the real runtime.

The job's LLMConfig points at the policy host and names the episode, so the policy host records
every orchestrator completion of this episode (planner.parl.policy_host). After the job, the rollout
takes those samples, reads critical steps and sub-agent outcomes from the job's events, and scores
the answer with the environment. An episode that fails for infrastructure reasons (an exception, a
dead actor, an unreachable engine) is re-run with a fresh id, never silently dropped: dropping
would bias its group's baseline. A job that fails because of what the policy wrote (no valid plan,
over a limit) is a real outcome and is kept, scored on what it produced.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from planner.envs.base import Task
from planner.parl.config import PARLConfig
from planner.parl.policy_host import PARLLLMFactory, episode_llm_config
from planner.parl.reward import EpisodeStats
from planner.parl.samples import OrchestratorSample
from swarm.events import (
    ORCHESTRATOR_ID,
    Event,
    SubAgentCreated,
    SubAgentFinished,
    ToolResult,
)
from swarm.plans import JobSpec, JobState, JobStatus, Limits

# Job errors that say the machinery failed, not the policy: such episodes are retried.
# ("engine actor ..." is EngineChatClient's unreachable-engine error; a request the engine rejects,
# e.g. a context overflow the policy caused, says "engine '<name>' rejected" and is kept.)
INFRA_ERRORS = ("internal error", "cannot build the model client", "no worker available", "its worker died",
                "engine actor", "policy engine")


class EpisodeFailed(RuntimeError):
    """An episode failed for infrastructure reasons on every allowed attempt."""


@dataclass
class EpisodeRequest:
    task: Task
    group: int  # index of the task's group within the step
    index: int  # rollout index within the group


@dataclass
class Episode:
    episode_id: str
    task_id: str
    group: int
    index: int
    state: str
    error: str | None
    answer: str
    stats: EpisodeStats
    samples: list[OrchestratorSample]
    item_f1: float
    subagents: int
    tool_calls: int
    tool_time_s: float
    completion_tokens: int  # every model call of the job
    wall_s: float
    attempts: int = 1
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def min_version(self) -> int:
        return min((s.version for s in self.samples), default=-1)


def episode_spec(task: Task, cfg: PARLConfig, corpus: str, tools: list[str], policy_actor: str,
                 episode_id: str) -> JobSpec:
    """The plan-mode swarm job of one episode (the same spec builder `swarm eval` uses)."""
    from planner.evaluate import swarm_spec
    from swarm.config import Settings

    llm = episode_llm_config(policy_actor, episode_id, temperature=cfg.temperature,
                             max_tokens=cfg.orchestrator_max_tokens, timeout_s=cfg.episode_timeout_s)
    spec = swarm_spec(task, Settings(llm=llm), corpus, tools, orchestrator="plan", label=f"parl {episode_id}",
                      merge_tables=False)  # the policy's own aggregate choice is part of what it learns
    limits = Limits(max_subagents=cfg.max_subagents, subagent_max_steps=cfg.subagent_max_steps,
                    job_timeout_s=cfg.episode_timeout_s, max_retries=0, orchestrator_max_steps=4)
    return spec.model_copy(update={"limits": limits, "metadata": {**spec.metadata, "parl_episode": episode_id}})


@dataclass
class _EventTally:
    created: dict[str, list[str]] = field(default_factory=dict)
    finished_ok: set[str] = field(default_factory=set)
    tool_time_s: float = 0.0

    def __call__(self, ev: Event) -> None:
        if isinstance(ev, SubAgentCreated):
            self.created[ev.agent_id] = list(ev.depends_on)
        elif isinstance(ev, SubAgentFinished) and ev.agent_id != ORCHESTRATOR_ID and ev.result.strip():
            self.finished_ok.add(ev.agent_id)
        elif isinstance(ev, ToolResult):
            self.tool_time_s += ev.duration_s


def is_infra_failure(status: JobStatus) -> bool:
    return status.state != JobState.succeeded and any(m in (status.error or "") for m in INFRA_ERRORS)


async def run_episode(runtime: Any, policy: Any, env: Any, req: EpisodeRequest, cfg: PARLConfig, corpus: str,
                      policy_actor: str) -> Episode:
    """Run one episode, retrying infrastructure failures up to cfg.episode_retries times."""
    last = ""
    for attempt in range(1, cfg.episode_retries + 2):
        episode_id = f"{req.task.id}-g{req.group}-r{req.index}-{uuid.uuid4().hex[:8]}"
        spec = episode_spec(req.task, cfg, corpus, env.tools, policy_actor, episode_id)
        tally = _EventTally()
        t0 = time.perf_counter()
        try:
            status = await runtime.run_job(spec, on_event=tally)
        except Exception as e:  # the runtime itself failed: infrastructure
            await policy.take_samples.remote(episode_id)  # discard what it recorded
            last = f"{type(e).__name__}: {e}"
            continue
        samples: list[OrchestratorSample] = await policy.take_samples.remote(episode_id)
        if is_infra_failure(status):
            last = status.error or status.state.value
            continue
        answer = status.result or "" if status.state == JobState.succeeded else ""
        score = env.score(req.task, answer)
        stats = EpisodeStats(score=float(score.item_f1), critical_steps=status.metrics.critical_steps,
                             created=len(tally.created), finished_ok=len(tally.finished_ok & set(tally.created)),
                             depends_on=tally.created)
        return Episode(episode_id=episode_id, task_id=req.task.id, group=req.group, index=req.index,
                       state=status.state.value, error=status.error, answer=answer, stats=stats, samples=samples,
                       item_f1=float(score.item_f1), subagents=status.metrics.subagents,
                       tool_calls=status.metrics.tool_calls, tool_time_s=tally.tool_time_s,
                       completion_tokens=status.metrics.completion_tokens, wall_s=time.perf_counter() - t0,
                       attempts=attempt)
    raise EpisodeFailed(f"episode of task {req.task.id} (group {req.group}, rollout {req.index}) failed "
                        f"{cfg.episode_retries + 1} time(s) for infrastructure reasons; last: {last}")


class RolloutWorker:
    """Runs many episodes concurrently (asyncio) through its own SwarmRuntime handle (a Ray actor when
    wrapped by `launch_rollout_workers`; usable in-process too)."""

    def __init__(self, cfg: PARLConfig, policy_actor: str, subagent_actor: str) -> None:
        from planner.envs import get_env
        from swarm.runtime import SwarmRuntime

        self.cfg = cfg
        self.policy_actor = policy_actor
        self.env = get_env(cfg.env)
        self.corpus = str(self.env.corpus_path())
        factory = PARLLLMFactory(subagent_actor, cfg.subagent_max_tokens, cfg.subagent_temperature)
        self.runtime = SwarmRuntime(num_workers=cfg.swarm_workers, namespace=cfg.namespace, llm_factory=factory)
        self._policy: Any = None

    def _policy_handle(self) -> Any:
        if self._policy is None:
            import ray

            self._policy = ray.get_actor(self.policy_actor)
        return self._policy

    async def run(self, requests: list[EpisodeRequest]) -> list[Episode]:
        policy = self._policy_handle()
        return list(await asyncio.gather(*(
            run_episode(self.runtime, policy, self.env, r, self.cfg, self.corpus, self.policy_actor) for r in requests)))

    def ping(self) -> bool:
        return True


def launch_rollout_workers(cfg: PARLConfig, policy_actor: str, subagent_actor: str) -> list[Any]:
    import ray

    cls = ray.remote(RolloutWorker).options(num_cpus=0, max_concurrency=1000)
    workers = [cls.remote(cfg, policy_actor, subagent_actor) for _ in range(cfg.rollout_workers)]
    ray.get([w.ping.remote() for w in workers])
    return workers


def split_requests(requests: list[EpisodeRequest], n: int) -> list[list[EpisodeRequest]]:
    """Round-robin over n workers, so each group's rollouts spread over workers."""
    return [requests[i::n] for i in range(n) if requests[i::n]]
