"""The swarm DAG: validate a plan into a networkx graph, then read stages and the critical path off it.

Nodes are sub-agent ids (node attribute "spec" holds the SubAgentSpec); an edge dep -> dependent
means "dependent starts after dep finished". Validation collects every problem before raising, so a
user fixes a bad plan in one round, and each message names the node(s) at fault.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import networkx as nx

from swarm.fan_out import range_windows
from swarm.plans import Limits, SubAgentSpec, SwarmPlan


class PlanValidationError(ValueError):
    """A plan (or one node added to a running DAG) breaks the DAG rules; `problems` lists them all."""

    def __init__(self, problems: list[str]) -> None:
        self.problems: list[str] = list(problems)
        super().__init__("; ".join(self.problems))


def _known_list(known_tools: Collection[str]) -> str:
    return ", ".join(sorted(known_tools)) or "none"


def _spec_problems(spec: SubAgentSpec, limits: Limits, known_tools: Collection[str]) -> list[str]:
    """Problems of one node on its own: tools and step cap (not its place in the graph)."""
    problems: list[str] = []
    for tool in spec.tools:
        if tool not in known_tools:
            problems.append(
                f"agent {spec.id!r} uses unknown tool {tool!r} (known tools: {_known_list(known_tools)})"
            )
    if spec.max_steps is not None and spec.max_steps > limits.subagent_max_steps:
        problems.append(
            f"agent {spec.id!r} asks for max_steps={spec.max_steps}, above the limit "
            f"subagent_max_steps={limits.subagent_max_steps}"
        )
    return problems


def _range_problems(spec: SubAgentSpec) -> list[str]:
    """A range fan-out must say where each copy's window goes, and cannot also split a list."""
    if spec.for_range is None:
        return []
    problems = []
    if spec.for_each is not None:
        problems.append(f"agent {spec.id!r} has both for_each and for_range; a node fans out one way")
    if "{start}" not in spec.task and "{end}" not in spec.task:
        problems.append(f"agent {spec.id!r} has for_range, but its task names neither {{start}} nor {{end}}, "
                        "so every copy would do the same work")
    return problems


def _dependency_problems(spec: SubAgentSpec, known_ids: Collection[str]) -> list[str]:
    problems: list[str] = []
    for dep in spec.depends_on:
        if dep == spec.id:
            problems.append(f"agent {spec.id!r} depends on itself")
        elif dep not in known_ids:
            problems.append(f"agent {spec.id!r} depends on unknown agent {dep!r}")
    return problems


def _cycle_problems(graph: nx.DiGraph) -> list[str]:
    """One named cycle per strongly connected component that has one (self-loops are reported apart)."""
    problems: list[str] = []
    components = [sorted(c) for c in nx.strongly_connected_components(graph) if len(c) > 1]
    for comp in sorted(components):
        # Start from the smallest id so the message is stable from run to run.
        edges = nx.find_cycle(graph.subgraph(comp), source=comp[0])
        path = [edges[0][0]] + [v for _, v in edges]
        problems.append("dependency cycle: " + " -> ".join(path))
    return problems


def validate_plan(plan: SwarmPlan, limits: Limits, known_tools: Collection[str]) -> nx.DiGraph:
    """Check a whole plan against the DAG rules and the job's limits; return its graph.

    Raises PlanValidationError listing every problem found.
    """
    problems: list[str] = []
    specs = plan.subagents
    if not specs:
        raise PlanValidationError(["the plan has no sub-agents"])
    # A range fan-out's copies are known before anything runs (a list fan-out's only once its list is in).
    # (the range node itself runs no agent, as the runtime counts it)
    ranged = [s for s in specs if s.for_range is not None]
    copies = sum(len(range_windows(s.for_range)) for s in ranged)
    total = len(specs) - len(ranged) + copies
    if total > limits.max_subagents:
        counted = f" (counting {copies} range copies)" if ranged else ""
        problems.append(f"the plan has {total} sub-agents{counted}, more than the limit "
                        f"max_subagents={limits.max_subagents}")

    graph = nx.DiGraph()
    seen_dupes: set[str] = set()
    for spec in specs:
        if spec.id in graph:
            if spec.id not in seen_dupes:
                problems.append(f"duplicate agent id {spec.id!r}")
                seen_dupes.add(spec.id)
            continue
        graph.add_node(spec.id, spec=spec)

    for spec in specs:
        if graph.nodes[spec.id]["spec"] is not spec:
            continue  # a duplicate: already reported, its edges would be ambiguous
        problems.extend(_dependency_problems(spec, graph))
        problems.extend(_spec_problems(spec, limits, known_tools))
        problems.extend(_range_problems(spec))
        if spec.for_each is not None and spec.for_each.source not in spec.depends_on:
            problems.append(
                f"agent {spec.id!r} fans out over {spec.for_each.source!r}, which is not among its "
                f"dependencies {spec.depends_on}"
            )
        for dep in spec.depends_on:
            if dep != spec.id and dep in graph:
                graph.add_edge(dep, spec.id)

    problems.extend(_cycle_problems(graph))
    if problems:
        raise PlanValidationError(problems)
    return graph


def check_new_node(graph: nx.DiGraph, spec: SubAgentSpec, limits: Limits, known_tools: Collection[str]) -> None:
    """Check that `spec` may join a DAG that grows while the job runs (K2.5 assign_task).

    Same rules as validate_plan for one node. Dependencies may only point at nodes already in the
    graph, so a valid addition can never close a cycle. Does not mutate `graph`.
    """
    problems: list[str] = []
    if spec.id in graph:
        problems.append(f"duplicate agent id {spec.id!r}: an agent with this id already exists")
    elif graph.number_of_nodes() + 1 > limits.max_subagents:
        problems.append(
            f"adding agent {spec.id!r} would make {graph.number_of_nodes() + 1} sub-agents, "
            f"more than the limit max_subagents={limits.max_subagents}"
        )
    problems.extend(_dependency_problems(spec, graph))
    problems.extend(_spec_problems(spec, limits, known_tools))
    if spec.for_each is not None or spec.for_range is not None:
        problems.append(f"agent {spec.id!r} has {'for_each' if spec.for_each else 'for_range'}, which only a plan's node may have")
    if problems:
        raise PlanValidationError(problems)


def stages(graph: nx.DiGraph) -> list[list[str]]:
    """Topological generations: stage k holds the nodes whose longest dependency chain has k edges."""
    return [sorted(gen) for gen in nx.topological_generations(graph)]


def critical_path(graph: nx.DiGraph, weight: Mapping[str, float]) -> tuple[list[str], float]:
    """The heaviest path of the DAG by node weight, and its total weight.

    Nodes missing from `weight` weigh 0 (an agent that has not run yet took no steps). Ties go to
    the path through the smaller id, so the answer is deterministic. An empty graph gives ([], 0.0).
    """
    unknown = sorted(set(weight) - set(graph.nodes))
    if unknown:
        raise ValueError(f"weights given for nodes not in the graph: {', '.join(map(repr, unknown))}")
    negative = sorted(n for n, w in weight.items() if w < 0)
    if negative:
        raise ValueError(f"node weights must be >= 0; negative for: {', '.join(map(repr, negative))}")
    if not nx.is_directed_acyclic_graph(graph):
        raise ValueError(f"critical_path needs a DAG; the graph has a cycle: {nx.find_cycle(graph)}")

    best: dict[str, float] = {}  # heaviest path ending at the node, the node included
    prev: dict[str, str | None] = {}
    for node in nx.lexicographical_topological_sort(graph):
        pred_best, pred = 0.0, None
        for p in sorted(graph.predecessors(node)):
            if pred is None or best[p] > pred_best:
                pred_best, pred = best[p], p
        best[node] = pred_best + float(weight.get(node, 0.0))
        prev[node] = pred
    if not best:
        return [], 0.0
    end = min(best, key=lambda n: (-best[n], n))
    path: list[str] = []
    cur: str | None = end
    while cur is not None:
        path.append(cur)
        cur = prev[cur]
    path.reverse()
    return path, best[end]
