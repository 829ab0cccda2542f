"""GRPO group-relative advantages: each rollout's reward against the other rollouts of its task."""

from __future__ import annotations

import math
from collections.abc import Sequence


def group_advantages(rewards: Sequence[float], eps: float = 1e-6) -> list[float]:
    """(r - mean) / (std + eps) within one group (population std). An all-equal group gives zeros:
    nothing to learn from it, and no division blow-up."""
    if len(rewards) < 1:
        raise ValueError("a group needs at least one reward")
    bad = [r for r in rewards if not math.isfinite(r)]
    if bad:
        raise ValueError(f"rewards must be finite, got {bad}")
    n = len(rewards)
    mean = sum(rewards) / n
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / n)
    if std < 1e-12:
        return [0.0] * n
    return [(r - mean) / (std + eps) for r in rewards]
