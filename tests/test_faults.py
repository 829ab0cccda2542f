"""Fault injection through the whole stack: every job ends completed, or failed with a clear reason,
and the store stays consistent (events dense from 1, one JobFinished, last, matching the job's state).

Covered here: a worker actor killed mid-job (through the service and the store; the runtime-level
case is in test_runtime_faults.py), a tool that hangs, a tool that returns 10 MB, the engine under
many more concurrent requests than it has slots, a model shard killed mid-generation, and the job
service process killed and restarted against an external Ray cluster.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import ray
import ray.cloudpickle
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from swarm.config import Settings
from swarm.events import JobFinished, SubAgentRetried, ToolCalled, ToolResult
from swarm.plans import (
    JobSpec,
    JobState,
    Limits,
    LLMConfig,
    SubAgentSpec,
    SwarmPlan,
    ToolsConfig,
)
from swarm.runtime import SwarmRuntime
from swarm.service import JobService
from swarm.store import JobStore
from swarm.worker_pool import worker_name
from tests.net import free_port
from tests.openai_test_server import OpenAITestServer, completion
from tests.scripted_policy import ScriptedTestPolicy, script_task
from workers.tools import build_registry
from workers.tools.registry import MAX_TOOL_OUTPUT_CHARS, Tool, ToolRegistry

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

NAMESPACE = "agent-swarm-test-faults"
REPO = Path(__file__).resolve().parent.parent


class PathArgs(BaseModel):
    path: str


class NoArgs(BaseModel):
    pass


def faults_registry(config: ToolsConfig) -> ToolRegistry:
    """The built-in tools plus three test tools: wait for a file, hang forever, return 10 MB."""

    async def wait_file(args: PathArgs, ctx: Any) -> str:
        while not os.path.exists(args.path):
            await asyncio.sleep(0.02)
        return "released"

    async def hang(args: NoArgs, ctx: Any) -> str:
        await asyncio.Event().wait()  # never set: only the tool timeout ends this
        return "unreachable"

    async def flood(args: NoArgs, ctx: Any) -> str:
        return "x" * (10 * 1024 * 1024)

    registry = build_registry(config)
    registry.register(Tool("wait_file", "test tool: wait until a file exists", PathArgs, wait_file))
    registry.register(Tool("hang", "test tool: never returns", NoArgs, hang))
    registry.register(Tool("flood", "test tool: returns 10 MB of text", NoArgs, flood))
    return registry


def faults_llm_factory(config: LLMConfig) -> Any:
    """The real engine client for jobs that ask for backend "engine"; the scripted test policy otherwise."""
    if config.backend == "engine":
        from swarm.llm_factory import make_llm

        return make_llm(config)
    return ScriptedTestPolicy()


@pytest.fixture(scope="module")
def runtime(ray_local) -> SwarmRuntime:
    rt = SwarmRuntime(namespace=NAMESPACE, num_workers=2, llm_factory=faults_llm_factory,
                      registry_factory=faults_registry)
    yield rt
    rt.shutdown()


@pytest.fixture
async def service(runtime: SwarmRuntime, tmp_path: Path):
    db = str(tmp_path / "jobs.db")
    svc = JobService(Settings(db_path=db), runtime, poll_timeout_s=0.2)
    await svc.start()
    yield svc
    await svc.stop()


def assert_store_consistent(store: JobStore, job_id: str) -> list[Any]:
    """Events 1..n with no gap or repeat, one JobFinished and it is last, and it matches the job row."""
    events = store.events(job_id)
    assert [e.seq for e in events] == list(range(1, len(events) + 1)), [e.seq for e in events]
    finals = [e for e in events if isinstance(e, JobFinished)]
    assert len(finals) == 1 and events[-1] is finals[0]
    st = store.get_job(job_id)
    assert st is not None and st.state == finals[0].state and st.error == finals[0].error
    return events


def one_agent(agent_id: str, steps: list[list[dict[str, Any]]], tools: list[str], answer: str = "{results}") -> SubAgentSpec:
    return SubAgentSpec(id=agent_id, task=script_task({"steps": steps, "answer": answer}), tools=tools)


async def test_worker_killed_mid_job_is_survived_and_stored_consistently(service: JobService, runtime: SwarmRuntime,
                                                                         tmp_path: Path) -> None:
    release = str(tmp_path / "release")
    wait = [[{"tool": "wait_file", "arguments": {"path": release}}]]
    plan = SwarmPlan(subagents=[one_agent(f"w{i}", wait, ["wait_file"], f"done {i}") for i in range(4)])
    st = await service.submit(JobSpec(plan=plan, limits=Limits(retry_backoff_s=0.01)))
    deadline = time.monotonic() + 60
    while len({e.agent_id for e in service.events(st.id) if isinstance(e, ToolCalled)}) < 4:
        assert time.monotonic() < deadline, "the agents never reached their tool call"
        await asyncio.sleep(0.05)
    ray.kill(ray.get_actor(worker_name(0), namespace=NAMESPACE))
    Path(release).touch()
    final = await service.wait(st.id, timeout=60)

    assert final.state == JobState.succeeded, final.error
    events = assert_store_consistent(service.store, st.id)
    redone = [e for e in events if isinstance(e, SubAgentRetried)]
    assert redone and all(f"worker {worker_name(0)} died" in e.reason for e in redone)
    assert all(f"done {i}" in (final.result or "") for i in range(4))


async def test_hanging_tool_times_out_and_the_job_completes(service: JobService) -> None:
    plan = SwarmPlan(subagents=[one_agent("h", [[{"tool": "hang"}], [{"tool": "calculator", "arguments": {"expression": "6*7"}}]],
                                          ["hang", "calculator"], "after the hang: {results}")])
    st = await service.submit(JobSpec(plan=plan, limits=Limits(tool_timeout_s=0.5)))
    final = await service.wait(st.id, timeout=60)

    assert final.state == JobState.succeeded, final.error
    events = assert_store_consistent(service.store, st.id)
    results = [e for e in events if isinstance(e, ToolResult)]
    assert results[0].tool == "hang" and results[0].is_error and "timed out" in results[0].content.lower()
    assert results[1].tool == "calculator" and results[1].content.strip() == "42"
    assert "42" in (final.result or "")


async def test_ten_megabyte_tool_output_is_truncated_and_the_store_stays_small(service: JobService, tmp_path: Path) -> None:
    plan = SwarmPlan(subagents=[one_agent("f", [[{"tool": "flood"}]], ["flood"], "flooded")])
    st = await service.submit(JobSpec(plan=plan))
    final = await service.wait(st.id, timeout=60)

    assert final.state == JobState.succeeded and final.result == "## f\nflooded"
    events = assert_store_consistent(service.store, st.id)
    (res,) = [e for e in events if isinstance(e, ToolResult)]
    assert len(res.content) < MAX_TOOL_OUTPUT_CHARS + 100 and "characters truncated" in res.content
    db = Path(service.settings.db_path)
    size = sum(p.stat().st_size for p in db.parent.glob(db.name + "*"))  # the db and its WAL
    assert size < 2 * 1024 * 1024, f"the store grew to {size} bytes"


async def test_engine_overloaded_queues_every_request_and_drops_none() -> None:
    from model_shards.engine import build_engine
    from model_shards.engine_api import GenerationRequest, SamplingParams
    from model_shards.model_runner import RunnerSpec

    slots, n = 4, 48
    engine = build_engine(RunnerSpec(preset="tiny", seed=0, num_slots=slots, max_len=96), tp=1, use_ray=False)
    busiest = 0

    async def watch() -> None:
        nonlocal busiest
        while True:
            busiest = max(busiest, len(engine.scheduler.running))
            await asyncio.sleep(0)

    watcher = asyncio.create_task(watch())
    try:
        reqs = [GenerationRequest(request_id=f"r{i}", prompt_ids=[1 + i % 50, 2, 3, 4 + i % 7],
                                  params=SamplingParams(temperature=0.0, max_tokens=6)) for i in range(n)]
        results = await asyncio.wait_for(asyncio.gather(*(engine.complete(r) for r in reqs)), timeout=240)
    finally:
        watcher.cancel()
        await engine.close()
    assert sorted(r.request_id for r in results) == sorted(r.request_id for r in reqs)
    assert all(r.completion_tokens >= 1 and r.finish_reason in ("length", "stop") for r in results)
    assert all(r.completion_tokens == 6 for r in results if r.finish_reason == "length")
    # Backpressure: never more sequences in flight than the engine has cache slots; the rest waited.
    assert 1 <= busiest <= slots
    # The same prompt gives the same greedy tokens whether it waited in the queue or not.
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for req, res in zip(reqs, results):
        assert by_prompt.setdefault(tuple(req.prompt_ids), res.token_ids) == res.token_ids


async def test_model_shard_killed_mid_job_rebuilds_the_replica_and_the_job_completes(service: JobService) -> None:
    """A TP-2 engine replica loses rank 1 in the middle of a generation. The engine rebuilds the replica
    (new shard processes) and retries the in-flight request, so the job completes with the same greedy
    tokens as an undisturbed run."""
    import ray._private.state

    from model_shards.engine_api import SamplingParams
    from model_shards.model_runner import RunnerSpec
    from model_shards.shards import launch_engine_actor

    def alive_shards() -> list[dict[str, Any]]:
        # The shards are the engine actor's own (unnamed) actors: find rank processes in the GCS table.
        return [a for a in ray._private.state.actors().values()
                if a["ActorClassName"] == "ShardActor" and a["State"] == "ALIVE"]

    name = "faults-engine"
    prompt = list(b"Tell me a long story about shards")
    greedy = SamplingParams(temperature=0.0, max_tokens=48)
    # In the driver's namespace: that is where EngineChatClient, in a worker this driver started, looks.
    engine = launch_engine_actor(name, RunnerSpec(preset="tiny", seed=0, num_slots=4, max_len=1024), tp=2,
                                 tokenizer="byte")
    try:
        undisturbed = await engine.complete.remote(prompt, greedy, None, "undisturbed")
        llm = LLMConfig(backend="engine", engine_actor=name, max_tokens=8, temperature=0.0)
        plan = SwarmPlan(subagents=[SubAgentSpec(id="first", task="say hi"),
                                    SubAgentSpec(id="second", task="say bye", depends_on=["first"])])
        st = await service.submit(JobSpec(plan=plan, llm=llm, limits=Limits(max_retries=1, retry_backoff_s=0.01)))
        deadline = time.monotonic() + 120
        while not any(getattr(e, "agent_id", "") == "first" and e.type == "subagent_finished" for e in service.events(st.id)):
            assert time.monotonic() < deadline, "the first sub-agent never got an answer from the engine"
            assert not service.get(st.id).state.terminal, service.get(st.id).error
            await asyncio.sleep(0.05)
        before = alive_shards()
        assert len(before) == 2
        # Kill rank 1 while a long generation is in flight on the replica.
        in_flight = engine.complete.remote(prompt, greedy, None, "in-flight")
        while (await engine.info.remote())["running"] == 0:
            assert not ray.wait([in_flight], timeout=0)[0], "the request finished before the kill"
            await asyncio.sleep(0.01)
        os.kill(max(before, key=lambda a: a["StartTime"])["Pid"], signal.SIGKILL)
        retried = await in_flight
        final = await service.wait(st.id, timeout=120)
        info = await engine.info.remote()
        after = alive_shards()
    finally:
        ray.kill(engine)
    assert final.state == JobState.succeeded, final.error
    assert info["rebuilds"] == 1
    assert retried.token_ids == undisturbed.token_ids and len(retried.token_ids) > 1
    assert len(after) == 2
    assert not {a["Pid"] for a in after} & {a["Pid"] for a in before}
    assert not {a["ActorID"] for a in after} & {a["ActorID"] for a in before}
    assert_store_consistent(service.store, st.id)


# ---- the job service process killed and restarted ------------------------------------------------


class SlowOpenAITestServer(OpenAITestServer):
    """OpenAITestServer whose every reply takes `delay_s` (an echo of the last user message)."""

    delay_s = 1.2

    def _make_app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat_completions(request: Request) -> JSONResponse:
            body = await request.json()
            with self._lock:
                self.requests.append(body)
            await asyncio.sleep(self.delay_s)
            last = next((m.get("content") for m in reversed(body["messages"]) if m.get("role") == "user"), "")
            return JSONResponse(completion(f"echo: {last[-20:]}"))

        return app


def _cluster_pids(temp_dir: str) -> set[int]:
    from tests.test_cluster_multinode import _cluster_pids as pids

    return pids(temp_dir)


def _serve(env: dict[str, str], address: str, port: int, db: str, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "swarm.cli", "serve", "--address", address, "--port", str(port), "--db", db],
        env=env, cwd=str(REPO), stdout=log.open("ab"), stderr=subprocess.STDOUT,
    )


def _wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"swarm serve exited:\n{log.read_text()[-3000:]}"
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"swarm serve did not come up:\n{log.read_text()[-3000:]}"
        time.sleep(0.3)


@pytest.mark.timeout(400)
def test_service_process_killed_and_restarted_resumes_from_sqlite(tmp_path: Path) -> None:
    from tests.test_cluster_multinode import _kill, _ray_start

    temp_dir = f"/tmp/swarm-sv-{secrets.token_hex(4)}"
    ray_port, api_port = free_port(), free_port()
    address, url = f"127.0.0.1:{ray_port}", f"http://127.0.0.1:{api_port}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env.pop("SWARM_CONFIG", None)
    db, log = str(tmp_path / "jobs.db"), tmp_path / "serve.log"
    llm = SlowOpenAITestServer().start()
    proc: subprocess.Popen[bytes] | None = None
    try:
        _ray_start(["--head", f"--port={ray_port}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
                    "--include-dashboard=false", f"--ray-client-server-port={free_port()}", "--temp-dir", temp_dir,
                    "--dashboard-agent-listen-port", "0", "--metrics-export-port", str(free_port())], env)
        proc = _serve(env, address, api_port, db, log)
        _wait_http(url, proc, log)
        # A chain a -> b -> c -> d: four model calls of 1.2 s one after another.
        subagents = [{"id": x, "task": f"step {x}", "depends_on": [p] if p else []}
                     for p, x in [(None, "a"), ("a", "b"), ("b", "c"), ("c", "d")]]
        spec = {"name": "spans-restart", "plan": {"subagents": subagents},
                "llm": {"backend": "openai", "base_url": llm.url, "api_key": "test", "model": "test-model"}}
        job_id = httpx.post(url + "/jobs", json=spec, timeout=30).json()["id"]
        deadline = time.monotonic() + 60
        while not any(e["type"] == "subagent_finished" for e in _events(url, job_id)):
            assert time.monotonic() < deadline, "the first sub-agent never finished"
            time.sleep(0.2)

        proc.send_signal(signal.SIGKILL)  # no graceful shutdown: the store only has what was persisted
        proc.wait(30)
        with _open(db) as store:
            assert store.get_job(job_id).state == JobState.running
            persisted = store.last_seq(job_id)
        proc = _serve(env, address, api_port, db, log)
        _wait_http(url, proc, log)
        deadline = time.monotonic() + 120
        while (st := httpx.get(f"{url}/jobs/{job_id}", timeout=10).json())["state"] in ("queued", "running"):
            assert time.monotonic() < deadline, f"job still {st['state']} after the restart"
            time.sleep(0.3)
        assert st["state"] == "succeeded", st
        assert st["result"].count("echo: ") == 4
        events = _events(url, job_id)
        assert [e["id"] for e in events] == [str(i) for i in range(1, len(events) + 1)]
        assert len(events) > persisted, "events after the restart were persisted too"
        assert sorted(e["data"]["agent_id"] for e in events if e["type"] == "subagent_finished") == ["a", "b", "c", "d"]
        with _open(db) as store:
            assert_store_consistent(store, job_id)
        assert len(llm.requests) == 4, "no model call was repeated across the restart"
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(30)
        llm.stop()
        _kill(_cluster_pids(temp_dir))


class _open:
    """A JobStore for the duration of a `with` block."""

    def __init__(self, path: str) -> None:
        self.store = JobStore(path)

    def __enter__(self) -> JobStore:
        return self.store

    def __exit__(self, *exc: object) -> None:
        self.store.close()


def _events(url: str, job_id: str) -> list[dict[str, Any]]:
    from tests.test_api import parse_sse

    out = []
    for e in parse_sse(httpx.get(f"{url}/jobs/{job_id}/events", params={"follow": "false"}, timeout=30).text):
        e["type"] = e["event"]
        out.append(e)
    return out
