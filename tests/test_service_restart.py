"""The service restarts on the same store: finished jobs stay, running jobs are re-attached with no
event lost or duplicated, jobs without a live actor are marked interrupted."""

from __future__ import annotations

import threading

import httpx
import pytest

from swarm.api import create_app
from swarm.client import Swarm
from swarm.config import Settings
from swarm.events import JobStarted, JobSubmitted
from swarm.plans import JobSpec
from swarm.service import INTERRUPTED_ON_START
from swarm.store import JobStore
from tests.test_api import LiveServer, make_runtime, parse_sse, plan_job, wait_state


@pytest.fixture(scope="module")
def runtime(ray_local):
    return make_runtime()


def _events(c: httpx.Client, job_id: str) -> list[dict]:
    return parse_sse(c.get(f"/jobs/{job_id}/events").text)


def test_restart_keeps_finished_reattaches_running_and_interrupts_orphans(runtime, tmp_path) -> None:
    settings = Settings(db_path=str(tmp_path / "jobs.db"))
    followed: list = []

    with LiveServer(create_app(settings, runtime=runtime)) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        done = c.post("/jobs", json=plan_job("finished-before")).json()["id"]
        assert wait_state(c, done)["state"] == "succeeded"
        done_events = _events(c, done)
        # Three model calls of 1.5 s per agent: a few seconds of work, most of it after the restart.
        running = c.post("/jobs", json=plan_job("spans-restart", think_s=1.5, steps=2)).json()["id"]
        wait_state(c, running, {"running"})
        seen_before = len(_events_snapshot(c, running))
        assert seen_before >= 2
        port = srv.port
        # A Python client follows the job live; its stream breaks with the restart, and it must
        # reconnect to the new server and resume after the last event it saw.
        follower = threading.Thread(target=lambda: followed.extend(Swarm(srv.url).events(running, follow=True)))
        follower.start()
        assert _eventually(lambda: len(followed) >= 2)

    # While no service runs: a job is recorded as running but no actor exists for it.
    store = JobStore(settings.db_path)
    assert store.get_job(running).state.value == "running", "the job should still be running across the restart"
    stored_before = store.last_seq(running)
    # A job that had started (its first events are stored) but whose job host is gone. (A job with
    # no events at all was never started and is queued again instead: see test_cluster_multinode.)
    store.create_job("job-orphan", JobSpec(task="lost"))
    store.append_events("job-orphan", [JobSubmitted(job_id="job-orphan", seq=1), JobStarted(job_id="job-orphan", seq=2)])
    store.close()
    assert runtime.has_job(running), "the job actor should outlive the service"
    assert follower.is_alive(), "the following client should be waiting to reconnect"

    with LiveServer(create_app(settings, runtime=runtime), port=port) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        listed = {j["id"]: j for j in c.get("/jobs").json()["jobs"]}
        assert listed[done]["state"] == "succeeded"
        assert _events(c, done) == done_events

        orphan = c.get("/jobs/job-orphan").json()
        assert orphan["state"] == "interrupted" and orphan["error"] == INTERRUPTED_ON_START
        orphan_events = _events(c, "job-orphan")  # the stream ends: a final job_finished was recorded
        assert [e["event"] for e in orphan_events] == ["job_submitted", "job_started", "job_finished"]
        assert [int(e["id"]) for e in orphan_events] == [1, 2, 3]
        assert orphan_events[-1]["data"]["state"] == "interrupted"

        st = wait_state(c, running, timeout=60)
        assert st["state"] == "succeeded", st
        evs = _events(c, running)
        seqs = [int(e["id"]) for e in evs]
        assert seqs == list(range(1, len(evs) + 1)), "events lost or duplicated across the restart"
        assert len(evs) > stored_before >= seen_before
        types = [e["event"] for e in evs]
        assert types.count("job_submitted") == 1 and types.count("job_finished") == 1 and types[-1] == "job_finished"
        assert types.count("subagent_finished") == 3 and types.count("tool_call") == 5  # a, b: 2 each; c: 1
        assert "A=5" in st["result"]
        follower.join(30)
        assert not follower.is_alive()
        assert [e.seq for e in followed] == seqs, "the client lost or repeated events across its reconnect"
        # After its events are stored, the finished job's actor is released.
        deadline_ok = _eventually(lambda: not runtime.has_job(running))
        assert deadline_ok, "finished job actor was not released"


def _events_snapshot(c: httpx.Client, job_id: str) -> list[dict]:
    return parse_sse(c.get(f"/jobs/{job_id}/events", params={"follow": "false"}).text)


def _eventually(pred, timeout: float = 20.0) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.1)
    return False


def test_job_whose_actor_dies_is_marked_interrupted(runtime, tmp_path) -> None:
    import ray

    from tests.test_api import slow_job

    settings = Settings(db_path=str(tmp_path / "jobs.db"))
    with LiveServer(create_app(settings, runtime=runtime)) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        job_id = c.post("/jobs", json=slow_job("doomed")).json()["id"]
        wait_state(c, job_id, {"running"})
        # The job runs inside a job host actor; killing the host loses the job (and its events).
        ray.kill(ray.get_actor(runtime.host_of(job_id), namespace=runtime.namespace))
        st = wait_state(c, job_id, timeout=30)
        assert st["state"] == "interrupted" and "actor disappeared" in st["error"]
        evs = _events(c, job_id)  # the stream still ends, with the recorded interruption
        assert [int(e["id"]) for e in evs] == list(range(1, len(evs) + 1))
        assert evs[-1]["event"] == "job_finished" and evs[-1]["data"]["state"] == "interrupted"
        assert c.post(f"/jobs/{job_id}/cancel").status_code == 409
