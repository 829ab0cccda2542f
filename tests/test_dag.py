"""swarm.dag: plan validation (every rule, every message naming its node), stages, critical path."""

from __future__ import annotations

import networkx as nx
import pytest

from swarm.dag import PlanValidationError, check_new_node, critical_path, stages, validate_plan
from swarm.plans import Limits, SubAgentSpec, SwarmPlan

TOOLS = ["calculator", "search"]


def agent(id: str, deps: list[str] | None = None, tools: list[str] | None = None, max_steps: int = 10) -> SubAgentSpec:
    return SubAgentSpec(id=id, task=f"task of {id}", depends_on=deps or [], tools=tools or [], max_steps=max_steps)


def plan(*specs: SubAgentSpec) -> SwarmPlan:
    return SwarmPlan(subagents=list(specs))


def problems_of(p: SwarmPlan, limits: Limits | None = None) -> list[str]:
    with pytest.raises(PlanValidationError) as exc:
        validate_plan(p, limits or Limits(), TOOLS)
    err = exc.value
    assert str(err) == "; ".join(err.problems)
    assert isinstance(err, ValueError)
    return err.problems


def test_valid_plan_builds_graph_with_specs_and_edges() -> None:
    a, b, c = agent("a", tools=["search"]), agent("b", ["a"]), agent("c", ["a", "b"], tools=["calculator"])
    g = validate_plan(plan(a, b, c), Limits(), TOOLS)
    assert isinstance(g, nx.DiGraph)
    assert set(g.nodes) == {"a", "b", "c"}
    assert set(g.edges) == {("a", "b"), ("a", "c"), ("b", "c")}
    assert g.nodes["c"]["spec"] is c


def test_empty_plan_rejected() -> None:
    assert problems_of(plan()) == ["the plan has no sub-agents"]


def test_too_many_subagents_says_count_and_limit() -> None:
    probs = problems_of(plan(agent("a"), agent("b"), agent("c")), Limits(max_subagents=2))
    assert probs == ["the plan has 3 sub-agents, more than the limit max_subagents=2"]


def test_duplicate_id_named_once() -> None:
    probs = problems_of(plan(agent("a"), agent("a"), agent("a"), agent("b")))
    assert probs == ["duplicate agent id 'a'"]


def test_unknown_dependency_named() -> None:
    probs = problems_of(plan(agent("a"), agent("b", ["zz"])))
    assert probs == ["agent 'b' depends on unknown agent 'zz'"]


def test_self_dependency_named() -> None:
    probs = problems_of(plan(agent("a", ["a"])))
    assert probs == ["agent 'a' depends on itself"]


def test_cycle_is_named_as_a_path() -> None:
    probs = problems_of(plan(agent("a", ["c"]), agent("b", ["a"]), agent("c", ["b"]), agent("d", ["a"])))
    assert probs == ["dependency cycle: a -> b -> c -> a"]


def test_two_separate_cycles_both_reported() -> None:
    probs = problems_of(plan(agent("a", ["b"]), agent("b", ["a"]), agent("x", ["y"]), agent("y", ["x"])))
    assert probs == ["dependency cycle: a -> b -> a", "dependency cycle: x -> y -> x"]


def test_unknown_tool_names_tool_agent_and_known_tools() -> None:
    probs = problems_of(plan(agent("a", tools=["search", "browser"])))
    assert probs == ["agent 'a' uses unknown tool 'browser' (known tools: calculator, search)"]


def test_step_cap_above_limit_named() -> None:
    probs = problems_of(plan(agent("a", max_steps=50)), Limits(subagent_max_steps=20))
    assert probs == ["agent 'a' asks for max_steps=50, above the limit subagent_max_steps=20"]


def test_all_problems_collected_in_one_error() -> None:
    p = plan(
        agent("a", ["a"]),
        agent("b", ["zz"], tools=["nope"]),
        agent("b"),
        agent("c", ["d"]),
        agent("d", ["c"], max_steps=99),
    )
    probs = problems_of(p, Limits(max_subagents=3, subagent_max_steps=50))
    assert probs[0] == "the plan has 5 sub-agents, more than the limit max_subagents=3"
    assert "duplicate agent id 'b'" in probs
    assert "agent 'a' depends on itself" in probs
    assert "agent 'b' depends on unknown agent 'zz'" in probs
    assert "agent 'b' uses unknown tool 'nope' (known tools: calculator, search)" in probs
    assert "agent 'd' asks for max_steps=99, above the limit subagent_max_steps=50" in probs
    assert "dependency cycle: c -> d -> c" in probs
    assert len(probs) == 7


def test_check_new_node_accepts_valid_addition_without_mutating() -> None:
    g = validate_plan(plan(agent("a"), agent("b", ["a"])), Limits(), TOOLS)
    before = (set(g.nodes), set(g.edges))
    check_new_node(g, agent("c", ["a", "b"], tools=["search"]), Limits(), TOOLS)
    assert (set(g.nodes), set(g.edges)) == before


def test_check_new_node_on_empty_graph() -> None:
    check_new_node(nx.DiGraph(), agent("first"), Limits(), TOOLS)
    with pytest.raises(PlanValidationError, match="agent 'first' depends on unknown agent 'x'"):
        check_new_node(nx.DiGraph(), agent("first", ["x"]), Limits(), TOOLS)


@pytest.mark.parametrize(
    ("spec", "limits", "expected"),
    [
        (agent("a"), Limits(), "duplicate agent id 'a': an agent with this id already exists"),
        (agent("c", ["zz"]), Limits(), "agent 'c' depends on unknown agent 'zz'"),
        (agent("c", ["c"]), Limits(), "agent 'c' depends on itself"),
        (agent("c", tools=["rm"]), Limits(), "agent 'c' uses unknown tool 'rm' (known tools: calculator, search)"),
        (agent("c", max_steps=11), Limits(subagent_max_steps=10), "agent 'c' asks for max_steps=11, above the limit subagent_max_steps=10"),
        (agent("c"), Limits(max_subagents=2), "adding agent 'c' would make 3 sub-agents, more than the limit max_subagents=2"),
    ],
)
def test_check_new_node_rejects(spec: SubAgentSpec, limits: Limits, expected: str) -> None:
    g = validate_plan(plan(agent("a"), agent("b", ["a"])), Limits(), TOOLS)
    with pytest.raises(PlanValidationError) as exc:
        check_new_node(g, spec, limits, TOOLS)
    assert exc.value.problems == [expected]
    assert set(g.nodes) == {"a", "b"}


def test_stages_are_topological_generations_sorted() -> None:
    p = plan(agent("z"), agent("a"), agent("m", ["z", "a"]), agent("b", ["a"]), agent("end", ["m", "b"]))
    g = validate_plan(p, Limits(), TOOLS)
    assert stages(g) == [["a", "z"], ["b", "m"], ["end"]]
    assert stages(nx.DiGraph()) == []


def test_critical_path_heaviest_by_node_weight() -> None:
    # a -> b -> d and a -> c -> d: c is heavier, so the path goes through c.
    g = validate_plan(plan(agent("a"), agent("b", ["a"]), agent("c", ["a"]), agent("d", ["b", "c"])), Limits(), TOOLS)
    assert critical_path(g, {"a": 1, "b": 2, "c": 5, "d": 1}) == (["a", "c", "d"], 7.0)
    # A lone heavy node beats a longer light chain.
    g.add_node("solo")
    assert critical_path(g, {"a": 1, "b": 2, "c": 5, "d": 1, "solo": 20}) == (["solo"], 20.0)


def test_critical_path_missing_weights_are_zero_and_ties_break_by_id() -> None:
    g = validate_plan(plan(agent("a"), agent("b"), agent("c", ["a", "b"])), Limits(), TOOLS)
    assert critical_path(g, {"c": 3}) == (["a", "c"], 3.0)
    assert critical_path(nx.DiGraph(), {}) == ([], 0.0)


def test_critical_path_bad_input() -> None:
    g = validate_plan(plan(agent("a")), Limits(), TOOLS)
    with pytest.raises(ValueError, match="not in the graph: 'ghost'"):
        critical_path(g, {"a": 1, "ghost": 2})
    with pytest.raises(ValueError, match="negative for: 'a'"):
        critical_path(g, {"a": -1})
    cyc = nx.DiGraph([("x", "y"), ("y", "x")])
    with pytest.raises(ValueError, match="cycle"):
        critical_path(cyc, {})


def test_unset_max_steps_takes_the_job_limit():
    # A node without max_steps is never rejected for it: it runs under the job's own step cap.
    plan = SwarmPlan(subagents=[SubAgentSpec(id="a", task="t")])
    assert plan.subagents[0].max_steps is None
    validate_plan(plan, Limits(subagent_max_steps=5), known_tools=[])


def test_example_jobs_parse_and_their_plans_validate():
    """The README points operators at examples/*_job.json: each must be a valid job as shipped."""
    from pathlib import Path

    from planner.envs.corpus import default_corpus_path
    from swarm.plans import JobSpec

    files = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*_job.json"))
    assert {f.name for f in files} >= {"plan_job.json", "task_job.json", "fan_out_job.json", "filter_job.json"}
    for f in files:
        spec = JobSpec.model_validate_json(f.read_text())
        # They name the corpus `swarm corpus` builds: its file name carries the corpus version.
        if spec.tools.search_corpus is not None:
            assert Path(spec.tools.search_corpus).name == default_corpus_path().name, f.name
        if spec.plan is not None:
            validate_plan(spec.plan, spec.limits, {"search", "calculator", "python", "http_get"})
