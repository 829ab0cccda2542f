"""CriticalSteps, the K2.5 latency metric (DESIGN.md §4; full definition in docs/critical_steps.md).

    CriticalSteps = orchestrator_steps + Σ_t L_t

L_t is the heaviest dependency chain, by steps, among the sub-agents assigned at orchestrator step
t. Agents of one stage run in parallel, so only their longest chain adds latency; a dependency on an
agent of an earlier stage weighs 0 there because that agent finished before step t began.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import networkx as nx

from swarm.dag import critical_path


@dataclass
class AgentSteps:
    """What the metric needs to know about one sub-agent of a finished (or running) job."""

    agent_id: str
    stage: int  # orchestrator step (1-based) that assigned it; 1 for every agent of an up-front plan
    steps: int  # model calls it made, summed over all its attempts (a retry is latency too)
    depends_on: list[str] = field(default_factory=list)


def _stage_graphs(orchestrator_steps: int, agents: Sequence[AgentSteps]) -> dict[int, nx.DiGraph]:
    """Check the input and build one dependency graph per stage (edges only within a stage)."""
    if orchestrator_steps < 0:
        raise ValueError(f"orchestrator_steps must be >= 0, got {orchestrator_steps}")
    by_id: dict[str, AgentSteps] = {}
    problems: list[str] = []
    for a in agents:
        if a.agent_id in by_id:
            problems.append(f"duplicate agent id {a.agent_id!r}")
        by_id[a.agent_id] = a
        if a.stage < 1:
            problems.append(f"agent {a.agent_id!r} has stage {a.stage}; stages start at 1")
        if a.steps < 0:
            problems.append(f"agent {a.agent_id!r} has steps={a.steps}; steps must be >= 0")
    graphs: dict[int, nx.DiGraph] = {}
    for a in by_id.values():
        graphs.setdefault(a.stage, nx.DiGraph()).add_node(a.agent_id)
    for a in by_id.values():
        for dep in a.depends_on:
            d = by_id.get(dep)
            if d is None:
                problems.append(f"agent {a.agent_id!r} depends on unknown agent {dep!r}")
            elif d.stage > a.stage:
                problems.append(
                    f"agent {a.agent_id!r} (stage {a.stage}) depends on {dep!r} of a later stage {d.stage}"
                )
            elif d.stage == a.stage:
                graphs[a.stage].add_edge(dep, a.agent_id)
    for stage, g in sorted(graphs.items()):
        if not nx.is_directed_acyclic_graph(g):
            cycle = [u for u, _ in nx.find_cycle(g)]
            problems.append(f"dependency cycle in stage {stage}: " + " -> ".join(cycle + [cycle[0]]))
    if problems:
        raise ValueError("; ".join(problems))
    return graphs


def _stage_chains(orchestrator_steps: int, agents: Sequence[AgentSteps]) -> list[tuple[list[str], int]]:
    graphs = _stage_graphs(orchestrator_steps, agents)
    steps = {a.agent_id: float(a.steps) for a in agents}
    out: list[tuple[list[str], int]] = []
    for stage in sorted(graphs):
        g = graphs[stage]
        path, total = critical_path(g, {n: steps[n] for n in g.nodes})
        out.append((path, int(total)))
    return out


def critical_steps(orchestrator_steps: int, agents: Sequence[AgentSteps]) -> int:
    """orchestrator_steps + Σ_t L_t (see module doc). Stages without agents add nothing.

    Plan mode: orchestrator_steps is the number of orchestrator model calls actually made (0 for a
    plan given up front, 1 if the model aggregates the results). Raises ValueError on inconsistent
    input (unknown or later-stage dependency, cycle, duplicate id, negative counts).
    """
    return orchestrator_steps + sum(total for _, total in _stage_chains(orchestrator_steps, agents))


def critical_chain(orchestrator_steps: int, agents: Sequence[AgentSteps]) -> list[str]:
    """The agent ids on the critical chain, stage by stage, each stage's chain in dependency order."""
    chain: list[str] = []
    for path, total in _stage_chains(orchestrator_steps, agents):
        if total > 0:  # a stage whose agents took no steps adds no latency, so no chain to show
            chain.extend(path)
    return chain
