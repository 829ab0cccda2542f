"""SwarmRuntime: the public entry to run swarm jobs on Ray (used by the service, the CLI and notebooks).

Each job runs in its own detached, named async actor ("swarm-job-<job_id>", swarm.job_actor) that
owns all of the job's events; callers read them with a long poll and may re-attach after a restart
of the service (list_live_jobs). Sub-agents run as coroutines in a small pool of shared async worker
actors (swarm.worker_pool), created lazily by the first job that needs them.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable

import ray
from ray.actor import ActorHandle
from ray.exceptions import RayActorError

from swarm.dag import PlanValidationError, validate_plan
from swarm.events import Event, JobFinished, JobStarted, JobSubmitted
from swarm.job_actor import JOB_ACTOR_MAX_CONCURRENCY, JobActorConfig, JobActorRemote
from swarm.llm import LLMClient
from swarm.plans import JobSpec, JobState, JobStatus, LLMConfig, ToolsConfig, new_job_id
from workers.tools.registry import ToolRegistry

JOB_ACTOR_PREFIX = "swarm-job-"

__all__ = ["JobNotFound", "PlanValidationError", "SwarmRuntime", "job_actor_name"]


class JobNotFound(KeyError):
    """No live job actor for this id (never started, released, or the Ray cluster restarted)."""


def job_actor_name(job_id: str) -> str:
    return f"{JOB_ACTOR_PREFIX}{job_id}"


class SwarmRuntime:
    def __init__(
        self,
        *,
        address: str | None = None,
        num_workers: int = 2,
        namespace: str = "agent-swarm",
        llm_factory: Callable[[LLMConfig], LLMClient] | None = None,
        registry_factory: Callable[[ToolsConfig], ToolRegistry] | None = None,
        ray_init_kwargs: dict | None = None,
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if not namespace:
            raise ValueError("namespace must not be empty")
        if llm_factory is None:
            from swarm.llm_factory import make_llm

            llm_factory = make_llm
        if registry_factory is None:
            from workers.tools import build_registry

            registry_factory = build_registry
        self.num_workers = num_workers
        self.namespace = namespace
        self.llm_factory = llm_factory
        self.registry_factory = registry_factory
        self._owns_ray = False
        if not ray.is_initialized():
            # An already-initialised Ray (a notebook, a Ray Job, tests) is used as it is.
            ray.init(**{"address": address, "namespace": namespace, **(ray_init_kwargs or {})})
            self._owns_ray = True
        self._handles: dict[str, ActorHandle] = {}
        self._known_tools: dict[bytes, list[str]] = {}

    # ---- helpers ------------------------------------------------------------------------------

    def _tool_names(self, tools: ToolsConfig) -> list[str]:
        key = tools.to_json()
        if key not in self._known_tools:
            self._known_tools[key] = self.registry_factory(tools).names()
        return self._known_tools[key]

    def _actor(self, job_id: str) -> ActorHandle:
        handle = self._handles.get(job_id)
        if handle is None:
            try:
                handle = ray.get_actor(job_actor_name(job_id), namespace=self.namespace)
            except ValueError:
                raise JobNotFound(job_id) from None
            self._handles[job_id] = handle
        return handle

    # ---- the contract -------------------------------------------------------------------------

    def start_job(self, job_id: str, spec: JobSpec) -> None:
        """Validate (plan mode: raises PlanValidationError before anything starts), then start the
        job's detached actor, which runs the job."""
        if not job_id:
            raise ValueError("job_id must not be empty")
        if self.has_job(job_id):
            raise ValueError(f"job {job_id!r} already has a live job actor")
        known = self._tool_names(spec.tools)
        if spec.plan is not None:
            validate_plan(spec.plan, spec.limits, known)
        config = JobActorConfig(
            job_id=job_id,
            spec=spec,
            known_tools=known,
            num_workers=self.num_workers,
            namespace=self.namespace,
            llm_factory=self.llm_factory,
            registry_factory=self.registry_factory,
        )
        handle = JobActorRemote.options(
            name=job_actor_name(job_id),
            namespace=self.namespace,
            lifetime="detached",  # survives a restart of the service that started it
            max_concurrency=JOB_ACTOR_MAX_CONCURRENCY,
            num_cpus=0,
            max_restarts=0,
        ).remote(config)
        handle.start.remote()
        self._handles[job_id] = handle

    async def poll_events(self, job_id: str, after_seq: int, timeout_s: float = 1.0) -> list[Event]:
        handle = self._actor(job_id)
        try:
            return await handle.events_after.remote(after_seq, timeout_s)
        except RayActorError:
            self._handles.pop(job_id, None)
            raise JobNotFound(job_id) from None

    async def cancel(self, job_id: str) -> None:
        handle = self._actor(job_id)
        try:
            await handle.cancel.remote()
        except RayActorError:
            self._handles.pop(job_id, None)
            raise JobNotFound(job_id) from None

    def has_job(self, job_id: str) -> bool:
        try:
            ray.get_actor(job_actor_name(job_id), namespace=self.namespace)
        except ValueError:
            self._handles.pop(job_id, None)
            return False
        return True

    def list_live_jobs(self) -> list[str]:
        named = ray.util.list_named_actors(all_namespaces=True)
        return sorted(
            a["name"][len(JOB_ACTOR_PREFIX) :]
            for a in named
            if a.get("namespace") == self.namespace and a["name"].startswith(JOB_ACTOR_PREFIX)
        )

    async def release(self, job_id: str) -> None:
        """Kill the job's actor (its events must be persisted elsewhere first). No-op if it is gone."""
        try:
            handle = self._actor(job_id)
        except JobNotFound:
            return
        self._handles.pop(job_id, None)
        ray.kill(handle)
        # The name is freed asynchronously; wait (bounded) so has_job() is False on return.
        deadline = time.monotonic() + 10.0
        while self.has_job(job_id) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    async def run_job(
        self,
        spec: JobSpec,
        on_event: Callable[[Event], None] | None = None,
        job_id: str | None = None,
    ) -> JobStatus:
        """Start a job, pass each event to on_event as it arrives, release the actor, return the status."""
        job_id = job_id or new_job_id()
        self.start_job(job_id, spec)
        status = JobStatus(id=job_id, name=spec.name, mode=spec.mode)
        after = 0
        try:
            while not status.state.terminal:
                for ev in await self.poll_events(job_id, after, 1.0):
                    after = ev.seq
                    _apply(status, ev)
                    if on_event is not None:
                        on_event(ev)
        except BaseException:
            # The caller gave up (Ctrl-C, or its on_event raised): do not leave the job running.
            await asyncio.shield(self._cancel_and_release(job_id))
            raise
        await self.release(job_id)
        return status

    async def _cancel_and_release(self, job_id: str) -> None:
        try:
            await self.cancel(job_id)
        except JobNotFound:
            return
        await self.release(job_id)

    def shutdown(self) -> None:
        """Forget cached handles; shut Ray down only if this runtime started it."""
        self._handles.clear()
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
        self._owns_ray = False


def _apply(status: JobStatus, ev: Any) -> None:
    if isinstance(ev, JobSubmitted):
        status.created_at = ev.ts
        status.state = JobState.queued
    elif isinstance(ev, JobStarted):
        status.started_at = ev.ts
        status.state = JobState.running
    elif isinstance(ev, JobFinished):
        status.finished_at = ev.ts
        status.state = ev.state
        status.result = ev.result
        status.error = ev.error
        status.metrics = ev.metrics
