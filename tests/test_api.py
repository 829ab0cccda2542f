"""REST API end to end: a real uvicorn server on loopback, a real Ray runtime, the SQLite store.

The only test double is the LLM (tests.scripted_policy.ScriptedTestPolicy), driven by scripts in
the task texts, so the service, runtime, store and HTTP layers are what is tested.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import httpx
import orjson
import pytest
import uvicorn

from swarm.api import create_app
from swarm.config import Settings
from tests.scripted_policy import script_task, scripted_llm_factory

TERMINAL = {"succeeded", "failed", "cancelled", "interrupted"}


class LiveServer:
    """uvicorn serving `app` on 127.0.0.1 (a free port) in a background thread."""

    def __init__(self, app: Any, port: int = 0) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(60)
        self.sock.close()
        assert not self.thread.is_alive(), "test server did not stop"


def make_runtime() -> Any:
    from swarm.runtime import SwarmRuntime

    return SwarmRuntime(llm_factory=scripted_llm_factory, num_workers=2)


def calc_task(expr: str, answer: str, think_s: float = 0.0, steps: int = 1) -> str:
    calls = [[{"tool": "calculator", "arguments": {"expression": expr}}] for _ in range(steps)]
    return script_task({"steps": calls, "answer": answer, "think_s": think_s})


def plan_job(name: str = "plan", think_s: float = 0.0, steps: int = 1) -> dict[str, Any]:
    return {
        "name": name,
        "plan": {
            "subagents": [
                {"id": "a", "task": calc_task("2+3", "A={results}", think_s, steps), "tools": ["calculator"]},
                {"id": "b", "task": calc_task("4*5", "B={results}", think_s, steps), "tools": ["calculator"]},
                {"id": "c", "task": calc_task("1+1", "C={results}"), "tools": ["calculator"], "depends_on": ["a", "b"]},
            ]
        },
    }


def slow_job(name: str = "slow", think_s: float = 30.0) -> dict[str, Any]:
    return {"name": name, "plan": {"subagents": [{"id": "s", "task": calc_task("1", "S", think_s), "tools": ["calculator"]}]}}


def task_job(name: str = "task") -> dict[str, Any]:
    stages = [
        [{"agent": "x", "task": calc_task("6*7", "X={results}")}, {"agent": "y", "task": calc_task("9-2", "Y={results}")}],
        [{"agent": "z", "task": calc_task("3*3", "Z={results}")}],
    ]
    return {"name": name, "task": script_task({"orchestrate": stages}, "find the numbers"), "subagent_tools": ["calculator"]}


def wait_state(http: httpx.Client, job_id: str, states: set[str] = TERMINAL, timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        st = http.get(f"/jobs/{job_id}").json()
        if st["state"] in states:
            return st
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} still {st['state']} after {timeout} s")
        time.sleep(0.1)


def parse_sse(text: str) -> list[dict[str, Any]]:
    """[{id, event, data}] from an SSE body (comments dropped)."""
    out = []
    for block in text.split("\n\n"):
        fields: dict[str, Any] = {}
        for line in block.splitlines():
            if line.startswith(":") or not line:
                continue
            k, _, v = line.partition(": ")
            fields[k] = v
        if fields:
            fields["data"] = orjson.loads(fields["data"])
            out.append(fields)
    return out


def job_count(http: httpx.Client) -> int:
    return http.get("/jobs").json()["total"]


@pytest.fixture(scope="module")
def runtime(ray_local):
    return make_runtime()


@pytest.fixture(scope="module")
def server(runtime, tmp_path_factory):
    settings = Settings(db_path=str(tmp_path_factory.mktemp("api") / "jobs.db"), max_body_bytes=16_384)
    with LiveServer(create_app(settings, runtime=runtime)) as srv:
        yield srv


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def test_plan_job_runs_to_success_and_streams_events(http: httpx.Client) -> None:
    r = http.post("/jobs", json=plan_job("p1"))
    assert r.status_code == 201, r.text
    body = r.json()
    assert set(body) == {"id", "state"} and body["state"] == "queued"
    assert r.headers["location"] == f"/jobs/{body['id']}"
    st = wait_state(http, body["id"])
    assert st["state"] == "succeeded", st
    assert st["mode"] == "plan" and st["name"] == "p1"
    assert "A=5" in st["result"] and "B=20" in st["result"] and "C=2" in st["result"]
    m = st["metrics"]
    assert m["subagents"] == 3 and m["tool_calls"] == 3 and m["critical_steps"] >= 4
    assert st["started_at"] and st["finished_at"] >= st["started_at"]

    r = http.get(f"/jobs/{body['id']}/events")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    evs = parse_sse(r.text)
    seqs = [int(e["id"]) for e in evs]
    assert seqs == list(range(1, len(evs) + 1))
    assert [e["data"]["seq"] for e in evs] == seqs
    assert all(e["event"] == e["data"]["type"] for e in evs)
    assert evs[0]["event"] == "job_submitted" and evs[-1]["event"] == "job_finished"
    assert evs[-1]["data"]["state"] == "succeeded"
    assert sum(e["event"] == "subagent_finished" for e in evs) == 3


def test_task_job_runs_to_success(http: httpx.Client) -> None:
    r = http.post("/jobs", json=task_job("t1"))
    assert r.status_code == 201, r.text
    st = wait_state(http, r.json()["id"])
    assert st["state"] == "succeeded", st
    assert st["mode"] == "orchestrator"
    for part in ("X=42", "Y=7", "Z=9"):
        assert part in st["result"]
    assert st["metrics"]["subagents"] == 3


def test_sse_resume_gives_exactly_the_rest(http: httpx.Client) -> None:
    job_id = http.post("/jobs", json=plan_job("resume")).json()["id"]
    # Follow live from the start: the stream ends by itself after job_finished.
    with http.stream("GET", f"/jobs/{job_id}/events") as r:
        live = parse_sse(r.read().decode())
    n = len(live)
    assert [int(e["id"]) for e in live] == list(range(1, n + 1)) and live[-1]["event"] == "job_finished"
    k = n // 2
    rest = parse_sse(http.get(f"/jobs/{job_id}/events", headers={"Last-Event-ID": str(k)}).text)
    assert [int(e["id"]) for e in rest] == list(range(k + 1, n + 1))
    assert [e["data"] for e in rest] == [e["data"] for e in live[k:]]
    rest_q = parse_sse(http.get(f"/jobs/{job_id}/events", params={"after": k}).text)
    assert [e["data"] for e in rest_q] == [e["data"] for e in live[k:]]
    assert parse_sse(http.get(f"/jobs/{job_id}/events", params={"after": n}).text) == []
    snap = parse_sse(http.get(f"/jobs/{job_id}/events", params={"follow": "false", "after": 1}).text)
    assert [int(e["id"]) for e in snap] == list(range(2, n + 1))


def test_list_filters_and_paging(http: httpx.Client) -> None:
    done = http.post("/jobs", json=plan_job("listed")).json()["id"]
    wait_state(http, done)
    slow = http.post("/jobs", json=slow_job("listed-slow")).json()["id"]
    wait_state(http, slow, {"running"})
    try:
        succeeded = http.get("/jobs", params={"state": "succeeded", "limit": 1000}).json()
        assert done in {j["id"] for j in succeeded["jobs"]} and slow not in {j["id"] for j in succeeded["jobs"]}
        assert all(j["state"] == "succeeded" for j in succeeded["jobs"])
        assert succeeded["total"] == len(succeeded["jobs"])
        running = http.get("/jobs", params={"state": "running"}).json()
        assert [j["id"] for j in running["jobs"]] == [slow]
        everything = http.get("/jobs", params={"limit": 1000}).json()
        assert everything["jobs"][0]["id"] == slow  # newest first
        page = http.get("/jobs", params={"limit": 1, "offset": 1}).json()
        assert page["jobs"] == everything["jobs"][1:2] and page["total"] == everything["total"]
        bad = http.get("/jobs", params={"state": "bogus"})
        assert bad.status_code == 422 and "state" in bad.text
        assert http.get("/jobs", params={"limit": 0}).status_code == 422
    finally:
        assert http.post(f"/jobs/{slow}/cancel").status_code == 202
        wait_state(http, slow)


def test_bad_input_is_rejected_and_nothing_is_stored(http: httpx.Client) -> None:
    before = job_count(http)

    r = http.post("/jobs", content=b'{"task": "x",', headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["detail"]

    r = http.post("/jobs", content=b"")
    assert r.status_code == 400 and "empty" in r.json()["detail"]

    bad = plan_job()
    bad["plan"]["subagents"][1]["task"] = ""
    r = http.post("/jobs", json=bad)
    assert r.status_code == 422
    assert r.json()["errors"][0]["loc"] == "plan.subagents.1.task"
    assert "plan.subagents.1.task" in r.json()["detail"]

    r = http.post("/jobs", json={"task": "t", "plan": {"subagents": []}})
    assert r.status_code == 422 and "exactly one of 'task'" in r.json()["detail"]

    r = http.post("/jobs", json={"task": "t", "limits": {"max_tool_calls": -1}})
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == "limits.max_tool_calls"

    r = http.post("/jobs", json={"task": "t", "bogus_field": 1})
    assert r.status_code == 422 and "bogus_field" in r.json()["detail"]

    r = http.post("/jobs", json=[1, 2])
    assert r.status_code == 422

    cyclic = {"plan": {"subagents": [
        {"id": "a", "task": "x", "depends_on": ["b"], "tools": ["calculator"]},
        {"id": "b", "task": "y", "depends_on": ["a"]},
        {"id": "c", "task": "z", "depends_on": ["ghost"], "tools": ["no_such_tool"]},
    ]}}
    r = http.post("/jobs", json=cyclic)
    assert r.status_code == 400, r.text
    problems = r.json()["problems"]
    text = " ".join(problems)
    assert len(problems) >= 3 and "no_such_tool" in text and "ghost" in text and "cycle" in text.lower()
    assert r.json()["detail"].startswith("invalid plan")

    r = http.post("/jobs", json={"task": "t", "subagent_tools": ["no_such_tool"]})
    assert r.status_code == 400 and "no_such_tool" in r.json()["detail"]

    huge = {"task": "x" * 20_000}
    r = http.post("/jobs", json=huge)
    assert r.status_code == 413 and "16384" in r.json()["detail"]

    # Chunked upload without Content-Length is cut off at the limit too.
    def chunks():
        for _ in range(40):
            yield b" " * 1000
    r = http.post("/jobs", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413

    for method, path in [("GET", "/jobs/job-nope"), ("GET", "/jobs/job-nope/events"), ("POST", "/jobs/job-nope/cancel")]:
        r = http.request(method, path)
        assert r.status_code == 404 and "job-nope" in r.json()["detail"], (method, path, r.text)

    assert job_count(http) == before


def test_bad_last_event_id(http: httpx.Client) -> None:
    job_id = http.post("/jobs", json=plan_job("lei")).json()["id"]
    r = http.get(f"/jobs/{job_id}/events", headers={"Last-Event-ID": "abc"})
    assert r.status_code == 400 and "Last-Event-ID" in r.json()["detail"]
    assert http.get(f"/jobs/{job_id}/events", params={"after": -1}).status_code == 422
    wait_state(http, job_id)


def test_cancel_running_job_then_409(http: httpx.Client) -> None:
    job_id = http.post("/jobs", json=slow_job("to-cancel")).json()["id"]
    wait_state(http, job_id, {"running"})
    r = http.post(f"/jobs/{job_id}/cancel")
    assert r.status_code == 202 and r.json()["id"] == job_id
    st = wait_state(http, job_id, timeout=25)  # the agent alone would think for 30 s
    assert st["state"] == "cancelled"
    evs = parse_sse(http.get(f"/jobs/{job_id}/events").text)
    assert evs[-1]["event"] == "job_finished" and evs[-1]["data"]["state"] == "cancelled"
    r = http.post(f"/jobs/{job_id}/cancel")
    assert r.status_code == 409 and "already ended" in r.json()["detail"]


def test_openapi_and_docs(http: httpx.Client) -> None:
    spec = http.get("/openapi.json").json()
    assert {"/jobs", "/jobs/{job_id}", "/jobs/{job_id}/events", "/jobs/{job_id}/cancel", "/healthz"} <= set(spec["paths"])
    body = spec["paths"]["/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/JobSpec"}
    comps = spec["components"]["schemas"]
    assert {"task", "plan", "limits"} <= set(comps["JobSpec"]["properties"])
    assert "SwarmPlan" in comps and "JobStatus" in comps
    docs = http.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    assert http.get("/healthz").json()["status"] == "ok"


def test_bearer_token_auth(runtime, tmp_path) -> None:
    settings = Settings(db_path=str(tmp_path / "auth.db"), api_token="s3cret")
    with LiveServer(create_app(settings, runtime=runtime)) as srv, httpx.Client(base_url=srv.url) as c:
        assert c.get("/healthz").status_code == 200
        for path in ("/jobs", "/openapi.json", "/jobs/x"):
            r = c.get(path)
            assert r.status_code == 401 and "Authorization: Bearer" in r.json()["detail"]
            assert r.headers["www-authenticate"].startswith("Bearer")
        r = c.get("/jobs", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["detail"] == "invalid bearer token"
        assert 'error="invalid_token"' in r.headers["www-authenticate"]
        r = c.post("/jobs", json={"task": "x"}, headers={"Authorization": "Basic s3cret"})
        assert r.status_code == 401
        ok = {"Authorization": "Bearer s3cret"}
        r = c.get("/jobs", headers=ok)
        assert r.status_code == 200 and r.json()["total"] == 0  # the rejected POST stored nothing
        spec = c.get("/openapi.json", headers=ok).json()
        assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


def test_runtime_start_failure_is_503_and_recorded(ray_local, tmp_path) -> None:
    from swarm.runtime import SwarmRuntime

    class StartFailsRuntimeTestDouble(SwarmRuntime):
        """A real runtime whose cluster refuses new job actors."""

        def start_job(self, job_id, spec):
            raise RuntimeError("no resources for the job actor")

    rt = StartFailsRuntimeTestDouble(llm_factory=scripted_llm_factory)
    settings = Settings(db_path=str(tmp_path / "fail.db"))
    with LiveServer(create_app(settings, runtime=rt)) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        r = c.post("/jobs", json=plan_job("cannot-start"))
        assert r.status_code == 503 and "no resources for the job actor" in r.json()["detail"]
        jobs = c.get("/jobs").json()["jobs"]
        assert len(jobs) == 1 and jobs[0]["state"] == "failed" and "could not start" in jobs[0]["error"]
        evs = parse_sse(c.get(f"/jobs/{jobs[0]['id']}/events").text)
        assert [e["event"] for e in evs] == ["job_finished"] and evs[0]["data"]["state"] == "failed"
