"""Sub-agent workers: async Ray actors that run many sub-agents as coroutines, and the pool that finds them.

A worker is a long-lived, named, detached actor ("swarm-worker-<i>" in the runtime's namespace)
shared by every job: one process runs hundreds of sub-agents concurrently (max_concurrency), so a
100-agent swarm fits on a laptop. Job-level things (LLM config, tool settings, the factories that
build clients and registries, the job host's handle) reach each worker once per job (open_job);
each run then carries only its node.

Events of all of a job's runs on one worker go to the job's host as one stream (in order, one batch
in flight at a time), so 100 agents do not mean 100 concurrent pushes; a worker that dies loses only
what it had not sent yet, and the host drops events of a run it no longer considers live (cancelled,
or re-dispatched after a worker death). The job-wide tool budget is leased in small blocks per run;
what a run did not use goes back with its result.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
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
# Jobs are closed by their host when they end; this bounds what a worker keeps if a host died first.
_MAX_OPEN_JOBS = 4096
# Calls asked for per lease (the host may grant fewer when the budget runs low).
TOOL_LEASE_WANT = 16

DEFAULT_SUBAGENT_PROMPT = (
    "You are a sub-agent in a swarm of parallel agents. Solve exactly the task you are given, "
    "using your tools when they help. Your final answer is the only thing the orchestrator will "
    "see, so make it complete and self-contained: state the findings, figures and sources plainly, "
    "and say clearly if something could not be found."
)


def worker_name(index: int) -> str:
    return f"{WORKER_NAME_PREFIX}{index}"


@dataclass
class JobContext:
    """What every run of a job shares, sent to a worker once per job."""

    job_id: str
    instance: str  # this run of the job id (a job id may be started again after its host died)
    llm_config: LLMConfig
    tools_config: ToolsConfig
    llm_factory: Callable[[LLMConfig], LLMClient]
    registry_factory: Callable[[ToolsConfig], ToolRegistry]
    host: ActorHandle  # the job's host: push_events(job_id, batch), lease_tool_calls(job_id, token, n)


@dataclass
class SubAgentRun:
    """One attempt of one sub-agent, as sent to a worker."""

    job_id: str
    instance: str  # JobContext.instance of the job this run belongs to
    token: str  # identifies this attempt to the job (events and tool budget)
    spec: SubAgentSpec
    task_message: str  # the task, with the results of its dependencies
    max_steps: int
    tool_timeout_s: float
    tool_lease: int = 0  # tool calls granted up front (saves the first lease round trip)


@dataclass
class SubAgentRunResult:
    ok: bool
    result: str = ""
    error: str = ""
    steps: int = 0
    tool_calls: int = 0
    hit_step_cap: bool = False
    unused_tool_calls: int = 0  # leased from the job's budget but not used: the job takes them back
    needs_open: bool = False  # the worker does not know the job (e.g. it was restarted): open it again
    events: list[_Event] = field(default_factory=list)  # the run's last events, not streamed yet


class _JobStream:
    """Sends the events of one job's runs on this worker to the job's host, in emission order,
    one batch in flight at a time (a batch groups events by run token)."""

    def __init__(self, host: ActorHandle, job_id: str) -> None:
        self._host = host
        self._job_id = job_id
        self._buf: list[tuple[str, _Event]] = []
        self._sent = 0  # events handed to push calls so far
        self._done = 0  # of those, delivered (or given up on) so far
        self._delivered = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def emit(self, token: str, event: _Event) -> None:
        self._buf.append((token, event))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while self._buf:
            batch, self._buf = self._buf, []
            self._sent += len(batch)
            grouped: list[tuple[str, list[_Event]]] = []
            for token, ev in batch:
                if grouped and grouped[-1][0] == token:
                    grouped[-1][1].append(ev)
                else:
                    grouped.append((token, [ev]))
            try:
                await self._host.push_events.remote(self._job_id, grouped)
            except Exception as e:  # the host is gone: nobody is left to read the events
                log.warning("could not deliver events of job %s: %s", self._job_id, e)
            self._done += len(batch)
            delivered, self._delivered = self._delivered, asyncio.Event()
            delivered.set()

    async def finish_run(self, token: str) -> list[_Event]:
        """A run ends: take its events not yet sent (they travel with its result, saving a round
        trip) and wait until those already sent were delivered, so the host has them first."""
        mine = [ev for t, ev in self._buf if t == token]
        if mine:
            self._buf = [(t, ev) for t, ev in self._buf if t != token]
        mark = self._sent
        while self._done < mark:
            await self._delivered.wait()
        return mine


class _ToolLease:
    """A run's share of the job-wide tool budget, refilled from the host in blocks."""

    def __init__(self, host: ActorHandle, job_id: str, token: str, granted: int) -> None:
        self._host = host
        self._job_id = job_id
        self._token = token
        self._left = granted
        self._spent = False  # the host granted nothing: the budget is exhausted for this run
        self._lock = asyncio.Lock()

    async def acquire(self) -> bool:
        async with self._lock:  # calls of one step ask concurrently; one refill serves them
            if self._left == 0 and not self._spent:
                self._left = await self._host.lease_tool_calls.remote(self._job_id, self._token, TOOL_LEASE_WANT)
                self._spent = self._left == 0
            if self._left == 0:
                return False
            self._left -= 1
            return True

    @property
    def unused(self) -> int:
        return self._left


@dataclass
class _OpenJob:
    ctx: JobContext
    stream: _JobStream
    llm: LLMClient | None = None
    registry: ToolRegistry | None = None
    runs: set[str] = field(default_factory=set)
    closing: bool = False  # the job ended while runs were still unwinding: drop it after the last


class SubAgentWorker:
    """Runs sub-agents as coroutines. Created as a Ray actor through WorkerPool."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._jobs: OrderedDict[str, _OpenJob] = OrderedDict()

    async def ping(self) -> str:
        return self.name

    async def open_job(self, ctx: JobContext) -> None:
        """Keep the job's settings for its runs (idempotent; a new instance of the job id replaces
        the old one, whose runs in flight keep what they hold)."""
        old = self._jobs.get(ctx.job_id)
        if old is not None and old.ctx.instance == ctx.instance:
            self._jobs.move_to_end(ctx.job_id)
            return
        self._jobs[ctx.job_id] = _OpenJob(ctx, _JobStream(ctx.host, ctx.job_id))
        while len(self._jobs) > _MAX_OPEN_JOBS:
            oldest = next(iter(self._jobs))
            if self._jobs[oldest].runs:  # never drop a job with runs in flight
                break
            self._jobs.popitem(last=False)

    async def close_job(self, job_id: str, instance: str) -> None:
        job = self._jobs.get(job_id)
        if job is None or job.ctx.instance != instance:
            return
        if not job.runs:
            del self._jobs[job_id]
        else:
            job.closing = True

    async def open_jobs(self) -> list[str]:
        return list(self._jobs)

    async def run_subagent(self, run: SubAgentRun) -> SubAgentRunResult:
        """Run one attempt to its final answer. Agent errors come back as ok=False, never raised;
        cancellation (ray.cancel) propagates into the agent loop and its running tools."""
        job = self._jobs.get(run.job_id)
        if job is None or job.ctx.instance != run.instance:
            return SubAgentRunResult(ok=False, needs_open=True)
        ctx = job.ctx
        job.runs.add(run.token)
        lease = _ToolLease(ctx.host, run.job_id, run.token, run.tool_lease)
        token = run.token

        def emit(event: _Event) -> None:
            job.stream.emit(token, event)

        try:
            try:
                if job.llm is None:
                    job.llm = ctx.llm_factory(ctx.llm_config)
                if job.registry is None:
                    job.registry = ctx.registry_factory(ctx.tools_config)
                outcome = await run_agent(
                    agent_id=run.spec.id,
                    system_prompt=run.spec.system_prompt or DEFAULT_SUBAGENT_PROMPT,
                    task=run.task_message,
                    llm=job.llm,
                    registry=job.registry,
                    tool_names=list(run.spec.tools),
                    max_steps=run.max_steps,
                    emit=emit,
                    ctx=ToolContext(job_id=run.job_id, agent_id=run.spec.id),
                    tool_timeout_s=run.tool_timeout_s,
                    acquire_tool_call=lease.acquire,
                    temperature=ctx.llm_config.temperature,
                    max_tokens=ctx.llm_config.max_tokens,
                )
                res = SubAgentRunResult(
                    ok=True,
                    result=outcome.result,
                    steps=outcome.steps,
                    tool_calls=outcome.tool_calls,
                    hit_step_cap=outcome.hit_step_cap,
                )
            except asyncio.CancelledError:
                raise
            except Exception as e:  # LLMError, a broken factory, a bug: the job decides on retries
                res = SubAgentRunResult(ok=False, error=f"{type(e).__name__}: {e}")
            res.events = await job.stream.finish_run(token)
        except asyncio.CancelledError:
            if lease.unused:  # the result never reaches the job: settle the lease on the side
                ctx.host.return_tool_calls.remote(run.job_id, token, lease.unused)
            raise
        finally:
            self._end_run(run.job_id, job, token)
        res.unused_tool_calls = lease.unused
        return res

    def _end_run(self, job_id: str, job: _OpenJob, token: str) -> None:
        job.runs.discard(token)
        if job.closing and not job.runs and self._jobs.get(job_id) is job:
            del self._jobs[job_id]


SubAgentWorkerActor = ray.remote(SubAgentWorker)


@dataclass
class WorkerSlot:
    index: int
    name: str
    handle: ActorHandle


class WorkerPool:
    """A job's view of the shared workers: least-loaded choice, replacement of dead ones, and which
    workers already hold the job's settings."""

    def __init__(self, size: int, namespace: str, options: dict[str, Any] | None = None) -> None:
        if size < 1:
            raise ValueError(f"num_workers must be >= 1, got {size}")
        self.namespace = namespace
        self._options = dict(options or {})
        self._handles: list[ActorHandle | None] = [None] * size
        self._load = [0] * size
        self._dead_ids: set[str] = set()
        self._opened: dict[str, asyncio.Future[None]] = {}  # worker actor id -> its open_job call
        self._opened_handles: dict[str, ActorHandle] = {}

    def _get_or_create(self, index: int) -> ActorHandle:
        name = worker_name(index)
        return SubAgentWorkerActor.options(
            name=name,
            namespace=self.namespace,
            lifetime="detached",  # shared by all jobs, outlives any one job
            get_if_exists=True,
            max_concurrency=WORKER_MAX_CONCURRENCY,
            num_cpus=0,
            max_restarts=0,
            **self._options,
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
        key = slot.handle._actor_id.hex()
        self._dead_ids.add(key)
        self._opened.pop(key, None)
        self._opened_handles.pop(key, None)
        if self._handles[slot.index] is slot.handle:
            self._handles[slot.index] = None

    async def open_job(self, slot: WorkerSlot, context: Callable[[], JobContext]) -> None:
        """Send the job's settings to this worker once; concurrent runs share the one call."""
        key = slot.handle._actor_id.hex()
        fut = self._opened.get(key)
        if fut is None:
            fut = asyncio.ensure_future(slot.handle.open_job.remote(context()))
            self._opened[key] = fut
            self._opened_handles[key] = slot.handle
        try:
            await asyncio.shield(fut)
        except BaseException:
            if fut.done() and self._opened.get(key) is fut:  # failed: the next run tries again
                self._opened.pop(key, None)
            raise

    def forget_open(self, slot: WorkerSlot, job_id: str) -> None:
        key = slot.handle._actor_id.hex()
        self._opened.pop(key, None)

    def close_job(self, job_id: str, instance: str) -> None:
        """Tell the workers that hold the job's settings to drop them (fire and forget)."""
        for handle in self._opened_handles.values():
            handle.close_job.remote(job_id, instance)
        self._opened.clear()
        self._opened_handles.clear()

    async def warm(self) -> list[str]:
        """Start (or find) every worker and wait until each answers."""
        handles = [self._get_or_create(i) for i in range(len(self._handles))]
        return list(await asyncio.gather(*(h.ping.remote() for h in handles)))
