"""Bad input at every door (REST, the Python service, the runtime) is refused with a clear message,
and nothing is stored and no job actor is started. tests/test_api.py covers the common REST cases;
this file adds the limits (101 sub-agents, oversized prompts), odd JSON and the auth boundary."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import ray
from pydantic import ValidationError

from swarm.api import create_app
from swarm.config import Settings
from swarm.dag import PlanValidationError
from swarm.plans import MAX_PROMPT_CHARS, JobSpec
from swarm.runtime import SwarmRuntime
from swarm.service import JobService
from swarm.store import JobStore
from tests.test_api import LiveServer, plan_job
from tests.scripted_policy import scripted_llm_factory

NAMESPACE = "agent-swarm-test-bad-input"


_RUNTIME: SwarmRuntime | None = None


@pytest.fixture(scope="module")
def runtime(ray_local) -> SwarmRuntime:
    global _RUNTIME
    _RUNTIME = SwarmRuntime(namespace=NAMESPACE, llm_factory=scripted_llm_factory, num_workers=1)
    _RUNTIME.warmup()  # hosts and workers exist before the first snapshot, so any change is a leak
    return _RUNTIME


def live_job_actors() -> tuple[frozenset[str], tuple[str, ...]]:
    """Every named actor of the cluster (job hosts, workers) and every live job of our runtime."""
    assert _RUNTIME is not None
    named = frozenset(f"{a.get('namespace')}/{a['name']}" for a in ray.util.list_named_actors(all_namespaces=True))
    return named, tuple(_RUNTIME.list_live_jobs())


def many_agents(n: int) -> dict[str, Any]:
    return {"plan": {"subagents": [{"id": f"a{i}", "task": "t"} for i in range(n)]}}


@pytest.fixture(scope="module")
def server(runtime, tmp_path_factory):
    # A body limit above the prompt limit, so that the prompt limit is what refuses big tasks.
    settings = Settings(db_path=str(tmp_path_factory.mktemp("bad") / "jobs.db"), max_body_bytes=4 * MAX_PROMPT_CHARS,
                        api_token="tok-123")
    with LiveServer(create_app(settings, runtime=runtime)) as srv:
        yield srv


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=30, headers={"Authorization": "Bearer tok-123"}) as c:
        yield c


def _total(http: httpx.Client) -> int:
    return http.get("/jobs").json()["total"]


CASES: list[tuple[str, dict[str, Any] | bytes, int, str]] = [
    ("101 sub-agents", many_agents(101), 400, "more than the limit max_subagents=100"),
    ("oversized task", {"task": "x" * (MAX_PROMPT_CHARS + 1)}, 422, "task: String should have at most"),
    ("oversized sub-agent prompt", {"plan": {"subagents": [{"id": "a", "task": "t", "system_prompt": "p" * (MAX_PROMPT_CHARS + 1)}]}},
     422, "plan.subagents.0.system_prompt"),
    ("unknown tool", {"plan": {"subagents": [{"id": "a", "task": "t", "tools": ["rm_rf"]}]}}, 400, "unknown tool 'rm_rf'"),
    ("self dependency", {"plan": {"subagents": [{"id": "a", "task": "t", "depends_on": ["a"]}]}}, 400, "depends on itself"),
    ("duplicate ids", {"plan": {"subagents": [{"id": "a", "task": "t"}, {"id": "a", "task": "u"}]}}, 400, "duplicate agent id 'a'"),
    ("empty plan", {"plan": {"subagents": []}}, 400, "no sub-agents"),
    ("bad agent id", {"plan": {"subagents": [{"id": "../etc", "task": "t"}]}}, 422, "must be 1-64 characters"),
    ("wrong type", {"task": ["not", "a", "string"]}, 422, "task"),
    ("too many steps", {"plan": {"subagents": [{"id": "a", "task": "t", "max_steps": 500}]}}, 400, "above the limit"),
    ("NaN literal", b'{"task": NaN}', 400, "not valid JSON"),
    ("not UTF-8", b'{"task": "\xff\xfe"}', 400, "not valid JSON"),
    ("deep nesting", b'{"task": "t", "metadata": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, "not valid JSON"),
    ("trailing garbage", b'{"task": "t"} {"task": "u"}', 400, "not valid JSON"),
    ("a JSON string", b'"just a string"', 422, "invalid job spec"),
]


@pytest.mark.parametrize("name,body,status,needle", CASES, ids=[c[0] for c in CASES])
def test_rest_refuses_with_a_clear_reason_and_starts_nothing(http: httpx.Client, name: str, body: Any, status: int,
                                                             needle: str) -> None:
    before_jobs, before_actors = _total(http), live_job_actors()
    if isinstance(body, bytes):
        r = http.post("/jobs", content=body, headers={"content-type": "application/json"})
    else:
        r = http.post("/jobs", json=body)
    assert r.status_code == status, r.text[:500]
    assert needle in r.json()["detail"], r.json()["detail"][:500]
    assert _total(http) == before_jobs
    assert live_job_actors() == before_actors


def test_oversized_body_is_413_before_parsing(server) -> None:
    limit = 4 * MAX_PROMPT_CHARS
    with httpx.Client(base_url=server.url, timeout=30, headers={"Authorization": "Bearer tok-123"}) as c:
        before = _total(c)
        r = c.post("/jobs", content=b"{" + b" " * limit + b"}", headers={"content-type": "application/json"})
        assert r.status_code == 413 and str(limit) in r.json()["detail"]
        assert _total(c) == before


@pytest.mark.parametrize("headers,needle", [
    ({}, "missing bearer token"),
    ({"Authorization": "Bearer tok-124"}, "invalid bearer token"),
    ({"Authorization": "Bearer tok-1234"}, "invalid bearer token"),
    ({"Authorization": "tok-123"}, "invalid bearer token"),
    ({"Authorization": "Basic dG9rLTEyMw=="}, "invalid bearer token"),
])
def test_missing_or_wrong_token_is_401_and_starts_nothing(server, http: httpx.Client, headers: dict[str, str],
                                                          needle: str) -> None:
    before_jobs, before_actors = _total(http), live_job_actors()
    with httpx.Client(base_url=server.url, timeout=30, headers=headers) as anon:
        r = anon.post("/jobs", json=plan_job("sneaky"))
        assert r.status_code == 401 and r.json()["detail"].startswith(needle)
        assert anon.get("/jobs").status_code == 401
        assert anon.post("/jobs/job-x/cancel").status_code == 401
    assert _total(http) == before_jobs
    assert live_job_actors() == before_actors


async def test_python_service_refuses_the_same_input(runtime: SwarmRuntime, tmp_path) -> None:
    store = JobStore(str(tmp_path / "svc.db"))
    svc = JobService(Settings(db_path=str(tmp_path / "svc.db")), runtime, store=store)
    await svc.start()
    before = live_job_actors()
    try:
        with pytest.raises(PlanValidationError) as e:
            await svc.submit(many_agents(101))
        assert "max_subagents=100" in str(e.value)
        with pytest.raises(ValidationError) as v:
            await svc.submit({"task": "y" * (MAX_PROMPT_CHARS + 1)})
        assert "at most 200000 characters" in str(v.value)
        with pytest.raises(PlanValidationError) as e:
            await svc.submit({"task": "t", "subagent_tools": ["shell"]})
        assert "unknown tool 'shell'" in str(e.value)
        assert store.count_jobs() == 0 and live_job_actors() == before
    finally:
        await svc.stop()
        store.close()


def test_runtime_refuses_a_cyclic_plan_before_starting_an_actor(runtime: SwarmRuntime) -> None:
    spec = JobSpec.model_validate({"plan": {"subagents": [
        {"id": "a", "task": "t", "depends_on": ["c"]},
        {"id": "b", "task": "t", "depends_on": ["a"]},
        {"id": "c", "task": "t", "depends_on": ["b"]},
    ]}})
    before = live_job_actors()
    with pytest.raises(PlanValidationError) as e:
        runtime.start_job("job-cyclic", spec)
    assert "dependency cycle" in str(e.value)
    assert not runtime.has_job("job-cyclic") and live_job_actors() == before
