"""Typed event records of a job, the one stream that the store, the API, the CLI and the dashboard read.

Each event carries the job id, a wall-clock timestamp and, once stored, a per-job sequence number
`seq` (1, 2, 3 ...) assigned by the job's runtime in the order it received them. `seq` is what SSE
clients resume from (Last-Event-ID), so it is dense and never reused within a job.
The orchestrator is an agent like the others, with agent_id "orchestrator".
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal, Union

import orjson
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from swarm.plans import JobMetrics, JobState

ORCHESTRATOR_ID = "orchestrator"


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid")

    job_id: str = ""
    seq: int = 0
    ts: float = Field(default_factory=time.time)


class JobSubmitted(_Event):
    type: Literal["job_submitted"] = "job_submitted"
    name: str = ""
    mode: Literal["plan", "orchestrator"] = "orchestrator"
    spec: dict[str, Any] = Field(default_factory=dict)


class JobStarted(_Event):
    type: Literal["job_started"] = "job_started"


class JobFinished(_Event):
    type: Literal["job_finished"] = "job_finished"
    state: JobState
    result: str | None = None
    error: str | None = None
    metrics: JobMetrics = Field(default_factory=JobMetrics)


class SubAgentCreated(_Event):
    type: Literal["subagent_created"] = "subagent_created"
    agent_id: str
    name: str = ""
    system_prompt: str = ""
    task: str = ""
    tools: list[str] = Field(default_factory=list)
    depends_on: list[str] = Field(default_factory=list)
    # Orchestrator step that created/assigned it (1-based); 1 for an up-front plan.
    stage: int = 1
    # Set for a copy of a fan-out node (swarm.fan_out): that node's id.
    fan_out_of: str = ""


class SubAgentStarted(_Event):
    type: Literal["subagent_started"] = "subagent_started"
    agent_id: str
    attempt: int = 1
    worker: str = ""


class SubAgentStep(_Event):
    """One model call of an agent (the orchestrator included)."""

    type: Literal["subagent_step"] = "subagent_step"
    agent_id: str
    step: int
    content: str | None = None
    reasoning: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class ToolCalled(_Event):
    type: Literal["tool_call"] = "tool_call"
    agent_id: str
    step: int
    call_id: str
    tool: str
    arguments: str = ""


class ToolResult(_Event):
    type: Literal["tool_result"] = "tool_result"
    agent_id: str
    step: int
    call_id: str
    tool: str
    content: str = ""
    is_error: bool = False
    duration_s: float = 0.0


class SubAgentFinished(_Event):
    type: Literal["subagent_finished"] = "subagent_finished"
    agent_id: str
    result: str = ""
    steps: int = 0
    tool_calls: int = 0
    # What the node's keep_rows filter did to its answer (swarm.row_filter); "" without a filter.
    filter_note: str = ""


class SubAgentFailed(_Event):
    type: Literal["subagent_failed"] = "subagent_failed"
    agent_id: str
    error: str
    attempt: int = 1
    will_retry: bool = False


class SubAgentRetried(_Event):
    type: Literal["subagent_retried"] = "subagent_retried"
    agent_id: str
    attempt: int
    delay_s: float = 0.0
    reason: str = ""


class SubAgentCancelled(_Event):
    type: Literal["subagent_cancelled"] = "subagent_cancelled"
    agent_id: str


Event = Annotated[
    Union[
        JobSubmitted,
        JobStarted,
        JobFinished,
        SubAgentCreated,
        SubAgentStarted,
        SubAgentStep,
        ToolCalled,
        ToolResult,
        SubAgentFinished,
        SubAgentFailed,
        SubAgentRetried,
        SubAgentCancelled,
    ],
    Field(discriminator="type"),
]

_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)


def event_from_dict(data: dict[str, Any]) -> Event:
    return _ADAPTER.validate_python(data)


def event_to_json(event: _Event) -> bytes:
    return orjson.dumps(event.model_dump(mode="json"))


def event_from_json(data: bytes | str) -> Event:
    return _ADAPTER.validate_python(orjson.loads(data))
