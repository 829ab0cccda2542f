"""JobStore: idempotent event appends, derived job state, interrupted marking, transactions."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from swarm.events import JobFinished, JobStarted, JobSubmitted, SubAgentCreated, SubAgentFinished
from swarm.plans import JobMetrics, JobSpec, JobState, SubAgentSpec, SwarmPlan
from swarm.store import JobStore, UnknownJobError


def _spec(name: str = "j") -> JobSpec:
    return JobSpec(name=name, plan=SwarmPlan(subagents=[SubAgentSpec(id="a", task="do a")]))


def _run_events(job_id: str) -> list:
    return [
        JobSubmitted(job_id=job_id, seq=1, name="j", mode="plan"),
        JobStarted(job_id=job_id, seq=2, ts=100.0),
        SubAgentCreated(job_id=job_id, seq=3, agent_id="a", task="do a"),
        SubAgentFinished(job_id=job_id, seq=4, agent_id="a", result="A", steps=1),
        JobFinished(job_id=job_id, seq=5, ts=101.5, state=JobState.succeeded, result="A",
                    metrics=JobMetrics(critical_steps=2, total_steps=2, subagents=1)),
    ]


@pytest.fixture
def store(tmp_path):
    s = JobStore(tmp_path / "sub" / "jobs.db")
    yield s
    s.close()


def test_create_and_get(store: JobStore, tmp_path) -> None:
    st = store.create_job("job-1", _spec("first"))
    assert st.state == JobState.queued and st.mode == "plan"
    got = store.get_job("job-1")
    assert got is not None and got.name == "first" and got.state == JobState.queued
    assert store.get_spec("job-1") == _spec("first")
    assert store.get_job("nope") is None
    assert (tmp_path / "sub" / "jobs.db").exists()  # parent dir created
    with pytest.raises(ValueError, match="already exists"):
        store.create_job("job-1", _spec())


def test_events_drive_state_and_appends_are_idempotent(store: JobStore) -> None:
    store.create_job("job-1", _spec())
    evs = _run_events("job-1")
    assert store.append_events("job-1", evs[:2]) == 2
    st = store.get_job("job-1")
    assert st.state == JobState.running and st.started_at == 100.0
    # Overlapping batch: seq 2 again plus the rest. Only new ones are stored.
    assert store.append_events("job-1", evs[1:]) == 3
    assert store.append_events("job-1", evs) == 0
    stored = store.events("job-1")
    assert [e.seq for e in stored] == [1, 2, 3, 4, 5]
    assert [e.type for e in stored] == [e.type for e in evs]
    assert store.last_seq("job-1") == 5
    assert [e.seq for e in store.events("job-1", after_seq=3)] == [4, 5]
    assert [e.seq for e in store.events("job-1", after_seq=1, limit=2)] == [2, 3]
    st = store.get_job("job-1")
    assert st.state == JobState.succeeded and st.result == "A" and st.finished_at == 101.5
    assert st.metrics.critical_steps == 2 and st.metrics.subagents == 1
    assert store.unfinished_jobs() == []


def test_event_job_id_filled_in(store: JobStore) -> None:
    store.create_job("job-1", _spec())
    store.append_events("job-1", [JobSubmitted(seq=1)])
    assert store.events("job-1")[0].job_id == "job-1"


def test_bad_batch_stores_nothing(store: JobStore) -> None:
    store.create_job("job-1", _spec())
    good = _run_events("job-1")
    with pytest.raises(ValueError, match="belongs to job 'other'"):
        store.append_events("job-1", [good[0], JobStarted(job_id="other", seq=2)])
    with pytest.raises(ValueError, match="seq starts at 1"):
        store.append_events("job-1", [good[0], JobStarted(job_id="job-1", seq=0)])
    with pytest.raises(UnknownJobError, match="unknown job 'ghost'"):
        store.append_events("ghost", [JobSubmitted(job_id="ghost", seq=1)])
    assert store.events("job-1") == []
    assert store.get_job("job-1").state == JobState.queued


def test_transaction_rolls_back_on_midway_failure(store: JobStore, monkeypatch) -> None:
    store.create_job("job-1", _spec())
    evs = _run_events("job-1")
    calls = {"n": 0}
    real = JobStore._insert_events

    def failing(self, c, job_id, batch):
        # Insert the first half for real, then fail, as a crash mid-batch would.
        real(self, c, job_id, batch[:3])
        calls["n"] += 1
        raise sqlite3.OperationalError("disk I/O error (simulated)")

    monkeypatch.setattr(JobStore, "_insert_events", failing)
    with pytest.raises(sqlite3.OperationalError):
        store.append_events("job-1", evs)
    monkeypatch.setattr(JobStore, "_insert_events", real)
    assert calls["n"] == 1
    assert store.events("job-1") == [] and store.get_job("job-1").state == JobState.queued
    assert store.append_events("job-1", evs) == 5


def test_mark_interrupted(store: JobStore) -> None:
    store.create_job("job-1", _spec())
    store.append_events("job-1", _run_events("job-1")[:3])
    assert [j.id for j in store.unfinished_jobs()] == ["job-1"]
    assert store.mark_interrupted("job-1", "the Ray cluster restarted") is True
    st = store.get_job("job-1")
    assert st.state == JobState.interrupted and st.error == "the Ray cluster restarted" and st.finished_at
    last = store.events("job-1")[-1]
    assert isinstance(last, JobFinished) and last.seq == 4 and last.state == JobState.interrupted
    # Already ended: nothing changes.
    assert store.mark_interrupted("job-1", "again") is False
    assert store.get_job("job-1").error == "the Ray cluster restarted"
    assert store.last_seq("job-1") == 4
    with pytest.raises(UnknownJobError):
        store.mark_interrupted("ghost", "x")


def test_list_filters_and_paging(store: JobStore) -> None:
    for i in range(5):
        store.create_job(f"job-{i}", _spec(f"n{i}"), created_at=1000.0 + i)
    store.append_events("job-1", _run_events("job-1"))
    store.append_events("job-3", _run_events("job-3")[:2])
    assert [j.id for j in store.list_jobs()] == ["job-4", "job-3", "job-2", "job-1", "job-0"]
    assert [j.id for j in store.list_jobs(limit=2, offset=1)] == ["job-3", "job-2"]
    assert [j.id for j in store.list_jobs(state="succeeded")] == ["job-1"]
    assert [j.id for j in store.list_jobs(state=JobState.running)] == ["job-3"]
    assert store.count_jobs() == 5 and store.count_jobs("queued") == 3
    with pytest.raises(ValueError):
        store.list_jobs(state="bogus")
    with pytest.raises(ValueError, match="limit and offset"):
        store.list_jobs(limit=-1)


def test_reopen_keeps_data_and_threads_share_store(tmp_path) -> None:
    path = tmp_path / "jobs.db"
    s = JobStore(path)
    s.create_job("job-1", _spec())
    evs = _run_events("job-1")

    def writer(k: int) -> None:  # several threads race to store the same events
        s.append_events("job-1", evs[k:] + evs[:k])

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s.close()
    s2 = JobStore(path)
    assert [e.seq for e in s2.events("job-1")] == [1, 2, 3, 4, 5]
    assert s2.get_job("job-1").state == JobState.succeeded
    s2.close()


def test_create_job_rejects_non_spec(store: JobStore) -> None:
    with pytest.raises(TypeError, match="JobSpec"):
        store.create_job("job-1", {"task": "x"})  # type: ignore[arg-type]
    assert store.count_jobs() == 0


def test_end_job_and_delete(store: JobStore) -> None:
    store.create_job("job-1", _spec())
    store.append_events("job-1", _run_events("job-1")[:2])
    with pytest.raises(ValueError, match="terminal state"):
        store.end_job("job-1", JobState.running, "x")
    assert store.end_job("job-1", JobState.failed, "could not start") is True
    st = store.get_job("job-1")
    assert st.state == JobState.failed and st.error == "could not start"
    assert store.events("job-1")[-1].seq == 3
    # A late JobStarted from the runtime never reopens an ended job.
    store.append_events("job-1", [JobStarted(job_id="job-1", seq=4)])
    assert store.get_job("job-1").state == JobState.failed
    assert store.delete_job("job-1") is True
    assert store.get_job("job-1") is None and store.events("job-1") == [] and store.last_seq("job-1") == 0
    assert store.delete_job("job-1") is False
