"""SwarmRuntime: the public entry to run swarm jobs on Ray (used by the service, the CLI and notebooks).

Jobs run inside a few long-lived, detached, named async job host actors ("swarm-jobhost-<i>",
swarm.job_host), each running many jobs as in-process objects; a job's host owns all of its events.
Callers read them with a long poll and may re-attach after a restart of the service: a new runtime
asks the hosts which jobs they run (list_live_jobs, has_job) and caches job -> host. Sub-agents run as
coroutines in a small pool of shared async worker actors (swarm.worker_pool). Hosts and workers are
created lazily under their names (and warmed up when the runtime is constructed), so a job starts
with one method call instead of a new process.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from typing import Any, Callable

import ray
from ray.actor import ActorHandle
from ray.exceptions import GetTimeoutError, RayActorError

from swarm.dag import PlanValidationError, validate_plan
from swarm.events import Event, JobFinished, JobStarted, JobSubmitted
from swarm.job_host import JOB_HOST_MAX_CONCURRENCY, JOB_HOST_PREFIX, JobConfig, JobHostRemote, job_host_name
from swarm.llm import LLMClient
from swarm.placement import PlacementConfig, job_actor_options, worker_actor_options
from swarm.plans import JobSpec, JobState, JobStatus, LLMConfig, ToolsConfig, new_job_id
from workers.tools.registry import ToolRegistry

__all__ = ["JOB_HOST_PREFIX", "JobNotFound", "PlanValidationError", "SwarmRuntime", "job_host_name"]

# How long start_job waits for Ray to free the name of a host that died before it starts a new one.
HOST_REPLACE_TIMEOUT_S = 10.0
# A host that cannot be placed (e.g. placement "require" and no node has the resource yet) would
# otherwise block the caller forever: lookups skip it after this long, start_job gives up with an error.
HOST_CALL_TIMEOUT_S = 120.0


class JobNotFound(KeyError):
    """No live job with this id (never started, released, its host died, or the Ray cluster restarted)."""


class SwarmRuntime:
    def __init__(
        self,
        *,
        address: str | None = None,
        num_workers: int = 2,
        num_job_hosts: int = 2,
        namespace: str = "agent-swarm",
        llm_factory: Callable[[LLMConfig], LLMClient] | None = None,
        registry_factory: Callable[[ToolsConfig], ToolRegistry] | None = None,
        ray_init_kwargs: dict | None = None,
        placement: PlacementConfig | None = None,
        warm: bool = True,
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if num_job_hosts < 1:
            raise ValueError(f"num_job_hosts must be >= 1, got {num_job_hosts}")
        if not namespace:
            raise ValueError("namespace must not be empty")
        if llm_factory is None:
            from swarm.llm_factory import make_llm

            llm_factory = make_llm
        if registry_factory is None:
            from workers.tools import build_registry

            registry_factory = build_registry
        self.num_workers = num_workers
        self.num_job_hosts = num_job_hosts
        self.namespace = namespace
        self.llm_factory = llm_factory
        self.registry_factory = registry_factory
        self.placement = placement
        self._owns_ray = False
        if not ray.is_initialized():
            # An already-initialised Ray (a notebook, a Ray Job, tests) is used as it is.
            ray.init(**{"address": address, "namespace": namespace, **(ray_init_kwargs or {})})
            self._owns_ray = True
        self._hosts: dict[int, ActorHandle] = {}
        self._dead_hosts: set[str] = set()  # actor ids of hosts seen dead
        self._job_hosts: dict[str, ActorHandle] = {}  # job id -> the host that runs it
        self._known_tools: dict[bytes, list[str]] = {}
        self._worker_options = worker_actor_options(placement)
        if warm:
            # Fire and forget: hosts and workers start while the caller does other things.
            host = self._host(0)
            host.warm_workers.remote(self.num_workers, self.namespace, self._worker_options)
            for i in range(1, num_job_hosts):
                self._host(i)

    # ---- hosts --------------------------------------------------------------------------------

    def _create_host(self, index: int) -> ActorHandle:
        name = job_host_name(index)
        return JobHostRemote.options(
            name=name,
            namespace=self.namespace,
            lifetime="detached",  # survives a restart of the service that started its jobs
            get_if_exists=True,
            max_concurrency=JOB_HOST_MAX_CONCURRENCY,
            num_cpus=0,
            max_restarts=0,
            **job_actor_options(self.placement),
        ).remote(name)

    def _host(self, index: int) -> ActorHandle:
        """The live host of this index; a dead one is replaced (once Ray has freed its name)."""
        handle = self._hosts.get(index)
        if handle is not None and _actor_key(handle) not in self._dead_hosts:
            return handle
        deadline = time.monotonic() + HOST_REPLACE_TIMEOUT_S
        while True:
            handle = self._create_host(index)
            if _actor_key(handle) not in self._dead_hosts:
                self._hosts[index] = handle
                return handle
            if time.monotonic() > deadline:
                raise RuntimeError(f"job host {job_host_name(index)} could not be replaced after it died")
            time.sleep(0.05)

    def _host_died(self, handle: ActorHandle) -> None:
        key = _actor_key(handle)
        self._dead_hosts.add(key)
        for index, h in list(self._hosts.items()):
            if _actor_key(h) == key:
                del self._hosts[index]
        for job_id, h in list(self._job_hosts.items()):
            if _actor_key(h) == key:
                del self._job_hosts[job_id]

    def _live_hosts(self) -> list[ActorHandle]:
        """Every host of this namespace that Ray knows of, whatever runtime created it."""
        names = sorted(
            a["name"]
            for a in ray.util.list_named_actors(all_namespaces=True)
            if a.get("namespace") == self.namespace and a["name"].startswith(JOB_HOST_PREFIX)
        )
        by_name = {job_host_name(i): h for i, h in self._hosts.items()}
        out = []
        for name in names:
            handle = by_name.get(name)
            if handle is None:
                try:
                    handle = ray.get_actor(name, namespace=self.namespace)
                except ValueError:  # it went away meanwhile
                    continue
            if _actor_key(handle) not in self._dead_hosts:
                out.append(handle)
        return out

    def _ask_hosts(self, method: str, *args: Any) -> list[tuple[ActorHandle, Any]]:
        """Call `method` on every live host; hosts that turn out dead are noted and skipped."""
        hosts = self._live_hosts()
        refs = [getattr(h, method).remote(*args) for h in hosts]
        out = []
        for handle, ref in zip(hosts, refs):
            try:
                out.append((handle, ray.get(ref, timeout=HOST_CALL_TIMEOUT_S)))
            except RayActorError:
                self._host_died(handle)
            except GetTimeoutError:  # not running (yet): it has no jobs to report
                ray.cancel(ref)
        return out

    async def _ask_hosts_async(self, method: str, *args: Any) -> list[tuple[ActorHandle, Any]]:
        hosts = await asyncio.to_thread(self._live_hosts)
        refs = [getattr(h, method).remote(*args) for h in hosts]
        out = []
        for handle, ref in zip(hosts, refs):
            try:
                out.append((handle, await asyncio.wait_for(ref, HOST_CALL_TIMEOUT_S)))
            except RayActorError:
                self._host_died(handle)
            except asyncio.TimeoutError:  # not running (yet): it has no jobs to report
                pass
        return out

    async def _locate(self, job_id: str) -> ActorHandle:
        handle = self._job_hosts.get(job_id)
        if handle is None:
            found = [h for h, has in await self._ask_hosts_async("has_job", job_id) if has]
            if not found:
                raise JobNotFound(job_id)
            handle = self._job_hosts[job_id] = found[0]
        return handle

    def host_of(self, job_id: str) -> str:
        """The name of the host actor that runs the job (for operators and fault tests)."""
        if not self.has_job(job_id):
            raise JobNotFound(job_id)
        handle = self._job_hosts[job_id]
        return ray.get(handle.ping.remote())

    # ---- helpers ------------------------------------------------------------------------------

    def _tool_names(self, tools: ToolsConfig) -> list[str]:
        key = tools.to_json()
        if key not in self._known_tools:
            self._known_tools[key] = self.registry_factory(tools).names()
        return self._known_tools[key]

    # ---- the contract -------------------------------------------------------------------------

    def warmup(self) -> None:
        """Start every host and the shared workers now and wait until they answer, so that the
        first job does not pay actor start-up."""
        hosts = [self._host(i) for i in range(self.num_job_hosts)]
        ray.get([h.ping.remote() for h in hosts])
        ray.get(hosts[0].warm_workers.remote(self.num_workers, self.namespace, self._worker_options))

    def start_job(self, job_id: str, spec: JobSpec) -> None:
        """Validate (plan mode: raises PlanValidationError before anything starts), then start the
        job on its host; on return the job is live (has_job is True, from any process)."""
        if not job_id:
            raise ValueError("job_id must not be empty")
        if self.has_job(job_id):
            raise ValueError(f"job {job_id!r} already has a live job")
        known = self._tool_names(spec.tools)
        if spec.plan is not None:
            validate_plan(spec.plan, spec.limits, known)
        config = JobConfig(
            job_id=job_id,
            spec=spec,
            known_tools=known,
            num_workers=self.num_workers,
            namespace=self.namespace,
            llm_factory=self.llm_factory,
            registry_factory=self.registry_factory,
            worker_options=self._worker_options,
        )
        index = zlib.crc32(job_id.encode()) % self.num_job_hosts
        for _ in range(2):  # a host found dead is replaced once
            host = self._host(index)
            ref = host.start_job.remote(config)
            try:
                ray.get(ref, timeout=HOST_CALL_TIMEOUT_S)
            except GetTimeoutError:
                ray.cancel(ref)  # do not let it start the job later, unseen
                raise RuntimeError(
                    f"job host {job_host_name(index)} did not start within {HOST_CALL_TIMEOUT_S:g} s "
                    "(does the cluster have the resources its placement asks for?)"
                ) from None
            except RayActorError:
                self._host_died(host)
                continue
            self._job_hosts[job_id] = host
            return
        raise RuntimeError(f"job host {job_host_name(index)} died twice while starting job {job_id!r}")

    async def poll_events(self, job_id: str, after_seq: int, timeout_s: float = 1.0) -> list[Event]:
        handle = await self._locate(job_id)
        try:
            events = await handle.events_after.remote(job_id, after_seq, timeout_s)
        except RayActorError:
            self._host_died(handle)
            raise JobNotFound(job_id) from None
        if events is None:  # released meanwhile
            self._job_hosts.pop(job_id, None)
            raise JobNotFound(job_id)
        return events

    async def cancel(self, job_id: str) -> None:
        handle = await self._locate(job_id)
        try:
            found = await handle.cancel.remote(job_id)
        except RayActorError:
            self._host_died(handle)
            raise JobNotFound(job_id) from None
        if not found:
            self._job_hosts.pop(job_id, None)
            raise JobNotFound(job_id)

    def has_job(self, job_id: str) -> bool:
        handle = self._job_hosts.get(job_id)
        if handle is not None:
            try:
                if ray.get(handle.has_job.remote(job_id)):
                    return True
            except RayActorError:
                self._host_died(handle)
            self._job_hosts.pop(job_id, None)
            return False
        found = [h for h, has in self._ask_hosts("has_job", job_id) if has]
        if found:
            self._job_hosts[job_id] = found[0]
        return bool(found)

    def list_live_jobs(self) -> list[str]:
        return sorted(job for _, jobs in self._ask_hosts("list_jobs") for job in jobs)

    async def release(self, job_id: str) -> None:
        """Drop the job and its events from its host at once (persist them elsewhere first).
        No-op if it is gone."""
        try:
            handle = await self._locate(job_id)
        except JobNotFound:
            return
        self._job_hosts.pop(job_id, None)
        try:
            await handle.release.remote(job_id)
        except RayActorError:
            self._host_died(handle)

    async def run_job(
        self,
        spec: JobSpec,
        on_event: Callable[[Event], None] | None = None,
        job_id: str | None = None,
    ) -> JobStatus:
        """Start a job, pass each event to on_event as it arrives, release it, return the status."""
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
        """Forget cached handles; shut Ray down only if this runtime started it. Hosts and workers
        are detached: they keep running (and keep their jobs) for the next runtime."""
        self._hosts.clear()
        self._job_hosts.clear()
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
        self._owns_ray = False


def _actor_key(handle: ActorHandle) -> str:
    return handle._actor_id.hex()


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
