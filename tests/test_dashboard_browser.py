"""The dashboard in a real browser: Debian's Chromium driven by Playwright against the real job
service (uvicorn on loopback, Ray runtime, SQLite store). The only test double is the LLM
(tests.scripted_policy.ScriptedTestPolicy). scripts/install_browser.sh provides Chromium and
Playwright; the `browser` fixture runs it when either is missing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from dashboards.app import DASHBOARD_OPEN_PATHS, dashboard_router
from swarm.api import create_app
from swarm.config import Settings
from tests.scripted_policy import script_task, scripted_llm_factory
from tests.test_api import LiveServer

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
TOKEN = "dash-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ARTIFACTS = ROOT / "artifacts"


def _ensure_browser() -> None:
    try:
        import playwright.sync_api  # noqa: F401

        have_pw = True
    except ImportError:
        have_pw = False
    if have_pw and Path(CHROMIUM).exists():
        return
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "install_browser.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, f"scripts/install_browser.sh failed:\n{proc.stdout}\n{proc.stderr}"


def build_app(settings: Settings, runtime: Any) -> Any:
    """The service app with the dashboard. create_app mounts it itself once the one-line hook is in
    (see docs/dashboard.md); until then the test mounts it and opens the shell's paths the same way."""
    app = create_app(settings, runtime=runtime)
    if not any(getattr(r, "path", "").startswith("/dashboard") for r in app.routes):
        app.include_router(dashboard_router(settings))
        for mw in app.user_middleware:
            if getattr(mw.cls, "__name__", "") == "BearerAuth":
                mw.kwargs["open_paths"] = ("/healthz", *DASHBOARD_OPEN_PATHS)
    return app


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("runs")
    old = os.environ.get("SWARM_RUNS_DIR")
    os.environ["SWARM_RUNS_DIR"] = str(root)
    yield root
    if old is None:
        os.environ.pop("SWARM_RUNS_DIR", None)
    else:
        os.environ["SWARM_RUNS_DIR"] = old


@pytest.fixture(scope="module")
def server(ray_local: Any, tmp_path_factory: pytest.TempPathFactory, runs_root: Path) -> Iterator[LiveServer]:
    from swarm.runtime import SwarmRuntime

    settings = Settings(db_path=str(tmp_path_factory.mktemp("dashdb") / "jobs.sqlite"), api_token=TOKEN)
    app = build_app(settings, SwarmRuntime(llm_factory=scripted_llm_factory, num_workers=2))
    with LiveServer(app) as srv:
        yield srv


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    _ensure_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser: Any, server: LiveServer) -> Iterator[Any]:
    ctx = browser.new_context(viewport={"width": 1400, "height": 900})
    pg = ctx.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(server.url + "/dashboard#/jobs")
    pg.fill("#token", TOKEN)  # the login field: stored in localStorage, sent as a bearer header
    pg.click("#login button")
    yield pg
    ctx.close()
    assert errors == [], f"JavaScript errors on the page: {errors}"


def wait_finished(page: Any, state: str, timeout_ms: int) -> None:
    """Wait until the page has applied the job's job_finished event, then check the state it shows."""
    page.wait_for_function("window.__dash.model && window.__dash.model.finished", timeout=timeout_ms)
    assert page.text_content("#job-state") == state


def calc_steps(n_steps: int, calls: int, base: int = 1) -> list[list[dict[str, Any]]]:
    return [[{"tool": "calculator", "arguments": {"expression": f"{base}+{k}"}} for k in range(calls)] for _ in range(n_steps)]


def submit(server: LiveServer, spec: dict[str, Any]) -> str:
    r = httpx.post(server.url + "/jobs", json=spec, headers=AUTH, timeout=30)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def wait_job(server: LiveServer, job_id: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = httpx.get(f"{server.url}/jobs/{job_id}", headers=AUTH).json()
        if st["state"] in ("succeeded", "failed", "cancelled", "interrupted"):
            return st
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish in {timeout} s")


@pytest.fixture(scope="module")
def small_job_spec(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    marker = tmp_path_factory.mktemp("retry") / "failed-once"
    table = "| city | value |\n|---|---|\n| Oslo | {results} |\n\n<img src=x onerror=\"window.__xss=1\">"
    return {
        "name": "dash-small",
        "limits": {"retry_backoff_s": 0.3},
        "plan": {
            "subagents": [
                {"id": "fetch-a", "name": "fetch-a", "system_prompt": "You fetch A.", "tools": ["calculator"],
                 "task": script_task({"steps": calc_steps(2, 2, 10), "answer": "A done", "think_s": 1.5})},
                {"id": "fetch-b", "name": "fetch-b", "system_prompt": "You fetch B.", "tools": ["calculator"],
                 "task": script_task({"steps": calc_steps(1, 1, 20), "answer": "B done", "think_s": 0.3,
                                      "fail_once_file": str(marker)})},
                {"id": "merge", "name": "merge", "system_prompt": "You merge.", "tools": ["calculator"],
                 "depends_on": ["fetch-a", "fetch-b"],
                 "task": script_task({"steps": calc_steps(1, 1, 40), "answer": table, "think_s": 0.2})},
            ]
        },
    }


def test_live_graph_node_panel_critical_path_and_answer(page: Any, server: LiveServer, small_job_spec: dict[str, Any]) -> None:
    job_id = submit(server, small_job_spec)
    row = page.wait_for_selector(f'#jobs-body tr[data-id="{job_id}"]', timeout=15_000)
    row.click()
    page.wait_for_selector('#dag .node[data-id="merge"]', timeout=15_000)
    # Live: some agent is seen running before the job ends (fetch-a thinks 3 x 1.5 s, long enough
    # to be seen even on a loaded machine).
    page.wait_for_selector('#dag .node[data-state="running"]', timeout=15_000)
    wait_finished(page, "succeeded", 30_000)
    st = wait_job(server, job_id)
    m = st["metrics"]
    states = page.eval_on_selector_all("#dag .node", "els => els.map(e => [e.dataset.id, e.dataset.state])")
    assert sorted(states) == [["fetch-a", "done"], ["fetch-b", "done"], ["merge", "done"], ["orchestrator", "done"]]
    # Counters equal the job's own metrics; speedup = total / critical.
    assert page.text_content('[data-c="critical"]') == str(m["critical_steps"])
    assert page.text_content('[data-c="total"]') == str(m["total_steps"])
    assert page.text_content('[data-c="speedup"]') == f"{m['total_steps'] / m['critical_steps']:.2f}×"
    assert page.text_content('[data-c="tools"]') == str(m["tool_calls"])
    # The chain computed in the browser is the one swarm.critical_steps computes on the server.
    js = page.evaluate("() => { const c = window.__dash.view.crit; return {chain: c.chain, critical: c.critical, total: c.total}; }")
    py = httpx.get(f"{server.url}/dashboard/api/jobs/{job_id}/critical", headers=AUTH).json()
    assert js["chain"] == py["chain"] == ["fetch-a", "merge"]
    assert js["critical"] == py["critical_steps"] == m["critical_steps"]
    assert js["total"] == py["total_steps"] == m["total_steps"]
    crit_nodes = page.eval_on_selector_all("#dag .node.crit", "els => els.map(e => e.dataset.id).sort()")
    assert crit_nodes == ["fetch-a", "merge"]
    assert page.eval_on_selector_all("#gantt .row.crit", "els => els.length") == 2
    # The retried agent: two attempts, a retry badge, and retries listed in its panel.
    assert page.text_content('#dag .node[data-id="fetch-b"] .steps').startswith("↻1")
    page.click('#dag .node[data-id="fetch-b"]')
    panel = page.wait_for_selector("#panel:not([hidden])")
    assert "Retries" in panel.text_content() and "scripted failure" in panel.text_content()
    # The merge agent's panel: role, task, steps with tool call arguments and results.
    page.click('#dag .node[data-id="merge"]')
    page.wait_for_function("document.querySelector('#panel-body h2').textContent === 'merge'")
    text = page.text_content("#panel-body")
    assert "You merge." in text and "calculator" in text and '"expression": "40+0"' in text and "40" in text
    assert "reasoning" in text and "prompt +" in text
    # Timeline: one row per agent plus the orchestrator, one mark per tool call.
    assert page.eval_on_selector_all("#gantt .row", "els => els.length") == 4
    assert page.eval_on_selector_all("#gantt .mark", "els => els.length") == m["tool_calls"]
    # Final answer: the markdown table is an HTML table; the <img> stays text (escaped), never runs.
    page.click("#panel-close")
    assert page.text_content("#answer table tbody td") == "Oslo"
    assert page.eval_on_selector_all("#answer img", "els => els.length") == 0
    assert "<img src=x" in page.text_content("#answer")
    assert page.evaluate("window.__xss") is None


def test_cancel_from_the_page_stops_the_job(page: Any, server: LiveServer) -> None:
    slow = script_task({"steps": calc_steps(1, 1), "answer": "never", "think_s": 60})
    spec = {"name": "dash-cancel", "plan": {"subagents": [
        {"id": "slow", "task": slow, "tools": ["calculator"]},
        {"id": "after", "task": slow, "tools": ["calculator"], "depends_on": ["slow"]},
    ]}}
    # Submit through the page's own form.
    page.click("#new-job-toggle")
    page.fill("#new-job-spec", json.dumps(spec))
    page.click("#new-job button[type=submit]")
    page.wait_for_function("location.hash.startsWith('#/jobs/job-')", timeout=15_000)
    job_id = page.evaluate("decodeURIComponent(location.hash.slice(7))")
    page.wait_for_selector('#dag .node[data-id="slow"][data-state="running"]', timeout=20_000)
    assert page.get_attribute('#dag .node[data-id="after"]', "data-state") == "pending"
    page.click("#cancel-job")
    wait_finished(page, "cancelled", 30_000)
    assert wait_job(server, job_id, timeout=10)["state"] == "cancelled"
    states = dict(page.eval_on_selector_all("#dag .node", "els => els.map(e => [e.dataset.id, e.dataset.state])"))
    assert states["slow"] == "cancelled" and states["after"] == "cancelled"
    assert page.is_disabled("#cancel-job")
    # Stopped means stopped: the wall clock no longer advances.
    wall = page.text_content('[data-c="wall"]')
    page.wait_for_timeout(1200)
    assert page.text_content('[data-c="wall"]') == wall
    # The jobs list filters by status.
    page.click('[data-nav="jobs"]')
    page.select_option("#state-filter", "cancelled")
    page.wait_for_selector(f'#jobs-body tr[data-id="{job_id}"]')
    page.wait_for_function("[...document.querySelectorAll('#jobs-body tr[data-state]')].every(r => r.dataset.state === 'cancelled')")
    page.select_option("#state-filter", "succeeded")
    page.wait_for_selector(f'#jobs-body tr[data-id="{job_id}"]', state="detached")


def test_stream_resumes_after_a_disconnect_without_duplicates(page: Any, server: LiveServer, small_job_spec: dict[str, Any]) -> None:
    spec = dict(small_job_spec, name="dash-resume", limits={})
    spec["plan"] = {"subagents": [s for s in small_job_spec["plan"]["subagents"] if s["id"] == "fetch-a"]}
    job_id = submit(server, spec)
    st = wait_job(server, job_id)
    n_events = len(httpx.get(f"{server.url}/jobs/{job_id}/events?follow=false", headers=AUTH).text.split("\n\n")) - 1
    urls: list[str] = []

    def cut_first_stream(route: Any) -> None:
        urls.append(route.request.url)
        if len(urls) > 1:
            route.continue_()
            return
        body = route.fetch().text()
        frames = body.split("\n\n")[:5]  # the connection "drops" after 5 events
        route.fulfill(status=200, headers={"content-type": "text/event-stream"}, body="\n\n".join(frames) + "\n\n")

    page.route("**/jobs/*/events*", cut_first_stream)
    page.goto(f"{server.url}/dashboard#/jobs/{job_id}")
    page.wait_for_function("window.__dash.model && window.__dash.model.finished", timeout=20_000)
    assert len(urls) == 2 and urls[1].endswith("after=5")
    model = page.evaluate("() => ({seq: window.__dash.model.lastSeq, tools: window.__dash.model.toolCalls})")
    assert model == {"seq": n_events, "tools": st["metrics"]["tool_calls"]}
    assert page.text_content('[data-c="tools"]') == str(st["metrics"]["tool_calls"])


def test_a_stream_that_ends_without_job_finished_settles_from_the_job_status(page: Any, server: LiveServer,
                                                                               small_job_spec: dict[str, Any]) -> None:
    spec = dict(small_job_spec, name="dash-cut", limits={})
    spec["plan"] = {"subagents": [s for s in small_job_spec["plan"]["subagents"] if s["id"] == "fetch-a"]}
    job_id = submit(server, spec)
    wait_job(server, job_id)
    urls: list[str] = []
    body: list[str] = []

    def always_cut(route: Any) -> None:  # like a service that ended the job without a job_finished event
        urls.append(route.request.url)
        if not body:
            body.append("\n\n".join(route.fetch().text().split("\n\n")[:4]) + "\n\n")
        route.fulfill(status=200, headers={"content-type": "text/event-stream"}, body=body[0])  # never more

    page.route("**/jobs/*/events*", always_cut)
    page.goto(f"{server.url}/dashboard#/jobs/{job_id}")
    wait_finished(page, "succeeded", 15_000)
    page.wait_for_function("document.getElementById('stream-state').textContent === 'job ended'")
    page.wait_for_timeout(800)
    assert len(urls) == 2  # one reconnect that brings nothing new, then no loop: the status says it is over
    assert page.get_attribute('#dag .node[data-id="fetch-a"]', "data-state") == "failed"  # it never reported finishing


def big_plan(n: int = 100, calls_per_step: int = 5, steps: int = 3, think_s: float = 0.05) -> dict[str, Any]:
    """n agents in three dependency layers, n*calls_per_step*steps tool calls (1,500 by default)."""
    subs = []
    for i in range(n):
        deps = [f"a{i - 60:02d}", f"a{i - 30:02d}"] if 60 <= i < 90 else [f"a{i - 30:02d}"] if i >= 90 else []
        subs.append({
            "id": f"a{i:02d}", "name": f"agent-{i:02d}", "system_prompt": f"You research item {i}.",
            "tools": ["calculator"], "depends_on": deps,
            "task": script_task({"steps": calc_steps(steps, calls_per_step, i), "answer": f"item {i}: {{results}}",
                                 "think_s": think_s}),
        })
    return {"name": "wide-100", "plan": {"subagents": subs}}


def test_100_node_job_renders_legibly_and_coalesces_updates(page: Any, server: LiveServer) -> None:
    job_id = submit(server, big_plan())
    page.goto(f"{server.url}/dashboard#/jobs/{job_id}")
    wait_finished(page, "succeeded", 90_000)
    st = wait_job(server, job_id)
    assert st["metrics"]["tool_calls"] == 1500 and st["metrics"]["subagents"] == 100, st["metrics"]
    assert page.eval_on_selector_all('#dag .node[data-state="done"]', "els => els.length") == 101
    assert page.text_content('[data-c="tools"]') == "1,500"
    perf = page.evaluate("() => ({flushes: window.__dash.perf.flushes, seq: window.__dash.model.lastSeq})")
    # Coalescing: thousands of events, far fewer DOM updates.
    assert perf["seq"] > 3000 and perf["flushes"] * 3 < perf["seq"], perf
    # Nodes do not overlap: the layout wraps tall layers into columns.
    boxes = page.eval_on_selector_all("#dag .node", "els => els.map(e => { const r = e.getBoundingClientRect(); return [r.x, r.y, r.width, r.height]; })")
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert a[0] + a[2] <= b[0] + 0.5 or b[0] + b[2] <= a[0] + 0.5 or a[1] + a[3] <= b[1] + 0.5 or b[1] + b[3] <= a[1] + 0.5
    # "fit" zooms the graph to the pane's width.
    page.click('[data-zoom="fit"]')
    fit = page.evaluate("() => [document.getElementById('dag').getBoundingClientRect().width, document.getElementById('dag-wrap').clientWidth]")
    assert fit[0] <= fit[1]
    page.click('[data-zoom="in"]')
    assert page.evaluate("document.getElementById('dag').getBoundingClientRect().width") > fit[0]
    page.click('[data-zoom="fit"]')
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "dashboard-100.png"
    page.screenshot(path=str(shot))
    from PIL import Image, ImageStat

    with Image.open(shot) as im:
        rgb = im.convert("RGB")
        colours = rgb.getcolors(maxcolors=1 << 20) or []
        stddev = ImageStat.Stat(rgb).stddev
    assert len(colours) > 200, f"screenshot looks blank: {len(colours)} distinct colours"
    assert min(stddev) > 20, f"screenshot looks blank: per-channel stddev {stddev}"


def write_metrics(path: Path, steps: range, anneal: bool, extra: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        for s in steps:
            lam = max(0.0, 1 - s / 30) if anneal else 1.0
            fh.write(json.dumps({"step": s, "time": 1_700_000_000 + s, "reward": 0.2 + 0.02 * s, "r_parallel": 0.5,
                                 "r_finish": 0.4 + 0.01 * s, "r_perf": 0.1 + 0.015 * s, "lambda1": lam, "lambda2": lam,
                                 "critical_steps": 30 - s / 2, "item_f1": 0.5 + 0.01 * s, "subagents_per_task": 3 + s / 5,
                                 "rollouts_per_s": 4.0}) + "\n")
        fh.write(extra)


def test_training_view_overlays_runs_and_follows_new_lines(page: Any, runs_root: Path) -> None:
    write_metrics(runs_root / "anneal" / "metrics.jsonl", range(20), anneal=True)
    write_metrics(runs_root / "fixed-lambda" / "metrics.jsonl", range(20), anneal=False, extra="this is not json\n")
    page.click('[data-nav="training"]')
    page.wait_for_selector('#runs input[data-run="fixed-lambda"]')
    page.wait_for_selector('[data-chart="Reward terms"] path.series')
    page.wait_for_function("document.querySelectorAll('[data-chart=\"Reward terms\"] path.series').length === 8")
    for title, n in [("λ schedule", 4), ("Critical steps", 2), ("Item-F1", 2), ("Sub-agents per task", 2), ("Rollouts / s", 2)]:
        assert page.eval_on_selector_all(f'[data-chart="{title}"] path.series', "els => els.length") == n, title
    assert "fixed-lambda: line 21: not valid JSON" in page.text_content("#metric-errors")
    # Live: appended lines show up at the next poll, read from the last offset.
    write_metrics(runs_root / "anneal" / "metrics.jsonl", range(20, 25), anneal=True)
    lam = '[data-chart="λ schedule"] path.series[data-run="anneal"][data-field="lambda1"]'
    page.wait_for_function(f"document.querySelector('{lam}').getAttribute('d').split('L').length === 25", timeout=10_000)
    assert page.evaluate("window.__dash.training.runs.get('anneal').records.length") == 25
    # Hovering a chart shows each curve's value at the nearest step.
    box = page.query_selector('[data-chart="Item-F1"] svg').bounding_box()
    page.mouse.move(box["x"] + box["width"] - 12, box["y"] + box["height"] / 2)
    tip = page.wait_for_selector('[data-chart="Item-F1"] .tip:not([hidden])')
    assert "step 24" in tip.text_content() and "anneal · item_f1: 0.74" in tip.text_content()
    # Unchecking a run removes its curves (ablation overlay by checkbox).
    page.uncheck('#runs input[data-run="fixed-lambda"]')
    page.wait_for_function("document.querySelectorAll('path.series[data-run=\"fixed-lambda\"]').length === 0")
    assert page.eval_on_selector_all('path.series[data-run="anneal"]', "els => els.length") == 10
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "dashboard-training.png"), full_page=True)


def test_shell_loads_without_token_but_data_needs_it(server: LiveServer) -> None:
    assert httpx.get(server.url + "/dashboard").status_code == 200
    assert httpx.get(server.url + "/dashboard/static/app.js").status_code == 200
    assert httpx.get(server.url + "/jobs").status_code == 401
    assert httpx.get(server.url + "/dashboard/api/runs").status_code == 401
    assert httpx.get(server.url + "/dashboard/api/runs", headers=AUTH).status_code == 200


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
