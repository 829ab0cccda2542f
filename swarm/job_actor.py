"""The job actor: one detached async Ray actor per job that runs it and owns all of its events.

It schedules DAG nodes eagerly (a node starts the moment its dependencies finish, no superstep
barrier), dispatches each attempt to a shared worker, retries failed sub-agents with exponential
backoff, re-dispatches the sub-agents of a worker that died, hands out the job-wide tool budget,
enforces the job timeout and cancellation, and numbers every event (seq 1, 2, 3, ...). In
orchestrator mode it also runs the orchestrator agent (swarm.orchestrator) in its own event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
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
from swarm.llm import ChatMessage, LLMClient, LLMError
from swarm.orchestrator import Orchestrator, SubAgentOutcome
from swarm.plans import JobMetrics, JobSpec, JobState, LLMConfig, SubAgentSpec, ToolsConfig
from swarm.worker_pool import SubAgentRun, SubAgentRunResult, WorkerPool
from workers.tools.registry import ToolRegistry

log = logging.getLogger(__name__)

JOB_ACTOR_MAX_CONCURRENCY = 2000
# A sub-agent whose workers keep dying is given up after this many re-dispatches.
MAX_REDISPATCHES = 10
# How long a cancelled node waits for its worker to confirm that the agent and its tools stopped.
CANCEL_CONFIRM_S = 5.0
MAX_EVENTS_PER_POLL = 5000

AGGREGATOR_SYSTEM_PROMPT = (
    "You are the orchestrator of an agent swarm. Sub-agents worked on parts of a task in parallel; "
    "their final answers follow, each under its agent id. Combine them into one complete, consistent "
    "final answer. Resolve contradictions where you can and say where you cannot; do not invent facts "
    "that none of the answers contains."
)
DEFAULT_AGGREGATE_PROMPT = "Write the final answer from the sub-agents' results below."


class JobFailure(RuntimeError):
    """The job cannot succeed; the message is the job's error."""


@dataclass
class JobActorConfig:
    job_id: str
    spec: JobSpec
    known_tools: list[str]
    num_workers: int
    namespace: str
    llm_factory: Callable[[LLMConfig], LLMClient]
    registry_factory: Callable[[ToolsConfig], ToolRegistry]


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


def _label(spec: SubAgentSpec) -> str:
    return spec.id if spec.name == spec.id else f"{spec.id} ({spec.name})"


def compose_task_message(task: str, deps: list[tuple[SubAgentSpec, str]]) -> str:
    """The sub-agent's user message: its dependencies' final results, labelled, then its task."""
    if not deps:
        return task
    parts = ["Results of the sub-agents this task depends on:"]
    for spec, text in deps:
        parts.append(f"### Result of {_label(spec)}\n{text}")
    parts.append(f"### Your task\n{task}")
    return "\n\n".join(parts)


def redacted_spec(spec: JobSpec) -> dict[str, Any]:
    """The spec as JobSubmitted carries it: events are stored and served, so no API key in them."""
    data = spec.model_dump(mode="json")
    if data["llm"].get("api_key"):
        data["llm"]["api_key"] = "***"
    return data


def _error_text(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}".strip()


class JobActor:
    def __init__(self, config: JobActorConfig) -> None:
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
        self._pool = WorkerPool(config.num_workers, config.namespace)
        self._tool_calls = 0
        self._orchestrator_steps = 0
        self._retries = 0
        self._tokens = [0, 0]
        self._started_at: float | None = None
        self._main: asyncio.Task[None] | None = None
        self._exec: asyncio.Task[str] | None = None
        self._cancel_requested = False
        self._llm: LLMClient | None = None
        self._handle: Any = None
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
            if self._finished or remaining <= 0:
                return []
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except asyncio.TimeoutError:
                return []

    async def push_events(self, token: str, events: list[_Event]) -> None:
        """Events of a running attempt, from its worker; a stale attempt's events are dropped."""
        if token not in self._runs:
            return
        for ev in events:
            self.emit(ev)

    async def acquire_tool_call(self, token: str) -> bool:
        """One call from the job-wide tool budget (limits.max_tool_calls)."""
        if token not in self._runs or self._tool_calls >= self._limits.max_tool_calls:
            return False
        self._tool_calls += 1
        return True

    def tool_budget_left(self) -> int:
        return max(0, self._limits.max_tool_calls - self._tool_calls)

    # ---- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        if self._main is None and not self._finished:
            self._main = asyncio.create_task(self._run_job())

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

    async def _stop_nodes(self) -> None:
        tasks = [n.task for n in self._nodes.values() if n.task is not None and not n.task.done()]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=CANCEL_CONFIRM_S * 2)

    def _metrics(self) -> JobMetrics:
        agents = [AgentSteps(n.spec.id, n.stage, n.steps, list(n.spec.depends_on)) for n in self._nodes.values()]
        try:
            crit = critical_steps(self._orchestrator_steps, agents)
        except ValueError:  # cannot happen for a validated DAG; metrics must never sink the job
            log.exception("critical_steps failed for job %s", self._job_id)
            crit = 0
        return JobMetrics(
            critical_steps=crit,
            total_steps=self._orchestrator_steps + sum(a.steps for a in agents),
            orchestrator_steps=self._orchestrator_steps,
            subagents=len(self._nodes),
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
            return await self._execute_plan()
        return await self._execute_orchestrator()

    async def _execute_plan(self) -> str:
        plan = self._spec.plan
        assert plan is not None
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
            return await self._aggregate_llm(results)
        return "\n\n".join(f"## {_label(spec)}\n{text}" for spec, text in results)

    async def _aggregate_llm(self, results: list[tuple[SubAgentSpec, str]]) -> str:
        plan = self._spec.plan
        assert plan is not None
        body = "\n\n".join(f"### Result of {_label(spec)}\n{text}" for spec, text in results)
        messages = [
            ChatMessage(role="system", content=AGGREGATOR_SYSTEM_PROMPT),
            ChatMessage(role="user", content=f"{plan.aggregate_prompt.strip() or DEFAULT_AGGREGATE_PROMPT}\n\n{body}"),
        ]
        self.emit(SubAgentStarted(agent_id=ORCHESTRATOR_ID, worker="job-actor"))
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
        self._orchestrator_steps = 1
        msg = res.message
        self.emit(
            SubAgentStep(
                agent_id=ORCHESTRATOR_ID,
                step=1,
                content=msg.content,
                reasoning=msg.reasoning_content,
                prompt_tokens=res.usage.prompt_tokens,
                completion_tokens=res.usage.completion_tokens,
            )
        )
        self.emit(SubAgentFinished(agent_id=ORCHESTRATOR_ID, result=msg.content or "", steps=1))
        return msg.content or ""

    async def _execute_orchestrator(self) -> str:
        self.emit(SubAgentStarted(agent_id=ORCHESTRATOR_ID, worker="job-actor"))
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

    def _add_node(self, spec: SubAgentSpec, stage: int) -> _Node:
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
            message = compose_task_message(node.spec.task, [(d.spec, d.outcome.text) for d in deps if d.outcome])
            out = await self._dispatch(node, message)
            node.outcome = out
            return out
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
            run = SubAgentRun(
                job_id=self._job_id,
                token=token,
                spec=spec,
                task_message=message,
                max_steps=min(spec.max_steps, lim.subagent_max_steps),
                tool_timeout_s=lim.tool_timeout_s,
                llm_config=self._spec.llm,
                tools_config=self._spec.tools,
                llm_factory=self._cfg.llm_factory,
                registry_factory=self._cfg.registry_factory,
                job=self._self_handle(),
            )
            try:
                node.ref = slot.handle.run_subagent.remote(run)
                res: SubAgentRunResult = await node.ref
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
                self.emit(
                    SubAgentFinished(agent_id=spec.id, result=res.result, steps=res.steps, tool_calls=res.tool_calls)
                )
                return SubAgentOutcome(True, res.result)
            failures += 1
            will_retry = failures <= lim.max_retries
            self.emit(SubAgentFailed(agent_id=spec.id, error=res.error, attempt=attempt, will_retry=will_retry))
            if not will_retry:
                node.state = "failed"
                return SubAgentOutcome(False, f"failed after {failures} attempt(s): {res.error}")
            delay = lim.retry_backoff_s * (2 ** (failures - 1))
            self.emit(SubAgentRetried(agent_id=spec.id, attempt=attempt + 1, delay_s=delay, reason=res.error))
            await asyncio.sleep(delay)

    def _self_handle(self) -> Any:
        if self._handle is None:
            self._handle = ray.get_runtime_context().current_actor
        return self._handle

    def _fail_node(self, node: _Node, attempt: int, error: str) -> SubAgentOutcome:
        node.state = "failed"
        self.emit(SubAgentFailed(agent_id=node.spec.id, error=error, attempt=attempt, will_retry=False))
        return SubAgentOutcome(False, error)


JobActorRemote = ray.remote(JobActor)
