"""The main job (`swarm demo`): one held-out WideGeo task run as a swarm and by a single agent.

Everything is the real stack, started here and shut down at the end: local Ray (or `--address`),
the model (planner.builtin.select_model: the SWARM_LLM_* endpoint when one is configured, else the
built-in policy served by this project's engine with TP shards), and the job service (REST API and
dashboard on 127.0.0.1) running in a background thread. Both jobs are submitted to that service, so
they are stored in its SQLite store and can be watched live on the dashboard while the terminal
shows their progress; then the answers, the scores and where to look are printed.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from planner import builtin
from planner.builtin import NoModelError, running_model, select_model
from planner.envs import get_env
from planner.envs.base import Score, Task
from planner.evaluate import single_agent_spec, swarm_spec  # shared with `swarm eval`
from swarm.config import Settings, load_settings
from swarm.plans import JobSpec, JobState, JobStatus
from swarm.progress import JobProgress

EXIT_OK, EXIT_FAILED, EXIT_NO_MODEL, EXIT_INTERRUPTED = 0, 1, 2, 130


@dataclass
class DemoRun:
    """One finished run of the demo task (swarm or single agent) and its score."""

    label: str
    status: JobStatus
    score: Score
    wall_s: float
    job_id: str = ""


def pick_task(tasks: list[Task], index: int | None, max_rows: int) -> Task:
    if index is not None:
        if not 0 <= index < len(tasks):
            raise ValueError(f"--task-index must be between 0 and {len(tasks) - 1}, got {index}")
        return tasks[index]
    small = [t for t in tasks if len(t.gold) <= max_rows]
    if not small:
        raise ValueError(f"no held-out task has at most {max_rows} rows")
    return max(small, key=lambda t: len(t.gold))


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


def _listen_socket(host: str, port: int) -> socket.socket:
    """A bound socket on host:port, or on a free port when that one is taken (or port is 0)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.bind((host, 0))
    return sock


class ServiceThread:
    """The job service (swarm.api.create_app: REST API, SSE events, dashboard) served by uvicorn on
    127.0.0.1 in a background thread, on `runtime`, storing jobs in settings.db_path."""

    def __init__(self, settings: Settings, runtime: Any, host: str = "127.0.0.1") -> None:
        import uvicorn

        from swarm.api import create_app

        self.sock = _listen_socket(host, settings.port)
        self.port: int = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        config = uvicorn.Config(create_app(settings, runtime=runtime), log_level="warning", lifespan="on",
                                access_log=False, timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="swarm-demo-service", daemon=True)

    @property
    def dashboard_url(self) -> str:
        return f"{self.url}/dashboard"

    def start(self, timeout_s: float = 120.0) -> None:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError(f"the job service did not start on {self.url} (see the log above)")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the job service did not start on {self.url} within {timeout_s:.0f} s")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(30)
        self.sock.close()

    def __enter__(self) -> ServiceThread:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def follow_job(client: Any, spec: JobSpec, console: Console, on_submitted: Callable[[str], None] | None = None
               ) -> tuple[str, JobStatus, float]:
    """Submit `spec` to the service and show its live progress from the service's event stream until
    it ends; returns (job id, final status, wall seconds). Ctrl-C cancels the job and re-raises."""
    t0 = time.perf_counter()
    job_id = client.submit(spec)
    if on_submitted is not None:
        on_submitted(job_id)
    prog = JobProgress(job_id=job_id, name=spec.name, max_tool_calls=spec.limits.max_tool_calls)
    try:
        with Live(prog, console=console, refresh_per_second=4, transient=True, auto_refresh=console.is_terminal):
            for ev in client.events(job_id, follow=True):
                prog.update(ev)
        status = client.status(job_id)
        if not status.state.terminal:  # the stream ended early (service restarting): wait for the end
            status = client.wait(job_id)
    except KeyboardInterrupt:
        console.print(f"interrupted: cancelling job {job_id} ...", highlight=False)
        try:
            client.cancel(job_id)
        except Exception as e:  # it may have just ended
            console.print(f"cancel: {type(e).__name__}: {e}", highlight=False)
        raise
    return job_id, status, time.perf_counter() - t0


def run_demo(
    *,
    settings: Settings | None = None,
    address: str | None = None,
    task_index: int | None = None,
    max_rows: int = 12,
    single_agent: bool = True,
    console: Console | None = None,
    checkpoint: str | Path | None = None,
    tp: int = 2,
    orchestrator: str | None = None,
    keep_serving: bool = False,
    engine_options: dict[str, Any] | None = None,
    on_service_started: Callable[[str], None] | None = None,
    on_run: Callable[[DemoRun], None] | None = None,
) -> int:
    """Run the demo; returns the process exit code (0 ok, 1 a job failed, 2 no model, 130 Ctrl-C).

    checkpoint: a policy checkpoint to serve instead of the configured endpoint / the built-in policy;
    tp: its tensor-parallel shards; orchestrator: "plan" or "agent" (default: the model's own);
    engine_options: more planner.builtin.start_engine options (num_slots, max_len, max_tokens, ...);
    on_service_started: called with the service URL once it answers, before any job is submitted;
    on_run: called with each finished run (job id, final status, score, wall time).
    Raises ValueError for bad arguments (task index, orchestrator, tp)."""
    console = console or Console()
    settings = settings or load_settings()
    if tp < 1:
        raise ValueError(f"--tp must be >= 1, got {tp}")
    try:
        selection = select_model(settings, checkpoint, orchestrator)
    except NoModelError as e:
        console.print(str(e), highlight=False)
        return EXIT_NO_MODEL
    env = get_env("widegeo")
    task = pick_task(env.eval_set(), task_index, max_rows)
    console.print(f"[bold]Task[/] ({task.id}, held-out split):\n{task.prompt}\n", highlight=False)
    console.print(f"[bold]Model[/]: {selection.describe(tp if selection.builtin else None)}; "
                  f"swarm orchestrator: {selection.orchestrator}", highlight=False)
    with console.status("building the GeoNames search corpus (first run only) ..."):
        corpus = str(env.corpus_path())

    from swarm.client import Swarm
    from swarm.runtime import SwarmRuntime

    runs: list[DemoRun] = []
    job_ids: list[str] = []
    specs: list[tuple[str, JobSpec]] = []
    try:
        # Everything started here stops in reverse order on the way out: client, service, engine, Ray.
        with ExitStack() as stack:
            with console.status("starting Ray ..."):
                runtime = SwarmRuntime(address=address or settings.ray_address, num_workers=settings.num_workers,
                                       placement=settings.placement)
            stack.callback(runtime.shutdown)
            try:
                with console.status(f"starting the model ({selection.describe(tp if selection.builtin else None)}) ..."):
                    llm = stack.enter_context(running_model(selection, tp=tp, placement=settings.placement,
                                                            **(engine_options or {})))
                job_settings = settings.model_copy(update={"llm": llm})
                service = stack.enter_context(ServiceThread(job_settings, runtime))
            except Exception as e:  # the engine could not be placed, the port or the store is unusable ...
                console.print(f"[red]error:[/] could not start the demo: {type(e).__name__}: {e}", highlight=False)
                return EXIT_FAILED
            console.print(f"[bold]Dashboard[/] (watch the jobs live): {service.dashboard_url}"
                          + ("  (paste the API token at the top right)" if settings.api_token else ""),
                          highlight=False)
            if on_service_started is not None:
                on_service_started(service.url)
            client = stack.enter_context(Swarm(service.url, token=settings.api_token, timeout=60.0))

            def announce(job_id: str) -> None:
                job_ids.append(job_id)
                console.print(f"job {job_id}: {service.dashboard_url}#/jobs/{job_id}", highlight=False)

            specs.append(("swarm", swarm_spec(task, job_settings, corpus, env.tools, label="demo swarm",
                                              orchestrator=selection.orchestrator, merge_tables=not selection.builtin)))
            if single_agent:
                prompt = {"system_prompt": selection.single_agent_prompt} if selection.single_agent_prompt else {}
                specs.append(("single agent", single_agent_spec(task, job_settings, corpus, env.tools,
                                                                label="demo single agent", **prompt)))
            for label, spec in specs:
                console.rule(label)
                job_id, status, wall = follow_job(client, spec, console, announce)
                answer = status.result or ""
                runs.append(DemoRun(label, status, env.score(task, answer), wall, job_id))
                if on_run is not None:
                    on_run(runs[-1])
                if status.error:
                    console.print(f"[red]error:[/] {status.error}", highlight=False)
                console.print(answer or "(no answer)", highlight=False)
            console.print(results_table(task, runs))
            if selection.checkpoint is not None and selection.checkpoint == builtin.BUILTIN_POLICY_DIR.resolve():
                console.print(SERIAL_START_NOTE, highlight=False)
            _where_to_look(console, service.url, list(zip([label for label, _ in specs], job_ids)), settings,
                           keep_serving)
            if keep_serving:
                console.print("Serving the API and the dashboard until Ctrl-C ...", highlight=False)
                while service.thread.is_alive():
                    time.sleep(0.5)
            console.print("shutting down ...", highlight=False)
    except KeyboardInterrupt:
        if not (keep_serving and runs and len(runs) == len(specs)):
            return EXIT_INTERRUPTED  # interrupted while a job ran (it was cancelled)
    return EXIT_OK if all(r.status.state == JobState.succeeded for r in runs) else EXIT_FAILED


# The shipped policy is PARL's starting point (issue 4: "start out serial"), which the numbers above
# show; say so where a user reads them, with the command that trains the parallel policy.
SERIAL_START_NOTE = (
    "The built-in orchestrator starts out serial: its plans run each fan-out's sub-agents one at a time, "
    "the starting point PARL trains from. `swarm train examples/parl_widegeo.yaml` (~20 min on 2 cores) "
    "teaches it to run them side by side (docs/PARL.md)."
)


def _where_to_look(console: Console, url: str, jobs: list[tuple[str, str]], settings: Settings, keep_serving: bool) -> None:
    """The closing lines: the dashboard and job links, and how to read the jobs again later."""
    until = "until Ctrl-C" if keep_serving else "until the demo ends; --keep-serving keeps it up"
    lines = [f"Dashboard: {url}/dashboard ({until})"]
    lines += [f"  {label}: {job_id}  {url}/dashboard#/jobs/{job_id}" for label, job_id in jobs]
    first = jobs[0][1] if jobs else "ID"
    lines.append(f"Later: `swarm serve --db {settings.db_path}`, then `swarm status {first}` / "
                 f"`swarm events {first}` or the dashboard on port {settings.port or 8321} (the jobs are stored there).")
    console.print("\n".join(lines), highlight=False)
