"""PARL reward terms, λ annealing, group advantages, version-lag filtering and config errors (no Ray)."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest

from planner.parl.advantages import group_advantages
from planner.parl.config import PARLConfig, PARLConfigError, load_config
from planner.parl.loop import stale_groups
from planner.parl.reward import (
    EpisodeStats,
    episode_reward,
    lambda_at,
    parallel_width,
    r_finish,
    r_parallel,
    r_perf,
)
from planner.parl.rollout import Episode
from planner.parl.samples import OrchestratorSample


def cfg(**kw: object) -> PARLConfig:
    base: dict[str, object] = {"policy_checkpoint": "ckpt", "out": "out"}
    base.update(kw)
    return PARLConfig(**base)  # type: ignore[arg-type]


# ---- hand-built episodes ------------------------------------------------------------------------------
SERIAL = {"a-1": []}  # serial collapse: one sub-agent does everything
CHAIN = {"a-1": [], "b-2": ["a-1"], "c-3": ["b-2"]}  # three agents, but never two at once
WIDE = {f"w-{i}": [] for i in range(1, 6)}  # five independent agents
DIAMOND = {"a-1": [], "b-2": ["a-1"], "c-3": ["a-1"], "d-4": ["b-2", "c-3"]}


def test_parallel_width_counts_agents_that_can_run_at_once() -> None:
    assert parallel_width({}) == 0
    assert parallel_width(SERIAL) == 1
    assert parallel_width(CHAIN) == 1
    assert parallel_width(WIDE) == 5
    assert parallel_width(DIAMOND) == 2
    with pytest.raises(ValueError, match="cycle"):
        parallel_width({"a": ["b"], "b": ["a"]})


def test_r_parallel_zero_for_serial_collapse_and_saturates_at_target() -> None:
    assert r_parallel({}, 4) == 0.0
    assert r_parallel(SERIAL, 4) == 0.0
    assert r_parallel(CHAIN, 4) == 0.0  # a disguised serial plan earns nothing
    assert r_parallel(DIAMOND, 4) == pytest.approx(1 / 3)
    assert r_parallel(WIDE, 4) == 1.0  # saturated: more agents cannot farm this term
    assert r_parallel({f"x-{i}": [] for i in range(50)}, 4) == 1.0
    with pytest.raises(ValueError, match="parallel_target"):
        r_parallel(WIDE, 1)


def test_r_finish_is_the_share_of_created_subagents_that_finished() -> None:
    assert r_finish(0, 0) == 0.0
    assert r_finish(4, 4) == 1.0
    assert r_finish(8, 2) == 0.25  # spurious parallelism: most spawned agents never delivered
    with pytest.raises(ValueError, match="finished_ok"):
        r_finish(2, 3)


def test_r_perf_prefers_fewer_critical_steps_at_equal_quality_and_zeroes_over_budget() -> None:
    fast, slow = r_perf(0.8, 4, 20, 0.05), r_perf(0.8, 16, 20, 0.05)
    assert fast > slow
    assert fast == pytest.approx(0.8 - 0.05 * 4 / 20)
    # the latency term never outweighs a real quality gain
    assert r_perf(0.9, 20, 20, 0.05) > r_perf(0.8, 1, 20, 0.05)
    assert r_perf(1.0, 21, 20, 0.05) == 0.0
    with pytest.raises(ValueError, match="score"):
        r_perf(1.5, 1, 20, 0.05)


@pytest.mark.parametrize("anneal", ["linear", "cosine", "none"])
def test_lambda_schedules(anneal: str) -> None:
    c = cfg(lambda1=0.4, lambda2=0.2, anneal=anneal, anneal_steps=10)
    assert lambda_at(0, c) == pytest.approx((0.4, 0.2))
    mid = lambda_at(5, c)
    end = lambda_at(10, c)
    after = lambda_at(50, c)
    if anneal == "none":
        assert mid == end == after == pytest.approx((0.4, 0.2))
    else:
        assert mid == pytest.approx((0.2, 0.1))  # linear and cosine both pass half-way at half the steps
        assert end == after == pytest.approx((0.0, 0.0))
        seq = [lambda_at(s, c)[0] for s in range(11)]
        assert all(a >= b for a, b in itertools.pairwise(seq))  # monotone to zero
    if anneal == "cosine":
        assert lambda_at(2, c)[0] > 0.4 * (1 - 2 / 10)  # cosine keeps the bonus longer at first


def test_episode_reward_combines_terms_with_annealed_weights() -> None:
    c = cfg(lambda1=0.5, lambda2=0.25, anneal="linear", anneal_steps=4, parallel_target=3,
            critical_steps_budget=10, latency_beta=0.1)
    ep = EpisodeStats(score=0.6, critical_steps=5, created=4, finished_ok=2, depends_on=WIDE)
    t0 = episode_reward(ep, 0, c)
    assert (t0.r_parallel, t0.r_finish) == (1.0, 0.5)
    assert t0.r_perf == pytest.approx(0.6 - 0.1 * 0.5)
    assert t0.total == pytest.approx(0.5 * 1.0 + 0.25 * 0.5 + 0.55)
    t_end = episode_reward(ep, 4, c)
    assert t_end.total == pytest.approx(t_end.r_perf)  # annealed away: only the outcome is left


def test_group_advantages() -> None:
    adv = group_advantages([1.0, 0.0, 0.5, 0.5])
    assert sum(adv) == pytest.approx(0.0, abs=1e-9)
    assert adv[0] > adv[2] == adv[3] > adv[1]
    std = math.sqrt(sum(a * a for a in adv) / 4)
    assert std == pytest.approx(1.0, abs=1e-4)
    assert group_advantages([0.3, 0.3, 0.3]) == [0.0, 0.0, 0.0]  # all equal: nothing to learn
    with pytest.raises(ValueError, match="finite"):
        group_advantages([1.0, float("nan")])


def _episode(group: int, version: int) -> Episode:
    s = OrchestratorSample("plan", [1, 2], [3], [-0.5], version=version)
    return Episode(episode_id=f"e{group}-{version}", task_id="t", group=group, index=0, state="succeeded",
                   error=None, answer="", stats=EpisodeStats(0.0, 1), samples=[s], item_f1=0.0, subagents=0,
                   tool_calls=0, tool_time_s=0.0, completion_tokens=1, wall_s=0.1)


def test_stale_groups_respect_max_version_lag() -> None:
    eps = [_episode(0, 5), _episode(1, 4), _episode(2, 3)]
    assert stale_groups(eps, version=5, max_lag=0) == {1, 2}
    assert stale_groups(eps, version=5, max_lag=1) == {2}
    assert stale_groups(eps, version=5, max_lag=2) == set()


def test_config_errors_name_the_field(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("policy_checkpoint: ck\nout: runs/x\ngroup_size: 3\nanneal: cosine\n")
    c = load_config(good)
    assert c.group_size == 3 and c.subagent_checkpoint == "ck"  # frozen sub-agents default to the policy
    bad = tmp_path / "bad.yaml"
    bad.write_text("policy_checkpoint: ck\nout: runs/x\ngroup_size: 1\n")
    with pytest.raises(PARLConfigError, match="group_size"):
        load_config(bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("policy_checkpoint: ck\nout: runs/x\nlamda1: 0.3\n")
    with pytest.raises(PARLConfigError, match="lamda1"):
        load_config(typo)
    sched = tmp_path / "sched.yaml"
    sched.write_text("policy_checkpoint: ck\nout: runs/x\nanneal: exponential\n")
    with pytest.raises(PARLConfigError, match="anneal"):
        load_config(sched)
    with pytest.raises(PARLConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(PARLConfigError, match="policy_checkpoint"):
        load_config(good).check_paths()  # no checkpoint directory at 'ck'


def test_the_shipped_parl_configs_are_valid() -> None:
    """docs/PARL.md's commands start from these files: each must load as written."""
    files = sorted((Path(__file__).resolve().parent.parent / "examples").glob("parl_*.yaml"))
    assert len(files) >= 2
    for f in files:
        cfg = load_config(f)
        assert cfg.subagent_checkpoint and cfg.steps >= 1, f
    main = load_config(files[0].parent / "parl_widegeo.yaml")
    # the headline run: the built-in policy is both the trained orchestrator and the frozen sub-agents
    assert main.policy_checkpoint == main.subagent_checkpoint == "planner/builtin_policy"
    assert main.kl_coef > 0 and main.anneal_steps <= main.steps
