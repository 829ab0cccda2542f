"""REST API of the job service (FastAPI): submit, list, inspect, stream and cancel jobs.

Errors always answer `{"detail": "<one clear sentence>"}` (plus `errors` / `problems` lists where
there are several), and bad input is rejected before anything is stored or started.
Events stream as Server-Sent Events: `id: <seq>`, `event: <type>`, `data: <json>`; a client
resumes with the Last-Event-ID header (or `?after=`) and gets exactly the events after it.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Literal

import orjson
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ValidationError

import swarm
from swarm.config import Settings
from swarm.dag import PlanValidationError
from swarm.events import JobSubmitted, _Event
from swarm.plans import JobSpec, JobState, JobStatus, redact_llm_keys
from swarm.service import JobAlreadyFinishedError, JobNotFoundError, JobService

if TYPE_CHECKING:
    from swarm.runtime import SwarmRuntime

SSE_HEARTBEAT_S = 15.0


class JSONBody(Response):
    """orjson-rendered JSON response."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


class JobCreated(BaseModel):
    id: str
    state: JobState


class JobList(BaseModel):
    jobs: list[JobStatus]
    total: int
    limit: int
    offset: int


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    version: str


def _error(status: int, detail: str, headers: dict[str, str] | None = None, **extra: Any) -> JSONBody:
    return JSONBody({"detail": detail, **extra}, status_code=status, headers=headers)


def _loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) or "(root)"


class BearerAuth:
    """ASGI middleware: every path but the open ones needs `Authorization: Bearer <token>`."""

    def __init__(self, app: Any, token: str, open_paths: tuple[str, ...] = ("/healthz",)) -> None:
        self.app = app
        self.token = token.encode()
        self.open_paths = open_paths

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        header = b""
        for k, v in scope.get("headers", []):
            if k == b"authorization":
                header = v
        scheme, _, cred = header.partition(b" ")
        if scheme.lower() == b"bearer" and secrets.compare_digest(cred.strip(), self.token):
            await self.app(scope, receive, send)
            return
        if not header:
            detail = "missing bearer token: this server requires the header 'Authorization: Bearer <token>'"
            challenge = 'Bearer realm="agent-swarm"'
        else:
            detail = "invalid bearer token"
            challenge = 'Bearer realm="agent-swarm", error="invalid_token"'
        await _error(401, detail, {"WWW-Authenticate": challenge})(scope, receive, send)


async def _read_body(request: Request, limit: int) -> bytes | JSONBody:
    """The request body, or a 413 response as soon as it passes `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return _error(413, f"request body of {int(declared)} bytes is larger than the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return _error(413, f"request body is larger than the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _sse(ev: _Event) -> bytes:
    data = ev.model_dump(mode="json")
    if isinstance(ev, JobSubmitted):
        redact_llm_keys(data.get("spec", {}))  # a secret never leaves the server in an event stream
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (ev.seq, ev.type.encode(), orjson.dumps(data))


def _spec_schema() -> tuple[dict[str, Any], dict[str, Any]]:
    schema = JobSpec.model_json_schema(ref_template="#/components/schemas/{model}")
    return schema, schema.pop("$defs", {})


def create_app(settings: Settings, runtime: SwarmRuntime | None = None, service: JobService | None = None) -> FastAPI:
    """The API app. Without `service`, its lifespan builds a JobService on `runtime` (a SwarmRuntime
    built from `settings` if None), starts it (re-attaching running jobs) and stops it on shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        own_runtime = None
        svc = service
        if svc is None:
            rt = runtime
            if rt is None:
                from swarm.runtime import SwarmRuntime

                rt = own_runtime = SwarmRuntime(address=settings.ray_address, num_workers=settings.num_workers,
                                                placement=settings.placement)
            svc = JobService(settings, rt)
        await svc.start()
        app.state.service = svc
        try:
            yield
        finally:
            await svc.stop()
            if own_runtime is not None:
                own_runtime.shutdown()

    app = FastAPI(
        title="agent-swarm",
        version=swarm.__version__,
        description="Kimi K2.5-style Agent Swarm jobs on Ray: submit a task or a plan, follow its events.",
        lifespan=lifespan,
        default_response_class=JSONBody,
    )
    from dashboards.app import DASHBOARD_OPEN_PATHS, dashboard_router

    if settings.api_token:
        # The dashboard's page shell loads without a token (it asks for one); its data calls need it.
        app.add_middleware(BearerAuth, token=settings.api_token, open_paths=("/healthz", *DASHBOARD_OPEN_PATHS))
    app.include_router(dashboard_router(settings))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONBody:
        # Bad query or path parameters get the same error shape as every other error (a sentence).
        errors = [{"loc": _loc(tuple(err["loc"])), "msg": err["msg"], "type": err["type"]} for err in exc.errors()]
        return _error(422, "invalid request: " + "; ".join(f"{x['loc']}: {x['msg']}" for x in errors), errors=errors)

    def svc_of(request: Request) -> JobService:
        return request.app.state.service

    @app.get("/healthz", response_model=Health, tags=["service"])
    async def healthz() -> JSONBody:
        return JSONBody(Health(version=swarm.__version__).model_dump())

    @app.post(
        "/jobs",
        status_code=201,
        response_model=JobCreated,
        tags=["jobs"],
        summary="Submit a job (a task for the orchestrator, or a plan)",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/JobSpec"}}},
            }
        },
        responses={400: {"description": "malformed JSON or an invalid plan"}, 413: {"description": "body too large"},
                   422: {"description": "the body is not a valid JobSpec"}},
    )
    async def submit_job(request: Request) -> JSONBody:
        body = await _read_body(request, settings.max_body_bytes)
        if isinstance(body, JSONBody):
            return body
        if not body.strip():
            return _error(400, "request body is empty; send a JobSpec JSON object with 'task' or 'plan'")
        try:
            raw = orjson.loads(body)
        except orjson.JSONDecodeError as e:
            return _error(400, f"request body is not valid JSON: {e}")
        try:
            spec = JobSpec.model_validate(raw)
        except ValidationError as e:
            errors = [{"loc": _loc(err["loc"]), "msg": err["msg"], "type": err["type"]} for err in e.errors()]
            msg = "; ".join(f"{x['loc']}: {x['msg']}" for x in errors)
            return _error(422, f"invalid job spec: {msg}", errors=errors)
        try:
            status = await svc_of(request).submit(spec)
        except PlanValidationError as e:
            return _error(400, f"invalid plan: {'; '.join(e.problems)}", problems=e.problems)
        except Exception as e:  # the runtime could not start it (the job is stored as failed)
            return _error(503, f"could not start the job: {type(e).__name__}: {e}")
        return JSONBody(
            JobCreated(id=status.id, state=status.state).model_dump(mode="json"),
            status_code=201,
            headers={"Location": f"/jobs/{status.id}"},
        )

    @app.get("/jobs", response_model=JobList, tags=["jobs"], summary="List jobs, newest first")
    async def list_jobs(
        request: Request,
        state: JobState | None = None,
        limit: int = Query(50, ge=1, le=1000),
        offset: int = Query(0, ge=0),
    ) -> JSONBody:
        svc = svc_of(request)
        jobs = svc.list(state=state, limit=limit, offset=offset)
        out = JobList(jobs=jobs, total=svc.store.count_jobs(state), limit=limit, offset=offset)
        return JSONBody(out.model_dump(mode="json"))

    @app.get("/jobs/{job_id}", response_model=JobStatus, tags=["jobs"], responses={404: {"description": "unknown job"}})
    async def get_job(request: Request, job_id: str) -> JSONBody:
        try:
            return JSONBody(svc_of(request).get(job_id).model_dump(mode="json"))
        except JobNotFoundError as e:
            return _error(404, str(e))

    @app.get(
        "/jobs/{job_id}/events",
        tags=["jobs"],
        summary="The job's events as Server-Sent Events (resumable with Last-Event-ID or ?after=)",
        response_class=StreamingResponse,
        responses={200: {"content": {"text/event-stream": {}}}, 404: {"description": "unknown job"}},
    )
    async def job_events(
        request: Request,
        job_id: str,
        after: int | None = Query(None, ge=0, description="only events with seq > after"),
        follow: bool = Query(True, description="keep streaming until the job finishes"),
    ) -> Response:
        svc = svc_of(request)
        try:
            svc.get(job_id)
        except JobNotFoundError as e:
            return _error(404, str(e))
        cursor = after
        last_id = request.headers.get("last-event-id")
        if cursor is None and last_id is not None:
            if not last_id.strip().isdigit():
                return _error(400, f"Last-Event-ID must be an event seq (a whole number >= 0), got {last_id!r}")
            cursor = int(last_id.strip())
        cursor = cursor or 0

        async def stream() -> AsyncIterator[bytes]:
            if not follow:
                for ev in svc.events(job_id, after_seq=cursor):
                    yield _sse(ev)
                return
            async for ev in svc.follow(job_id, cursor, heartbeat_s=SSE_HEARTBEAT_S):
                yield b": keep-alive\n\n" if ev is None else _sse(ev)

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @app.post(
        "/jobs/{job_id}/cancel",
        status_code=202,
        response_model=JobStatus,
        tags=["jobs"],
        responses={404: {"description": "unknown job"}, 409: {"description": "the job already ended"}},
    )
    async def cancel_job(request: Request, job_id: str) -> JSONBody:
        try:
            st = await svc_of(request).cancel(job_id)
        except JobNotFoundError as e:
            return _error(404, str(e))
        except JobAlreadyFinishedError as e:
            return _error(409, str(e))
        return JSONBody(st.model_dump(mode="json"), status_code=202)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            spec, defs = _spec_schema()
            comps = schema.setdefault("components", {}).setdefault("schemas", {})
            for name, d in defs.items():
                comps.setdefault(name, d)
            comps["JobSpec"] = spec
            if settings.api_token:
                schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
                schema["security"] = [{"bearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
