"""`swarm eval ENV`: the fixed eval set's tasks through the real runtime, as a swarm and/or as a
single agent, scored by the environment; a table per task plus means, and a JSONL of the results.

The spec builders here are shared with `swarm demo` (planner.demo): the swarm is a task job for the
K2.5 agent orchestrator or for the plan-writing orchestrator; the single agent is a one-node plan
with the same tools, so both run through the same runtime and are measured the same way.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import orjson
from rich.console import Console
from rich.table import Table

from planner.envs import get_env
from planner.envs.base import Task
from planner.prompts import aggregate_table_prompt
from swarm.config import Settings, load_settings
from swarm.plans import JobSpec, JobStatus, Limits, SubAgentSpec, SwarmPlan, ToolsConfig

Policy = Literal["swarm", "single"]
Orchestrator = Literal["agent", "plan"]
POLICIES: dict[str, tuple[Policy, ...]] = {"swarm": ("swarm",), "single": ("single",), "both": ("swarm", "single")}

SINGLE_AGENT_PROMPT = (
    "You are a careful research agent. Use the search tool as often as you need to find every "
    "requested fact; do not guess. Answer with a markdown table with exactly the requested columns."
)


def swarm_spec(task: Task, settings: Settings, corpus: str, tools: list[str], *,
               orchestrator: Orchestrator = "agent", label: str = "swarm", merge_tables: bool = True) -> JobSpec:
    """The task for the swarm. With the plan-writing orchestrator and `merge_tables`, a table task is
    always merged into one table by the aggregation call (aggregate_table_prompt: a general model's
    concatenated tables may disagree on headers); otherwise the answer is aggregated as the plan says
    (the built-in policy was trained to choose "concat" or "llm" itself)."""
    table = len(task.columns) > 1 and merge_tables
    return JobSpec(
        name=f"{label} {task.id}",
        task=task.prompt,
        orchestrator=orchestrator,
        plan_aggregate_prompt=aggregate_table_prompt(task.columns) if orchestrator == "plan" and table else "",
        subagent_tools=tools,
        tools=ToolsConfig(search_corpus=corpus),
        llm=settings.llm,
        metadata={"env": task.env, "task_id": task.id, "mode": "swarm", "orchestrator": orchestrator},
    )


def single_agent_spec(task: Task, settings: Settings, corpus: str, tools: list[str], *,
                      label: str = "single agent", system_prompt: str = SINGLE_AGENT_PROMPT) -> JobSpec:
    """The task as a one-node plan. `system_prompt`: the built-in policy's single agent gets the
    sub-agent prompt it was trained on (planner.builtin.select_model says which)."""
    agent = SubAgentSpec(id="single-agent", system_prompt=system_prompt, task=task.prompt, tools=tools)
    return JobSpec(
        name=f"{label} {task.id}",
        plan=SwarmPlan(subagents=[agent]),
        tools=ToolsConfig(search_corpus=corpus),
        llm=settings.llm,
        limits=Limits(),
        metadata={"env": task.env, "task_id": task.id, "mode": "single"},
    )


# --split train draws this many train tasks. An env's task list for a seed is prefix-stable (the first
# 200 of 400 are the 200), so its first tasks are those of any PARL task_pool with that seed.
TRAIN_POOL = 400  # examples/parl_widegeo.yaml's task_pool
TRAIN_SPLIT_N = 30  # --split train without --n: as many tasks as the held-out WideGeo set


def split_tasks(env: Any, split: str, seed: int = 0, eval_set: str = "v1") -> list[Task]:
    """The tasks to evaluate on: the fixed eval set `eval_set` ("test"), or the train-split pool that
    `swarm train` draws with data_seed `seed` ("train"; a diagnostic: how much reward signal PARL will
    see from this policy)."""
    if split == "test":
        return env.eval_set(eval_set)
    if split == "train":
        return env.tasks("train", TRAIN_POOL, seed)
    raise ValueError(f"--split must be 'test' or 'train', got {split!r}")


def select_tasks(tasks: Sequence[Task], n: int | None = None, max_rows: int | None = None,
                 task_ids: Sequence[str] | None = None) -> list[Task]:
    """Tasks with at most max_rows gold rows (all when None), then the first n of them; `task_ids`
    (when given) keeps only those tasks, in the eval set's order. An unknown id is an error naming it."""
    if task_ids:
        wanted = set(task_ids)
        unknown = sorted(wanted - {t.id for t in tasks})
        if unknown:
            raise ValueError(f"no task {', '.join(map(repr, unknown))} in the eval set (ids look like {tasks[0].id!r})")
        tasks = [t for t in tasks if t.id in wanted]
    if n is not None and n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"--max-rows must be >= 1, got {max_rows}")
    picked = [t for t in tasks if max_rows is None or len(t.gold) <= max_rows]
    if not picked:
        raise ValueError(f"no task of the eval set has at most {max_rows} rows")
    return picked[:n] if n is not None else picked


@dataclass
class EvalResult:
    """One task run by one policy: what the JSONL holds, one object per line."""

    env: str
    task_id: str
    policy: str
    orchestrator: str
    state: str
    item_f1: float
    row_f1: float
    success: bool
    critical_steps: int
    total_steps: int
    wall_s: float
    subagents: int
    tool_calls: int
    prompt_tokens: int
    completion_tokens: int
    rows: int
    error: str | None = None
    answer: str = ""


MEAN_FIELDS = ("item_f1", "row_f1", "critical_steps", "wall_s", "subagents", "tool_calls")


def means(results: Sequence[EvalResult], policy: str) -> dict[str, float]:
    mine = [r for r in results if r.policy == policy]
    if not mine:
        return {}
    return {f: sum(float(getattr(r, f)) for r in mine) / len(mine) for f in MEAN_FIELDS}


def results_table(title: str, results: Sequence[EvalResult]) -> Table:
    table = Table(title=title)
    for col in ("task", "policy", "state", "item-F1", "row-F1", "critical steps", "wall", "sub-agents", "tool calls"):
        table.add_column(col, justify="left" if col in ("task", "policy", "state") else "right")
    for r in results:
        table.add_row(r.task_id, r.policy, r.state, f"{r.item_f1:.3f}", f"{r.row_f1:.3f}", str(r.critical_steps),
                      f"{r.wall_s:.1f} s", str(r.subagents), str(r.tool_calls))
    for policy in dict.fromkeys(r.policy for r in results):
        m = means(results, policy)
        table.add_row("mean", policy, "", f"{m['item_f1']:.3f}", f"{m['row_f1']:.3f}", f"{m['critical_steps']:.1f}",
                      f"{m['wall_s']:.1f} s", f"{m['subagents']:.1f}", f"{m['tool_calls']:.1f}", style="bold")
    return table


def _result(env: Any, task: Task, policy: str, orchestrator: str, status: JobStatus, wall: float) -> EvalResult:
    answer = status.result or ""
    score = env.score(task, answer)
    m = status.metrics
    return EvalResult(env=task.env, task_id=task.id, policy=policy, orchestrator=orchestrator if policy == "swarm" else "",
                      state=status.state.value, item_f1=score.item_f1, row_f1=score.row_f1, success=score.success,
                      critical_steps=m.critical_steps, total_steps=m.total_steps, wall_s=wall, subagents=m.subagents,
                      tool_calls=m.tool_calls, prompt_tokens=m.prompt_tokens, completion_tokens=m.completion_tokens,
                      rows=len(task.gold), error=status.error, answer=answer)


def run_eval(
    env_name: str,
    *,
    settings: Settings | None = None,
    address: str | None = None,
    policy: str = "both",
    n: int | None = None,
    max_rows: int | None = None,
    orchestrator: str | None = None,
    out: str | Path | None = None,
    console: Console | None = None,
    checkpoint: str | Path | None = None,
    tp: int = 2,
    engine_options: dict[str, Any] | None = None,
    task_ids: Sequence[str] | None = None,
    split: str = "test",
    seed: int = 0,
    subagent_checkpoint: str | Path | None = None,
    eval_set: str = "v1",
) -> int:
    """Run the evaluation; returns the exit code (0 every job succeeded, 1 some failed, 2 no model).
    The model is chosen as for `swarm demo` (planner.builtin.select_model): `checkpoint` if given, else
    the configured endpoint, else the built-in policy, served with `tp` shards; `orchestrator` None
    means the model's default. Raises ValueError for bad arguments (unknown env, policy or
    orchestrator or task id; no task selected). `split="train"` evaluates on the train-split pool of
    `swarm train` (data seed `seed`), the first TRAIN_SPLIT_N tasks unless `n` says otherwise;
    `eval_set` names the fixed set of the test split (planner/eval_sets/<env>-<version>.json).
    `subagent_checkpoint`: the sub-agents (and the single agent) run on a second engine serving that
    checkpoint, the orchestrator on the selected model, as in `swarm train` (a PARL checkpoint judged
    with the frozen sub-agents it was trained with)."""
    from planner.builtin import NoModelError, running_model, select_model

    console = console or Console()
    if policy not in POLICIES:
        raise ValueError(f"--policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    if orchestrator is not None and orchestrator not in ("agent", "plan"):
        raise ValueError(f"--orchestrator must be 'agent' or 'plan', got {orchestrator!r}")
    if tp < 1:
        raise ValueError(f"--tp must be >= 1, got {tp}")
    env = get_env(env_name)
    try:
        pool = split_tasks(env, split, seed, eval_set)
    except FileNotFoundError as e:  # an eval set that does not exist: a bad argument, named
        raise ValueError(str(e)) from None
    if split == "train" and n is None and not task_ids:
        n = TRAIN_SPLIT_N
    tasks = select_tasks(pool, n, max_rows, task_ids)
    settings = settings or load_settings()
    try:
        selection = select_model(settings, checkpoint, orchestrator)
        sub_selection = select_model(settings, subagent_checkpoint) if subagent_checkpoint is not None else None
    except NoModelError as e:
        console.print(str(e), highlight=False)
        return 2
    orchestrator = selection.orchestrator
    single_prompt = {"system_prompt": selection.single_agent_prompt} if selection.single_agent_prompt else {}
    out_path = Path(out) if out else Path(f"eval-{env_name}-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with console.status("building the search corpus (first run only) ..."):
        corpus = str(env.corpus_path())

    from swarm.runtime import SwarmRuntime

    results: list[EvalResult] = []
    console.print(f"model: {selection.describe(tp if selection.builtin else None)}", highlight=False)
    if sub_selection is not None:
        console.print(f"sub-agents: {sub_selection.describe(tp)}", highlight=False)
    # Stopped in reverse order on the way out: the engine this run started (if any), then Ray.
    with ExitStack() as stack:
        runtime = SwarmRuntime(address=address or settings.ray_address, num_workers=settings.num_workers)
        stack.callback(runtime.shutdown)
        with console.status("starting the model ..."):
            llm = stack.enter_context(running_model(selection, tp=tp, placement=settings.placement,
                                                    **(engine_options or {})))
            sub_llm = (stack.enter_context(running_model(sub_selection, tp=tp, placement=settings.placement,
                                                         **(engine_options or {})))
                       if sub_selection is not None else None)
        settings = settings.model_copy(update={"llm": llm})
        with out_path.open("wb") as f:
            for task in tasks:
                for pol in POLICIES[policy]:
                    spec = (swarm_spec(task, settings, corpus, env.tools, orchestrator=orchestrator, label="eval swarm",
                                       merge_tables=not selection.builtin)
                            if pol == "swarm" else single_agent_spec(task, settings, corpus, env.tools, label="eval single",
                                                                     **single_prompt))
                    spec = spec.model_copy(update={"subagent_llm": sub_llm})
                    t0 = time.perf_counter()
                    with console.status(f"{task.id}: {pol} ..."):
                        status = asyncio.run(runtime.run_job(spec))
                    r = _result(env, task, pol, orchestrator, status, time.perf_counter() - t0)
                    results.append(r)
                    f.write(orjson.dumps(asdict(r)) + b"\n")
                    f.flush()  # a long run keeps what it has if stopped
                    line = (f"{task.id} {pol}: {r.state} item-F1 {r.item_f1:.3f} row-F1 {r.row_f1:.3f} "
                            f"critical steps {r.critical_steps} wall {r.wall_s:.1f} s")
                    console.print(line + (f" error: {r.error}" if r.error else ""), highlight=False)
    where = f" of eval set {eval_set}" if split == "test" else f" of the train split (seed {seed})"
    title = f"{env_name}: {len(tasks)} task(s){where}, swarm orchestrator {orchestrator!r}"
    console.print(results_table(title, results))
    console.print(f"results: {out_path}", highlight=False)
    return 0 if all(r.state == "succeeded" for r in results) else 1
