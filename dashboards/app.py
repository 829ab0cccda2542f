"""The dashboard's HTTP side: the static single-page app under /dashboard and its small JSON API.

Mount it in the job service with `app.include_router(dashboard_router(settings))`. The page shell
(HTML/JS/CSS, listed in DASHBOARD_OPEN_PATHS) loads without a token so the login field can be
shown; every data call needs the bearer token when settings.api_token is set. Jobs, events and
cancel are the job service's own endpoints (/jobs...); this router adds only what the service lacks:
training-run metrics files and the critical chain of a job computed by swarm.critical_steps.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import FileResponse, RedirectResponse
from pydantic import BaseModel

from dashboards.metrics import (
    DEFAULT_MAX_BYTES,
    RunNotFoundError,
    list_runs,
    read_metrics,
    run_metrics_path,
    runs_dir,
)
from swarm.config import Settings

PREFIX = "/dashboard"
STATIC_DIR = Path(__file__).parent / "static"
_MEDIA = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
          ".svg": "image/svg+xml"}


def static_files() -> list[str]:
    return sorted(p.name for p in STATIC_DIR.iterdir() if p.is_file() and p.suffix in _MEDIA)


# Exact paths a bearer-auth middleware must let through: the shell only, never data.
DASHBOARD_OPEN_PATHS: tuple[str, ...] = (PREFIX, PREFIX + "/", *(f"{PREFIX}/static/{n}" for n in static_files()))


class RunOut(BaseModel):
    name: str
    size: int
    modified: float


class RunsOut(BaseModel):
    runs_dir: str
    runs: list[RunOut]


class MetricsRecordOut(BaseModel):
    step: int
    time: float
    values: dict[str, float | None]


class MetricsErrorOut(BaseModel):
    line: int
    offset: int
    message: str


class MetricsOut(BaseModel):
    run: str
    records: list[MetricsRecordOut]
    errors: list[MetricsErrorOut]
    next_offset: int
    next_line: int
    size: int
    eof: bool


class CriticalOut(BaseModel):
    job_id: str
    chain: list[str]
    critical_steps: int
    total_steps: int
    steps: dict[str, int]


def _auth_dependency(token: str | None) -> Any:
    """Checks the bearer token itself, so the data routes stay closed even if mounted without the
    service's auth middleware."""

    async def check(request: Request) -> None:
        if not token:
            return
        scheme, _, cred = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(cred.strip().encode(), token.encode()):
            raise HTTPException(401, "missing or invalid bearer token", headers={"WWW-Authenticate": "Bearer"})

    return check


def job_critical_chain(events: list[Any]) -> CriticalOut:
    """The critical chain of a job from its events (running or finished), by swarm.critical_steps."""
    from swarm.critical_steps import AgentSteps, critical_chain, critical_steps
    from swarm.events import ORCHESTRATOR_ID

    job_id = ""
    orch = 0
    agents: dict[str, AgentSteps] = {}
    for ev in events:
        job_id = ev.job_id or job_id
        if ev.type == "subagent_created":
            agents[ev.agent_id] = AgentSteps(ev.agent_id, ev.stage, 0, list(ev.depends_on))
            parent = agents.get(getattr(ev, "fan_out_of", ""))
            if parent is not None:  # a fan-out node ends after its copies (swarm.fan_out)
                parent.depends_on.append(ev.agent_id)
        elif ev.type == "subagent_step":
            if ev.agent_id == ORCHESTRATOR_ID:
                orch += 1
            elif ev.agent_id in agents:
                agents[ev.agent_id].steps += 1  # every attempt's steps count: a retry is latency too
    lst = list(agents.values())
    return CriticalOut(
        job_id=job_id,
        chain=critical_chain(orch, lst),
        critical_steps=critical_steps(orch, lst),
        total_steps=orch + sum(a.steps for a in lst),
        steps={ORCHESTRATOR_ID: orch, **{a.agent_id: a.steps for a in lst}},
    )


def dashboard_router(settings: Settings, runs_root: str | os.PathLike[str] | None = None) -> APIRouter:
    """Routes of the dashboard. `runs_root` defaults to $SWARM_RUNS_DIR, else ./runs (read per request,
    so runs created after start-up appear)."""
    router = APIRouter(prefix=PREFIX, tags=["dashboard"])
    auth = [Depends(_auth_dependency(settings.api_token))]
    files = set(static_files())

    def root() -> Path:
        return runs_dir(runs_root)

    @router.get("", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type=_MEDIA[".html"], headers={"Cache-Control": "no-cache"})

    @router.get("/", include_in_schema=False)
    async def index_slash() -> RedirectResponse:
        return RedirectResponse(PREFIX, status_code=307)

    @router.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> FileResponse:
        if name not in files:  # a fixed list: no path from the URL ever reaches the filesystem
            raise HTTPException(404, f"no dashboard asset {name!r}")
        p = STATIC_DIR / name
        return FileResponse(p, media_type=_MEDIA[p.suffix], headers={"Cache-Control": "no-cache"})

    @router.get("/api/runs", response_model=RunsOut, dependencies=auth, summary="Training runs with a metrics.jsonl")
    async def runs() -> RunsOut:
        r = root()
        return RunsOut(runs_dir=str(r), runs=[RunOut(name=i.name, size=i.size, modified=i.modified) for i in list_runs(r)])

    @router.get("/api/runs/{run}/metrics", response_model=MetricsOut, dependencies=auth,
                summary="Metrics records of a run from a byte offset (poll with next_offset/next_line)")
    async def metrics(
        run: str,
        offset: int = Query(0, ge=0, description="byte offset to resume from (a previous next_offset)"),
        line: int = Query(1, ge=1, description="line number at offset (a previous next_line)"),
        max_bytes: int = Query(DEFAULT_MAX_BYTES, ge=1, le=64 << 20),
    ) -> MetricsOut:
        try:
            path = run_metrics_path(root(), run)
        except RunNotFoundError as e:
            raise HTTPException(404, str(e)) from None
        try:
            chunk = read_metrics(path, offset=offset, line=line, max_bytes=max_bytes)
        except ValueError as e:
            raise HTTPException(409, str(e)) from None
        return MetricsOut(run=run, **asdict(chunk))

    @router.get("/api/jobs/{job_id}/critical", response_model=CriticalOut, dependencies=auth,
                summary="The job's critical chain (swarm.critical_steps) from its stored events")
    async def critical(request: Request, job_id: str) -> CriticalOut:
        svc = getattr(request.app.state, "service", None)
        if svc is None:
            raise HTTPException(503, "the dashboard is not mounted in a job service (no app.state.service)")
        try:
            events = svc.events(job_id)
        except KeyError:
            raise HTTPException(404, f"unknown job {job_id!r}") from None
        try:
            return job_critical_chain(events)
        except ValueError as e:
            raise HTTPException(422, f"the job's events give an inconsistent DAG: {e}") from None

    return router
