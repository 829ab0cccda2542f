"""The text a job sends to its agents: sub-agent task messages, results, the aggregation prompt.

Kept free of Ray so that the trace synthesizer (planner.traces) renders exactly what the runtime
sends, on machines where Ray is absent (a GPU box training the policy).
"""

from __future__ import annotations

from swarm.plans import SubAgentSpec

AGGREGATOR_SYSTEM_PROMPT = (
    "You are the orchestrator of an agent swarm. Sub-agents worked on parts of a task in parallel; "
    "their final answers follow, each under its agent id. Combine them into one complete, consistent "
    "final answer. Resolve contradictions where you can and say where you cannot; do not invent facts "
    "that none of the answers contains."
)
DEFAULT_AGGREGATE_PROMPT = "Write the final answer from the sub-agents' results below."


def result_label(spec: SubAgentSpec) -> str:
    """How a sub-agent's result is labelled: "<id> (<name>)" when the two differ, else the id."""
    return spec.id if spec.name == spec.id else f"{spec.id} ({spec.name})"


def compose_task_message(task: str, deps: list[tuple[SubAgentSpec, str]]) -> str:
    """The sub-agent's user message: its dependencies' final results, labelled, then its task."""
    if not deps:
        return task
    parts = ["Results of the sub-agents this task depends on:"]
    for spec, text in deps:
        parts.append(f"### Result of {result_label(spec)}\n{text}")
    parts.append(f"### Your task\n{task}")
    return "\n\n".join(parts)


def concat_results(results: list[tuple[SubAgentSpec, str]]) -> str:
    """The final answer of a plan whose aggregate is "concat": each result under its label."""
    return "\n\n".join(f"## {result_label(spec)}\n{text}" for spec, text in results)


def aggregate_user_message(aggregate_prompt: str, results: list[tuple[SubAgentSpec, str]]) -> str:
    """The aggregation step's user message: the plan's prompt (or the default), then every result."""
    body = "\n\n".join(f"### Result of {result_label(spec)}\n{text}" for spec, text in results)
    return f"{aggregate_prompt.strip() or DEFAULT_AGGREGATE_PROMPT}\n\n{body}"
