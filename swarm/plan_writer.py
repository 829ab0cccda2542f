"""The plan-writing orchestrator's loop: ask the model for a whole plan, validate it, send the exact
error back for repair, up to `max_repairs` times.

Why here and not in planner/: the job host (swarm) runs plan-writing jobs, and swarm must not import
planner (planner depends on swarm). So swarm owns the loop and a small `PlanFormat` value (system
prompt, JSON schema, parser); a format is found by name through the `agent_swarm.plan_formats`
entry-point group, which the planner package fills (`compact` -> planner.plan_schema). Any process
(job host actors included) can resolve it without swarm naming planner in its code.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from importlib.metadata import EntryPoint, distributions
from typing import Any

from swarm.llm import ChatMessage, ChatResult, LLMClient
from swarm.plans import Limits, SwarmPlan

PLAN_FORMAT_GROUP = "agent_swarm.plan_formats"
DEFAULT_PLAN_FORMAT = "compact"
DEFAULT_MAX_REPAIRS = 2
REPAIR_PROMPT = (
    "That plan is invalid: {error}\n"
    "Write the whole plan again, fixing exactly these problems. Reply with only the JSON plan."
)


@dataclass(frozen=True)
class PlanFormat:
    """How a plan is asked for and read back. `parse` raises ValueError whose message names the problem."""

    name: str
    system_prompt: str
    schema: Callable[[Limits], dict[str, Any]]  # JSON schema of the reply, for response_format
    parse: Callable[[str, Limits, Collection[str]], SwarmPlan]


@dataclass
class WrittenPlan:
    plan: SwarmPlan
    text: str
    attempts: int  # model calls, the repairs included
    prompt_tokens: int = 0
    completion_tokens: int = 0


class PlanRepairError(RuntimeError):
    """Every attempt gave an invalid plan; `last_error` is the validation error of the last one."""

    def __init__(self, last_error: str, attempts: int, last_text: str = "") -> None:
        self.last_error = last_error
        self.attempts = attempts
        self.last_text = last_text
        super().__init__(f"no valid plan after {attempts} attempt(s); last error: {last_error}")

    def __reduce__(self) -> tuple[Any, ...]:  # crosses Ray process boundaries intact
        return (PlanRepairError, (self.last_error, self.attempts, self.last_text))


def load_plan_format(name: str = DEFAULT_PLAN_FORMAT) -> PlanFormat:
    """The installed plan format called `name` (an entry point returning a PlanFormat or a factory of one)."""
    eps = _plan_format_entry_points()
    found = [ep for ep in eps if ep.name == name]
    if not found:
        known = sorted({ep.name for ep in eps})
        raise LookupError(
            f"no plan format {name!r} is installed (entry-point group {PLAN_FORMAT_GROUP!r} has: "
            f"{', '.join(known) or 'nothing'}); install the project with `pip install -e .`"
        )
    obj = found[0].load()
    fmt = obj() if callable(obj) and not isinstance(obj, PlanFormat) else obj
    if not isinstance(fmt, PlanFormat):
        raise TypeError(f"plan format entry point {name!r} gave {type(fmt).__name__}, not a PlanFormat")
    return fmt


def _plan_format_entry_points() -> list[EntryPoint]:
    """Entry points of the group from every installed distribution. Not `entry_points(group=...)`:
    it keeps one distribution per name, and a stale `*.egg-info` in the working directory (left by an
    old build) would then hide the installed metadata."""
    return [ep for dist in distributions() for ep in dist.entry_points if ep.group == PLAN_FORMAT_GROUP]


def response_format_for(fmt: PlanFormat, limits: Limits) -> dict[str, Any]:
    """The OpenAI `response_format` that makes a constraining engine write only schema-valid plans."""
    return {"type": "json_schema", "json_schema": {"name": "swarm_plan", "schema": fmt.schema(limits)}}


async def write_plan(
    llm: LLMClient,
    fmt: PlanFormat,
    task: str,
    limits: Limits,
    tools: Collection[str],
    *,
    max_repairs: int = DEFAULT_MAX_REPAIRS,
    temperature: float | None = None,
    max_tokens: int | None = None,
    on_step: Callable[[int, ChatResult], None] | None = None,
) -> WrittenPlan:
    """Ask for a plan; on an invalid one, send it back with its exact error (at most max_repairs
    times). `on_step(n, result)` sees every model call (n = 1, 2, ...). Raises PlanRepairError."""
    if max_repairs < 0:
        raise ValueError(f"max_repairs must be >= 0, got {max_repairs}")
    if not task.strip():
        raise ValueError("the task to plan is empty")
    response_format = response_format_for(fmt, limits)
    messages = [ChatMessage(role="system", content=fmt.system_prompt), ChatMessage(role="user", content=task)]
    tokens = [0, 0]
    error, text = "", ""
    for attempt in range(1, max_repairs + 2):
        res = await llm.chat(messages, temperature=temperature, max_tokens=max_tokens, response_format=response_format)
        tokens[0] += res.usage.prompt_tokens
        tokens[1] += res.usage.completion_tokens
        if on_step is not None:
            on_step(attempt, res)
        text = res.message.content or ""
        try:
            plan = fmt.parse(text, limits, tools)
        except ValueError as e:
            error = str(e)
            messages += [ChatMessage(role="assistant", content=text),
                         ChatMessage(role="user", content=REPAIR_PROMPT.format(error=error))]
            continue
        return WrittenPlan(plan, text, attempt, tokens[0], tokens[1])
    raise PlanRepairError(error, max_repairs + 1, text)
