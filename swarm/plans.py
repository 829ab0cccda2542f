"""Pydantic models at the swarm's boundary: limits, sub-agent specs, plans, jobs and their status.

Everything here crosses a process or HTTP boundary, so it is a pydantic v2 model that round-trips
through orjson (`to_json` / `from_json`). Validation of the DAG shape (cycles, unknown dependencies,
limits) lives in `swarm.dag`; these models only check field-level facts.
"""

from __future__ import annotations

import enum
import re
import time
import uuid
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from swarm.row_filter import RowFilter

# K2.5 Agent Swarm limits (DESIGN.md §3): the defaults, all configurable per job.
MAX_SUBAGENTS = 100
MAX_TOOL_CALLS = 1500
ORCHESTRATOR_MAX_STEPS = 15
SUBAGENT_MAX_STEPS = 100
# Largest task or prompt text accepted (characters): bounds what one job can make the store and
# every model call carry, whatever the transport (REST has its own body limit too).
MAX_PROMPT_CHARS = 200_000

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


class WireModel(BaseModel):
    """Base for every boundary model: strict about unknown fields, orjson on the wire."""

    model_config = ConfigDict(extra="forbid")

    def to_json(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json"))

    @classmethod
    def from_json(cls, data: bytes | str) -> "WireModel":
        return cls.model_validate(orjson.loads(data))


class Limits(WireModel):
    """Per-job limits. Defaults follow Kimi K2.5's Agent Swarm."""

    max_subagents: int = Field(MAX_SUBAGENTS, ge=1, le=10_000)
    max_tool_calls: int = Field(MAX_TOOL_CALLS, ge=0, le=1_000_000)
    orchestrator_max_steps: int = Field(ORCHESTRATOR_MAX_STEPS, ge=1, le=1_000)
    subagent_max_steps: int = Field(SUBAGENT_MAX_STEPS, ge=1, le=10_000)
    tool_timeout_s: float = Field(60.0, gt=0)
    job_timeout_s: float = Field(3600.0, gt=0)
    max_retries: int = Field(2, ge=0, le=20, description="retries of a failed sub-agent")
    retry_backoff_s: float = Field(0.5, ge=0, description="first retry delay; doubles each retry")


class ForEach(WireModel):
    """Fan-out (swarm.fan_out): run the node once per `chunk` items of the list `source` returned."""

    source: str = Field(description="id of a dependency whose answer is a list (or a markdown table)")
    chunk: int = Field(3, ge=1, le=1000, description="items per copy")
    # None: every copy at once. N: at most N copies run at a time, copy k starting when copy k-N ends
    # (N = 1 runs them one after another: a serial plan, which PARL trains away; docs/PARL.md).
    max_parallel: int | None = Field(None, ge=1, le=1000, description="copies running at once (None: all)")


class ForRange(WireModel):
    """Range fan-out (swarm.fan_out): run the node once per window of `chunk` numbers from `start` to
    `end` (the last window ends at `end`), each copy's task with "{start}" and "{end}" replaced by its
    window's bounds: "cities ranked {start} to {end}", "result pages {start} to {end}"."""

    start: int = Field(ge=0, le=1_000_000)
    end: int = Field(ge=0, le=1_000_000)
    chunk: int = Field(10, ge=1, le=1_000_000, description="numbers per copy")
    max_parallel: int | None = Field(None, ge=1, le=1000, description="copies running at once (None: all)")

    @model_validator(mode="after")
    def _ordered(self) -> "ForRange":
        if self.end < self.start:
            raise ValueError(f"for_range end {self.end} is below its start {self.start}")
        return self


class SubAgentSpec(WireModel):
    """One node of the swarm DAG: a frozen sub-agent with a role, a task and its tools."""

    id: str = Field(description="unique within the job; letters, digits, '_', '-', '.'")
    name: str = ""
    system_prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    task: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    tools: list[str] = Field(default_factory=list)
    depends_on: list[str] = Field(default_factory=list)
    # None: the job's limits.subagent_max_steps.
    max_steps: int | None = Field(None, ge=1)
    # Set: this node runs as one copy per chunk of `for_each.source`'s list, in parallel (plan mode).
    for_each: ForEach | None = None
    # Set: this node runs as one copy per window of numbers, in parallel (plan mode; swarm.fan_out).
    for_range: ForRange | None = None
    # Set: the runtime keeps only the rows of this agent's table(s) that pass (swarm.row_filter); a
    # fan-out's copies each filter their own table.
    keep_rows: RowFilter | None = None

    @field_validator("id")
    @classmethod
    def _id_shape(cls, v: str) -> str:
        if not _ID_RE.match(v):
            raise ValueError(
                f"sub-agent id {v!r} must be 1-64 characters of letters, digits, '_', '-' or '.', "
                "starting with a letter or digit"
            )
        return v

    @model_validator(mode="after")
    def _default_name(self) -> "SubAgentSpec":
        if not self.name:
            self.name = self.id
        return self


class SwarmPlan(WireModel):
    """A whole DAG submitted up front (LLMCompiler-style)."""

    subagents: list[SubAgentSpec] = Field(default_factory=list)
    # How the final answer is written from the sub-agents' results: "concat" joins them without a
    # model call; "llm" asks the orchestrator model once (one extra orchestrator step).
    aggregate: Literal["concat", "llm"] = "concat"
    aggregate_prompt: str = Field("", max_length=MAX_PROMPT_CHARS)


class LLMConfig(WireModel):
    """Which model backend the job's agents talk to (see swarm.llm)."""

    backend: Literal["openai", "engine"] = "openai"
    base_url: str | None = None
    api_key: str | None = None
    model: str | None = None
    temperature: float | None = None
    max_tokens: int | None = Field(None, ge=1)
    timeout_s: float = Field(120.0, gt=0)
    max_retries: int = Field(4, ge=0)
    # backend == "engine": the Ray actor name of an in-cluster model_shards replica.
    engine_actor: str | None = None


class ToolsConfig(WireModel):
    """Settings of the built-in tools for one job."""

    search_corpus: str | None = Field(None, description="path of a JSONL corpus for `search`")
    http_allowlist: list[str] = Field(default_factory=list, description="hosts `http_get` may reach")
    python_timeout_s: float = Field(10.0, gt=0)
    python_memory_mb: int = Field(512, ge=32)


class JobSpec(WireModel):
    """A job: either a task for the orchestrator agent (K2.5 style) or a whole plan."""

    name: str = ""
    task: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    plan: SwarmPlan | None = None
    orchestrator_prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    subagent_tools: list[str] = Field(
        default_factory=lambda: ["search", "calculator"],
        description="tools the orchestrator may give to sub-agents it creates",
    )
    limits: Limits = Field(default_factory=Limits)
    llm: LLMConfig = Field(default_factory=LLMConfig)
    subagent_llm: LLMConfig | None = Field(
        None,
        description="the model the sub-agents (every agent of a plan) talk to; None: the same as 'llm', which then "
        "serves the orchestrator only (e.g. a trained orchestrator over a fixed sub-agent model)",
    )
    tools: ToolsConfig = Field(default_factory=ToolsConfig)
    metadata: dict[str, Any] = Field(default_factory=dict)
    # How a task job is orchestrated: "agent" is the K2.5 create_subagent/assign_task agent; "plan" has
    # the model write one whole plan up front (swarm.plan_writer, repaired on validation errors), runs
    # it like a submitted plan, and aggregates the final answer.
    orchestrator: Literal["agent", "plan"] = "agent"
    plan_aggregate_prompt: str = Field(
        "",
        max_length=MAX_PROMPT_CHARS,
        description="orchestrator 'plan': when set, the final answer is always one aggregation call with this "
        "prompt (e.g. a table's columns); empty: as the written plan says",
    )

    @model_validator(mode="after")
    def _task_or_plan(self) -> "JobSpec":
        if (self.task is None) == (self.plan is None):
            raise ValueError("a job needs exactly one of 'task' (orchestrator mode) or 'plan'")
        if self.task is not None and not self.task.strip():
            raise ValueError("'task' is empty")
        if self.orchestrator == "plan" and self.plan is not None:
            raise ValueError("orchestrator 'plan' writes the plan from 'task': give 'task', not 'plan'")
        return self

    @property
    def mode(self) -> Literal["plan", "orchestrator"]:
        return "plan" if self.plan is not None else "orchestrator"

    @property
    def agent_llm(self) -> LLMConfig:
        """The model config the sub-agents use."""
        return self.subagent_llm or self.llm


def redact_llm_keys(spec: dict[str, Any]) -> dict[str, Any]:
    """Mask the API keys of a dumped JobSpec's model configs (in place; returned for chaining):
    events are stored and served, so no secret goes into them."""
    for key in ("llm", "subagent_llm"):
        llm = spec.get(key)
        if isinstance(llm, dict) and llm.get("api_key"):
            llm["api_key"] = "***"
    return spec


class JobState(str, enum.Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"
    interrupted = "interrupted"

    @property
    def terminal(self) -> bool:
        return self in (JobState.succeeded, JobState.failed, JobState.cancelled, JobState.interrupted)


class JobMetrics(WireModel):
    """What every job reports: the K2.5 latency metric next to wall time and volume."""

    critical_steps: int = 0
    total_steps: int = 0
    orchestrator_steps: int = 0
    subagents: int = 0
    tool_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    wall_time_s: float = 0.0
    retries: int = 0


class JobStatus(WireModel):
    id: str
    name: str = ""
    state: JobState = JobState.queued
    mode: Literal["plan", "orchestrator"] = "orchestrator"
    created_at: float = Field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    result: str | None = None
    error: str | None = None
    metrics: JobMetrics = Field(default_factory=JobMetrics)


def new_job_id() -> str:
    return "job-" + uuid.uuid4().hex[:12]
