"""The `swarm` command: serve the API, submit and watch jobs, or run one job in-process.

    swarm serve                       # REST API on settings host/port (embedded Ray unless --address)
    swarm submit job.json --follow    # via the API, with a live progress view
    swarm run job.json                # in-process on a Ray cluster (what `ray job submit -- swarm run` runs)

Other packages add command groups with one line each at the bottom of this file
(`app.add_typer(<their Typer>, name="model")`), so the CLI stays one entry point.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, Optional

import orjson
import typer
import yaml
from pydantic import ValidationError
from rich.console import Console
from rich.live import Live
from rich.table import Table

from swarm.client import Swarm, SwarmClientError
from swarm.config import ConfigError, Settings, load_settings
from swarm.plans import JobSpec, JobState, JobStatus

if TYPE_CHECKING:
    from swarm.runtime import SwarmRuntime

app = typer.Typer(
    name="swarm",
    help="Kimi K2.5-style Agent Swarm on Ray: run parallel sub-agent jobs and follow them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


@dataclass
class CliState:
    """Global options, shared by every subcommand through the typer context."""

    config: str | None = None
    server: str | None = None
    token: str | None = None

    def export_config(self) -> None:
        """Make --config visible to Ray workers this process starts (they load settings themselves)."""
        if self.config:
            os.environ["SWARM_CONFIG"] = str(Path(self.config).expanduser().resolve())

    def settings(self) -> Settings:
        try:
            return load_settings(self.config)
        except ConfigError as e:
            fail(str(e), EXIT_USAGE)

    def server_url(self) -> str:
        if self.server:
            return self.server
        s = self.settings()
        host = "127.0.0.1" if s.host in ("0.0.0.0", "::", "") else s.host
        return f"http://{host}:{s.port}"

    def client(self) -> Swarm:
        return Swarm(self.server_url(), token=self.token or self.settings().api_token)


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def _state(ctx: typer.Context) -> CliState:
    return ctx.ensure_object(CliState)


def load_job_file(path: Path) -> JobSpec:
    """A JobSpec from a JSON (or YAML) file; errors name the file and the field."""
    if not path.is_file():
        raise ValueError(f"job file {str(path)!r} does not exist")
    text = path.read_bytes()
    try:
        raw = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else orjson.loads(text)
    except (orjson.JSONDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"job file {str(path)!r} is not valid {'YAML' if path.suffix in ('.yaml', '.yml') else 'JSON'}: {e}") from None
    try:
        return JobSpec.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(
            f"field {'.'.join(map(str, err['loc'])) or '(root)'!r}: {err['msg']}" for err in e.errors()
        )
        raise ValueError(f"job file {str(path)!r} is not a valid job: {problems}") from None


def _client_call(fn: Any, *args: Any, **kw: Any) -> Any:
    try:
        return fn(*args, **kw)
    except SwarmClientError as e:
        fail(str(e), EXIT_FAILED)


def _print_status(st: JobStatus) -> None:
    t = Table.grid(padding=(0, 2))
    for k, v in st.model_dump(mode="json", exclude={"metrics"}).items():
        if k.endswith("_at") and v is not None:
            v = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v))
        if v is not None and v != "":
            t.add_row(k, str(v))
    for k, v in st.metrics.model_dump().items():
        t.add_row(f"metrics.{k}", f"{v:.2f}" if isinstance(v, float) else str(v))
    console.print(t)


@app.callback()
def _global(
    ctx: typer.Context,
    config: Optional[str] = typer.Option(None, "--config", help="settings YAML file (else $SWARM_CONFIG)"),
    server: Optional[str] = typer.Option(None, "--server", envvar="SWARM_SERVER", help="API URL, e.g. http://host:8321"),
    token: Optional[str] = typer.Option(None, "--token", envvar="SWARM_TOKEN", help="API bearer token"),
) -> None:
    ctx.obj = CliState(config=config, server=server, token=token)


@app.command()
def serve(
    ctx: typer.Context,
    host: Optional[str] = typer.Option(None, help="listen address (settings: host)"),
    port: Optional[int] = typer.Option(None, help="listen port (settings: port, default 8321)"),
    address: Optional[str] = typer.Option(None, "--address", help="existing Ray cluster, e.g. ray://head:10001 or auto"),
    db: Optional[str] = typer.Option(None, "--db", help="SQLite job store path"),
    num_workers: Optional[int] = typer.Option(None, "--num-workers", help="worker actors hosting sub-agents"),
    token: Optional[str] = typer.Option(None, "--token", help="require this bearer token on the API"),
) -> None:
    """Run the REST API (jobs, SSE events, OpenAPI at /docs)."""
    import uvicorn

    from swarm.api import create_app

    st = _state(ctx)
    st.export_config()
    update = {k: v for k, v in dict(host=host, port=port, ray_address=address, db_path=db,
                                    num_workers=num_workers, api_token=token or st.token).items() if v is not None}
    try:
        settings = Settings.model_validate({**st.settings().model_dump(), **update})
    except ValidationError as e:
        fail(f"invalid option: {e.errors()[0]['loc'][0]}: {e.errors()[0]['msg']}", EXIT_USAGE)
    console.print(f"swarm API on http://{settings.host}:{settings.port} (store {settings.db_path}, "
                  f"Ray {settings.ray_address or 'embedded'}, auth {'on' if settings.api_token else 'off'})")
    from swarm.runtime import SwarmRuntime

    # Ray first: ray.init installs its own SIGTERM handler, which uvicorn's (installed when it
    # starts serving) must replace so that Ctrl-C / SIGTERM shut the service down cleanly.
    runtime = SwarmRuntime(address=settings.ray_address, num_workers=settings.num_workers,
                           placement=settings.placement)
    try:
        # Open SSE streams would hold a graceful shutdown until their jobs end; cut them after 5 s
        # (clients resume with Last-Event-ID).
        uvicorn.run(create_app(settings, runtime=runtime), host=settings.host, port=settings.port,
                    log_level="info", timeout_graceful_shutdown=5)
    finally:
        runtime.shutdown()


@app.command()
def submit(
    ctx: typer.Context,
    job_file: Optional[Path] = typer.Argument(None, metavar="JOB.json", help="a JobSpec file (JSON or YAML)"),
    task: Optional[str] = typer.Option(None, "--task", help="a task for the orchestrator instead of a file"),
    name: Optional[str] = typer.Option(None, "--name", help="job name"),
    follow: bool = typer.Option(False, "--follow", "-f", help="show live progress until the job ends"),
) -> None:
    """Submit a job to the service; prints its id."""
    if (job_file is None) == (task is None):
        fail("give exactly one of JOB.json or --task TEXT", EXIT_USAGE)
    if job_file is not None:
        try:
            body: dict[str, Any] = load_job_file(job_file).model_dump(mode="json", exclude_unset=True)
        except ValueError as e:
            fail(str(e), EXIT_USAGE)
    else:
        body = {"task": task}
    if name is not None:
        body["name"] = name
    client = _state(ctx).client()
    job_id = _client_call(client.submit, body)
    console.print(job_id, highlight=False)
    if follow:
        raise typer.Exit(_follow(client, job_id))


def _follow(client: Swarm, job_id: str) -> int:
    from swarm.progress import show_progress

    prog = _client_call(show_progress, client.events(job_id, follow=True), console)
    ok = prog.finished is not None and JobState(prog.finished.state) == JobState.succeeded
    return EXIT_OK if ok else EXIT_FAILED


@app.command()
def status(ctx: typer.Context, job_id: str = typer.Argument(..., metavar="ID"),
           as_json: bool = typer.Option(False, "--json", help="print the JobStatus JSON")) -> None:
    """Show a job's state, metrics and result."""
    st = _client_call(_state(ctx).client().status, job_id)
    if as_json:
        typer.echo(st.to_json().decode())
    else:
        _print_status(st)


@app.command("list")
def list_jobs(
    ctx: typer.Context,
    state: Optional[JobState] = typer.Option(None, "--state", help="only jobs in this state"),
    limit: int = typer.Option(20, "--limit", min=1, max=1000),
    as_json: bool = typer.Option(False, "--json", help="one JobStatus JSON per line"),
) -> None:
    """List jobs, newest first."""
    jobs = _client_call(_state(ctx).client().list, state=state, limit=limit)
    if as_json:
        for j in jobs:
            typer.echo(j.to_json().decode())
        return
    t = Table()
    t.add_column("id", no_wrap=True, min_width=16)
    for col in ("name", "mode", "state", "critical steps", "wall s"):
        t.add_column(col)
    for j in jobs:
        t.add_row(j.id, j.name, j.mode, j.state.value, str(j.metrics.critical_steps), f"{j.metrics.wall_time_s:.1f}")
    console.print(t)


@app.command()
def events(
    ctx: typer.Context,
    job_id: str = typer.Argument(..., metavar="ID"),
    follow: bool = typer.Option(False, "--follow", "-f", help="keep streaming until the job ends"),
    after: int = typer.Option(0, "--after", min=0, help="only events after this seq"),
    as_json: bool = typer.Option(False, "--json", help="one event JSON per line"),
) -> None:
    """Print a job's events (one line each)."""
    from swarm.events import event_to_json
    from swarm.progress import event_line

    client = _state(ctx).client()

    def emit_all() -> None:
        for ev in client.events(job_id, follow=follow, after=after):
            typer.echo(event_to_json(ev).decode() if as_json else event_line(ev))

    _client_call(emit_all)


@app.command()
def cancel(ctx: typer.Context, job_id: str = typer.Argument(..., metavar="ID")) -> None:
    """Cancel a running job."""
    st = _client_call(_state(ctx).client().cancel, job_id)
    console.print(f"cancelling {st.id} (state now {st.state.value})", highlight=False)


@app.command()
def run(
    ctx: typer.Context,
    job_file: Path = typer.Argument(..., metavar="JOB.json", help="a JobSpec file (JSON or YAML)"),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster (default: settings, else embedded)"),
    num_workers: Optional[int] = typer.Option(None, "--num-workers", min=1),
) -> None:
    """Run one job in this process on Ray, with live progress. Exit 0 on success, 1 on failure,
    130 on Ctrl-C (after cancelling the job)."""
    from swarm.runtime import SwarmRuntime

    try:
        spec = load_job_file(job_file)
    except ValueError as e:
        fail(str(e), EXIT_USAGE)
    from swarm.dag import PlanValidationError
    from swarm.service import check_spec

    try:  # reject a bad plan before paying for Ray's start-up
        check_spec(spec)
    except PlanValidationError as e:
        fail(f"invalid plan in {job_file}:\n  - " + "\n  - ".join(e.problems), EXIT_USAGE)
    settings = _state(ctx).settings()
    _state(ctx).export_config()
    runtime = SwarmRuntime(address=address or settings.ray_address, num_workers=num_workers or settings.num_workers,
                           placement=settings.placement)
    try:
        code = run_spec(spec, runtime)
    finally:
        runtime.shutdown()
    raise typer.Exit(code)


def run_spec(spec: JobSpec, runtime: SwarmRuntime, out: Console | None = None) -> int:
    """Run a job in-process on `runtime` with the live view; returns the exit code."""
    from swarm.dag import PlanValidationError
    from swarm.plans import new_job_id
    from swarm.progress import JobProgress
    from swarm.service import check_spec

    out = out or console
    try:
        check_spec(spec)
    except PlanValidationError as e:
        err_console.print("[bold red]error:[/] invalid plan:\n  - " + "\n  - ".join(e.problems), highlight=False)
        return EXIT_USAGE
    job_id = new_job_id()
    prog = JobProgress(job_id=job_id, name=spec.name, max_tool_calls=spec.limits.max_tool_calls)
    try:
        with Live(prog, console=out, refresh_per_second=4, transient=True, auto_refresh=out.is_terminal):
            final = asyncio.run(runtime.run_job(spec, on_event=prog.update, job_id=job_id))
    except KeyboardInterrupt:
        err_console.print(f"interrupted: cancelling job {job_id} ...")
        # run_job cancels the job itself when interrupted; this covers an interrupt that came
        # between its start and its first poll.
        if runtime.has_job(job_id):
            try:
                asyncio.run(runtime.cancel(job_id))
            except Exception as e:
                err_console.print(f"cancel: {type(e).__name__}: {e}")
        return EXIT_INTERRUPTED
    out.print(prog.summary())
    if prog.finished is None:  # the stream ended early: report from the final status
        out.print(f"state: {final.state.value}" + (f"\nerror: {final.error}" if final.error else ""))
        if final.result:
            out.print(final.result, highlight=False)
    return EXIT_OK if final.state == JobState.succeeded else EXIT_FAILED


_CHECKPOINT_HELP = "policy checkpoint to serve on this project's engine (default: the SWARM_LLM_* endpoint if set, else planner/builtin_policy)"


@app.command()
def demo(
    ctx: typer.Context,
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster (default: settings, else embedded)"),
    task_index: Optional[int] = typer.Option(None, "--task-index", help="which held-out WideGeo task (default: a small one)"),
    max_rows: int = typer.Option(12, "--max-rows", min=1, help="pick the largest held-out task with at most this many rows"),
    single_agent: bool = typer.Option(True, "--single-agent/--no-single-agent", help="also run it as one agent"),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help=_CHECKPOINT_HELP),
    tp: int = typer.Option(2, "--tp", min=1, help="tensor-parallel shards of the engine (built-in policy / --checkpoint)"),
    orchestrator: Optional[str] = typer.Option(
        None, "--orchestrator", help="the swarm's orchestrator: plan or agent (default: plan for the built-in policy, agent for an endpoint)"),
    keep_serving: bool = typer.Option(False, "--keep-serving", help="leave the API and dashboard up after the run, until Ctrl-C"),
) -> None:
    """The main job: a held-out WideGeo task as a swarm and as a single agent, with item-F1 and critical
    steps, through the job service and its dashboard."""
    from planner.demo import run_demo

    _state(ctx).export_config()
    try:
        code = run_demo(
            settings=_state(ctx).settings(),
            address=address,
            task_index=task_index,
            max_rows=max_rows,
            single_agent=single_agent,
            console=console,
            checkpoint=checkpoint,
            tp=tp,
            orchestrator=orchestrator,
            keep_serving=keep_serving,
        )
    except ValueError as e:
        fail(str(e), EXIT_USAGE)
    raise typer.Exit(code)


@app.command("eval")
def eval_cmd(
    ctx: typer.Context,
    env: str = typer.Argument(..., metavar="ENV", help="environment: widegeo or deepgeo (its fixed eval set)"),
    policy: str = typer.Option("both", "--policy", help="swarm, single or both"),
    n: Optional[int] = typer.Option(None, "--n", min=1, help="the first N tasks (after --max-rows)"),
    max_rows: Optional[int] = typer.Option(None, "--max-rows", min=1, help="only tasks with at most R gold rows"),
    task: Optional[list[str]] = typer.Option(None, "--task", help="only this task id (repeatable), e.g. widegeo-test-s7000001-0022"),
    orchestrator: Optional[str] = typer.Option(
        None, "--orchestrator", help="the swarm's orchestrator: agent or plan (default: plan for the built-in policy, agent for an endpoint)"),
    out: Optional[Path] = typer.Option(None, "--out", help="JSONL of the results (default: eval-ENV-<time>.jsonl)"),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster (default: settings, else embedded)"),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help=_CHECKPOINT_HELP),
    tp: int = typer.Option(2, "--tp", min=1, help="tensor-parallel shards of the engine (built-in policy / --checkpoint)"),
    split: str = typer.Option(
        "test", "--split", help="test: the fixed held-out eval set; train: the train-split tasks `swarm train` "
        "samples (a diagnostic of the reward signal PARL will see; 30 tasks unless --n)"),
    seed: int = typer.Option(0, "--seed", help="with --split train: the data seed of the pool (PARL's data_seed)"),
    subagent_checkpoint: Optional[Path] = typer.Option(
        None, "--subagent-checkpoint", help="run the sub-agents (and the single agent) on this checkpoint, the "
        "orchestrator on the model above: how `swarm train` runs them (e.g. a PARL checkpoint over planner/builtin_policy)"),
    eval_set: str = typer.Option(
        "v1", "--eval-set", help="which fixed held-out set (planner/eval_sets/ENV-VERSION.json): v1, or v2 or v3, "
        "sets no built-in policy was chosen on"),
) -> None:
    """Evaluate on ENV's fixed eval set: item-F1, row-F1, critical steps, wall time, sub-agents and tool
    calls per task for the swarm and a single agent, with their means; writes a JSONL. The model is
    chosen as for `swarm demo`."""
    from planner.evaluate import run_eval

    _state(ctx).export_config()
    try:
        code = run_eval(env, settings=_state(ctx).settings(), address=address, policy=policy, n=n,
                        max_rows=max_rows, orchestrator=orchestrator, out=out, console=console,
                        checkpoint=checkpoint, tp=tp, task_ids=task, split=split, seed=seed,
                        subagent_checkpoint=subagent_checkpoint, eval_set=eval_set)
    except ValueError as e:
        fail(str(e), EXIT_USAGE)
    raise typer.Exit(code)


@app.command()
def corpus(
    out: Optional[Path] = typer.Option(None, "--out", help="where to write it (default: the cache path)"),
    force: bool = typer.Option(False, "--force", help="rebuild even if it exists"),
) -> None:
    """Build the GeoNames search corpus (JSONL) that the `search` tool and the examples use; print its path."""
    from planner.envs.corpus import build_corpus

    with console.status("writing the GeoNames corpus ..."):
        path = build_corpus(out, force=force)
    console.print(str(path), highlight=False)


@app.command()
def train(
    config: Path = typer.Argument(..., metavar="CONFIG", help="PARL config YAML (see examples/parl_*.yaml)"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in the config's `out` directory"),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster (default: a local one)"),
    set_: Optional[list[str]] = typer.Option(
        None, "--set", metavar="KEY=VALUE", help="override a config key, repeatable, e.g. an ablation: "
        "--set lambda1=0 --set out=runs/parl-lambda1-0"),
) -> None:
    """Train the plan-mode orchestrator with PARL (docs/PARL.md): parallel swarm rollouts on Ray,
    group-relative advantages, clipped policy gradient, hot weight updates; metrics to OUT/metrics.jsonl."""
    from planner.parl import PARLConfigError, load_config
    from planner.parl.config import parse_overrides
    from planner.parl.loop import run_training

    try:
        cfg = load_config(config, **parse_overrides(set_ or []))
        cfg.check_paths()
    except PARLConfigError as e:
        fail(str(e), EXIT_USAGE)
    try:
        res = run_training(cfg, resume=resume, address=address, log=lambda m: console.print(m, highlight=False))
    except (FileNotFoundError, ValueError) as e:
        fail(str(e), EXIT_USAGE)
    console.print(f"trained {res.steps} step(s); checkpoint and metrics in {res.out}", highlight=False)


# ---- command groups -------------------------------------------------------------------------
model_app = typer.Typer(help="Serve and manage the Kimi-K2-architecture model engine (model_shards).", no_args_is_help=True)
app.add_typer(model_app, name="model")


@model_app.command("serve")
def model_serve(
    preset: Optional[str] = typer.Option(None, "--preset", help="random-initialised preset: tiny, small, kimi-k2"),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="HF-layout safetensors checkpoint directory"),
    tp: int = typer.Option(1, "--tp", min=1, help="tensor-parallel shards (Ray actors in one STRICT_PACK group)"),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8000, "--port"),
    no_ray: bool = typer.Option(False, "--no-ray", help="run in this process (tp must be 1)"),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help='"byte", "byte:VOCAB" or a dir with tiktoken.model'),
    model_name: Optional[str] = typer.Option(None, "--model-name", help="the name clients send as `model`"),
    num_slots: int = typer.Option(64, "--num-slots", min=1, help="concurrent sequences (KV-cache slots)"),
    max_len: int = typer.Option(2048, "--max-len", min=16, help="context length per slot"),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16"),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda"),
    shard_resources: Optional[str] = typer.Option(
        None, "--shard-resources", help='JSON custom resources per shard bundle (tp > 1), e.g. \'{"swarm_model": 1}\''),
    int4_exact: bool = typer.Option(
        False, "--int4-exact", help="INT4 checkpoint on CPU: dequantize the experts (exact, slower) instead of "
        "ATen's packed int4 kernel (bf16 activations)"),
    cpus_per_shard: Optional[int] = typer.Option(
        None, "--cpus-per-shard", min=1, help="tp > 1: Ray CPUs each shard reserves and the torch threads it runs "
        "(default 1; tp 1 runs in this process on torch's default threads)"),
    cpu_collectives: str = typer.Option(
        "shared_memory", "--cpu-collectives", help="tp > 1 on CPU: shared_memory (shards on one host exchange "
        "partial sums through /dev/shm; gloo if they cannot) or gloo (loopback TCP)"),
) -> None:
    """Serve a model over the OpenAI chat API (`/v1/chat/completions`) on HOST:PORT."""
    if (preset is None) == (checkpoint is None):
        fail("give exactly one of --preset or --checkpoint", EXIT_USAGE)
    if int4_exact and preset is not None:
        fail("--int4-exact applies to INT4 checkpoints: a preset has full-precision experts", EXIT_USAGE)
    if int4_exact and checkpoint is not None and (checkpoint / "config.json").is_file():
        from model_shards.checkpoint import read_config

        if not read_config(checkpoint).int4_experts:
            fail(f"--int4-exact applies to INT4 checkpoints: {checkpoint} has full-precision experts "
                 "(`swarm model quantize` makes one)", EXIT_USAGE)
    if checkpoint is not None and not (checkpoint / "config.json").is_file():
        fail(f"{checkpoint} is not a checkpoint directory (no config.json in it)", EXIT_USAGE)
    if no_ray and tp != 1:
        fail("--no-ray runs one process: use --tp 1, or drop --no-ray", EXIT_USAGE)
    if dtype not in ("float32", "bfloat16", "float16"):
        fail(f"--dtype must be float32, bfloat16 or float16, got {dtype!r}", EXIT_USAGE)
    from model_shards.model_runner import CPU_COLLECTIVES

    if cpu_collectives not in CPU_COLLECTIVES:
        fail(f"--cpu-collectives must be {' or '.join(CPU_COLLECTIVES)}, got {cpu_collectives!r}", EXIT_USAGE)
    extra: dict[str, float] = {}
    if shard_resources is not None:
        try:
            extra = orjson.loads(shard_resources)
        except orjson.JSONDecodeError as e:
            fail(f"--shard-resources is not valid JSON: {e}", EXIT_USAGE)
        if not isinstance(extra, dict) or not all(
            isinstance(k, str) and isinstance(v, (int, float)) and v > 0 for k, v in extra.items()
        ):
            fail('--shard-resources must be a JSON object of resource name -> positive number, e.g. \'{"swarm_model": 1}\'',
                 EXIT_USAGE)
        if tp == 1:
            fail("--shard-resources applies to Ray shards: use it with --tp 2 or more", EXIT_USAGE)
    if cpus_per_shard is not None and tp == 1:
        fail("--cpus-per-shard applies to --tp 2 or more (tp 1 runs in this process on torch's default threads)",
             EXIT_USAGE)
    from model_shards.serve import serve as serve_model

    console.print(
        f"serving {'preset ' + preset if preset else checkpoint} with TP={tp} on http://{host}:{port}/v1",
        highlight=False,
    )
    serve_model(
        preset,
        str(checkpoint) if checkpoint else None,
        tp,
        host,
        port,
        use_ray=not no_ray,
        tokenizer=tokenizer,
        model_name=model_name,
        num_slots=num_slots,
        max_len=max_len,
        dtype=dtype,
        device=device,
        int4_exact=int4_exact,
        cpu_collectives=cpu_collectives,
        **({"shard_resources": extra} if extra else {}),
        **({"num_cpus_per_shard": float(cpus_per_shard)} if cpus_per_shard else {}),
    )


def _convert_checkpoint(what: str, src: Path, dst: Path, run: Any) -> None:
    """Runs a checkpoint conversion with a progress bar; bad input exits with the reason, nothing written over."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if not (src / "config.json").is_file():
        fail(f"{src} is not a checkpoint directory (no config.json in it)", EXIT_USAGE)
    if dst.exists() and any(dst.iterdir()):
        fail(f"{dst} exists and is not empty: give a new directory", EXIT_USAGE)
    with Progress(TextColumn(f"{what} tensors"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task(what, total=None)
        try:
            run(lambda done, total: bar.update(task, completed=done, total=total))
        except (ValueError, FileNotFoundError) as e:
            fail(str(e), EXIT_USAGE)
    console.print(f"wrote {dst}", highlight=False)


@model_app.command("quantize")
def model_quantize(
    src: Path = typer.Argument(..., metavar="SRC", help="full-precision HF-layout checkpoint directory"),
    dst: Path = typer.Argument(..., metavar="DST", help="new directory for the INT4 checkpoint"),
) -> None:
    """Write an INT4 copy of a checkpoint: routed experts in K2 Thinking's native format (symmetric, group 32,
    compressed-tensors names), everything else unchanged; tokenizer files are copied."""
    from model_shards.int4 import quantize_checkpoint

    _convert_checkpoint("quantizing", src, dst, lambda progress: quantize_checkpoint(src, dst, progress=progress))


@model_app.command("dequantize")
def model_dequantize(
    src: Path = typer.Argument(..., metavar="SRC", help="INT4 checkpoint directory"),
    dst: Path = typer.Argument(..., metavar="DST", help="new directory for the full-precision checkpoint"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32, bfloat16 or float16 (default: the scales' dtype)"),
) -> None:
    """Write a full-precision copy of an INT4 checkpoint (the same weights, for tools without INT4 support,
    e.g. transformers' DeepseekV3ForCausalLM on CPU)."""
    import torch

    from model_shards.int4 import dequantize_checkpoint

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype is not None and dtype not in dtypes:
        fail(f"--dtype must be float32, bfloat16 or float16, got {dtype!r}", EXIT_USAGE)
    _convert_checkpoint("dequantizing", src, dst, lambda progress: dequantize_checkpoint(
        src, dst, dtypes[dtype] if dtype else None, progress=progress))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
