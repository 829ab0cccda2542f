"""`swarm eval` end to end: the CLI, the real Ray runtime, the real search corpus and scoring, with
the model played by the OpenAITestServer test double answering with the gold tables."""

from __future__ import annotations


import orjson
import pytest
from typer.testing import CliRunner

from planner.envs import get_env
from planner.evaluate import select_tasks
from planner.plan_schema import CompactAgent, CompactPlan, compact_plan_json
from swarm.cli import app
from tests.openai_test_server import OpenAITestServer, completion

runner = CliRunner()


def gold_table(task) -> str:
    lines = ["| " + " | ".join(task.columns) + " |", "|" + "---|" * len(task.columns)]
    lines += ["| " + " | ".join(str(row[c]) for c in task.columns) + " |" for row in task.gold]
    return "\n".join(lines)


@pytest.fixture
def endpoint(monkeypatch):
    with OpenAITestServer() as server:
        monkeypatch.delenv("SWARM_CONFIG", raising=False)
        monkeypatch.setenv("SWARM_LLM_BASE_URL", server.url)
        monkeypatch.setenv("SWARM_LLM_MODEL", "test-model")
        monkeypatch.setenv("SWARM_LLM_API_KEY", "k")
        monkeypatch.setenv("COLUMNS", "200")
        yield server


def read_jsonl(path) -> list[dict]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def test_eval_runs_swarm_and_single_agent_and_writes_jsonl(ray_local, endpoint, tmp_path) -> None:
    tasks = select_tasks(get_env("widegeo").eval_set(), n=2, max_rows=3)
    for t in tasks:  # per task: the orchestrator answers at once, then the single agent does
        endpoint.enqueue(completion(gold_table(t)), completion(gold_table(t)))
    out = tmp_path / "res.jsonl"
    r = runner.invoke(app, ["eval", "widegeo", "--n", "2", "--max-rows", "3", "--out", str(out)])
    assert r.exit_code == 0, r.output
    rows = read_jsonl(out)
    assert [(x["task_id"], x["policy"]) for x in rows] == [(t.id, p) for t in tasks for p in ("swarm", "single")]
    assert all(x["state"] == "succeeded" and x["item_f1"] == 1.0 and x["row_f1"] == 1.0 for x in rows)
    assert all(x["critical_steps"] == 1 and x["wall_s"] > 0 for x in rows)
    assert [x["subagents"] for x in rows] == [0, 1, 0, 1]
    # Per-task lines and the means row, with F1 1.000 printed.
    assert "mean" in r.output and r.output.count("1.000") >= 8, r.output
    assert str(out) in r.output.replace("\n", "")


def test_eval_with_the_plan_writing_orchestrator(ray_local, endpoint, tmp_path) -> None:
    task = select_tasks(get_env("widegeo").eval_set(), n=1, max_rows=3)[0]
    plan = compact_plan_json(CompactPlan(agents=[CompactAgent(name="lookup", task="Fill the whole table.")]))
    endpoint.enqueue(completion(plan), completion(gold_table(task)), completion(gold_table(task)))
    out = tmp_path / "plan.jsonl"
    r = runner.invoke(app, ["eval", "widegeo", "--n", "1", "--max-rows", "3", "--policy", "swarm",
                            "--orchestrator", "plan", "--out", str(out)])
    assert r.exit_code == 0, r.output
    (row,) = read_jsonl(out)
    assert (row["policy"], row["orchestrator"], row["item_f1"]) == ("swarm", "plan", 1.0)
    # planner call + aggregation call + the one agent's step
    assert (row["critical_steps"], row["subagents"]) == (3, 1)
    first, _, agg = endpoint.requests
    assert first["response_format"]["json_schema"]["name"] == "swarm_plan"
    # a table task is merged by the aggregation call with the table's columns
    assert agg["messages"][-1]["content"].startswith("Merge the sub-agents' tables into one markdown table with "
                                                     "exactly these columns: " + ", ".join(task.columns))


def test_eval_bad_arguments_and_missing_endpoint(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("SWARM_CONFIG", raising=False)
    for var in ("SWARM_LLM_BASE_URL", "SWARM_LLM_MODEL", "OPENAI_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    import planner.builtin  # no endpoint and no built-in policy either: nothing to run on

    monkeypatch.setattr(planner.builtin, "BUILTIN_POLICY_DIR", tmp_path / "builtin_policy")
    r = runner.invoke(app, ["eval", "widegeo", "--policy", "crowd"])
    assert r.exit_code == 2 and "--policy must be one of swarm, single, both" in r.output
    r = runner.invoke(app, ["eval", "nowhere"])
    assert r.exit_code == 2 and "unknown environment 'nowhere'" in r.output
    r = runner.invoke(app, ["eval", "widegeo", "--max-rows", "1"])
    assert r.exit_code == 2 and "no task of the eval set has at most 1 rows" in r.output
    r = runner.invoke(app, ["eval", "deepgeo", "--n", "1", "--out", str(tmp_path / "x.jsonl")])
    assert r.exit_code == 2 and "SWARM_LLM_BASE_URL" in r.output and "python -m planner.sft" in r.output
    assert not (tmp_path / "x.jsonl").exists()


def test_select_tasks_by_id_keeps_the_eval_sets_order_and_names_unknown_ids() -> None:
    tasks = get_env("widegeo").eval_set()
    picked = select_tasks(tasks, task_ids=[tasks[5].id, tasks[2].id])
    assert [t.id for t in picked] == [tasks[2].id, tasks[5].id]
    assert select_tasks(tasks, max_rows=1000, task_ids=[tasks[5].id], n=1) == [tasks[5]]
    with pytest.raises(ValueError, match="no task 'widegeo-test-nope'"):
        select_tasks(tasks, task_ids=["widegeo-test-nope"])
    # An id filtered out by --max-rows leaves nothing: the usual "no task" error, not a silent empty run.
    big = max(tasks, key=lambda t: len(t.gold))
    with pytest.raises(ValueError, match="at most 1 rows"):
        select_tasks(tasks, max_rows=1, task_ids=[big.id])


def test_eval_on_the_train_split_runs_the_pool_parl_samples(ray_local, endpoint, tmp_path) -> None:
    from planner.parl.config import PARLConfig
    from planner.parl.loop import task_pool

    # The tasks `swarm train` would sample with this data seed, in its order, filtered the same way.
    pool = task_pool(PARLConfig(policy_checkpoint="x", out=str(tmp_path / "run"), task_pool=400, data_seed=3,
                                max_rows=3))
    held_out = {t.id for t in get_env("widegeo").eval_set()}
    for t in pool[:2]:
        endpoint.enqueue(completion(gold_table(t)))
    out = tmp_path / "train.jsonl"
    r = runner.invoke(app, ["eval", "widegeo", "--split", "train", "--seed", "3", "--n", "2", "--max-rows", "3",
                            "--policy", "swarm", "--orchestrator", "agent", "--out", str(out)])
    assert r.exit_code == 0, r.output
    rows = read_jsonl(out)
    assert [x["task_id"] for x in rows] == [t.id for t in pool[:2]]
    assert all("-train-" in x["task_id"] and x["task_id"] not in held_out for x in rows)
    assert all(x["item_f1"] == 1.0 for x in rows)
    assert "of the train split (seed 3)" in r.output
    r = runner.invoke(app, ["eval", "widegeo", "--split", "dev"])
    assert r.exit_code == 2 and "--split must be 'test' or 'train', got 'dev'" in r.output


def test_eval_on_the_second_held_out_set(ray_local, endpoint, tmp_path) -> None:
    # v2 is another draw of held-out tasks (seed 7,000,003): its ids are not v1's.
    env = get_env("widegeo")
    v1 = {t.id for t in env.eval_set("v1")}
    task = select_tasks(env.eval_set("v2"), n=1, max_rows=3)[0]
    assert "-s7000003-" in task.id and task.id not in v1
    endpoint.enqueue(completion(gold_table(task)))
    out = tmp_path / "v2.jsonl"
    r = runner.invoke(app, ["eval", "widegeo", "--eval-set", "v2", "--n", "1", "--max-rows", "3",
                            "--policy", "swarm", "--orchestrator", "agent", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert [x["task_id"] for x in read_jsonl(out)] == [task.id]
    assert "of eval set v2" in r.output
    r = runner.invoke(app, ["eval", "widegeo", "--eval-set", "v9"])
    assert r.exit_code == 2 and "no eval set 'v9'" in r.output and "widegeo-v2" in r.output
