"""The `swarm` CLI against a live test server (submit/status/list/events/cancel) and `run` in-process."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import httpx
import pytest
from rich.console import Console
from typer.testing import CliRunner

from swarm.api import create_app
from swarm.cli import app, load_job_file, run_spec
from swarm.client import Swarm, SwarmClientError
from swarm.config import Settings
from swarm.plans import JobSpec
from tests.scripted_policy import script_task
from tests.test_api import LiveServer, make_runtime, plan_job, slow_job, wait_state

runner = CliRunner()
JOB_ID = re.compile(r"job-[0-9a-f]{12}")


@pytest.fixture(scope="module")
def runtime(ray_local):
    return make_runtime()


@pytest.fixture(scope="module")
def server(runtime, tmp_path_factory):
    settings = Settings(db_path=str(tmp_path_factory.mktemp("cli") / "jobs.db"), api_token="tok")
    with LiveServer(create_app(settings, runtime=runtime)) as srv:
        yield srv


def swarm(server: LiveServer, *args: str):
    return runner.invoke(app, ["--server", server.url, "--token", "tok", *args])


def write(tmp_path: Path, name: str, data: object) -> Path:
    p = tmp_path / name
    p.write_text(json.dumps(data))
    return p


def test_submit_follow_status_list_events(server: LiveServer, tmp_path: Path) -> None:
    job = write(tmp_path, "job.json", plan_job("cli-plan"))
    r = swarm(server, "submit", str(job), "--follow")
    assert r.exit_code == 0, r.output
    job_id = JOB_ID.search(r.output).group(0)
    assert "succeeded" in r.output and "critical steps" in r.output and "A=5" in r.output

    r = swarm(server, "status", job_id)
    assert r.exit_code == 0 and "succeeded" in r.output and "metrics.critical_steps" in r.output
    r = swarm(server, "status", job_id, "--json")
    assert json.loads(r.output)["state"] == "succeeded"

    r = swarm(server, "list", "--state", "succeeded", "--json")
    assert r.exit_code == 0
    rows = [json.loads(line) for line in r.output.splitlines()]
    assert job_id in {x["id"] for x in rows} and all(x["state"] == "succeeded" for x in rows)
    r = swarm(server, "list", "--state", "running", "--json")
    assert job_id not in r.output
    r = swarm(server, "list")
    assert r.exit_code == 0 and job_id in r.output

    r = swarm(server, "events", job_id, "--json")
    assert r.exit_code == 0
    evs = [json.loads(line) for line in r.output.splitlines()]
    assert [e["seq"] for e in evs] == list(range(1, len(evs) + 1)) and evs[-1]["type"] == "job_finished"
    r = swarm(server, "events", job_id, "--after", str(len(evs) - 1))
    assert r.exit_code == 0 and len(r.output.splitlines()) == 1 and "job_finished" in r.output


def test_submit_task_and_cancel(server: LiveServer) -> None:
    task = script_task({"steps": [], "think_s": 30}, "slow orchestrator")
    r = swarm(server, "submit", "--task", task, "--name", "cli-slow")
    assert r.exit_code == 0, r.output
    job_id = JOB_ID.search(r.output).group(0)
    with httpx.Client(base_url=server.url, headers={"Authorization": "Bearer tok"}) as c:
        wait_state(c, job_id, {"running"})
        r = swarm(server, "cancel", job_id)
        assert r.exit_code == 0 and "cancelling" in r.output
        assert wait_state(c, job_id, timeout=20)["state"] == "cancelled"
    r = swarm(server, "cancel", job_id)
    assert r.exit_code == 1 and "409" in r.output and "already ended" in r.output
    r = swarm(server, "events", job_id, "--follow")  # ends by itself: the job is over
    assert r.exit_code == 0 and "job_finished" in r.output and "cancelled" in r.output


def test_cli_errors(server: LiveServer, tmp_path: Path) -> None:
    bad = write(tmp_path, "bad.json", {"plan": {"subagents": [{"id": "a", "task": ""}]}})
    r = swarm(server, "submit", str(bad))
    assert r.exit_code == 2 and "bad.json" in r.output and "plan.subagents.0.task" in r.output
    notjson = tmp_path / "broken.json"
    notjson.write_text("{oops")
    r = swarm(server, "submit", str(notjson))
    assert r.exit_code == 2 and "not valid JSON" in r.output
    r = swarm(server, "submit", str(tmp_path / "missing.json"))
    assert r.exit_code == 2 and "does not exist" in r.output
    r = swarm(server, "submit")
    assert r.exit_code == 2 and "exactly one of" in r.output
    invalid_plan = write(tmp_path, "cyc.json", {"plan": {"subagents": [
        {"id": "a", "task": "x", "depends_on": ["a"]}]}})
    r = swarm(server, "submit", str(invalid_plan))
    assert r.exit_code == 1 and "HTTP 400" in r.output and "invalid plan" in r.output
    r = swarm(server, "status", "job-nope")
    assert r.exit_code == 1 and "404" in r.output and "job-nope" in r.output
    r = runner.invoke(app, ["--server", server.url, "list"])  # no token
    assert r.exit_code == 1 and "401" in r.output
    r = swarm(server, "list", "--state", "bogus")
    assert r.exit_code == 2


def test_unreachable_server_message() -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    r = runner.invoke(app, ["--server", f"http://127.0.0.1:{port}", "list"])
    assert r.exit_code == 1 and "cannot reach the swarm service" in r.output and "swarm serve" in r.output
    with pytest.raises(SwarmClientError, match="cannot reach"):
        Swarm(f"http://127.0.0.1:{port}").status("job-x")


def test_python_client(server: LiveServer) -> None:
    with Swarm(server.url, token="tok") as sw:
        job_id = sw.submit(JobSpec.model_validate(plan_job("client")))
        st = sw.wait(job_id, timeout=60)
        assert st.state.value == "succeeded" and "B=20" in st.result
        evs = list(sw.events(job_id))
        assert [e.seq for e in evs] == list(range(1, len(evs) + 1))
        assert [e.seq for e in sw.events(job_id, follow=True, after=3)] == [e.seq for e in evs[3:]]
        assert job_id in {j.id for j in sw.list(state="succeeded")}
        slow = sw.submit(slow_job("client-slow"))
        assert sw.cancel(slow).id == slow
        assert sw.wait(slow, timeout=20).state.value == "cancelled"
        with pytest.raises(SwarmClientError, match="409"):
            sw.cancel(slow)
        pending = sw.submit(slow_job("client-timeout"))
        with pytest.raises(TimeoutError, match=pending):
            sw.wait(pending, timeout=0.3)
        sw.cancel(pending)
        with pytest.raises(SwarmClientError, match="HTTP 422") as e:
            sw.submit({"plan": {"subagents": "nope"}})
        assert e.value.status_code == 422


def test_load_job_file_yaml(tmp_path: Path) -> None:
    p = tmp_path / "job.yaml"
    p.write_text("name: y\ntask: do it\nlimits:\n  max_tool_calls: 7\n")
    spec = load_job_file(p)
    assert spec.task == "do it" and spec.limits.max_tool_calls == 7
    p.write_text("task: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_job_file(p)


def test_run_in_process(runtime) -> None:
    out = Console(record=True, width=120)
    assert run_spec(JobSpec.model_validate(plan_job("run-ok")), runtime, out=out) == 0
    text = out.export_text()
    assert "succeeded" in text and "critical steps" in text and "A=5" in text
    failing = {"plan": {"subagents": [{"id": "f", "task": script_task({"fail_always": True}), "tools": [],
                                       }]}, "limits": {"max_retries": 0}}
    out = Console(record=True, width=120)
    assert run_spec(JobSpec.model_validate(failing), runtime, out=out) == 1
    assert "failed" in out.export_text()
    cyclic = JobSpec.model_validate({"plan": {"subagents": [{"id": "a", "task": "x", "depends_on": ["a"]}]}})
    assert run_spec(cyclic, runtime, out=Console(record=True)) == 2


def test_run_command_rejects_bad_file(tmp_path: Path) -> None:
    bad = write(tmp_path, "job.json", {"task": "x", "limits": {"max_subagents": 0}})
    r = runner.invoke(app, ["run", str(bad)])
    assert r.exit_code == 2 and "job.json" in r.output and "limits.max_subagents" in r.output


def test_progress_view_folds_events() -> None:
    from swarm.events import (JobFinished, JobStarted, JobSubmitted, SubAgentCreated, SubAgentFailed,
                              SubAgentFinished, SubAgentStarted, SubAgentStep, ToolCalled, ToolResult)
    from swarm.plans import JobMetrics, JobState
    from swarm.progress import JobProgress, event_line

    p = JobProgress()
    evs = [
        JobSubmitted(job_id="job-1", seq=1, name="demo", spec={"limits": {"max_tool_calls": 40}}),
        JobStarted(job_id="job-1", seq=2, ts=100.0),
        *[SubAgentCreated(job_id="job-1", seq=3 + i, agent_id=a, name=f"agent {a}") for i, a in enumerate("abc")],
        SubAgentStarted(job_id="job-1", seq=6, agent_id="a"),
        SubAgentStarted(job_id="job-1", seq=7, agent_id="b"),
        SubAgentStep(job_id="job-1", seq=8, agent_id="a", step=2),
        ToolCalled(job_id="job-1", seq=9, agent_id="a", step=2, call_id="c1", tool="search", arguments="{}"),
        ToolResult(job_id="job-1", seq=10, agent_id="a", step=2, call_id="c1", tool="search", content="hit"),
        SubAgentFinished(job_id="job-1", seq=11, agent_id="b", result="B"),
        SubAgentFailed(job_id="job-1", seq=12, agent_id="c", error="boom", will_retry=False),
    ]
    for ev in evs:
        p.update(ev)
    con = Console(record=True, width=120)
    con.print(p)
    live = con.export_text()
    assert "job-1" in live and "demo" in live and "2/3" in live and "1/40" in live
    assert "agent a" in live and "search" in live and "agent b" not in live  # only running agents listed
    p.update(JobFinished(job_id="job-1", seq=13, ts=103.5, state=JobState.failed, error="c failed",
                         metrics=JobMetrics(critical_steps=7, subagents=3)))
    assert p.elapsed() == 3.5
    con = Console(record=True, width=120)
    con.print(p.summary())
    end = con.export_text()
    assert "failed" in end and "critical steps" in end and "7" in end and "c failed" in end
    line = event_line(evs[8])
    assert "tool_call" in line and "search" in line and line.lstrip().startswith("9")
