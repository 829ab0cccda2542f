"""The K2.5 orchestrator agent: grows the swarm DAG at run time through two tools.

`create_subagent(name, system_prompt)` registers a frozen sub-agent template; `assign_task(agent,
task, depends_on)` turns a template into a DAG node (a SubAgentSpec with a fresh id "<name>-<n>")
that starts as soon as its dependencies finish. All assignments of one orchestrator step run
concurrently; each returns only the sub-agent's final answer (context sharding), or an error text
the orchestrator can react to. The orchestrator talks to its model in the same OpenAI tool-calling
format as every other agent, under agent_id "orchestrator".
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Collection
from dataclasses import dataclass, field
from typing import Protocol

import networkx as nx
import orjson
from pydantic import BaseModel, Field, ValidationError

from swarm.dag import PlanValidationError, check_new_node
from swarm.events import ORCHESTRATOR_ID, ToolCalled, ToolResult, _Event
from swarm.llm import ChatMessage, LLMClient, ToolCall, ToolSpec
from swarm.plans import JobSpec, SubAgentSpec
from workers.agent_loop import step_event

CREATE_SUBAGENT = "create_subagent"
ASSIGN_TASK = "assign_task"
# Room for the "-<n>" suffix inside SubAgentSpec's 64-character id.
MAX_AGENT_NAME = 56
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


class CreateSubagentArgs(BaseModel):
    name: str = Field(
        description=(
            "Unique name of the new sub-agent, e.g. 'country_researcher'. Letters, digits, '_', '-', '.'; "
            f"at most {MAX_AGENT_NAME} characters."
        )
    )
    system_prompt: str = Field(
        "",
        description="The sub-agent's role and working rules; it is frozen for every task given to this agent.",
    )


class AssignTaskArgs(BaseModel):
    agent: str = Field(description="Name of a sub-agent created earlier with create_subagent.")
    task: str = Field(
        min_length=1,
        description="A complete, self-contained task: the sub-agent sees only this text and its dependencies' results.",
    )
    depends_on: list[str] = Field(
        default_factory=list,
        description=(
            "Ids of earlier assignments (as returned by assign_task, e.g. 'researcher-2') or names of "
            "sub-agents (meaning all their assignments so far) whose final results this task needs. "
            "The task starts when they finish and receives their results."
        ),
    )


def orchestrator_tools() -> list[ToolSpec]:
    def spec(name: str, description: str, model: type[BaseModel]) -> ToolSpec:
        schema = model.model_json_schema()
        schema.pop("title", None)
        return ToolSpec(name=name, description=description, parameters=schema)

    return [
        spec(
            CREATE_SUBAGENT,
            "Create a sub-agent: a frozen worker with a name and a system prompt. Creating does not run "
            "anything; give it work with assign_task.",
            CreateSubagentArgs,
        ),
        spec(
            ASSIGN_TASK,
            "Give a task to a sub-agent created before. Every assign_task call is a new parallel run; "
            "all calls in one message run at the same time. Returns the sub-agent's final answer only.",
            AssignTaskArgs,
        ),
    ]


def orchestrator_system_prompt(spec: JobSpec) -> str:
    lim = spec.limits
    tools = ", ".join(spec.subagent_tools) or "none"
    prompt = f"""You are the orchestrator of an agent swarm. You solve the user's task by splitting it \
into subtasks that sub-agents work on in parallel, then you combine their answers into the final answer.

Your tools:
- create_subagent(name, system_prompt): define a sub-agent - a frozen worker with a role. Creating \
runs nothing.
- assign_task(agent, task, depends_on=[]): run one task on a sub-agent you created. Each call is a new \
independent run that returns an id like "<agent>-<n>" and the sub-agent's final answer. One sub-agent \
may take many tasks. depends_on lists ids of earlier assignments (or agent names, meaning all their \
assignments so far) whose final answers the task needs: it starts as soon as they finish and receives \
their answers.

How to work:
- All tool calls you make in one message run at the same time. Independent subtasks belong in the same \
message, so they run in parallel; a task that needs another's answer either goes in a later message or \
names it in depends_on.
- Make each task complete and self-contained: a sub-agent knows nothing but its system prompt, its task \
and the answers it depends on. Ask for a concise final answer in the form you need.
- You see only each sub-agent's final answer, never its intermediate steps or tool outputs. If an answer \
is missing, wrong or an error, assign a corrected or narrower task.
- Sub-agents have these tools: {tools}.
- When you have what you need, answer the user directly without calling tools.

Limits of this job: at most {lim.max_subagents} task assignments in total, {lim.max_tool_calls} tool \
calls shared by all sub-agents, {lim.subagent_max_steps} steps per sub-agent and {lim.orchestrator_max_steps} \
steps for you; on your last step tools are withdrawn and you must answer with what you have."""
    if spec.orchestrator_prompt.strip():
        prompt += "\n\n" + spec.orchestrator_prompt.strip()
    return prompt


@dataclass
class SubAgentOutcome:
    """How a DAG node ended, as the orchestrator and dependent nodes see it."""

    ok: bool
    text: str  # the final answer, or the error


class SwarmHost(Protocol):
    """What the orchestrator needs from the job actor that runs it."""

    graph: nx.DiGraph  # the growing DAG (nodes are assignment ids)

    def emit(self, event: _Event) -> None: ...

    def launch(self, spec: SubAgentSpec, stage: int) -> Awaitable[SubAgentOutcome]: ...

    def tool_budget_left(self) -> int: ...


@dataclass
class OrchestratorOutcome:
    answer: str
    steps: int
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class _State:
    templates: dict[str, str] = field(default_factory=dict)  # name -> system prompt
    assigned: dict[str, list[str]] = field(default_factory=dict)  # name -> assignment ids, in order


def _parse(model: type[BaseModel], call: ToolCall) -> BaseModel | str:
    try:
        raw = orjson.loads(call.arguments or "{}")
    except orjson.JSONDecodeError as e:
        return f"error: arguments of {call.name} are not valid JSON ({e}); send a JSON object"
    if not isinstance(raw, dict):
        return f"error: arguments of {call.name} must be a JSON object"
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or '(root)'}: {err['msg']}" for err in e.errors())
        return f"error: invalid arguments for {call.name}: {problems}"


class Orchestrator:
    """One job's orchestrator loop. `run` returns the final answer; raises LLMError if the model fails."""

    def __init__(self, spec: JobSpec, llm: LLMClient, host: SwarmHost, known_tools: Collection[str]) -> None:
        if spec.task is None:
            raise ValueError("the orchestrator needs a job with a 'task'")
        self.spec = spec
        self.llm = llm
        self.host = host
        self.known_tools = set(known_tools)
        self._state = _State()

    def _create(self, call: ToolCall) -> str:
        args = _parse(CreateSubagentArgs, call)
        if isinstance(args, str):
            return args
        assert isinstance(args, CreateSubagentArgs)
        name = args.name.strip()
        if not _NAME_RE.match(name) or len(name) > MAX_AGENT_NAME:
            return (
                f"error: invalid sub-agent name {name!r}: use 1-{MAX_AGENT_NAME} letters, digits, '_', '-' "
                "or '.', starting with a letter or digit"
            )
        if name in self._state.templates:
            return f"error: a sub-agent named {name!r} already exists; assign it more tasks instead"
        self._state.templates[name] = args.system_prompt
        self._state.assigned[name] = []
        return f"created sub-agent {name!r}; give it work with assign_task(agent={name!r}, task=...)"

    def _resolve(self, deps: list[str]) -> list[str]:
        """Assignment ids stay; an agent name stands for all its assignments so far; unknown names
        are kept so that check_new_node reports them."""
        out: list[str] = []
        for d in deps:
            d = d.strip()
            if d in self.host.graph or not self._state.assigned.get(d):
                out.append(d)
            else:
                out.extend(self._state.assigned[d])
        return list(dict.fromkeys(out))

    def _assign(self, call: ToolCall, stage: int) -> str | tuple[str, Awaitable[SubAgentOutcome]]:
        """Validate an assignment and launch it: an error text, or (id, the awaitable outcome)."""
        args = _parse(AssignTaskArgs, call)
        if isinstance(args, str):
            return args
        assert isinstance(args, AssignTaskArgs)
        st = self._state
        if args.agent not in st.templates:
            known = ", ".join(sorted(st.templates)) or "none yet"
            return f"error: unknown sub-agent {args.agent!r}; create it with create_subagent first (created: {known})"
        if self.spec.subagent_tools and self.host.tool_budget_left() <= 0:
            return (
                f"error: the job's tool-call budget ({self.spec.limits.max_tool_calls} calls) is spent; "
                "no new sub-agent can use tools - answer with the results you have"
            )
        node_id = f"{args.agent}-{len(st.assigned[args.agent]) + 1}"
        try:
            node = SubAgentSpec(
                id=node_id,
                name=args.agent,
                system_prompt=st.templates[args.agent],
                task=args.task,
                tools=list(self.spec.subagent_tools),
                depends_on=self._resolve(args.depends_on),
                max_steps=self.spec.limits.subagent_max_steps,
            )
            check_new_node(self.host.graph, node, self.spec.limits, self.known_tools)
        except PlanValidationError as e:
            return "error: assign_task rejected, nothing was started: " + "; ".join(e.problems)
        except ValidationError as e:
            return f"error: assign_task rejected, nothing was started: {e.errors()[0]['msg']}"
        st.assigned[args.agent].append(node_id)
        return node_id, self.host.launch(node, stage)

    async def _step_tools(self, step: int, calls: list[ToolCall]) -> list[str]:
        """Run one step's tool calls: creates first, then assigns (concurrently). Results in call order."""
        results: list[str] = [""] * len(calls)

        def report(i: int, content: str) -> None:
            results[i] = content
            call = calls[i]
            self.host.emit(
                ToolResult(
                    agent_id=ORCHESTRATOR_ID,
                    step=step,
                    call_id=call.id,
                    tool=call.name,
                    content=content,
                    is_error=content.startswith("error:"),
                )
            )

        for i, call in enumerate(calls):
            if call.name == CREATE_SUBAGENT:
                report(i, self._create(call))
            elif call.name != ASSIGN_TASK:
                report(i, f"error: unknown tool {call.name!r}; available: {CREATE_SUBAGENT}, {ASSIGN_TASK}")

        async def finish(i: int, node_id: str, outcome: Awaitable[SubAgentOutcome]) -> None:
            out = await outcome
            report(i, f"[{node_id}] final answer:\n{out.text}" if out.ok else f"error: [{node_id}] {out.text}")

        running = []
        for i, call in enumerate(calls):
            if call.name == ASSIGN_TASK:
                launched = self._assign(call, step)
                if isinstance(launched, str):
                    report(i, launched)
                else:
                    running.append(finish(i, *launched))
        await asyncio.gather(*running)
        return results

    async def run(self) -> OrchestratorOutcome:
        spec = self.spec
        assert spec.task is not None
        messages = [
            ChatMessage(role="system", content=orchestrator_system_prompt(spec)),
            ChatMessage(role="user", content=spec.task),
        ]
        tools = orchestrator_tools()
        out = OrchestratorOutcome(answer="", steps=0)
        max_steps = spec.limits.orchestrator_max_steps
        for step in range(1, max_steps + 1):
            last = step == max_steps
            res = await self.llm.chat(
                messages,
                tools=None if last else tools,
                temperature=spec.llm.temperature,
                max_tokens=spec.llm.max_tokens,
            )
            msg = res.message
            out.steps = step
            out.prompt_tokens += res.usage.prompt_tokens
            out.completion_tokens += res.usage.completion_tokens
            self.host.emit(step_event(ORCHESTRATOR_ID, step, res))
            messages.append(msg)
            if not msg.tool_calls or last:
                out.answer = msg.content or ""
                return out
            for call in msg.tool_calls:
                self.host.emit(
                    ToolCalled(agent_id=ORCHESTRATOR_ID, step=step, call_id=call.id, tool=call.name, arguments=call.arguments)
                )
            results = await self._step_tools(step, msg.tool_calls)
            for call, content in zip(msg.tool_calls, results):
                messages.append(ChatMessage(role="tool", content=content, tool_call_id=call.id, name=call.name))
        return out  # unreachable: the last step always returns
