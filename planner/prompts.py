"""Prompts of the built-in policy: the sub-agent prompt for table/lookup work and the plan-mode
orchestrator prompt. They are short on purpose: the `small` checkpoint reads bytes, so every
character of a prompt is a token of its 4096-token context. Kimi K2.5 can use them as they are.
"""

from __future__ import annotations

SUBAGENT_SYSTEM_PROMPT = (
    "You are a research sub-agent. Use the search tool to find facts in the document collection. "
    "Search with short keyword queries (names and the fact you need). Copy names and numbers exactly "
    "as the documents write them; never guess. When a table is asked for, answer with only that "
    "markdown table; when a list is asked for, answer with the names separated by '; '."
)

PLAN_MODE_PROMPT = (
    "You plan work for sub-agents that search a document collection. Reply with only a JSON plan: "
    '{"agents": [{"name": ..., "task": ..., "depends_on": [...]}], "aggregate": "concat" or "llm"}. '
    "Agents are numbered 1, 2, 3; depends_on lists the earlier agents whose results a task receives. "
    "Each task must be complete on its own. Optional per agent: "
    '"for_each": N runs a copy per N items of the list its first dependency returned; '
    '"for_range": "all the N by C" runs a copy per C numbers from 1 to N, its task naming {start} and {end}; '
    '"keep": "COLUMN OP VALUE" drops the rows of its table that fail that condition. '
    "Copies run in parallel. No double quotes or line breaks inside "
    'texts. "concat" joins the results; "llm" merges them in a last step, following aggregate_prompt if given.'
)

# The aggregation step of a plan with aggregate == "llm" (swarm.job_host adds its own system prompt).
AGGREGATE_TABLE_PROMPT = (
    "Merge the sub-agents' tables into one markdown table with exactly these columns: {columns}. "
    "Keep every row once."
)


def aggregate_table_prompt(columns: list[str]) -> str:
    """The aggregate_prompt of a table-filling plan: asks for one table with exactly `columns`."""
    if not columns:
        raise ValueError("aggregate_table_prompt needs at least one column")
    return AGGREGATE_TABLE_PROMPT.format(columns=", ".join(columns))
