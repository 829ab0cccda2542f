"""The compact plan the policy writes in plan mode, its JSON schema (for the engine's structured
decoding) and its conversion to `swarm.plans.SwarmPlan`.

Compact form (positional): {"agents": [{"name", "task", "depends_on", "for_each"? | "for_range"?,
"parallel"?, "keep"?}], "aggregate": "concat"|"llm", "aggregate_prompt"?}; `parallel` N runs a fan-out
agent's copies N at a time; `keep` "COLUMN OP VALUE" is a row filter
of the agent's table (swarm.row_filter); `for_range` "all the N by C" runs the agent once per window of C
numbers from 1 to N (SwarmPlan's for_range), written so that N is copied after the word the task puts
before it (" the" in "What are the 120 most populous cities"). So that every text the grammar admits is a valid plan,
the conversion puts the window into a task that names neither {start} nor {end}, and widens the
windows when their copies would pass max_subagents. Agents are numbered 1, 2, 3 ... in list order; `depends_on` lists the numbers
of EARLIER agents, so every plan is acyclic and has no unknown dependency by construction. The
sub-agent id is "<name>-<number>" (unique even when names repeat). The policy does not repeat the
system prompt and tools of every sub-agent; `parse_plan` fills them in, then checks the DAG with
`swarm.dag.validate_plan`.

`plan_json_schema(max_agents)` makes the schema itself rule out invalid plans: position k has its
own item schema (`prefixItems`) whose `depends_on` is an array of the integers 1..k-1, the list is
bounded by the job's max_subagents, and strings have bounded length, so constrained decoding
(xgrammar) can only write text that `parse_plan` accepts, and always finishes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from planner.prompts import PLAN_MODE_PROMPT, SUBAGENT_SYSTEM_PROMPT
from swarm.dag import PlanValidationError, validate_plan
from swarm.fan_out import range_windows
from swarm.plan_writer import PlanFormat
from swarm.plans import MAX_SUBAGENTS, SUBAGENT_MAX_STEPS, ForEach, ForRange, Limits, SubAgentSpec, SwarmPlan
from swarm.row_filter import NUMERIC_OPS, OP_WORDS, RowFilter

# A name becomes the id "<name>-<k>" (k <= 10_000 fits SubAgentSpec's 64-character id).
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,39}$"
# Text fields inside the grammar: no '"', '\\' or control characters (so no escapes, no line breaks),
# written as bounded chunks because xgrammar 0.2.8 cannot compile one repetition much above 128.
_CHAR = r'[^"\\\x00-\x1f]'
MAX_TASK_CHARS = 1000
MAX_AGGREGATE_PROMPT_CHARS = 1000
MAX_CHUNK = 50  # items per copy of a fan-out agent (for_each)
MAX_PARALLEL = 99  # a fan-out agent's "parallel": copies running at once
MAX_KEEP_CHARS = 100


def _keep_pattern() -> str:
    """The `keep` phrases the grammar admits, all of which RowFilter reads: a one-word column ('_' for
    spaces), one operator, and a number after a comparison or a text after the others."""
    def alt(words: list[str]) -> str:  # letters, spaces and <>=!: nothing to escape in a regex
        assert all(re.fullmatch(r"[a-z <>=!]+", w) for w in words), words
        return "|".join(sorted(words, key=len, reverse=True))

    numeric = [w for w, op in OP_WORDS.items() if op in NUMERIC_OPS]
    text = [w for w, op in OP_WORDS.items() if op not in NUMERIC_OPS]
    number = r"-?[0-9][0-9,]{0,20}(\.[0-9]{1,6})?"
    value = r'[^"\\\x00-\x1f ][^"\\\x00-\x1f]{0,59}'
    return rf"^[A-Za-z][A-Za-z0-9_]{{0,39}} (({alt(numeric)}) {number}|({alt(text)}) {value})$"


# "all the N by C" (the grammar's form) or "S to E by C": windows of C numbers from 1 (or S) to N (or E).
# "all the N": the policy copies N after " the", the token before it in "What are the 120 most ...";
# at the start of a string "the" is another token (no space), after which stage 18's first try wrote
# the count from memory.
RANGE_PATTERN = r"^all the [1-9][0-9]{0,3} by [1-9][0-9]{0,2}$"
_RANGE_RE = re.compile(r"^\s*(?:(?:all\s+)?the\s+(?P<n>\d+)|(?P<s>\d+)\s+to\s+(?P<e>\d+))\s+by\s+(?P<c>\d+)\s*$", re.IGNORECASE)
# Appended to a range agent's task that does not say where its window goes.
RANGE_TASK_SUFFIX = " Your part: {start} to {end}."


def parse_range(text: str) -> ForRange:
    """A compact `for_range` phrase as a ForRange; ValueError naming what is wrong."""
    m = _RANGE_RE.match(text)
    if not m:
        raise ValueError(f"for_range {text!r} is not 'all the N by C' (numbers 1 to N, C per copy) or 'S to E by C'")
    start, end = (1, int(m["n"])) if m["n"] else (int(m["s"]), int(m["e"]))
    return ForRange(start=start, end=end, chunk=int(m["c"]))  # its validators name a bad bound or chunk


DEFAULT_TOOLS: tuple[str, ...] = ("search",)
_GRAMMAR_TEXT_RE = re.compile(r'^[^"\\\x00-\x1f]*$')


class PlanParseError(ValueError):
    """The policy's plan text is not a valid plan; the message names every problem found."""


class CompactAgent(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN, description="short role name: letters, digits, '_', '-', '.'")
    task: str = Field(min_length=1, description="complete, self-contained task text")
    depends_on: list[int] = Field(
        default_factory=list, description="numbers (1-based list positions) of earlier agents whose results it needs"
    )
    for_each: int = Field(
        0, ge=0, le=MAX_CHUNK, description="0: one agent; N: one copy per N items of its first dependency's list"
    )
    for_range: str | None = Field(None, description="'all the N by C': one copy per window of C numbers from 1 to N")
    # A fan-out agent's copies run at most this many at a time (1: one after another); absent: all at
    # once. The serial PARL start writes 1 (docs/PARL.md).
    parallel: int | None = Field(None, ge=1, le=MAX_PARALLEL, description="fan-out copies running at once (absent: all)")
    # "COLUMN OP VALUE" in words the task itself uses ("population more than 5,000,000", "languages
    # have English"): the policy copies the phrase, where a bare value has no words before it to
    # copy after (swarm.row_filter.RowFilter reads it).
    keep: str | None = Field(None, description="keep only the rows of its table that pass: 'COLUMN OP VALUE'")

    @field_validator("for_range")
    @classmethod
    def _range_reads(cls, v: str | None) -> str | None:
        if v is not None:
            parse_range(v)
        return v

    @field_validator("keep")
    @classmethod
    def _keep_reads(cls, v: str | None) -> str | None:
        if v is not None:
            RowFilter.model_validate(v)  # raises naming what is wrong
        return v


def agent_id(name: str, number: int) -> str:
    """The sub-agent id of the `number`-th (1-based) agent: unique because the number ends it."""
    return f"{name}-{number}"


class CompactPlan(BaseModel):
    model_config = ConfigDict(extra="forbid")

    agents: list[CompactAgent] = Field(min_length=1, max_length=MAX_SUBAGENTS)
    aggregate: Literal["concat", "llm"] = "concat"
    aggregate_prompt: str = ""

    def dependency_problems(self) -> list[str]:
        problems = []
        for k, a in enumerate(self.agents, start=1):
            for d in a.depends_on:
                if not 1 <= d < k:
                    allowed = f"1 to {k - 1}" if k > 1 else "none: the first agent cannot depend on any"
                    problems.append(
                        f"agent {k} ({a.name!r}) depends on {d}, but an agent may only depend on agents listed "
                        f"before it (allowed here: {allowed})"
                    )
            if a.for_each and not a.depends_on:
                problems.append(f"agent {k} ({a.name!r}) has for_each but no dependency whose list it could split")
            if a.for_each and a.for_range:
                problems.append(f"agent {k} ({a.name!r}) has both for_each and for_range; an agent fans out one way")
            if a.parallel is not None and not (a.for_each or a.for_range):
                problems.append(f"agent {k} ({a.name!r}) has parallel but no for_each or for_range: only copies run in parallel")
        return problems

    def _ranges(self, max_subagents: int) -> list[ForRange | None]:
        """Each agent's range fan-out, windows widened where needed so that the range copies and the
        other agents together stay within `max_subagents`."""
        ranges = [parse_range(a.for_range).model_copy(update={"max_parallel": a.parallel}) if a.for_range else None
                  for a in self.agents]
        n_ranged = sum(r is not None for r in ranges)
        if not n_ranged:
            return ranges
        budget = max(1, (max_subagents - (len(self.agents) - n_ranged)) // n_ranged)
        return [r if r is None or len(range_windows(r)) <= budget
                else r.model_copy(update={"chunk": -(-(r.end - r.start + 1) // budget)}) for r in ranges]

    def to_swarm_plan(
        self,
        system_prompt: str = SUBAGENT_SYSTEM_PROMPT,
        tools: Collection[str] = DEFAULT_TOOLS,
        max_steps: int = SUBAGENT_MAX_STEPS,
        max_subagents: int = MAX_SUBAGENTS,
    ) -> SwarmPlan:
        problems = self.dependency_problems()
        if problems:
            raise PlanValidationError(problems)
        ids = [agent_id(a.name, k) for k, a in enumerate(self.agents, start=1)]
        ranges = self._ranges(max_subagents)

        def task(a: CompactAgent) -> str:
            if a.for_range and "{start}" not in a.task and "{end}" not in a.task:
                return a.task + RANGE_TASK_SUFFIX
            return a.task

        return SwarmPlan(
            subagents=[
                SubAgentSpec(id=ids[k], name=a.name, system_prompt=system_prompt, task=task(a), tools=list(tools),
                             # a repeated number is harmless: keep each dependency once
                             depends_on=[ids[d - 1] for d in dict.fromkeys(a.depends_on)], max_steps=max_steps,
                             for_each=ForEach(source=ids[a.depends_on[0] - 1], chunk=a.for_each,
                                                      max_parallel=a.parallel) if a.for_each else None,
                             for_range=ranges[k],
                             keep_rows=RowFilter.model_validate(a.keep) if a.keep else None)
                for k, a in enumerate(self.agents)
            ],
            aggregate=self.aggregate,
            aggregate_prompt=self.aggregate_prompt,
        )


def _text_schema(min_chunks: int, max_chars: int) -> dict[str, Any]:
    chunks = -(-max_chars // 100)
    return {"type": "string", "pattern": f"^(?:{_CHAR}{{1,100}}){{{min_chunks},{chunks}}}$"}


def plan_json_schema(max_agents: int = MAX_SUBAGENTS, max_task_chars: int = MAX_TASK_CHARS,
                     max_aggregate_prompt_chars: int = MAX_AGGREGATE_PROMPT_CHARS) -> dict[str, Any]:
    """JSON schema of the compact plan with at most `max_agents` agents; every text it admits is a
    valid plan (see module doc). Shared string rules sit in $defs so the grammar compiles them once."""
    if not 1 <= max_agents <= MAX_SUBAGENTS:
        raise ValueError(f"max_agents must be between 1 and {MAX_SUBAGENTS}, got {max_agents}")
    if max_task_chars < 1 or max_aggregate_prompt_chars < 1:
        raise ValueError("max_task_chars and max_aggregate_prompt_chars must be >= 1")

    def agent(k: int) -> dict[str, Any]:
        name_task = {"name": {"$ref": "#/$defs/name"}, "task": {"$ref": "#/$defs/task"}}
        keep = {"keep": {"$ref": "#/$defs/keep"}}  # optional, last: the row filter of the agent's table
        # optional, after the fan-out: absent runs every copy at once
        parallel = {"parallel": {"$ref": "#/$defs/parallel"}}
        if k == 1:
            none = {"type": "array", "maxItems": 0}
            return {"anyOf": [
                {"type": "object", "properties": {**name_task, "depends_on": none, **keep},
                 "required": ["name", "task", "depends_on"], "additionalProperties": False},
                {"type": "object", "properties": {**name_task, "depends_on": none, "for_range": {"$ref": "#/$defs/for_range"},
                                                          **parallel, **keep},
                 "required": ["name", "task", "depends_on", "for_range"], "additionalProperties": False}]}
        ids = {"type": "integer", "enum": list(range(1, k))}
        plain = {"type": "object",
                 "properties": {**name_task, "depends_on": {"type": "array", "items": ids, "maxItems": k - 1}, **keep},
                 "required": ["name", "task", "depends_on"], "additionalProperties": False}
        # A fan-out agent must have a dependency to split: its own branch, so the grammar admits no other.
        fan_out = {"type": "object",
                   "properties": {**name_task,
                                  "depends_on": {"type": "array", "items": ids, "minItems": 1, "maxItems": k - 1},
                                  "for_each": {"$ref": "#/$defs/for_each"}, **parallel, **keep},
                   "required": ["name", "task", "depends_on", "for_each"], "additionalProperties": False}
        # A range agent needs no dependency (its windows are in the plan); it may still read some.
        ranged = {"type": "object",
                  "properties": {**name_task, "depends_on": {"type": "array", "items": ids, "maxItems": k - 1},
                                 "for_range": {"$ref": "#/$defs/for_range"}, **parallel, **keep},
                  "required": ["name", "task", "depends_on", "for_range"], "additionalProperties": False}
        return {"anyOf": [plain, fan_out, ranged]}

    return {
        "type": "object",
        "properties": {
            "agents": {
                "type": "array",
                "prefixItems": [agent(k) for k in range(1, max_agents + 1)],
                "items": False,
                "minItems": 1,
                "maxItems": max_agents,
            },
            "aggregate": {"type": "string", "enum": ["concat", "llm"]},
            "aggregate_prompt": {"$ref": "#/$defs/aggregate_prompt"},
        },
        "required": ["agents", "aggregate"],
        "additionalProperties": False,
        "$defs": {
            "name": {"type": "string", "pattern": NAME_PATTERN},
            "task": _text_schema(1, max_task_chars),
            "aggregate_prompt": _text_schema(0, max_aggregate_prompt_chars),
            "for_each": {"type": "integer", "minimum": 1, "maximum": MAX_CHUNK},
            "keep": {"type": "string", "pattern": _keep_pattern()},
            "for_range": {"type": "string", "pattern": RANGE_PATTERN},
            "parallel": {"type": "integer", "minimum": 1, "maximum": MAX_PARALLEL},
        },
    }


def compact_plan_json(plan: CompactPlan) -> str:
    """The text the policy is trained to write: keys in schema order, no empty aggregate_prompt, and
    the ", " / ": " separators that the engine's grammar (xgrammar, any_whitespace=False) admits.
    Raises ValueError for text the grammar cannot express (quotes, backslashes, line breaks)."""
    problems = plan.dependency_problems()
    for k, a in enumerate(plan.agents, start=1):
        if not _GRAMMAR_TEXT_RE.match(a.task) or len(a.task) > MAX_TASK_CHARS:
            problems.append(f"agent {k} ({a.name!r}): task has '\"', '\\\\' or control characters, or is over {MAX_TASK_CHARS} characters")
        if a.keep is not None and (not _GRAMMAR_TEXT_RE.match(a.keep) or len(a.keep) > MAX_KEEP_CHARS):
            problems.append(f"agent {k} ({a.name!r}): keep has '\"', '\\\\' or control characters, or is too long")
    if not _GRAMMAR_TEXT_RE.match(plan.aggregate_prompt) or len(plan.aggregate_prompt) > MAX_AGGREGATE_PROMPT_CHARS:
        problems.append("aggregate_prompt has '\"', '\\\\' or control characters, or is too long")
    if problems:
        raise ValueError("plan cannot be written in the constrained format: " + "; ".join(problems))
    data = plan.model_dump(mode="json")
    if not data["aggregate_prompt"]:
        del data["aggregate_prompt"]
    for a in data["agents"]:
        if not a["for_each"]:
            del a["for_each"]
        if a["for_range"] is None:
            del a["for_range"]
        if a["parallel"] is None:
            del a["parallel"]
        if a["keep"] is None:
            del a["keep"]
    return json.dumps(data, ensure_ascii=False, separators=(", ", ": "))


def with_parallel(text: str, parallel: int) -> str:
    """`text` (a trained plan, compact_plan_json's form) with every fan-out agent's copies capped at
    `parallel` at a time: how the serial PARL start's plans are made from the parallel ones."""
    plan = CompactPlan.model_validate(json.loads(text))
    for a in plan.agents:
        if a.for_each or a.for_range:
            a.parallel = parallel
    return compact_plan_json(plan)


def parse_plan(
    text: str,
    *,
    system_prompt: str = SUBAGENT_SYSTEM_PROMPT,
    tools: Collection[str] = DEFAULT_TOOLS,
    limits: Limits | None = None,
) -> SwarmPlan:
    """Policy output text -> a validated SwarmPlan. Raises PlanParseError naming what is wrong.

    Accepts a superset of what the schema admits (a code fence, escapes, longer texts), because an
    unconstrained model (e.g. Kimi over an API without strict schemas) writes those too."""
    if not isinstance(text, str) or not text.strip():
        raise PlanParseError("the plan is empty: expected a JSON object with an 'agents' list")
    body = text.strip()
    # Tolerate a fenced code block around the JSON (models often add one when unconstrained).
    if body.startswith("```"):
        body = body.split("\n", 1)[1] if "\n" in body else ""
        body = body.rsplit("```", 1)[0]
    try:
        # strict=False: a raw tab inside a string is not worth a repair round
        raw = json.loads(body, strict=False)
    except json.JSONDecodeError as e:
        raise PlanParseError(f"the plan is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if not isinstance(raw, dict):
        raise PlanParseError(f"the plan must be a JSON object, got {type(raw).__name__}")
    try:
        compact = CompactPlan.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or '(root)'}: {err['msg']}" for err in e.errors())
        raise PlanParseError(f"invalid plan: {problems}") from None
    limits = limits or Limits()
    try:
        plan = compact.to_swarm_plan(system_prompt, tools, min(SUBAGENT_MAX_STEPS, limits.subagent_max_steps),
                                     limits.max_subagents)
        validate_plan(plan, limits, set(tools))
    except PlanValidationError as e:
        raise PlanParseError("invalid plan: " + "; ".join(e.problems)) from None
    except ValidationError as e:
        raise PlanParseError(f"invalid plan: {e.errors()[0]['msg']}") from None
    return plan


def _format_schema(limits: Limits) -> dict[str, Any]:
    return plan_json_schema(min(limits.max_subagents, MAX_SUBAGENTS))


def _format_parse(text: str, limits: Limits, tools: Collection[str]) -> SwarmPlan:
    return parse_plan(text, tools=tools, limits=limits)


def compact_plan_format() -> PlanFormat:
    """This format as swarm's plan writer takes it (entry point `agent_swarm.plan_formats: compact`)."""
    return PlanFormat(name="compact", system_prompt=PLAN_MODE_PROMPT, schema=_format_schema, parse=_format_parse)
