"""The shipped built-in policy through the real stack: `swarm eval` on one small held-out WideGeo task,
the policy served by this project's engine as two tensor-parallel shard actors on Ray, the plan-writing
orchestrator, sub-agents calling the real `search` tool over the GeoNames corpus, and the answer scored
by the environment. Greedy decoding, so the figure is repeatable; the bound leaves room for the last
bits of TP=2 arithmetic (this task scored 1.0 when the checkpoint was shipped, see docs/policy.md)."""

from __future__ import annotations

import io

import orjson
from rich.console import Console

from planner.builtin import BUILTIN_POLICY_DIR, checkpoint_problems
from planner.evaluate import run_eval
from swarm.config import Settings
from swarm.plans import LLMConfig

TASK_ID = "widegeo-test-s7000001-0014"  # the neighbours of Mozambique, with their capitals (6 rows)
MIN_ITEM_F1 = 0.6


def test_builtin_policy_solves_a_small_held_out_task(ray_local, tmp_path) -> None:
    assert checkpoint_problems(BUILTIN_POLICY_DIR) == []  # shipped in the repo, servable as is
    out_path = tmp_path / "eval.jsonl"
    out = io.StringIO()
    settings = Settings(db_path=str(tmp_path / "jobs.sqlite"), port=0, llm=LLMConfig(base_url=None, model=None))
    code = run_eval("widegeo", settings=settings, policy="swarm", task_ids=[TASK_ID], out=out_path,
                    console=Console(file=out, width=200), tp=2)
    assert code == 0, out.getvalue()
    [row] = [orjson.loads(line) for line in out_path.read_bytes().splitlines()]
    assert row["task_id"] == TASK_ID and row["state"] == "succeeded", row
    # A valid plan of sub-agents ran (a lister, then the filler's fan-out: one copy per 3 of its six
    # countries) and they searched.
    assert row["subagents"] >= 3 and row["tool_calls"] >= 4, row
    assert row["item_f1"] >= MIN_ITEM_F1, row["answer"]
