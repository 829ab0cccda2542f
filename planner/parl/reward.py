"""PARL reward closed forms (docs/PARL.md explains and justifies each):

    r = λ1·r_parallel + λ2·r_finish + r_perf

    r_parallel = min((W - 1) / (k - 1), 1)      W: widest level of the sub-agent DAG, k: parallel_target
    r_finish   = finished_ok / created          (0 when no sub-agent was created)
    r_perf     = score - β·min(C / B, 1)        C: critical steps, B: budget; 0 when C > B

λ1, λ2 anneal from their initial values to 0 over `anneal_steps` (linear, cosine or none).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from planner.parl.config import PARLConfig


@dataclass
class EpisodeStats:
    """What the reward needs to know about one finished swarm episode."""

    score: float  # the environment's score of the answer (item-F1 / exact match), in [0, 1]
    critical_steps: int
    created: int = 0  # sub-agents the orchestrator instantiated
    finished_ok: int = 0  # of those, finished with a non-empty result
    depends_on: Mapping[str, Sequence[str]] = field(default_factory=dict)  # sub-agent id -> dependencies


@dataclass
class RewardTerms:
    r_parallel: float
    r_finish: float
    r_perf: float
    lambda1: float
    lambda2: float

    @property
    def total(self) -> float:
        return self.lambda1 * self.r_parallel + self.lambda2 * self.r_finish + self.r_perf


def parallel_width(depends_on: Mapping[str, Sequence[str]]) -> int:
    """Largest number of sub-agents at one DAG level (level = 1 + deepest dependency's level): how many
    can run at the same time. A chain of n agents has width 1; n independent agents have width n."""
    level: dict[str, int] = {}

    def lvl(a: str, seen: frozenset[str] = frozenset()) -> int:
        if a in level:
            return level[a]
        if a in seen:
            raise ValueError(f"dependency cycle through sub-agent {a!r}")
        deps = [d for d in depends_on.get(a, ()) if d in depends_on]
        level[a] = 1 + max((lvl(d, seen | {a}) for d in deps), default=0)
        return level[a]

    counts: dict[int, int] = {}
    for a in depends_on:
        counts[lvl(a)] = counts.get(lvl(a), 0) + 1
    return max(counts.values(), default=0)


def r_parallel(depends_on: Mapping[str, Sequence[str]], target: int) -> float:
    """0 for no or one sub-agent at a time (serial collapse), rising linearly, 1 from `target` on."""
    if target < 2:
        raise ValueError(f"parallel_target must be >= 2, got {target}")
    width = parallel_width(depends_on)
    return min(max(width - 1, 0) / (target - 1), 1.0)


def r_finish(created: int, finished_ok: int) -> float:
    """Share of created sub-agents that finished their subtask with a result; 0 when none was created
    (so spawning nothing earns nothing here either)."""
    if created < 0 or finished_ok < 0 or finished_ok > created:
        raise ValueError(f"need 0 <= finished_ok <= created, got finished_ok={finished_ok}, created={created}")
    return finished_ok / created if created else 0.0


def r_perf(score: float, critical_steps: int, budget: int, beta: float) -> float:
    """The task score minus a small latency term; an answer over the critical-steps budget counts as none."""
    if budget < 1:
        raise ValueError(f"critical_steps_budget must be >= 1, got {budget}")
    if not 0.0 <= score <= 1.0:
        raise ValueError(f"score must be in [0, 1], got {score}")
    if critical_steps > budget:
        return 0.0
    return score - beta * min(critical_steps / budget, 1.0)


def lambda_at(step: int, cfg: PARLConfig) -> tuple[float, float]:
    """(λ1, λ2) at optimizer step `step` (0-based): initial values times the annealing factor."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    p = min(step / cfg.anneal_steps, 1.0)
    if cfg.anneal == "none":
        f = 1.0
    elif cfg.anneal == "linear":
        f = 1.0 - p
    else:  # cosine
        f = 0.5 * (1.0 + math.cos(math.pi * p))
    return cfg.lambda1 * f, cfg.lambda2 * f


def episode_reward(ep: EpisodeStats, step: int, cfg: PARLConfig) -> RewardTerms:
    l1, l2 = lambda_at(step, cfg)
    return RewardTerms(
        r_parallel=r_parallel(ep.depends_on, cfg.parallel_target),
        r_finish=r_finish(ep.created, ep.finished_ok),
        r_perf=r_perf(ep.score, ep.critical_steps, cfg.critical_steps_budget, cfg.latency_beta),
        lambda1=l1,
        lambda2=l2,
    )
