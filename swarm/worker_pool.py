"""Sub-agent workers: async Ray actors that run many sub-agents as coroutines, and the pool that finds them.

A worker is a long-lived, named, detached actor ("swarm-worker-<i>" in the runtime's namespace)
shared by every job: one process runs hundreds of sub-agents concurrently (max_concurrency), so a
100-agent swarm fits on a laptop. Everything job-specific (LLM config, tool settings, the factories
that build clients and registries, the job actor's handle) travels with each run request.

Events a sub-agent emits are streamed to its job actor as they happen (in order, one batch in
flight at a time), so a worker that dies loses only what it had not sent yet; the job actor drops
events of a run it no longer considers live (cancelled, or re-dispatched after a worker death).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import ray
from ray.actor import ActorHandle

from swarm.events import _Event
from swarm.llm import LLMClient
from swarm.plans import LLMConfig, SubAgentSpec, ToolsConfig
from workers.agent_loop import run_agent
from workers.tools.registry import ToolContext, ToolRegistry

log = logging.getLogger(__name__)

WORKER_NAME_PREFIX = "swarm-worker-"
WORKER_MAX_CONCURRENCY = 1000
# Clients and registries are cached per job in each worker; a few recent jobs are plenty.
_CACHE_JOBS = 16

DEFAULT_SUBAGENT_PROMPT = (
    "You are a sub-agent in a swarm of parallel agents. Solve exactly the task you are given, "
    "using your tools when they help. Your final answer is the only thing the orchestrator will "
    "see, so make it complete and self-contained: state the findings, figures and sources plainly, "
    "and say clearly if something could not be found."
)


def worker_name(index: int) -> str:
    return f"{WORKER_NAME_PREFIX}{index}"


@dataclass
class SubAgentRun:
    """One attempt of one sub-agent, as sent to a worker."""

    job_id: str
    token: str  # identifies this attempt to the job actor (events and tool budget)
    spec: SubAgentSpec
    task_message: str  # the task, with the results of its dependencies
    max_steps: int
    tool_timeout_s: float
    llm_config: LLMConfig
    tools_config: ToolsConfig
    llm_factory: Callable[[LLMConfig], LLMClient]
    registry_factory: Callable[[ToolsConfig], ToolRegistry]
    job: ActorHandle  # the job actor: push_events(token, events), acquire_tool_call(token)


@dataclass
class SubAgentRunResult:
    ok: bool
    result: str = ""
    error: str = ""
    steps: int = 0
    tool_calls: int = 0
    hit_step_cap: bool = False


class _EventPump:
    """Sends a run's events to the job actor in emission order, one batch in flight at a time."""

    def __init__(self, job: ActorHandle, token: str) -> None:
        self._job = job
        self._token = token
        self._buf: list[_Event] = []
        self._wake = asyncio.Event()
        self._closing = False
        self._task = asyncio.create_task(self._run())

    def emit(self, event: _Event) -> None:
        self._buf.append(event)
        self._wake.set()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._buf:
                batch, self._buf = self._buf, []
                await self._job.push_events.remote(self._token, batch)
            if self._closing:
                return

    async def close(self) -> None:
        """Deliver everything emitted so far, then stop."""
        self._closing = True
        self._wake.set()
        try:
            await self._task
        except Exception as e:  # the job actor is gone: nobody is left to read the events
            log.warning("could not deliver events of %s: %s", self._token, e)

    def abort(self) -> None:
        self._task.cancel()


class SubAgentWorker:
    """Runs sub-agents as coroutines. Created as a Ray actor through WorkerPool."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._llms: OrderedDict[str, LLMClient] = OrderedDict()
        self._registries: OrderedDict[str, ToolRegistry] = OrderedDict()

    async def ping(self) -> str:
        return self.name

    def _cached(self, cache: OrderedDict[str, Any], job_id: str, build: Callable[[], Any]) -> Any:
        if job_id in cache:
            cache.move_to_end(job_id)
            return cache[job_id]
        value = build()
        cache[job_id] = value
        while len(cache) > _CACHE_JOBS:
            cache.popitem(last=False)
        return value

    async def run_subagent(self, run: SubAgentRun) -> SubAgentRunResult:
        """Run one attempt to its final answer. Agent errors come back as ok=False, never raised;
        cancellation (ray.cancel) propagates into the agent loop and its running tools."""
        pump = _EventPump(run.job, run.token)

        async def acquire_tool_call() -> bool:
            return await run.job.acquire_tool_call.remote(run.token)

        try:
            llm = self._cached(self._llms, run.job_id, lambda: run.llm_factory(run.llm_config))
            registry = self._cached(self._registries, run.job_id, lambda: run.registry_factory(run.tools_config))
            outcome = await run_agent(
                agent_id=run.spec.id,
                system_prompt=run.spec.system_prompt or DEFAULT_SUBAGENT_PROMPT,
                task=run.task_message,
                llm=llm,
                registry=registry,
                tool_names=list(run.spec.tools),
                max_steps=run.max_steps,
                emit=pump.emit,
                ctx=ToolContext(job_id=run.job_id, agent_id=run.spec.id),
                tool_timeout_s=run.tool_timeout_s,
                acquire_tool_call=acquire_tool_call,
                temperature=run.llm_config.temperature,
                max_tokens=run.llm_config.max_tokens,
            )
        except asyncio.CancelledError:
            pump.abort()
            raise
        except Exception as e:  # LLMError, a broken factory, a bug: the job actor decides on retries
            await pump.close()
            return SubAgentRunResult(ok=False, error=f"{type(e).__name__}: {e}")
        await pump.close()
        return SubAgentRunResult(
            ok=True,
            result=outcome.result,
            steps=outcome.steps,
            tool_calls=outcome.tool_calls,
            hit_step_cap=outcome.hit_step_cap,
        )


SubAgentWorkerActor = ray.remote(SubAgentWorker)


@dataclass
class WorkerSlot:
    index: int
    name: str
    handle: ActorHandle


class WorkerPool:
    """The job actor's view of the shared workers: least-loaded choice, replacement of dead ones."""

    def __init__(self, size: int, namespace: str) -> None:
        if size < 1:
            raise ValueError(f"num_workers must be >= 1, got {size}")
        self.namespace = namespace
        self._handles: list[ActorHandle | None] = [None] * size
        self._load = [0] * size
        self._dead_ids: set[str] = set()

    def _get_or_create(self, index: int) -> ActorHandle:
        name = worker_name(index)
        return SubAgentWorkerActor.options(
            name=name,
            namespace=self.namespace,
            lifetime="detached",  # shared by all jobs, outlives any one job actor
            get_if_exists=True,
            max_concurrency=WORKER_MAX_CONCURRENCY,
            num_cpus=0,
            max_restarts=0,
        ).remote(name)

    async def acquire(self) -> WorkerSlot:
        index = min(range(len(self._load)), key=lambda i: self._load[i])
        handle = self._handles[index]
        # A dead worker's name is released by Ray shortly after its death; until then
        # get_if_exists hands back the dead actor, so wait for a fresh one.
        for _ in range(100):
            if handle is not None and handle._actor_id.hex() not in self._dead_ids:
                break
            handle = self._get_or_create(index)
            if handle._actor_id.hex() in self._dead_ids:
                await asyncio.sleep(0.05)
        else:
            raise RuntimeError(f"worker {worker_name(index)} could not be replaced after it died")
        self._handles[index] = handle
        self._load[index] += 1
        return WorkerSlot(index, worker_name(index), handle)

    def release(self, slot: WorkerSlot) -> None:
        self._load[slot.index] -= 1

    def mark_dead(self, slot: WorkerSlot) -> None:
        """Forget a worker that died; the next acquire of its index starts a replacement."""
        self._dead_ids.add(slot.handle._actor_id.hex())
        if self._handles[slot.index] is slot.handle:
            self._handles[slot.index] = None
