"""Property-based fuzzing of the REST API from its own OpenAPI schema (schemathesis + hypothesis).

Against the real app on a real loopback server, with a real Ray runtime and SQLite store: every
generated request, valid or not, must get a non-5xx answer with a JSON `detail` on errors. Jobs the
fuzzer manages to submit really run, so the runtime's model is the scripted test policy (answers
at once, no network) and the service admits at most two jobs at a time (the rest wait queued);
all of them are cancelled or finished before the module ends. Budget: a few dozen examples per
operation, well under a minute.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from swarm.api import create_app
from swarm.config import Settings
from swarm.runtime import SwarmRuntime
from tests.scripted_policy import scripted_llm_factory
from tests.test_api import LiveServer

TERMINAL = {"succeeded", "failed", "cancelled", "interrupted"}


@pytest.fixture(scope="module")
def fuzz_server(ray_local, tmp_path_factory):
    runtime = SwarmRuntime(namespace="agent-swarm-test-fuzz", llm_factory=scripted_llm_factory, num_workers=1)
    cfg = Settings(db_path=str(tmp_path_factory.mktemp("fuzz") / "jobs.db"), max_body_bytes=64_000, max_running_jobs=2)
    with LiveServer(create_app(cfg, runtime=runtime)) as srv:
        yield srv
        _drain(srv.url)


def _drain(url: str) -> None:
    """Cancel what the fuzzer left running and wait until every job has ended."""
    with httpx.Client(base_url=url, timeout=30) as c:
        jobs = c.get("/jobs", params={"limit": 1000}).json()["jobs"]
        for j in jobs:
            if j["state"] not in TERMINAL:
                c.post(f"/jobs/{j['id']}/cancel")
        deadline = time.monotonic() + 120
        while any(j["state"] not in TERMINAL for j in c.get("/jobs", params={"limit": 1000}).json()["jobs"]):
            assert time.monotonic() < deadline, "fuzzed jobs did not wind down"
            time.sleep(0.2)


@pytest.fixture(scope="module")
def api_schema(fuzz_server: LiveServer) -> Any:
    return schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_request_gets_a_server_error(case: Any) -> None:
    if case.path == "/jobs/{job_id}/events":
        case.query = {**(case.query or {}), "follow": "false"}  # never wait on a live stream
    response = case.call(timeout=30)
    assert response.status_code < 500, f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:500]}"
    if response.status_code >= 400:
        body = response.json()
        assert isinstance(body.get("detail"), str) and body["detail"], body


def test_fuzzed_jobs_all_end_and_the_queue_was_respected(fuzz_server: LiveServer) -> None:
    _drain(fuzz_server.url)
    with httpx.Client(base_url=fuzz_server.url, timeout=30) as c:
        jobs = c.get("/jobs", params={"limit": 1000}).json()["jobs"]
        assert all(j["state"] in TERMINAL for j in jobs)
        for j in jobs[:20]:
            ev = c.get(f"/jobs/{j['id']}/events", params={"follow": "false"}).text
            assert ev.count("event: job_finished") == 1, ev[-500:]
