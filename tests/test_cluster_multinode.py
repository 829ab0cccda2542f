"""A two-node Ray cluster on one machine: sub-agents spread over both nodes, and a node lost mid-job.

The head (`swarm_head`, some `swarm_worker`) and a second node (`swarm_worker` only) are real
`ray start` processes on loopback with their own temp dir and ports, so they never touch another
cluster on the machine. The job is driven from a subprocess (this test process's Ray belongs to the
session fixture). The second node is then killed — its raylet and every process under it, by pid,
never `ray stop`, which would stop every Ray on the machine — and the job must still complete with
every sub-agent finished and its events dense.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
AGENTS = 8

DRIVER = r'''
import asyncio, json, os, sys, time
import ray, ray.cloudpickle, ray._private.state
from pydantic import BaseModel
import tests.scripted_policy
from swarm.events import JobFinished, SubAgentStarted, ToolCalled
from swarm.placement import PlacementConfig
from swarm.plans import JobSpec, Limits, SubAgentSpec, SwarmPlan
from swarm.runtime import SwarmRuntime
from tests.scripted_policy import script_task, scripted_llm_factory
from workers.tools import build_registry
from workers.tools.registry import Tool

address, workdir, n_agents = sys.argv[1], sys.argv[2], int(sys.argv[3])
ray.init(address=address, namespace="swarm-multinode", log_to_driver=False)
ray.cloudpickle.register_pickle_by_value(tests.scripted_policy)

class PathArgs(BaseModel):
    path: str

async def wait_file(args, ctx):
    while not os.path.exists(args.path):
        await asyncio.sleep(0.05)
    return "released"

def registry(config):  # defined in __main__, so it travels to the workers by value
    reg = build_registry(config)
    reg.register(Tool("wait_file", "test tool: wait until a file exists", PathArgs, wait_file))
    return reg

def actor_nodes():
    # The GCS actor table (no dashboard needed): live actor name -> node id.
    return {a["Name"]: a["Address"]["NodeID"] for a in ray._private.state.actors().values()
            if a["Name"] and a["State"] == "ALIVE"}

release = os.path.join(workdir, "release")
task = script_task({"steps": [[{"tool": "wait_file", "arguments": {"path": release}}]], "answer": "done"})
plan = SwarmPlan(subagents=[SubAgentSpec(id=f"a{i}", task=task, tools=["wait_file"]) for i in range(n_agents)])
rt = SwarmRuntime(namespace="swarm-multinode", num_workers=4, llm_factory=scripted_llm_factory,
                  registry_factory=registry, placement=PlacementConfig())
rt.start_job("job-multinode", JobSpec(plan=plan, limits=Limits(job_timeout_s=120)))

async def main():
    events, after = [], 0
    def poll_more():
        return rt.poll_events("job-multinode", after, 0.5)
    while len({e.agent_id for e in events if isinstance(e, ToolCalled)}) < n_agents:
        for e in await poll_more():
            events.append(e); after = e.seq
    placed = {"actors": actor_nodes(), "head": ray.get_runtime_context().get_node_id(),
              "host": rt.host_of("job-multinode"),
              "workers": {e.agent_id: e.worker for e in events if isinstance(e, SubAgentStarted)}}
    Path(workdir, "placed.json").write_text(json.dumps(placed))
    while not events or not isinstance(events[-1], JobFinished):
        for e in await poll_more():
            events.append(e); after = e.seq
    Path(workdir, "events.json").write_text(json.dumps([e.model_dump(mode="json") for e in events]))
    Path(workdir, "after.json").write_text(json.dumps({"actors": actor_nodes()}))

from pathlib import Path
asyncio.run(main())
rt.shutdown()
'''


def _procs() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process we can see."""
    out: dict[int, tuple[int, str]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        out[int(d)] = (ppid, cmd)
    return out


def _with_descendants(roots: set[int], procs: dict[int, tuple[int, str]]) -> set[int]:
    found = set(roots)
    grew = True
    while grew:
        grew = False
        for pid, (ppid, _) in procs.items():
            if ppid in found and pid not in found:
                found.add(pid)
                grew = True
    return found


def _cluster_pids(temp_dir: str) -> set[int]:
    """The processes of our cluster: those naming its temp dir, and everything they started."""
    procs = _procs()
    me = os.getpid()
    return _with_descendants({p for p, (_, c) in procs.items() if temp_dir in c and p != me}, procs)


def _kill(pids: set[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _ray_start(args: list[str], env: dict[str, str]) -> None:
    r = subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "start", *args, "--disable-usage-stats"],
                       env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, f"ray start {args} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"


@pytest.mark.timeout(300)
def test_subagents_spread_over_two_nodes_and_survive_losing_one(tmp_path: Path) -> None:
    temp_dir = f"/tmp/swarm-mn-{secrets.token_hex(4)}"  # short: Ray's socket paths have a length limit
    port = free_port()
    address = f"127.0.0.1:{port}"
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        # Our own token: both nodes and the driver must agree, whatever ~/.ray holds.
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        # Notice a dead node in a few seconds instead of the default ~30 s (not faster: on a loaded
        # machine a live raylet must not miss its checks).
        "RAY_health_check_period_ms": "1000",
        "RAY_health_check_timeout_ms": "2000",
        "RAY_health_check_failure_threshold": "4",
    }
    def common() -> list[str]:  # per node: each needs its own metrics port
        return ["--temp-dir", temp_dir, "--dashboard-agent-listen-port", "0", "--metrics-export-port", str(free_port())]

    driver: subprocess.Popen[str] | None = None
    try:
        _ray_start(["--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
                    "--include-dashboard=false", f"--ray-client-server-port={free_port()}",
                    '--resources={"swarm_head": 1, "swarm_worker": 4}', *common()], env)
        head_pids = _cluster_pids(temp_dir)
        _ray_start([f"--address={address}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
                    '--resources={"swarm_worker": 4}', *common()], env)
        node2_roots = _cluster_pids(temp_dir) - head_pids
        assert any("raylet" in _procs().get(p, (0, ""))[1] for p in node2_roots), "second raylet not found"

        (tmp_path / "driver.py").write_text(DRIVER)
        driver = subprocess.Popen([sys.executable, str(tmp_path / "driver.py"), address, str(tmp_path), str(AGENTS)],
                                  env=env, cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 150
        while not (tmp_path / "placed.json").exists():
            assert driver.poll() is None, f"driver exited early:\n{driver.stdout.read()[-4000:]}"
            assert time.monotonic() < deadline, "sub-agents did not all start"
            time.sleep(0.2)
        placed = json.loads((tmp_path / "placed.json").read_text())
        head_node = placed["head"]
        actors = placed["actors"]
        nodes_of_agents = {a: actors[w] for a, w in placed["workers"].items()}
        assert len(nodes_of_agents) == AGENTS
        # Sub-agents run on both nodes; the job's host actor sits on the head (it asked for swarm_head).
        assert len(set(nodes_of_agents.values())) == 2, nodes_of_agents
        assert actors[placed["host"]] == head_node
        lost = {a for a, n in nodes_of_agents.items() if n != head_node}

        # Lose the second node with its sub-agents mid-tool-call, then let the tools return.
        _kill(_with_descendants(node2_roots, _procs()))
        (tmp_path / "release").touch()

        out, _ = driver.communicate(timeout=120)
        assert driver.returncode == 0, out[-4000:]
        events = json.loads((tmp_path / "events.json").read_text())
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
        final = events[-1]
        assert final["type"] == "job_finished" and final["state"] == "succeeded", final
        finished = {e["agent_id"] for e in events if e["type"] == "subagent_finished"}
        assert finished == {f"a{i}" for i in range(AGENTS)}
        assert final["metrics"]["subagents"] == AGENTS
        retried = {e["agent_id"] for e in events if e["type"] == "subagent_retried"}
        assert retried == lost, "exactly the sub-agents of the lost node are re-dispatched"
        # Every re-dispatched attempt ran on a replacement worker on the surviving head node.
        after_actors = json.loads((tmp_path / "after.json").read_text())["actors"]
        last_worker = {}
        for e in events:
            if e["type"] == "subagent_started":
                last_worker[e["agent_id"]] = e["worker"]
        assert all(after_actors[last_worker[a]] == head_node for a in lost)
    finally:
        if driver is not None and driver.poll() is None:
            driver.kill()
            driver.wait(10)
        _kill(_cluster_pids(temp_dir))


# ---- placement options (pure functions) and admission (jobs queue when the cluster is full) --------

from swarm.placement import (  # noqa: E402
    PlacementConfig,
    job_actor_options,
    model_shard_resources,
    worker_actor_options,
)
from tests.net import free_port

CLUSTER = {"CPU": 40.0, "swarm_head": 1.0, "swarm_worker": 32.0, "swarm_model": 8.0, "GPU": 8.0}
LAPTOP = {"CPU": 8.0}


def test_placement_asks_for_resources_only_where_the_cluster_has_them() -> None:
    cfg = PlacementConfig()
    assert job_actor_options(cfg, CLUSTER) == {"resources": {"swarm_head": 0.001}}
    assert worker_actor_options(cfg, CLUSTER) == {"resources": {"swarm_worker": 1.0}, "scheduling_strategy": "SPREAD"}
    assert model_shard_resources(cfg, CLUSTER) == {"swarm_model": 1.0}
    # A laptop has none of the custom resources: nothing is asked for, so everything still fits.
    assert job_actor_options(cfg, LAPTOP) == {}
    assert worker_actor_options(cfg, LAPTOP) == {"scheduling_strategy": "SPREAD"}
    assert model_shard_resources(cfg, LAPTOP) == {}
    # "require" asks even before such a node exists (the autoscaler adds one); "off" never asks.
    req = PlacementConfig(mode="require", worker_strategy="DEFAULT", worker_amount=2)
    assert job_actor_options(req, LAPTOP) == {"resources": {"swarm_head": 0.001}}
    assert worker_actor_options(req, LAPTOP) == {"resources": {"swarm_worker": 2.0}}
    off = PlacementConfig(mode="off")
    assert job_actor_options(off, CLUSTER) == {} and model_shard_resources(off, CLUSTER) == {}
    renamed = PlacementConfig(head_resource="control", worker_resource=None)
    assert job_actor_options(renamed, {"control": 1}) == {"resources": {"control": 0.001}}
    assert worker_actor_options(renamed, CLUSTER) == {"scheduling_strategy": "SPREAD"}


def test_placement_settings_are_validated_with_clear_errors() -> None:
    from pydantic import ValidationError

    from swarm.config import Settings

    s = Settings.model_validate({"placement": {"mode": "require", "worker_resource": "cpu_pool"}, "max_running_jobs": 3})
    assert s.placement.mode == "require" and s.placement.worker_resource == "cpu_pool" and s.max_running_jobs == 3
    with pytest.raises(ValidationError, match="placement.mode"):
        Settings.model_validate({"placement": {"mode": "sometimes"}})
    with pytest.raises(ValidationError, match="max_running_jobs"):
        Settings.model_validate({"max_running_jobs": 0})
    with pytest.raises(ValidationError, match="bogus"):
        Settings.model_validate({"placement": {"bogus": 1}})


def test_jobs_beyond_the_limit_wait_queued_and_start_in_order(ray_local, tmp_path: Path) -> None:
    import httpx

    from swarm.api import create_app
    from swarm.config import Settings
    from tests.test_api import LiveServer, make_runtime, parse_sse, plan_job, wait_state

    settings = Settings(db_path=str(tmp_path / "q.db"), max_running_jobs=1)
    runtime = make_runtime()
    with LiveServer(create_app(settings, runtime=runtime)) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        ids = [c.post("/jobs", json=plan_job(f"q{i}", think_s=0.6)).json()["id"] for i in range(3)]
        dropped = c.post("/jobs", json=plan_job("dropped", think_s=0.6)).json()["id"]
        wait_state(c, ids[0], {"running"})
        # One runs; the others wait, visibly, with no actor started for them.
        assert [c.get(f"/jobs/{j}").json()["state"] for j in ids[1:] + [dropped]] == ["queued"] * 3
        assert not any(runtime.has_job(j) for j in ids[1:] + [dropped])
        assert c.get("/jobs", params={"state": "queued"}).json()["total"] == 3
        # A queued job can be cancelled: it ends at once and never starts.
        r = c.post(f"/jobs/{dropped}/cancel")
        assert r.status_code == 202 and r.json()["state"] == "cancelled"
        assert "while queued" in r.json()["error"]
        finals = [wait_state(c, j, timeout=120) for j in ids]
        assert [f["state"] for f in finals] == ["succeeded"] * 3
        # In submission order, and never two at once.
        for a, b in zip(finals, finals[1:]):
            assert a["finished_at"] <= b["started_at"]
        assert [e["event"] for e in parse_sse(c.get(f"/jobs/{dropped}/events").text)] == ["job_finished"]


async def test_queued_jobs_survive_a_service_restart(ray_local, tmp_path: Path) -> None:
    from swarm.config import Settings
    from swarm.plans import JobSpec, JobState
    from swarm.service import JobService
    from tests.test_api import make_runtime, plan_job

    settings = Settings(db_path=str(tmp_path / "r.db"), max_running_jobs=1)
    runtime = make_runtime()
    svc = JobService(settings, runtime, poll_timeout_s=0.2)
    await svc.start()
    first = await svc.submit(JobSpec.model_validate(plan_job("first", think_s=0.5)))
    waiting = await svc.submit(JobSpec.model_validate(plan_job("waiting")))
    assert svc.queued_jobs() == [waiting.id]
    await svc.stop()

    svc = JobService(settings, runtime, poll_timeout_s=0.2)
    await svc.start()  # re-attaches `first` and queues `waiting` again
    try:
        assert (await svc.wait(first.id, timeout=120)).state == JobState.succeeded
        done = await svc.wait(waiting.id, timeout=120)
        assert done.state == JobState.succeeded and done.started_at >= svc.get(first.id).finished_at
    finally:
        await svc.stop()


def test_ray_cluster_yaml_gives_each_node_type_the_resource_the_placement_asks_for() -> None:
    import yaml

    conf = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    for key in ("setup_commands", "head_start_ray_commands", "worker_start_ray_commands"):
        bad = [c for c in conf[key] if not isinstance(c, str)]
        assert not bad, f"{key}: entries YAML did not read as command strings (quote them): {bad}"
    cfg = PlacementConfig()
    types = conf["available_node_types"]
    assert types[conf["head_node_type"]]["resources"].get(cfg.head_resource, 0) >= 1
    assert types["cpu_worker"]["resources"].get(cfg.worker_resource, 0) >= cfg.worker_amount
    gpu = types["gpu_worker"]["resources"]
    assert gpu.get(cfg.model_resource) == gpu.get("GPU") == 8  # one unit per shard of a TP-8 replica
    assert any(f'"{cfg.head_resource}": 1' in c for c in conf["head_start_ray_commands"])


def test_model_shards_ask_for_the_model_resource_in_their_strict_pack_bundles(ray_local) -> None:
    from model_shards.model_runner import RunnerSpec
    from model_shards.shards import RayShardGroup

    # This cluster has no `swarm_model`: a replica that asks for it must not start anywhere else.
    extra = model_shard_resources(PlacementConfig(mode="require"))
    assert extra == {"swarm_model": 1.0}
    with pytest.raises(RuntimeError, match="could not place 2 shards of .*'swarm_model': 1.0"):
        RayShardGroup.create(RunnerSpec(preset="tiny", num_slots=2, max_len=64), tp=2, bundle_resources=extra,
                             ready_timeout_s=2)
    assert model_shard_resources(PlacementConfig()) == {}  # auto: nothing to ask for on this cluster


@pytest.mark.parametrize("args,message", [
    (["--tp", "2", "--shard-resources", "{nope"], "--shard-resources is not valid JSON"),
    (["--tp", "2", "--shard-resources", '{"swarm_model": -1}'], "positive number"),
    (["--tp", "1", "--shard-resources", '{"swarm_model": 1}'], "use it with --tp 2 or more"),
])
def test_model_serve_shard_resources_option_is_checked(args: list[str], message: str) -> None:
    from typer.testing import CliRunner

    from swarm.cli import app

    r = CliRunner().invoke(app, ["model", "serve", "--preset", "tiny", *args])
    assert r.exit_code != 0 and message in " ".join(r.output.split()), r.output  # rich wraps long lines
