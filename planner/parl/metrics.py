"""Per-step training metrics: metrics.jsonl (dashboards.metrics format, read by the dashboard) and,
optionally, TensorBoard when `torch.utils.tensorboard` can be imported; and episodes.jsonl, one
record per rollout (what the orchestrator wrote, the answer, its score and reward terms), so a
researcher can read what the policy actually did at any step."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from dashboards.metrics import METRICS_FILE, append_metrics
from planner.parl.reward import RewardTerms
from planner.parl.rollout import Episode


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def rollout_metrics(episodes: Sequence[Episode], terms: Sequence[RewardTerms], tasks: int) -> dict[str, float | None]:
    """Means over the step's episodes of each reward term and of what the swarm did."""
    tokens = sum(len(s.completion_ids) for e in episodes for s in e.samples)
    wall = sum(e.wall_s for e in episodes)
    return {
        "reward": _mean([t.total for t in terms]),
        "r_parallel": _mean([t.r_parallel for t in terms]),
        "r_finish": _mean([t.r_finish for t in terms]),
        "r_perf": _mean([t.r_perf for t in terms]),
        "lambda1": terms[0].lambda1 if terms else None,
        "lambda2": terms[0].lambda2 if terms else None,
        "critical_steps": _mean([float(e.stats.critical_steps) for e in episodes]),
        "item_f1": _mean([e.item_f1 for e in episodes]),
        "subagents_per_task": _mean([float(e.subagents) for e in episodes]),
        "tool_calls_per_task": _mean([float(e.tool_calls) for e in episodes]),
        "job_success_rate": _mean([1.0 if e.state == "succeeded" else 0.0 for e in episodes]),
        "episode_retries": float(sum(e.attempts - 1 for e in episodes)),
        "episodes": float(len(episodes)),
        "tasks": float(tasks),
        "orchestrator_tokens": float(tokens),
        "share_tools_in_rollout": (sum(e.tool_time_s for e in episodes) / wall) if wall > 0 else None,
        "episode_wall_s": _mean([e.wall_s for e in episodes]),
    }


EPISODES_FILE = "episodes.jsonl"
ANSWER_CHARS = 4000  # an answer longer than this is cut in the log (the score used all of it)


def episode_record(step: int, e: Episode, t: RewardTerms,
                   decode: Callable[[list[int]], str] | None = None) -> dict[str, Any]:
    """One rollout as a JSON-able record. `decode(ids) -> str` adds the orchestrator's own text."""
    rec: dict[str, Any] = {
        "step": step, "task_id": e.task_id, "group": e.group, "index": e.index, "episode_id": e.episode_id,
        "state": e.state, "error": e.error, "item_f1": e.item_f1, "reward": t.total,
        "r_parallel": t.r_parallel, "r_finish": t.r_finish, "r_perf": t.r_perf,
        "critical_steps": e.stats.critical_steps, "subagents": e.subagents, "finished_ok": e.stats.finished_ok,
        "tool_calls": e.tool_calls, "wall_s": round(e.wall_s, 3), "attempts": e.attempts,
        "advantage": e.samples[0].advantage if e.samples else None,
        "answer": e.answer[:ANSWER_CHARS],
    }
    if decode is not None:
        rec["orchestrator"] = [{"role": s.role, "version": s.version, "text": decode(s.completion_ids)}
                               for s in e.samples]
    return rec


def append_episodes(out: str | Path, records: Sequence[Mapping[str, Any]]) -> None:
    with open(Path(out) / EPISODES_FILE, "a", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)  # ASCII: no raw U+2028 to split a line


class MetricsWriter:
    """Appends one record per step to <out>/metrics.jsonl (and TensorBoard when asked and available)."""

    def __init__(self, out: str | Path, tensorboard: bool = False, log: Any = print) -> None:
        self.path = Path(out) / METRICS_FILE
        self.tb: Any = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(out) / "tensorboard"))
            except ImportError as e:
                log(f"tensorboard: disabled ({e}); metrics still go to {self.path}. "
                    "Install the `tensorboard` package to enable it.")

    def write(self, step: int, values: Mapping[str, float | int | None]) -> None:
        clean = {k: (None if v is None or (isinstance(v, float) and not math.isfinite(v)) else v)
                 for k, v in values.items()}
        append_metrics(self.path, step, clean)
        if self.tb is not None:
            for k, v in clean.items():
                if v is not None:
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
