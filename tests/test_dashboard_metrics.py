"""The trainer-metrics reader and its HTTP endpoints (real files, real FastAPI app via httpx ASGI)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from dashboards.app import DASHBOARD_OPEN_PATHS, dashboard_router, job_critical_chain
from dashboards.metrics import RunNotFoundError, append_metrics, list_runs, parse_metrics_line, read_metrics, run_metrics_path, runs_dir
from swarm.config import Settings


def write_run(root: Path, name: str, lines: list[str]) -> Path:
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    f = d / "metrics.jsonl"
    f.write_text("".join(line + "\n" for line in lines))
    return f


def rec(step: int, **values: float) -> str:
    return json.dumps({"step": step, "time": 1000.0 + step, **values})


def test_parse_line_keeps_numbers_and_maps_nan_to_none() -> None:
    r = parse_metrics_line('{"step": 3, "time": 5.5, "reward": 0.25, "lambda1": 1, "r_perf": NaN, "phase": "warmup", "x": null}')
    assert r.step == 3 and r.time == 5.5
    assert r.values == {"reward": 0.25, "lambda1": 1.0, "r_perf": None, "x": None}


@pytest.mark.parametrize(
    "line, fragment",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"time": 1.0}', "'step' must be an integer"),
        ('{"step": -1, "time": 1.0}', "'step' must be an integer >= 0"),
        ('{"step": true, "time": 1.0}', "'step' must be an integer"),
        ('{"step": 1}', "'time' must be a finite number"),
        ('{"step": 1, "time": "noon"}', "'time' must be a finite number"),
    ],
)
def test_parse_line_errors_name_the_problem(line: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        parse_metrics_line(line)


def test_read_from_offsets_resumes_exactly(tmp_path: Path) -> None:
    f = write_run(tmp_path, "r1", [rec(0, reward=0.1), rec(1, reward=0.2)])
    first = read_metrics(f)
    assert [r.step for r in first.records] == [0, 1]
    assert first.next_offset == f.stat().st_size and first.next_line == 3 and first.eof
    # Nothing new: same offset, no records.
    again = read_metrics(f, first.next_offset, first.next_line)
    assert again.records == [] and again.next_offset == first.next_offset
    # The trainer appends a line and starts another (partial, no newline yet).
    with f.open("a") as fh:
        fh.write(rec(2, reward=0.3) + "\n" + '{"step": 3, "ti')
    second = read_metrics(f, first.next_offset, first.next_line)
    assert [r.step for r in second.records] == [2] and second.errors == []
    assert second.next_line == 4
    with f.open("a") as fh:
        fh.write('me": 1003.0, "reward": 0.4}\n')
    third = read_metrics(f, second.next_offset, second.next_line)
    assert [(r.step, r.values["reward"]) for r in third.records] == [(3, 0.4)]


def test_malformed_lines_are_reported_with_line_and_offset_and_skipped(tmp_path: Path) -> None:
    lines = [rec(0, reward=1.0), "garbage", "", rec(1, reward=2.0), '{"step": "x", "time": 1}']
    f = write_run(tmp_path, "bad", lines)
    chunk = read_metrics(f)
    assert [r.step for r in chunk.records] == [0, 1]
    assert [(e.line, e.offset) for e in chunk.errors] == [(2, len(lines[0]) + 1), (5, sum(len(x) + 1 for x in lines[:4]))]
    assert "line 2: not valid JSON" in chunk.errors[0].message
    assert "'step' must be an integer" in chunk.errors[1].message


def test_max_bytes_pages_through_a_file(tmp_path: Path) -> None:
    f = write_run(tmp_path, "big", [rec(i, reward=i / 10) for i in range(50)])
    steps: list[int] = []
    offset, line, reads = 0, 1, 0
    while True:
        c = read_metrics(f, offset, line, max_bytes=200)
        steps += [r.step for r in c.records]
        offset, line, reads = c.next_offset, c.next_line, reads + 1
        if c.eof:
            break
    assert steps == list(range(50)) and reads > 5 and line == 51


def test_bad_offsets_and_overlong_lines_are_clear_errors(tmp_path: Path) -> None:
    f = write_run(tmp_path, "r", [rec(0, reward=1.0)])
    with pytest.raises(ValueError, match="truncated"):
        read_metrics(f, offset=10_000)
    with pytest.raises(ValueError, match="offset must be >= 0"):
        read_metrics(f, offset=-1)
    with pytest.raises(ValueError, match="longer than 5 bytes"):
        read_metrics(f, max_bytes=5)


def test_several_runs_listed_and_names_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_run(tmp_path, "b-run", [rec(0)])
    write_run(tmp_path, "a-run", [rec(0)])
    (tmp_path / "no-metrics").mkdir()
    assert [r.name for r in list_runs(tmp_path)] == ["a-run", "b-run"]
    assert list_runs(tmp_path / "missing") == []
    with pytest.raises(RunNotFoundError, match="invalid run name"):
        run_metrics_path(tmp_path, "../etc")
    with pytest.raises(RunNotFoundError, match="no run 'zzz'"):
        run_metrics_path(tmp_path, "zzz")
    monkeypatch.setenv("SWARM_RUNS_DIR", str(tmp_path))
    assert runs_dir() == tmp_path
    monkeypatch.delenv("SWARM_RUNS_DIR")
    assert runs_dir() == Path("runs")


async def test_http_endpoints_page_metrics_and_guard_data_with_token(tmp_path: Path) -> None:
    write_run(tmp_path, "abl-0", [rec(0, reward=0.5, lambda1=1.0), "oops", rec(1, reward=0.6, lambda1=0.9)])
    write_run(tmp_path, "abl-1", [rec(0, reward=0.1)])
    app = FastAPI()
    app.include_router(dashboard_router(Settings(db_path=str(tmp_path / "x.db"), api_token="s3cret"), runs_root=tmp_path))
    auth = {"Authorization": "Bearer s3cret"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        # The shell loads without a token; data does not.
        page = await c.get("/dashboard")
        assert page.status_code == 200 and "/dashboard/static/app.js" in page.text
        for path in DASHBOARD_OPEN_PATHS:
            if path != "/dashboard/":
                assert (await c.get(path)).status_code == 200, path
        assert (await c.get("/dashboard/static/..%2Fapp.py")).status_code == 404
        assert (await c.get("/dashboard/api/runs")).status_code == 401
        assert (await c.get("/dashboard/api/runs", headers={"Authorization": "Bearer nope"})).status_code == 401
        runs = (await c.get("/dashboard/api/runs", headers=auth)).json()
        assert [r["name"] for r in runs["runs"]] == ["abl-0", "abl-1"]
        m = (await c.get("/dashboard/api/runs/abl-0/metrics", headers=auth)).json()
        assert [r["values"]["reward"] for r in m["records"]] == [0.5, 0.6]
        assert m["errors"][0]["line"] == 2 and "not valid JSON" in m["errors"][0]["message"]
        again = (await c.get(f"/dashboard/api/runs/abl-0/metrics?offset={m['next_offset']}&line={m['next_line']}", headers=auth)).json()
        assert again["records"] == [] and again["next_offset"] == m["next_offset"]
        missing = await c.get("/dashboard/api/runs/nope/metrics", headers=auth)
        assert missing.status_code == 404 and "no run 'nope'" in missing.json()["detail"]
        past = await c.get("/dashboard/api/runs/abl-1/metrics?offset=99999", headers=auth)
        assert past.status_code == 409 and "truncated" in past.json()["detail"]
        no_svc = await c.get("/dashboard/api/jobs/job-x/critical", headers=auth)
        assert no_svc.status_code == 503


def test_critical_chain_from_events_matches_the_documented_example() -> None:
    # docs/critical_steps.md example 4: 4 orchestrator calls; a(3), b(6) at stage 1; c(4) -> a, d(2) at stage 2.
    from swarm.events import SubAgentCreated, SubAgentStep

    evs: list = [SubAgentStep(job_id="j", agent_id="orchestrator", step=i) for i in range(1, 5)]
    for aid, stage, steps, deps in [("a", 1, 3, []), ("b", 1, 6, []), ("c", 2, 4, ["a"]), ("d", 2, 2, [])]:
        evs.append(SubAgentCreated(job_id="j", agent_id=aid, stage=stage, depends_on=deps))
        evs += [SubAgentStep(job_id="j", agent_id=aid, step=i) for i in range(1, steps + 1)]
    out = job_critical_chain(evs)
    assert out.chain == ["b", "c"] and out.critical_steps == 14 and out.total_steps == 19


def test_critical_chain_runs_through_the_copies_of_a_fan_out_node() -> None:
    from swarm.events import SubAgentCreated, SubAgentStep

    evs = [SubAgentCreated(job_id="j", agent_id="lister"), SubAgentStep(job_id="j", agent_id="lister", step=1),
           SubAgentCreated(job_id="j", agent_id="filler", depends_on=["lister"]),
           SubAgentCreated(job_id="j", agent_id="after", depends_on=["filler"])]
    for cid, steps in [("filler.1", 2), ("filler.2", 3)]:
        evs.append(SubAgentCreated(job_id="j", agent_id=cid, depends_on=["lister"], fan_out_of="filler"))
        evs += [SubAgentStep(job_id="j", agent_id=cid, step=i) for i in range(1, steps + 1)]
    evs.append(SubAgentStep(job_id="j", agent_id="after", step=1))
    out = job_critical_chain(evs)
    # The node waits for its slowest copy; the node itself makes no model call.
    assert out.chain == ["lister", "filler.2", "filler", "after"] and out.critical_steps == 5


def test_append_metrics_writes_what_the_reader_reads(tmp_path: Path) -> None:
    f = tmp_path / "run-a" / "metrics.jsonl"
    append_metrics(f, 0, {"reward": 0.5, "lambda1": 1.0, "r_perf": None}, time=10.0)
    append_metrics(f, 1, {"reward": 0.75})
    chunk = read_metrics(f)
    assert [(r.step, r.values) for r in chunk.records] == [(0, {"reward": 0.5, "lambda1": 1.0, "r_perf": None}), (1, {"reward": 0.75})]
    assert chunk.records[0].time == 10.0 and chunk.records[1].time > 1e9 and chunk.errors == []
    with pytest.raises(ValueError, match="not numeric: phase"):
        append_metrics(f, 2, {"phase": "warmup"})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="'step' must be an integer >= 0"):
        append_metrics(f, -1, {"reward": 1.0})
    with pytest.raises(ValueError, match="not inside values"):
        append_metrics(f, 3, {"step": 3})
    assert len(read_metrics(f).records) == 2  # nothing was written by the refused calls
