"""The main job (`swarm demo`): one held-out WideGeo task run as a swarm and by a single agent.

Both runs go through the real stack: local Ray (or `--address`), the job runtime, the sub-agent
loop and the `search` tool over the GeoNames corpus. The model is the OpenAI-compatible endpoint
from settings/env (SWARM_LLM_BASE_URL, SWARM_LLM_MODEL, SWARM_LLM_API_KEY) until the built-in
policy ships; without one, the demo says exactly what to set and exits with code 2.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from rich.console import Console
from rich.live import Live
from rich.table import Table

from planner.envs import get_env
from planner.envs.base import Score, Task
from planner.evaluate import NO_MODEL_HELP, model_configured, single_agent_spec, swarm_spec  # shared with `swarm eval`
from swarm.config import Settings, load_settings
from swarm.plans import JobSpec, JobStatus, new_job_id
from swarm.progress import JobProgress


@dataclass
class DemoRun:
    label: str
    status: JobStatus
    score: Score
    wall_s: float


def pick_task(tasks: list[Task], index: int | None, max_rows: int) -> Task:
    if index is not None:
        if not 0 <= index < len(tasks):
            raise ValueError(f"--task-index must be between 0 and {len(tasks) - 1}, got {index}")
        return tasks[index]
    small = [t for t in tasks if len(t.gold) <= max_rows]
    if not small:
        raise ValueError(f"no held-out task has at most {max_rows} rows")
    return max(small, key=lambda t: len(t.gold))


def _run(runtime, spec: JobSpec, console: Console) -> tuple[JobStatus, float]:
    job_id = new_job_id()
    prog = JobProgress(job_id=job_id, name=spec.name, max_tool_calls=spec.limits.max_tool_calls)
    t0 = time.perf_counter()
    with Live(prog, console=console, refresh_per_second=4, transient=True, auto_refresh=console.is_terminal):
        status = asyncio.run(runtime.run_job(spec, on_event=prog.update, job_id=job_id))
    return status, time.perf_counter() - t0


def results_table(task: Task, runs: list[DemoRun]) -> Table:
    table = Table(title=f"{task.id}: {len(task.gold)} rows x {len(task.columns)} columns")
    for col in ("run", "state", "item-F1", "row-F1", "critical steps", "total steps", "sub-agents", "tool calls", "wall"):
        table.add_column(col, justify="left" if col in ("run", "state") else "right")
    for r in runs:
        m = r.status.metrics
        table.add_row(
            r.label,
            r.status.state.value,
            f"{r.score.item_f1:.3f}",
            f"{r.score.row_f1:.3f}",
            str(m.critical_steps),
            str(m.total_steps),
            str(m.subagents),
            str(m.tool_calls),
            f"{r.wall_s:.1f} s",
        )
    return table


def run_demo(
    *,
    settings: Settings | None = None,
    address: str | None = None,
    task_index: int | None = None,
    max_rows: int = 12,
    single_agent: bool = True,
    console: Console | None = None,
) -> int:
    """Run the demo; returns the process exit code (0 ok, 1 a job failed, 2 not configured)."""
    console = console or Console()
    settings = settings or load_settings()
    if not model_configured(settings):
        console.print(NO_MODEL_HELP, highlight=False)
        return 2
    env = get_env("widegeo")
    task = pick_task(env.eval_set(), task_index, max_rows)
    console.print(f"[bold]Task[/] ({task.id}, held-out split):\n{task.prompt}\n", highlight=False)
    with console.status("building the GeoNames search corpus (first run only) ..."):
        corpus = str(env.corpus_path())

    from swarm.runtime import SwarmRuntime

    runtime = SwarmRuntime(address=address or settings.ray_address, num_workers=settings.num_workers)
    runs: list[DemoRun] = []
    try:
        plans = [("swarm", swarm_spec(task, settings, corpus, env.tools, label="demo swarm"))]
        if single_agent:
            plans.append(("single agent", single_agent_spec(task, settings, corpus, env.tools, label="demo single agent")))
        for label, spec in plans:
            console.rule(f"{label}")
            status, wall = _run(runtime, spec, console)
            answer = status.result or ""
            score = env.score(task, answer)
            runs.append(DemoRun(label, status, score, wall))
            if status.error:
                console.print(f"[red]error:[/] {status.error}", highlight=False)
            console.print(answer or "(no answer)", highlight=False)
    finally:
        runtime.shutdown()
    console.print(results_table(task, runs))
    console.print(
        "Watch jobs live: start the service with `swarm serve`, submit with `swarm submit --follow`, "
        "and open http://127.0.0.1:8321/dashboard",
        highlight=False,
    )
    return 0 if all(r.status.state.value == "succeeded" for r in runs) else 1
