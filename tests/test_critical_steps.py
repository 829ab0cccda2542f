"""swarm.critical_steps: the worked examples of docs/critical_steps.md, plus bad input."""

from __future__ import annotations

import pytest

from swarm.critical_steps import AgentSteps, critical_chain, critical_steps


def A(agent_id: str, steps: int, stage: int = 1, deps: list[str] | None = None) -> AgentSteps:
    return AgentSteps(agent_id=agent_id, stage=stage, steps=steps, depends_on=deps or [])


def test_fan_out_plan_mode() -> None:
    agents = [A("a", 3), A("b", 5), A("c", 2)]
    assert critical_steps(0, agents) == 5
    assert critical_steps(1, agents) == 6  # aggregate: llm adds one orchestrator call
    assert critical_chain(0, agents) == ["b"]


def test_chain() -> None:
    agents = [A("c", 2, deps=["b"]), A("a", 3), A("b", 4, deps=["a"])]
    assert critical_steps(0, agents) == 9
    assert critical_chain(0, agents) == ["a", "b", "c"]


def test_diamond_takes_heavier_branch() -> None:
    agents = [A("a", 2), A("b", 5, deps=["a"]), A("c", 3, deps=["a"]), A("d", 1, deps=["b", "c"])]
    assert critical_steps(0, agents) == 8
    assert critical_chain(0, agents) == ["a", "b", "d"]


def test_multi_stage_orchestrator_earlier_stage_dependency_weighs_zero() -> None:
    agents = [A("a", 3, 1), A("b", 6, 1), A("c", 4, 2, ["a"]), A("d", 2, 2)]
    assert critical_steps(4, agents) == 14
    assert critical_chain(4, agents) == ["b", "c"]


def test_same_stage_chain_in_orchestrator_mode() -> None:
    agents = [A("f", 3, 1), A("e", 2, 1, ["f"]), A("g", 4, 1)]
    assert critical_steps(2, agents) == 7
    assert critical_chain(2, agents) == ["f", "e"]


def test_retries_count_as_latency() -> None:
    agents = [A("a", 3 + 4), A("b", 5)]  # a: 3 steps in a failed attempt, 4 in its retry
    assert critical_steps(0, agents) == 7
    assert critical_chain(0, agents) == ["a"]


def test_empty_stages_add_only_their_orchestrator_step() -> None:
    agents = [A("x", 4, 2)]
    assert critical_steps(3, agents) == 7
    assert critical_chain(3, agents) == ["x"]


def test_no_agents() -> None:
    assert critical_steps(2, []) == 2
    assert critical_chain(2, []) == []


def test_zero_step_stage_adds_no_chain() -> None:
    agents = [A("cancelled", 0, 1), A("x", 2, 2)]
    assert critical_steps(2, agents) == 4
    assert critical_chain(2, agents) == ["x"]


def test_matches_k25_formula_without_dependencies() -> None:
    # Σ_t (S_main(t) + max_i S_sub,i(t)) with S_main = 1 per stage.
    per_stage = {1: [4, 9, 2], 2: [1], 3: [], 4: [7, 7]}
    agents = [A(f"s{t}_{i}", s, t) for t, ss in per_stage.items() for i, s in enumerate(ss)]
    expected = sum(1 + max(ss, default=0) for ss in per_stage.values())
    assert critical_steps(len(per_stage), agents) == expected == 4 + 9 + 1 + 0 + 7


@pytest.mark.parametrize(
    ("agents", "message"),
    [
        ([A("a", 1, deps=["zz"])], "agent 'a' depends on unknown agent 'zz'"),
        ([A("a", 1, 1, ["b"]), A("b", 1, 2)], "agent 'a' (stage 1) depends on 'b' of a later stage 2"),
        ([A("a", 1, deps=["b"]), A("b", 1, deps=["a"])], "dependency cycle in stage 1: "),
        ([A("a", 1), A("a", 2)], "duplicate agent id 'a'"),
        ([A("a", 1, 0)], "agent 'a' has stage 0; stages start at 1"),
        ([A("a", -1)], "agent 'a' has steps=-1; steps must be >= 0"),
    ],
)
def test_bad_input_is_named(agents: list[AgentSteps], message: str) -> None:
    with pytest.raises(ValueError) as exc:
        critical_steps(1, agents)
    assert message in str(exc.value)


def test_negative_orchestrator_steps_rejected() -> None:
    with pytest.raises(ValueError, match="orchestrator_steps must be >= 0, got -1"):
        critical_steps(-1, [])
