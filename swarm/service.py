"""JobService: the bridge between the Ray runtime (where jobs run) and the job store (what they did).

Per running job, one asyncio task long-polls the job actor for new events and persists them; the
store is the single source of truth that every reader (REST, SSE, CLI) reads from, so a reader
that replays stored events and then waits for more can never miss or repeat one. Job actors are
detached, so a restarted service re-attaches to jobs that are still running and resumes polling
after the last stored seq.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

from swarm.config import Settings
from swarm.dag import PlanValidationError, validate_plan
from swarm.events import Event, JobFinished
from swarm.plans import JobSpec, JobState, JobStatus, new_job_id
from swarm.runtime import JobNotFound, SwarmRuntime
from swarm.store import JobStore

log = logging.getLogger(__name__)

INTERRUPTED_ON_START = (
    "the service restarted and found no live actor for this job (the Ray cluster was restarted or "
    "the actor died); resubmit the job"
)
INTERRUPTED_ACTOR_LOST = "the job's actor disappeared before the job finished (node or cluster failure)"


class JobNotFoundError(KeyError):
    """No job with this id in the store."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown job"


class JobAlreadyFinishedError(RuntimeError):
    """The job already ended, so it cannot be cancelled."""


def known_tools(spec: JobSpec) -> list[str]:
    """Tool names the job's agents may use (workers.tools owns the list)."""
    from workers.tools import known_tool_names  # imported late: workers/ sits below swarm's core

    return list(known_tool_names(spec.tools))


def check_spec(spec: JobSpec, tools: list[str] | None = None) -> None:
    """Everything that makes a job unrunnable, found before anything is stored or started.
    Raises PlanValidationError listing every problem. `tools`: the names the runtime's tool
    registry offers (default: the built-in tools)."""
    tools = known_tools(spec) if tools is None else tools
    if spec.plan is not None:
        validate_plan(spec.plan, spec.limits, tools)
    else:
        unknown = [t for t in spec.subagent_tools if t not in tools]
        if unknown:
            raise PlanValidationError(
                [f"subagent_tools names unknown tool {t!r} (known tools: {', '.join(sorted(tools)) or 'none'})"
                 for t in unknown]
            )


class JobService:
    """Submit, watch and cancel jobs; persists every event of every job it runs."""

    def __init__(self, settings: Settings, runtime: SwarmRuntime, store: JobStore | None = None,
                 poll_timeout_s: float = 1.0) -> None:
        self.settings = settings
        self.runtime = runtime
        self._own_store = store is None
        self.store = store if store is not None else JobStore(settings.db_path)
        self.poll_timeout_s = poll_timeout_s
        self._pumps: dict[str, asyncio.Task[None]] = {}
        # One asyncio.Event per job that readers wait on; replaced after each notification.
        self._waiters: dict[str, asyncio.Event] = {}
        self._started = False
        self._stopping = False
        # Admission (settings.max_running_jobs): ids of stored jobs waiting to start, oldest first,
        # and how many starts are in flight (counted before their first await, so concurrent
        # submits cannot overshoot the limit).
        self._queue: deque[str] = deque()
        self._launching = 0
        self._tools_by_config: dict[bytes, list[str]] = {}

    # ---- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Re-attach to jobs still running on the cluster; mark the others interrupted."""
        if self._started:
            return
        self._started = True
        self._stopping = False
        for st in self.store.unfinished_jobs():
            alive = await asyncio.to_thread(self.runtime.has_job, st.id)
            if not alive and st.state == JobState.queued and self.store.last_seq(st.id) == 0:
                self._queue.append(st.id)  # waited for admission and never started: still waiting
                continue
            if alive:
                log.info("re-attaching to job %s after seq %d", st.id, self.store.last_seq(st.id))
                self._spawn_pump(st.id)
            elif self.store.mark_interrupted(st.id, INTERRUPTED_ON_START):
                log.warning("job %s marked interrupted: no live actor", st.id)
                self._notify(st.id)
        await self._admit()

    async def stop(self) -> None:
        """Stop persisting (jobs keep running in their detached actors; a new service re-attaches)."""
        self._stopping = True  # open event streams end; clients resume from their last seq
        pumps = list(self._pumps.values())
        for t in pumps:
            t.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        self._pumps.clear()
        self._queue.clear()  # still `queued` in the store; the next start() queues them again
        for ev in self._waiters.values():
            ev.set()
        self._waiters.clear()
        self._started = False
        if self._own_store:
            self.store.close()

    # ---- jobs -------------------------------------------------------------------------------

    async def submit(self, spec: JobSpec | dict[str, Any]) -> JobStatus:
        """Validate, store and start a job. Raises pydantic.ValidationError or PlanValidationError
        on bad input, with nothing stored or started."""
        if not isinstance(spec, JobSpec):
            spec = JobSpec.model_validate(spec)
        # Checked against the runtime's own registry, which may offer more than the built-in tools.
        check_spec(spec, self._tool_names(spec))
        job_id = new_job_id()
        status = self.store.create_job(job_id, spec)
        if self._queue or not self._has_capacity():
            self._queue.append(job_id)  # stays `queued` (visible through the API) until admitted
            return status
        self._launching += 1
        try:
            await asyncio.to_thread(self.runtime.start_job, job_id, spec)
        except PlanValidationError:
            self.store.delete_job(job_id)  # the runtime refused the plan: keep nothing
            raise
        except Exception as e:
            self.store.end_job(job_id, JobState.failed, f"could not start the job: {type(e).__name__}: {e}")
            self._notify(job_id)
            raise
        finally:
            self._launching -= 1
        self._spawn_pump(job_id)
        return status

    def _tool_names(self, spec: JobSpec) -> list[str]:
        key = spec.tools.to_json()
        if key not in self._tools_by_config:  # building a registry may index a corpus: once per config
            self._tools_by_config[key] = self.runtime.registry_factory(spec.tools).names()
        return self._tools_by_config[key]

    def queued_jobs(self) -> list[str]:
        """Ids of jobs waiting for admission (settings.max_running_jobs), in the order they will start."""
        return list(self._queue)

    def _has_capacity(self) -> bool:
        limit = self.settings.max_running_jobs
        return limit is None or len(self._pumps) + self._launching < limit

    async def _admit(self) -> None:
        """Start queued jobs, oldest first, while the running-jobs limit allows."""
        while self._queue and self._has_capacity() and not self._stopping:
            job_id = self._queue.popleft()
            spec = self.store.get_spec(job_id)
            st = self.store.get_job(job_id)
            if spec is None or st is None or st.state.terminal:
                continue  # cancelled (or deleted) while it waited
            self._launching += 1
            try:
                await asyncio.to_thread(self.runtime.start_job, job_id, spec)
            except Exception as e:
                self.store.end_job(job_id, JobState.failed, f"could not start the job: {type(e).__name__}: {e}")
                self._notify(job_id)
                continue
            finally:
                self._launching -= 1
            self._spawn_pump(job_id)

    def get(self, job_id: str) -> JobStatus:
        st = self.store.get_job(job_id)
        if st is None:
            raise JobNotFoundError(f"unknown job {job_id!r}")
        return st

    def list(self, state: JobState | str | None = None, limit: int = 100, offset: int = 0) -> list[JobStatus]:
        return self.store.list_jobs(state=state, limit=limit, offset=offset)

    def events(self, job_id: str, after_seq: int = 0, limit: int | None = None) -> list[Event]:
        self.get(job_id)
        return self.store.events(job_id, after_seq=after_seq, limit=limit)

    async def cancel(self, job_id: str) -> JobStatus:
        """Ask the runtime to stop the job; it ends `cancelled` once its actor has wound down."""
        st = self.get(job_id)
        if st.state.terminal:
            raise JobAlreadyFinishedError(f"job {job_id!r} already ended ({st.state.value}); nothing to cancel")
        if job_id in self._queue:  # never started: nothing runs, so end it here
            self._queue.remove(job_id)
            self.store.end_job(job_id, JobState.cancelled, "cancelled by request while queued")
            self._notify(job_id)
            return self.get(job_id)
        try:
            await self.runtime.cancel(job_id)
        except JobNotFound:
            if self.store.mark_interrupted(job_id, INTERRUPTED_ACTOR_LOST):
                self._notify(job_id)
        return self.get(job_id)

    async def wait(self, job_id: str, timeout: float | None = None) -> JobStatus:
        """Block until the job ends; raises TimeoutError after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            waiter = self._waiter(job_id)
            st = self.get(job_id)
            if st.state.terminal:
                return st
            left = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
            if left <= 0:
                raise TimeoutError(f"job {job_id!r} still {st.state.value} after {timeout:g} s")
            try:
                await asyncio.wait_for(waiter.wait(), timeout=left)
            except TimeoutError:
                pass

    async def subscribe(self, job_id: str, after_seq: int = 0) -> AsyncIterator[Event]:
        """Stored events after `after_seq`, then live ones as they are persisted; ends after JobFinished."""
        async for ev in self.follow(job_id, after_seq):
            if ev is not None:
                yield ev

    async def follow(self, job_id: str, after_seq: int = 0, heartbeat_s: float | None = None) -> AsyncIterator[Event | None]:
        """Like `subscribe`, but yields None after each `heartbeat_s` without events (SSE keep-alives)."""
        self.get(job_id)
        cursor = after_seq
        idle_since = time.monotonic()
        while not self._stopping:  # a stopping service ends open streams; clients resume later
            waiter = self._waiter(job_id)  # taken before reading, so no notification slips between
            batch = self.store.events(job_id, after_seq=cursor, limit=500)
            for ev in batch:
                cursor = ev.seq
                yield ev
                if isinstance(ev, JobFinished):
                    return
            if batch:
                idle_since = time.monotonic()
                continue
            if self.get(job_id).state.terminal:
                return  # the cursor is already past the job's end
            try:
                await asyncio.wait_for(waiter.wait(), timeout=1.0)
            except TimeoutError:
                pass
            if heartbeat_s is not None and time.monotonic() - idle_since >= heartbeat_s:
                idle_since = time.monotonic()
                yield None

    # ---- internals --------------------------------------------------------------------------

    def _waiter(self, job_id: str) -> asyncio.Event:
        ev = self._waiters.get(job_id)
        if ev is None:
            ev = self._waiters[job_id] = asyncio.Event()
        return ev

    def _notify(self, job_id: str) -> None:
        ev = self._waiters.pop(job_id, None)
        if ev is not None:
            ev.set()

    def _spawn_pump(self, job_id: str) -> None:
        if job_id in self._pumps and not self._pumps[job_id].done():
            return
        task = asyncio.get_running_loop().create_task(self._pump(job_id), name=f"swarm-pump-{job_id}")
        self._pumps[job_id] = task
        task.add_done_callback(lambda t, j=job_id: self._pump_done(j, t))

    def _pump_done(self, job_id: str, task: asyncio.Task[None]) -> None:
        if self._pumps.get(job_id) is task:
            self._pumps.pop(job_id, None)
        if self._queue and not self._stopping:  # a slot freed up: start the next queued job
            asyncio.get_running_loop().create_task(self._admit(), name="swarm-admit")

    async def _pump(self, job_id: str) -> None:
        """Persist the job's events until its JobFinished, then release its actor."""
        after = self.store.last_seq(job_id)
        failures = 0
        while True:
            try:
                batch = await self.runtime.poll_events(job_id, after, timeout_s=self.poll_timeout_s)
            except asyncio.CancelledError:
                raise
            except JobNotFound:
                if self.store.mark_interrupted(job_id, INTERRUPTED_ACTOR_LOST):
                    log.warning("job %s: actor lost, marked interrupted", job_id)
                self._notify(job_id)
                return
            except Exception as e:  # a transient Ray error: retry with backoff, give up eventually
                failures += 1
                log.warning("job %s: polling events failed (%d): %s", job_id, failures, e)
                if failures >= 20:
                    self.store.mark_interrupted(job_id, f"{INTERRUPTED_ACTOR_LOST}: {type(e).__name__}: {e}")
                    self._notify(job_id)
                    return
                await asyncio.sleep(min(0.1 * 2**failures, 5.0))
                continue
            failures = 0
            batch = [e for e in batch if e.seq > after]
            if not batch:
                continue
            self.store.append_events(job_id, batch)
            after = max(e.seq for e in batch)
            self._notify(job_id)
            if any(isinstance(e, JobFinished) for e in batch):
                try:
                    await self.runtime.release(job_id)
                except Exception as e:  # the events are safe; a lingering actor is only a leak
                    log.warning("job %s: releasing its actor failed: %s", job_id, e)
                return
