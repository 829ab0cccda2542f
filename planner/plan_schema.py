"""The compact plan the policy writes in plan mode, its JSON schema (for the engine's structured
decoding) and its conversion to `swarm.plans.SwarmPlan`.

Compact form: {"agents": [{"id", "task", "depends_on"}], "aggregate": "concat"|"llm",
"aggregate_prompt"?}. The policy does not repeat the system prompt and tools of every sub-agent;
`parse_plan` fills them in, then checks the DAG with `swarm.dag.validate_plan`.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from planner.prompts import SUBAGENT_SYSTEM_PROMPT
from swarm.dag import PlanValidationError, validate_plan
from swarm.plans import MAX_SUBAGENTS, SUBAGENT_MAX_STEPS, Limits, SubAgentSpec, SwarmPlan

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"
DEFAULT_TOOLS: tuple[str, ...] = ("search",)


class PlanParseError(ValueError):
    """The policy's plan text is not a valid plan; the message names every problem found."""


class CompactAgent(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=ID_PATTERN, description="unique id: letters, digits, '_', '-', '.'")
    task: str = Field(min_length=1, description="complete, self-contained task text")
    depends_on: list[str] = Field(default_factory=list, description="ids of agents whose results this task needs")


class CompactPlan(BaseModel):
    model_config = ConfigDict(extra="forbid")

    agents: list[CompactAgent] = Field(min_length=1, max_length=MAX_SUBAGENTS)
    aggregate: Literal["concat", "llm"] = "concat"
    aggregate_prompt: str = ""

    def to_swarm_plan(
        self,
        system_prompt: str = SUBAGENT_SYSTEM_PROMPT,
        tools: Collection[str] = DEFAULT_TOOLS,
        max_steps: int = SUBAGENT_MAX_STEPS,
    ) -> SwarmPlan:
        return SwarmPlan(
            subagents=[
                SubAgentSpec(id=a.id, system_prompt=system_prompt, task=a.task, tools=list(tools),
                             depends_on=list(a.depends_on), max_steps=max_steps)
                for a in self.agents
            ],
            aggregate=self.aggregate,
            aggregate_prompt=self.aggregate_prompt,
        )


def plan_json_schema() -> dict[str, Any]:
    """JSON schema of the compact plan, self-contained (no $ref), for grammar-constrained decoding."""
    agent = {
        "type": "object",
        "properties": {
            "id": {"type": "string", "pattern": ID_PATTERN},
            "task": {"type": "string", "minLength": 1},
            "depends_on": {"type": "array", "items": {"type": "string", "pattern": ID_PATTERN}},
        },
        "required": ["id", "task", "depends_on"],
        "additionalProperties": False,
    }
    return {
        "type": "object",
        "properties": {
            "agents": {"type": "array", "items": agent, "minItems": 1, "maxItems": MAX_SUBAGENTS},
            "aggregate": {"type": "string", "enum": ["concat", "llm"]},
            "aggregate_prompt": {"type": "string"},
        },
        "required": ["agents", "aggregate"],
        "additionalProperties": False,
    }


def compact_plan_json(plan: CompactPlan) -> str:
    """The text the policy is trained to write: keys in schema order, no empty aggregate_prompt, and
    the ", " / ": " separators that the engine's grammar (xgrammar, any_whitespace=False) admits."""
    data = plan.model_dump(mode="json")
    if not data["aggregate_prompt"]:
        del data["aggregate_prompt"]
    return json.dumps(data, ensure_ascii=False, separators=(", ", ": "))


def parse_plan(
    text: str,
    *,
    system_prompt: str = SUBAGENT_SYSTEM_PROMPT,
    tools: Collection[str] = DEFAULT_TOOLS,
    limits: Limits | None = None,
) -> SwarmPlan:
    """Policy output text -> a validated SwarmPlan. Raises PlanParseError naming what is wrong."""
    if not isinstance(text, str) or not text.strip():
        raise PlanParseError("the plan is empty: expected a JSON object with an 'agents' list")
    body = text.strip()
    # Tolerate a fenced code block around the JSON (models often add one when unconstrained).
    if body.startswith("```"):
        body = body.split("\n", 1)[1] if "\n" in body else ""
        body = body.rsplit("```", 1)[0]
    try:
        raw = json.loads(body)
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
        plan = compact.to_swarm_plan(system_prompt, tools, min(SUBAGENT_MAX_STEPS, limits.subagent_max_steps))
        validate_plan(plan, limits, set(tools))
    except PlanValidationError as e:
        raise PlanParseError("invalid plan: " + "; ".join(e.problems)) from None
    except ValidationError as e:
        raise PlanParseError(f"invalid plan: {e.errors()[0]['msg']}") from None
    return plan
