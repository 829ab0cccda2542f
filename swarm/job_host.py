"""Job hosts: a few long-lived async Ray actors ("swarm-jobhost-<i>") that each run many jobs.

A job is an in-process object (Job) inside its host; the host owns the job's events. The job schedules DAG nodes eagerly (a node starts the moment its dependencies finish, no superstep
barrier), dispatches each attempt to a shared worker, retries failed sub-agents with exponential
backoff, re-dispatches the sub-agents of a worker that died, hands out the job-wide tool budget,
enforces the job timeout and cancellation, and numbers every event (seq 1, 2, 3, ...). In
orchestrator mode it also runs the orchestrator agent (swarm.orchestrator) in the host's event loop,
or, with JobSpec.orchestrator == "plan", the plan-writing orchestrator (swarm.plan_writer).

A host replaces the former one-actor-per-job design: starting a job is a method call, not a new
process, and 50 concurrent jobs cost no extra processes. Workers receive the job-level settings once
(open_job), stream a job's events in batches shared by all of its runs on that worker, and lease the
job-wide tool budget in small blocks (returned unused with the run's result).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import networkx as nx
import ray
from ray.exceptions import ActorDiedError, RayActorError

from swarm.critical_steps import AgentSteps, critical_steps
from swarm.dag import validate_plan
from swarm.events import (
    ORCHESTRATOR_ID,
    Event,
    JobFinished,
    JobStarted,
    JobSubmitted,
    SubAgentCancelled,
    SubAgentCreated,
    SubAgentFailed,
    SubAgentFinished,
    SubAgentRetried,
    SubAgentStarted,
    SubAgentStep,
    ToolCalled,
    _Event,
)
from swarm.fan_out import chunk_text, chunks, copy_spec, distinct, list_items, merge_results, range_task, range_windows
from swarm.llm import ChatMessage, ChatResult, LLMClient, LLMError
from swarm.messages import AGGREGATOR_SYSTEM_PROMPT, aggregate_user_message, compose_task_message, concat_results
from swarm.orchestrator import Orchestrator, SubAgentOutcome
from swarm.plan_writer import DEFAULT_MAX_REPAIRS, PlanRepairError, load_plan_format, write_plan
from swarm.plans import JobMetrics, JobSpec, JobState, LLMConfig, SubAgentSpec, SwarmPlan, ToolsConfig, redact_llm_keys
from swarm.row_filter import filter_answer
from swarm.worker_pool import JobContext, SubAgentRun, SubAgentRunResult, WorkerPool
from workers.tools.registry import ToolRegistry

log = logging.getLogger(__name__)

JOB_HOST_PREFIX = "swarm-jobhost-"
# Long polls, event pushes and budget leases of many jobs run concurrently in one host.
JOB_HOST_MAX_CONCURRENCY = 10_000
# A sub-agent whose workers keep dying is given up after this many re-dispatches.
MAX_REDISPATCHES = 10
# How long a cancelled node waits for its worker to confirm that the agent and its tools stopped.
CANCEL_CONFIRM_S = 5.0
MAX_EVENTS_PER_POLL = 5000
# How long a cancelled run's tool lease may take to be settled by its worker before it counts as used.
LEASE_SETTLE_S = 3.0  # the worker's return of a cancelled run's lease can lag on a loaded machine

class JobFailure(RuntimeError):
    """The job cannot succeed; the message is the job's error."""


# A run leases at most this many tool calls at a time (fewer when the budget runs low).
TOOL_LEASE_BLOCK = 16


def job_host_name(index: int) -> str:
    return f"{JOB_HOST_PREFIX}{index}"


@dataclass
class JobConfig:
    job_id: str
    spec: JobSpec
    known_tools: list[str]
    num_workers: int
    namespace: str
    llm_factory: Callable[[LLMConfig], LLMClient]
    registry_factory: Callable[[ToolsConfig], ToolRegistry]
    worker_options: dict[str, Any] = field(default_factory=dict)  # placement of worker actors


@dataclass
class _Node:
    spec: SubAgentSpec
    stage: int
    state: str = "pending"  # pending | running | finished | failed | cancelled
    steps: int = 0  # model calls over all attempts, counted from its events
    outcome: SubAgentOutcome | None = None
    task: asyncio.Task[SubAgentOutcome] | None = None
    ref: Any = None  # ObjectRef of the attempt in flight
    token: str | None = None
    # A fan-out node (spec.for_each) runs no agent itself: these are the ids of its copies.
    children: list[str] | None = None


def redacted_spec(spec: JobSpec) -> dict[str, Any]:
    """The spec as JobSubmitted carries it: events are stored and served, so no API key in them."""
    return redact_llm_keys(spec.model_dump(mode="json"))


def _error_text(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}".strip()


class Job:
    """One job inside its host: runs it and owns its events. Not an actor; see JobHost."""

    def __init__(self, config: JobConfig, host: Any, host_name: str) -> None:
        self._cfg = config
        self._spec = config.spec
        self._limits = config.spec.limits
        self._job_id = config.job_id
        self._events: list[Event] = []
        self._changed = asyncio.Event()
        self._finished = False
        self._nodes: dict[str, _Node] = {}
        self.graph: nx.DiGraph = nx.DiGraph()
        self._runs: dict[str, _Node] = {}  # live attempt token -> node
        self._pool = WorkerPool(config.num_workers, config.namespace, config.worker_options)
        self._tool_calls = 0  # leased to runs, minus what they gave back unused
        self._leases: dict[str, int] = {}  # run token -> calls leased to it and not yet settled
        self._settled = asyncio.Event()  # set (and replaced) whenever a lease is settled
        self._orchestrator_steps = 0
        self._retries = 0
        self._tokens = [0, 0]
        self._started_at: float | None = None
        self._main: asyncio.Task[None] | None = None
        self._exec: asyncio.Task[str] | None = None
        self._cancel_requested = False
        self._llm: LLMClient | None = None
        self._host = host  # the host's own handle: workers push events and lease budget through it
        self._host_name = host_name
        self._released = False
        self._instance = uuid.uuid4().hex
        self.emit(JobSubmitted(name=self._spec.name, mode=self._spec.mode, spec=redacted_spec(self._spec)))

    # ---- events -------------------------------------------------------------------------------

    def emit(self, event: _Event) -> None:
        if self._finished:
            return
        event.job_id = self._job_id
        event.seq = len(self._events) + 1
        self._events.append(event)  # type: ignore[arg-type]
        if isinstance(event, SubAgentStep):
            self._tokens[0] += event.prompt_tokens
            self._tokens[1] += event.completion_tokens
            node = self._nodes.get(event.agent_id)
            if node is not None:
                node.steps += 1
        elif isinstance(event, SubAgentRetried):
            self._retries += 1
        # Wake every long poll: swap in a fresh Event for the next wait.
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def events_after(self, after_seq: int, timeout_s: float) -> list[Event]:
        """Long poll: events with seq > after_seq, or [] after timeout_s without any."""
        after = max(0, int(after_seq))
        deadline = time.monotonic() + max(0.0, timeout_s)
        while True:
            if len(self._events) > after:
                return self._events[after : after + MAX_EVENTS_PER_POLL]
            remaining = deadline - time.monotonic()
            if self._finished or self._released or remaining <= 0:
                return []
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except asyncio.TimeoutError:
                return []

    def push_events(self, token: str, events: list[_Event]) -> None:
        """Events of a running attempt, from its worker; a stale attempt's events are dropped."""
        if token not in self._runs:
            return
        for ev in events:
            self.emit(ev)

    def lease_tool_calls(self, token: str, want: int) -> int:
        """Grant up to `want` calls of the job-wide budget (limits.max_tool_calls) to a live run.

        Blocks shrink as the budget runs low (a share of what is left per live run, at least 1), so
        one run cannot sit on calls another needs; unused calls come back with the run's result."""
        left = self._limits.max_tool_calls - self._tool_calls
        if token not in self._runs or left <= 0 or want <= 0:
            return 0
        share = max(1, left // (2 * max(1, len(self._runs))))
        grant = min(want, left, share)
        self._tool_calls += grant
        self._leases[token] = self._leases.get(token, 0) + grant
        return grant

    def return_tool_calls(self, token: str, unused: int) -> None:
        """Settle a run's lease: its unused calls go back to the budget (once; later calls are no-ops).
        A run lost with its worker never settles, so its whole lease counts as used."""
        self._tool_calls -= max(0, min(unused, self._leases.pop(token, 0)))
        settled, self._settled = self._settled, asyncio.Event()
        settled.set()

    def tool_budget_left(self) -> int:
        return max(0, self._limits.max_tool_calls - self._tool_calls)

    # ---- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        if self._main is None and not self._finished:
            self._main = asyncio.create_task(self._run_job())

    def discard(self) -> None:
        """Drop the job from its host (release): stop whatever still runs and wake long polls."""
        self._released = True
        if self._main is not None and not self._main.done():
            self._cancel_requested = True
            if self._exec is not None:
                self._exec.cancel()
            self._main.cancel()
        for t in [n.task for n in self._nodes.values() if n.task is not None and not n.task.done()]:
            t.cancel()
        self._pool.close_job(self._job_id, self._instance)
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def cancel(self) -> None:
        """Stop every sub-agent and tool; returns once the job has finished as cancelled."""
        if self._finished:
            return
        self._cancel_requested = True
        if self._main is None:  # cancelled before it started
            self._finish(JobState.cancelled, None, "cancelled before it started")
            return
        if self._exec is not None:
            self._exec.cancel()
        await asyncio.wait({self._main}, timeout=CANCEL_CONFIRM_S * 2)

    async def _run_job(self) -> None:
        self.emit(JobStarted())
        self._started_at = time.time()
        state, result, error = JobState.failed, None, None
        try:
            self._exec = asyncio.create_task(self._execute())
            if self._cancel_requested:
                self._exec.cancel()
            done, _ = await asyncio.wait({self._exec}, timeout=self._limits.job_timeout_s)
            if not done:
                self._exec.cancel()
                await asyncio.wait({self._exec})
            ok = bool(done) and not self._exec.cancelled() and self._exec.exception() is None
            if ok:  # a cancel that came too late does not undo a finished job
                state, result = JobState.succeeded, self._exec.result()
            elif self._cancel_requested:
                state, error = JobState.cancelled, "cancelled by request"
            elif not done:
                error = f"job timed out after {self._limits.job_timeout_s:g} s (limits.job_timeout_s)"
            elif self._exec.cancelled():
                error = "the job was stopped unexpectedly"
            elif isinstance(exc := self._exec.exception(), JobFailure):
                error = str(exc)
            else:
                log.error("job %s crashed", self._job_id, exc_info=exc)
                error = f"internal error: {_error_text(exc)}" if exc else "internal error"
        except Exception as e:  # never leave a job without its JobFinished
            log.exception("job %s crashed", self._job_id)
            error = f"internal error: {_error_text(e)}"
        finally:
            await self._stop_nodes()
        self._finish(state, result, error)

    def _finish(self, state: JobState, result: str | None, error: str | None) -> None:
        self.emit(JobFinished(state=state, result=result, error=error, metrics=self._metrics()))
        self._finished = True
        self._pool.close_job(self._job_id, self._instance)  # workers drop this job's clients and registries

    async def _stop_nodes(self) -> None:
        tasks = [n.task for n in self._nodes.values() if n.task is not None and not n.task.done()]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=CANCEL_CONFIRM_S * 2)

    def _metrics(self) -> JobMetrics:
        # A fan-out node ends after its copies: they are its dependencies here (it adds no steps).
        agents = [AgentSteps(n.spec.id, n.stage, n.steps, [*n.spec.depends_on, *(n.children or [])])
                  for n in self._nodes.values()]
        try:
            crit = critical_steps(self._orchestrator_steps, agents)
        except ValueError:  # cannot happen for a validated DAG; metrics must never sink the job
            log.exception("critical_steps failed for job %s", self._job_id)
            crit = 0
        return JobMetrics(
            critical_steps=crit,
            total_steps=self._orchestrator_steps + sum(a.steps for a in agents),
            orchestrator_steps=self._orchestrator_steps,
            subagents=sum(1 for n in self._nodes.values() if n.children is None),
            tool_calls=self._tool_calls,
            prompt_tokens=self._tokens[0],
            completion_tokens=self._tokens[1],
            wall_time_s=(time.time() - self._started_at) if self._started_at else 0.0,
            retries=self._retries,
        )

    # ---- the two modes ------------------------------------------------------------------------

    def _get_llm(self) -> LLMClient:
        if self._llm is None:
            try:
                self._llm = self._cfg.llm_factory(self._spec.llm)
            except Exception as e:  # e.g. no endpoint configured: the job's error, not a crash
                raise JobFailure(f"cannot build the model client: {_error_text(e)}") from e
        return self._llm

    async def _execute(self) -> str:
        if self._spec.plan is not None:
            return await self._execute_plan(self._spec.plan)
        if self._spec.orchestrator == "plan":
            return await self._execute_plan_writer()
        return await self._execute_orchestrator()

    async def _execute_plan(self, plan: SwarmPlan) -> str:
        self.graph = validate_plan(plan, self._limits, self._cfg.known_tools)
        # Created in dependency order, so every node's dependencies exist when it is launched.
        order = list(nx.lexicographical_topological_sort(self.graph))
        nodes = [self._add_node(self.graph.nodes[i]["spec"], stage=1) for i in order]
        for node in nodes:
            node.task = asyncio.create_task(self._run_node(node))
        pending = {n.task for n in nodes if n.task is not None}
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                out = t.result()
                if not out.ok:
                    node = next(n for n in nodes if n.task is t)
                    raise JobFailure(f"sub-agent {node.spec.id!r} failed: {out.text}")
        results = [(n.spec, n.outcome.text if n.outcome else "") for n in (self._nodes[s.id] for s in plan.subagents)]
        if plan.aggregate == "llm":
            return await self._aggregate_llm(plan, results)
        return concat_results(results)

    async def _aggregate_llm(self, plan: SwarmPlan, results: list[tuple[SubAgentSpec, str]]) -> str:
        # After a written plan the orchestrator is already running and its steps continue.
        after_writer = self._spec.plan is None
        messages = [
            ChatMessage(role="system", content=AGGREGATOR_SYSTEM_PROMPT),
            ChatMessage(role="user", content=aggregate_user_message(plan.aggregate_prompt, results)),
        ]
        if not after_writer:
            self.emit(SubAgentStarted(agent_id=ORCHESTRATOR_ID, worker=self._host_name))
        try:
            res = await self._get_llm().chat(
                messages, temperature=self._spec.llm.temperature, max_tokens=self._spec.llm.max_tokens
            )
        except asyncio.CancelledError:
            self.emit(SubAgentCancelled(agent_id=ORCHESTRATOR_ID))
            raise
        except Exception as e:
            self.emit(SubAgentFailed(agent_id=ORCHESTRATOR_ID, error=_error_text(e)))
            if isinstance(e, JobFailure):
                raise
            raise JobFailure(f"the aggregation model call failed: {_error_text(e)}") from e
        self._orchestrator_steps += 1
        msg = res.message
        self.emit(
            SubAgentStep(
                agent_id=ORCHESTRATOR_ID,
                step=self._orchestrator_steps,
                content=msg.content,
                reasoning=msg.reasoning_content,
                prompt_tokens=res.usage.prompt_tokens,
                completion_tokens=res.usage.completion_tokens,
            )
        )
        if not after_writer:
            self.emit(SubAgentFinished(agent_id=ORCHESTRATOR_ID, result=msg.content or "", steps=1))
        return msg.content or ""

    async def _execute_plan_writer(self) -> str:
        """JobSpec.orchestrator == "plan": the model writes one whole plan (swarm.plan_writer; every
        call, repairs included, is one orchestrator step), the DAG runs like a submitted plan (stage 1),
        and the answer is aggregated as the plan says or with spec.plan_aggregate_prompt."""
        spec = self._spec
        assert spec.task is not None
        self.emit(SubAgentStarted(agent_id=ORCHESTRATOR_ID, worker=self._host_name))
        unknown = sorted(set(spec.subagent_tools) - set(self._cfg.known_tools))
        if unknown:
            raise self._fail_orchestrator(
                f"subagent_tools names unknown tools {unknown} (known: {', '.join(sorted(self._cfg.known_tools))})"
            )
        try:
            fmt = load_plan_format()
        except (LookupError, TypeError) as e:
            raise self._fail_orchestrator(f"cannot load the plan format: {e}") from e

        def on_step(n: int, res: ChatResult) -> None:
            self._orchestrator_steps = n
            msg = res.message
            self.emit(SubAgentStep(agent_id=ORCHESTRATOR_ID, step=n, content=msg.content, reasoning=msg.reasoning_content,
                                   prompt_tokens=res.usage.prompt_tokens, completion_tokens=res.usage.completion_tokens))

        # Planner calls and the aggregation share the orchestrator's step cap.
        max_repairs = max(0, min(DEFAULT_MAX_REPAIRS, self._limits.orchestrator_max_steps - 2))
        try:
            written = await write_plan(self._get_llm(), fmt, spec.task, self._limits, spec.subagent_tools,
                                       max_repairs=max_repairs, temperature=spec.llm.temperature,
                                       max_tokens=spec.llm.max_tokens, on_step=on_step)
        except asyncio.CancelledError:
            self.emit(SubAgentCancelled(agent_id=ORCHESTRATOR_ID))
            raise
        except PlanRepairError as e:
            raise self._fail_orchestrator(f"the planner wrote no valid plan: {e}") from e
        except LLMError as e:
            raise self._fail_orchestrator(f"the planner's model call failed: {e}") from e
        plan = written.plan
        if spec.plan_aggregate_prompt.strip():
            plan = plan.model_copy(update={"aggregate": "llm", "aggregate_prompt": spec.plan_aggregate_prompt})
        try:
            answer = await self._execute_plan(plan)
        except (asyncio.CancelledError, JobFailure) as e:
            # The orchestrator ends with its job, unless the aggregation call already said how.
            last = next((ev for ev in reversed(self._events) if getattr(ev, "agent_id", None) == ORCHESTRATOR_ID), None)
            if not isinstance(last, (SubAgentFailed, SubAgentCancelled)):
                cancelled = isinstance(e, asyncio.CancelledError)
                self.emit(SubAgentCancelled(agent_id=ORCHESTRATOR_ID) if cancelled
                          else SubAgentFailed(agent_id=ORCHESTRATOR_ID, error=str(e)))
            raise
        self.emit(SubAgentFinished(agent_id=ORCHESTRATOR_ID, result=answer, steps=self._orchestrator_steps))
        return answer

    def _fail_orchestrator(self, error: str) -> JobFailure:
        self.emit(SubAgentFailed(agent_id=ORCHESTRATOR_ID, error=error))
        return JobFailure(error)

    async def _execute_orchestrator(self) -> str:
        self.emit(SubAgentStarted(agent_id=ORCHESTRATOR_ID, worker=self._host_name))
        try:
            orch = Orchestrator(self._spec, self._get_llm(), self, self._cfg.known_tools)
            out = await orch.run()
        except asyncio.CancelledError:
            self.emit(SubAgentCancelled(agent_id=ORCHESTRATOR_ID))
            raise
        except LLMError as e:
            self.emit(SubAgentFailed(agent_id=ORCHESTRATOR_ID, error=_error_text(e)))
            raise JobFailure(f"the orchestrator's model call failed: {e}") from e
        except Exception as e:
            self.emit(SubAgentFailed(agent_id=ORCHESTRATOR_ID, error=_error_text(e)))
            raise
        finally:  # counted here so that a timeout or a failure still reports them
            self._orchestrator_steps = sum(
                1 for e in self._events if isinstance(e, SubAgentStep) and e.agent_id == ORCHESTRATOR_ID
            )
        calls = sum(1 for e in self._events if isinstance(e, ToolCalled) and e.agent_id == ORCHESTRATOR_ID)
        self.emit(SubAgentFinished(agent_id=ORCHESTRATOR_ID, result=out.answer, steps=out.steps, tool_calls=calls))
        return out.answer

    def launch(self, spec: SubAgentSpec, stage: int) -> asyncio.Future[SubAgentOutcome]:
        """Add a node to the growing DAG and start it (orchestrator mode); awaiting gives its outcome."""
        self.graph.add_node(spec.id, spec=spec)
        for dep in spec.depends_on:
            self.graph.add_edge(dep, spec.id)
        node = self._add_node(spec, stage)
        node.task = asyncio.create_task(self._run_node(node))
        # Awaited through a shield: if the orchestrator step is cancelled, _stop_nodes stops the node.
        return asyncio.shield(node.task)

    def _add_node(self, spec: SubAgentSpec, stage: int, fan_out_of: str = "") -> _Node:
        node = _Node(spec=spec, stage=stage)
        self._nodes[spec.id] = node
        self.emit(
            SubAgentCreated(
                agent_id=spec.id,
                name=spec.name,
                system_prompt=spec.system_prompt,
                task=spec.task,
                tools=list(spec.tools),
                depends_on=list(spec.depends_on),
                stage=stage,
                fan_out_of=fan_out_of,
            )
        )
        return node

    # ---- one node -----------------------------------------------------------------------------

    async def _run_node(self, node: _Node) -> SubAgentOutcome:
        try:
            deps = [self._nodes[d] for d in node.spec.depends_on]
            waiting = [d.task for d in deps if d.task is not None]
            if waiting:
                await asyncio.wait(waiting)  # not `await task`: cancelling us must not cancel them
            failed = [d for d in deps if d.outcome is None or not d.outcome.ok]
            if failed:
                names = ", ".join(repr(d.spec.id) for d in failed)
                out = SubAgentOutcome(False, f"not run because its dependency {names} failed")
                node.state, node.outcome = "failed", out
                self.emit(SubAgentFailed(agent_id=node.spec.id, error=out.text, attempt=0, will_retry=False))
                return out
            if node.spec.for_each is not None or node.spec.for_range is not None:
                out = await self._fan_out(node, deps)
            else:
                message = compose_task_message(node.spec.task, [(d.spec, d.outcome.text) for d in deps if d.outcome])
                out = await self._dispatch(node, message)
            node.outcome = out
            return out
        except asyncio.CancelledError:
            await self._cancel_node(node)
            raise

    async def _fan_out(self, node: _Node, deps: list[_Node]) -> SubAgentOutcome:
        """Run `node` as one copy per chunk of its source's list, or per window of its range
        (swarm.fan_out), all in parallel or `max_parallel` at a time; its result is the copies'
        results merged. Fails if the list is empty, the copies would pass max_subagents, or a copy
        fails."""
        spec = node.spec
        node.state, node.children = "running", []
        self.emit(SubAgentStarted(agent_id=spec.id, worker="fan-out"))
        dep_results = [(d.spec, d.outcome.text if d.outcome else "") for d in deps]
        if spec.for_range is not None:
            fr = spec.for_range
            tasks = [range_task(spec.task, s, e) for s, e in range_windows(fr)]
            specs = [copy_spec(spec, k, task) for k, task in enumerate(tasks, start=1)]
            messages = [compose_task_message(task, dep_results) for task in tasks]
            what = f"its range {fr.start} to {fr.end} in windows of {fr.chunk}"
        else:
            fe = spec.for_each
            assert fe is not None
            source = self._nodes[fe.source]
            label, listed = list_items(source.outcome.text if source.outcome else "")
            items = distinct(listed)
            repeats = f" (and {len(listed) - len(items)} repeated items, dropped)" if len(listed) > len(items) else ""
            if not items:
                return self._fail_node(node, 1, f"it fans out over {fe.source!r}, whose answer holds no list items")
            parts = chunks(items, fe.chunk)
            specs = [copy_spec(spec, k) for k in range(1, len(parts) + 1)]
            # Each copy sees only its chunk of the source's list (with the list's label).
            messages = [compose_task_message(spec.task, [(d, chunk_text(label, part) if d.id == fe.source else text)
                                                         for d, text in dep_results]) for part in parts]
            what = f"its {len(items)} items{repeats} in chunks of {fe.chunk}"
        agents = sum(1 for n in self._nodes.values() if n.children is None)
        if agents + len(specs) > self._limits.max_subagents:
            return self._fail_node(
                node, 1,
                f"{what} need {len(specs)} copies, which would make "
                f"{agents + len(specs)} sub-agents, more than the limit max_subagents={self._limits.max_subagents}",
            )
        taken = [c.id for c in specs if c.id in self._nodes]
        if taken:
            return self._fail_node(node, 1, f"its copies' ids {taken} are taken by other agents of the plan")
        lanes = (spec.for_range or spec.for_each).max_parallel
        copies: list[_Node] = []
        for k, (cs, message) in enumerate(zip(specs, messages)):
            # max_parallel N: copy k waits for copy k-N and lists it as a dependency (without reading
            # its result), so the DAG, the events and CriticalSteps all show the lanes.
            before = copies[k - lanes] if lanes is not None and k >= lanes else None
            if before is not None:
                cs = cs.model_copy(update={"depends_on": [*cs.depends_on, before.spec.id]})
            self.graph.add_node(cs.id, spec=cs)
            for dep in cs.depends_on:
                self.graph.add_edge(dep, cs.id)
            self.graph.add_edge(cs.id, spec.id)
            child = self._add_node(cs, node.stage, fan_out_of=spec.id)
            node.children.append(cs.id)
            child.task = asyncio.create_task(self._run_copy(child, message, before))
            copies.append(child)
        await asyncio.wait([c.task for c in copies if c.task is not None])
        failed = [c for c in copies if c.outcome is None or not c.outcome.ok]
        if failed:
            first = failed[0]
            why = first.outcome.text if first.outcome else "no outcome"
            return self._fail_node(node, 1, f"{len(failed)} of its {len(copies)} copies failed; {first.spec.id!r}: {why}")
        merged = merge_results([(c.spec, c.outcome.text) for c in copies if c.outcome])
        node.state = "finished"
        self.emit(SubAgentFinished(agent_id=spec.id, result=merged, steps=0, tool_calls=0))
        return SubAgentOutcome(True, merged)

    async def _run_copy(self, node: _Node, message: str, before: _Node | None = None) -> SubAgentOutcome:
        try:
            if before is not None and before.task is not None:
                await asyncio.wait([before.task])  # its lane's previous copy; not `await`: see _run_node
            node.outcome = await self._dispatch(node, message)
            return node.outcome
        except asyncio.CancelledError:
            await self._cancel_node(node)
            raise

    async def _cancel_node(self, node: _Node) -> None:
        if node.state not in ("pending", "running"):
            return
        ref, token = node.ref, node.token
        node.state = "cancelled"
        self.emit(SubAgentCancelled(agent_id=node.spec.id))
        if token is not None:
            self._runs.pop(token, None)
        if ref is not None:
            ray.cancel(ref)
            # Wait (bounded) for the worker to unwind the agent, which kills running tools.
            await asyncio.wait([asyncio.wrap_future(ref.future())], timeout=CANCEL_CONFIRM_S)
            # The worker settles the run's tool lease on the side (its result never comes): wait
            # briefly, so that the job's tool_calls count what was used, not what was leased.
            deadline = time.monotonic() + LEASE_SETTLE_S
            while token in self._leases and (left := deadline - time.monotonic()) > 0:
                try:
                    await asyncio.wait_for(self._settled.wait(), left)
                except asyncio.TimeoutError:
                    break

    async def _dispatch(self, node: _Node, message: str) -> SubAgentOutcome:
        """Run attempts until one succeeds or the retries are spent; re-dispatch on worker death."""
        spec, lim = node.spec, self._limits
        attempt = failures = redispatches = 0
        node.state = "running"
        while True:
            attempt += 1
            try:
                slot = await self._pool.acquire()
            except Exception as e:  # no worker can be started (e.g. the cluster is out of resources)
                return self._fail_node(node, attempt, f"no worker available: {_error_text(e)}")
            token = f"{spec.id}#{attempt}"
            node.token = token
            self._runs[token] = node
            self.emit(SubAgentStarted(agent_id=spec.id, attempt=attempt, worker=slot.name))
            # Only the node travels with each run; the job-level settings went once per worker.
            run = SubAgentRun(
                job_id=self._job_id,
                instance=self._instance,
                token=token,
                spec=spec,
                task_message=message,
                max_steps=min(spec.max_steps or lim.subagent_max_steps, lim.subagent_max_steps),
                tool_timeout_s=lim.tool_timeout_s,
                tool_lease=self.lease_tool_calls(token, TOOL_LEASE_BLOCK) if spec.tools else 0,
            )
            try:
                while True:
                    await self._pool.open_job(slot, self._job_context)
                    node.ref = slot.handle.run_subagent.remote(run)
                    res: SubAgentRunResult = await node.ref
                    if not res.needs_open:
                        break
                    self._pool.forget_open(slot, self._job_id)  # the worker lost the job's settings
                self.push_events(token, res.events)  # its tail, before the job reacts to its end
                self.return_tool_calls(token, res.unused_tool_calls)
            except RayActorError as e:
                self._runs.pop(token, None)
                node.ref = node.token = None
                died = isinstance(e, ActorDiedError)
                if died:
                    self._pool.mark_dead(slot)
                redispatches += 1
                if redispatches > MAX_REDISPATCHES:
                    return self._fail_node(node, attempt, f"its worker died {redispatches} times; last: {e}")
                # Not the agent's fault: recorded as a retry, not counted against max_retries.
                delay = 0.0 if died else 0.2 * redispatches
                what = "died" if died else "became unreachable"
                self.emit(
                    SubAgentRetried(
                        agent_id=spec.id,
                        attempt=attempt + 1,
                        delay_s=delay,
                        reason=f"worker {slot.name} {what}; re-dispatched to another worker",
                    )
                )
                await asyncio.sleep(delay)
                continue
            except Exception as e:  # the call itself failed (e.g. arguments that cannot be sent)
                res = SubAgentRunResult(ok=False, error=_error_text(e))
            finally:
                self._pool.release(slot)
            self._runs.pop(token, None)
            node.ref = node.token = None
            if res.ok:
                node.state = "finished"
                result, note = filter_answer(spec.keep_rows, res.result)
                self.emit(SubAgentFinished(agent_id=spec.id, result=result, steps=res.steps,
                                           tool_calls=res.tool_calls, filter_note=note))
                return SubAgentOutcome(True, result)
            failures += 1
            will_retry = failures <= lim.max_retries
            self.emit(SubAgentFailed(agent_id=spec.id, error=res.error, attempt=attempt, will_retry=will_retry))
            if not will_retry:
                node.state = "failed"
                return SubAgentOutcome(False, f"failed after {failures} attempt(s): {res.error}")
            delay = lim.retry_backoff_s * (2 ** (failures - 1))
            self.emit(SubAgentRetried(agent_id=spec.id, attempt=attempt + 1, delay_s=delay, reason=res.error))
            await asyncio.sleep(delay)

    def _job_context(self) -> JobContext:
        return JobContext(
            job_id=self._job_id,
            instance=self._instance,
            llm_config=self._spec.agent_llm,
            tools_config=self._spec.tools,
            llm_factory=self._cfg.llm_factory,
            registry_factory=self._cfg.registry_factory,
            host=self._host,
        )

    def _fail_node(self, node: _Node, attempt: int, error: str) -> SubAgentOutcome:
        node.state = "failed"
        self.emit(SubAgentFailed(agent_id=node.spec.id, error=error, attempt=attempt, will_retry=False))
        return SubAgentOutcome(False, error)


class JobHost:
    """A long-lived async actor that runs many jobs (Job objects) and answers for them by job id.

    Methods that name an unknown job answer None/False/0 rather than raising, so the runtime can
    tell "not on this host" from "host dead" (a RayActorError)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._jobs: dict[str, Job] = {}
        self._handle: Any = None

    def _self(self) -> Any:
        if self._handle is None:
            self._handle = ray.get_runtime_context().current_actor
        return self._handle

    async def ping(self) -> str:
        return self.name

    async def start_job(self, config: JobConfig) -> None:
        if config.job_id in self._jobs:
            raise ValueError(f"job {config.job_id!r} already runs on {self.name}")
        job = Job(config, self._self(), self.name)
        self._jobs[config.job_id] = job
        job.start()

    async def has_job(self, job_id: str) -> bool:
        return job_id in self._jobs

    async def list_jobs(self) -> list[str]:
        return list(self._jobs)

    async def events_after(self, job_id: str, after_seq: int, timeout_s: float) -> list[Event] | None:
        job = self._jobs.get(job_id)
        return None if job is None else await job.events_after(after_seq, timeout_s)

    async def cancel(self, job_id: str) -> bool:
        job = self._jobs.get(job_id)
        if job is None:
            return False
        await job.cancel()
        return True

    async def release(self, job_id: str) -> bool:
        job = self._jobs.pop(job_id, None)
        if job is None:
            return False
        job.discard()
        return True

    async def push_events(self, job_id: str, batch: list[tuple[str, list[_Event]]]) -> None:
        """Events of one worker's runs of a job, grouped by run token, in emission order."""
        job = self._jobs.get(job_id)
        if job is None:
            return
        for token, events in batch:
            job.push_events(token, events)

    async def lease_tool_calls(self, job_id: str, token: str, want: int) -> int:
        job = self._jobs.get(job_id)
        return 0 if job is None else job.lease_tool_calls(token, want)

    async def return_tool_calls(self, job_id: str, token: str, unused: int) -> None:
        job = self._jobs.get(job_id)
        if job is not None:
            job.return_tool_calls(token, unused)

    async def warm_workers(self, num_workers: int, namespace: str, worker_options: dict[str, Any]) -> list[str]:
        """Start the shared workers ahead of the first job (so it does not pay their start-up)."""
        pool = WorkerPool(num_workers, namespace, worker_options)
        return await pool.warm()


JobHostRemote = ray.remote(JobHost)
