"""The planner: asks a model for one whole swarm plan, constrained to the compact plan schema, and
repairs invalid plans by sending the exact validation error back (swarm.plan_writer's loop).

    planner = Planner(llm, max_repairs=2)
    result = await planner.write_plan(task, tools=["search"], limits=Limits())

`PlannerActor` runs the same as a Ray actor that builds its model client in its own process, so a
driver (e.g. a rollout loop) can share one planner. Jobs with `JobSpec.orchestrator == "plan"` use
the same loop and format inside the runtime's job host.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import ray

from planner.plan_schema import compact_plan_format
from swarm.llm import LLMClient
from swarm.plan_writer import DEFAULT_MAX_REPAIRS, PlanFormat, PlanRepairError, write_plan
from swarm.plans import Limits, LLMConfig, SwarmPlan

__all__ = ["Planner", "PlannerActor", "PlanRepairError", "PlanResult", "PlannerService"]


@dataclass
class PlanResult:
    plan: SwarmPlan
    attempts: int  # model calls, repairs included
    prompt_tokens: int = 0
    completion_tokens: int = 0
    text: str = ""  # the accepted plan as the model wrote it


class Planner:
    """Writes plans with `llm`; raises PlanRepairError (carrying the last error) when repairs run out."""

    def __init__(self, llm: LLMClient, max_repairs: int = DEFAULT_MAX_REPAIRS, *,
                 plan_format: PlanFormat | None = None, temperature: float | None = None,
                 max_tokens: int | None = None) -> None:
        if max_repairs < 0:
            raise ValueError(f"max_repairs must be >= 0, got {max_repairs}")
        self.llm = llm
        self.max_repairs = max_repairs
        self.format = plan_format or compact_plan_format()
        self.temperature = temperature
        self.max_tokens = max_tokens

    async def write_plan(self, task: str, tools: Sequence[str], limits: Limits | None = None) -> PlanResult:
        if not isinstance(task, str) or not task.strip():
            raise ValueError("write_plan needs a non-empty task")
        if not tools:
            raise ValueError("write_plan needs the sub-agents' tools (e.g. ['search'])")
        written = await write_plan(self.llm, self.format, task, limits or Limits(), list(tools),
                                   max_repairs=self.max_repairs, temperature=self.temperature,
                                   max_tokens=self.max_tokens)
        return PlanResult(written.plan, written.attempts, written.prompt_tokens, written.completion_tokens, written.text)


class PlannerService:
    """Body of PlannerActor: builds the model client from an LLMConfig inside the actor's process
    (clients hold connections and cannot travel between processes)."""

    def __init__(self, llm: LLMConfig, max_repairs: int = DEFAULT_MAX_REPAIRS) -> None:
        from swarm.llm_factory import make_llm

        self._planner = Planner(make_llm(llm), max_repairs, temperature=llm.temperature, max_tokens=llm.max_tokens)

    async def write_plan(self, task: str, tools: list[str], limits: Limits | None = None) -> PlanResult:
        return await self._planner.write_plan(task, tools, limits)


PlannerActor = ray.remote(PlannerService)
