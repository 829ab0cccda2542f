"""The built-in tools of sub-agents and the registry a job's agents share.

`build_registry(ToolsConfig)` gives one registry with all four tools configured for a job:
`search` (BM25 over the job's JSONL corpus), `calculator` (safe arithmetic), `python` (sandboxed
subprocess) and `http_get` (refuses every host unless the job allowlists it).
"""

from __future__ import annotations

from swarm.plans import ToolsConfig
from workers.tools.calculator import make_calculator_tool
from workers.tools.http_get import make_http_get_tool
from workers.tools.python_sandbox import make_python_tool
from workers.tools.registry import Tool, ToolContext, ToolOutcome, ToolRegistry
from workers.tools.search import make_search_tool

BUILTIN_TOOLS: tuple[str, ...] = ("search", "calculator", "python", "http_get")


def build_registry(config: ToolsConfig | None = None) -> ToolRegistry:
    """A registry holding the four built-in tools, configured from the job's ToolsConfig."""
    config = config or ToolsConfig()
    return ToolRegistry(
        [
            make_search_tool(config.search_corpus),
            make_calculator_tool(),
            make_python_tool(timeout_s=config.python_timeout_s, memory_mb=config.python_memory_mb),
            make_http_get_tool(config.http_allowlist),
        ]
    )


def known_tool_names(config: ToolsConfig | None = None) -> list[str]:
    """Names a sub-agent spec may list for a job with this config (all built-ins are always registered;
    those that the config leaves unusable, e.g. http_get with an empty allowlist, refuse at call time)."""
    return list(BUILTIN_TOOLS)


__all__ = [
    "BUILTIN_TOOLS",
    "Tool",
    "ToolContext",
    "ToolOutcome",
    "ToolRegistry",
    "build_registry",
    "known_tool_names",
]
