"""Dashboard latency under a K2.5-sized job: 100 sub-agents, 1,500 tool calls (not a test).

Starts the real job service (Ray runtime with the scripted test LLM, SQLite store, uvicorn on
loopback) with the dashboard mounted, opens the job view in headless Chromium *before* the job
runs, and reads what the page recorded (window.__dash.perf):

- event -> screen: ms from an event's timestamp (set where it happened, in the job actor) to the
  first animation frame after the one that applied it; split into the part spent before the page
  received it (actor -> service -> store -> SSE) and the page's own share;
- frame budget while streaming: frame-to-frame times from requestAnimationFrame and long tasks
  (> 50 ms) from PerformanceObserver;
- replay: time to load and draw the finished job from the store.

Usage: python bench/dashboard_latency.py [--agents 100] [--calls-per-step 5] [--steps 3] [--think-s 0.3]
Needs Chromium and Playwright: scripts/install_browser.sh.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def plan(agents: int, calls_per_step: int, steps: int, think_s: float) -> dict[str, Any]:
    from tests.scripted_policy import script_task

    subs = []
    third = max(1, agents // 3)
    for i in range(agents):
        # Three dependency layers, like a wide search followed by merges.
        deps = [f"a{i - third:03d}"] if i >= third and i < 2 * third else []
        if i >= 2 * third:
            deps = [f"a{i - third:03d}"]
        calls = [[{"tool": "calculator", "arguments": {"expression": f"{i}+{k}"}} for k in range(calls_per_step)]
                 for _ in range(steps)]
        subs.append({"id": f"a{i:03d}", "name": f"agent-{i:03d}", "tools": ["calculator"], "depends_on": deps,
                     "system_prompt": f"You research item {i}.",
                     "task": script_task({"steps": calls, "answer": f"item {i}: {{results}}", "think_s": think_s})})
    return {"name": f"bench-{agents}", "plan": {"subagents": subs}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--agents", type=int, default=100)
    ap.add_argument("--calls-per-step", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--think-s", type=float, default=0.3, help="simulated model latency per step")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()

    import ray
    import ray.cloudpickle
    from playwright.sync_api import sync_playwright

    import tests.scripted_policy
    from swarm.config import Settings
    from swarm.runtime import SwarmRuntime
    from tests.scripted_policy import scripted_llm_factory
    from tests.test_api import LiveServer
    from tests.test_dashboard_browser import build_app

    ray.cloudpickle.register_pickle_by_value(tests.scripted_policy)
    ray.init(num_cpus=4, include_dashboard=False, namespace="dashboard-bench", log_to_driver=False)
    tmp = tempfile.mkdtemp(prefix="dash-bench-")
    os.environ.setdefault("SWARM_RUNS_DIR", tmp)
    settings = Settings(db_path=f"{tmp}/jobs.sqlite")
    app = build_app(settings, SwarmRuntime(llm_factory=scripted_llm_factory, num_workers=args.workers,
                                           namespace="dashboard-bench"))
    rows: list[tuple[str, str]] = []
    with LiveServer(app) as srv, sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        # Open the view first so the page streams the job live from its very first event.
        job_id = httpx.post(srv.url + "/jobs", json=plan(args.agents, args.calls_per_step, args.steps, args.think_s),
                            timeout=60).json()["id"]
        page.goto(f"{srv.url}/dashboard#/jobs/{job_id}")
        page.wait_for_function("window.__dash.model && window.__dash.model.finished", timeout=600_000, polling=200)
        page.wait_for_timeout(300)
        perf = page.evaluate("""() => { const p = window.__dash.perf, m = window.__dash.model;
            return {lat: p.latencies, recv: p.received, frames: p.frames, long: p.longTasks, flushes: p.flushes,
                    apply: p.batches.map(b => b.applyMs), dag: p.parts.map(x => x[0]), gantt: p.parts.map(x => x[1]), events: m.lastSeq, tools: m.toolCalls,
                    agents: m.agents.size - 1}; }""")
        st = httpx.get(f"{srv.url}/jobs/{job_id}").json()
        # Replay: a fresh page draws the finished job from the store.
        page2 = browser.new_page(viewport={"width": 1400, "height": 900})
        t0 = time.perf_counter()
        page2.goto(f"{srv.url}/dashboard#/jobs/{job_id}")
        page2.wait_for_function("window.__dash.model && window.__dash.model.finished", timeout=120_000, polling=50)
        page2.evaluate("() => new Promise(r => requestAnimationFrame(() => r()))")
        replay_s = time.perf_counter() - t0
        browser.close()

    lat, recv, frames = perf["lat"], perf["recv"], perf["frames"]
    own = [a - b for a, b in zip(sorted(lat), sorted(recv))]
    rows += [
        ("job", f"{perf['agents']} sub-agents, {perf['tools']:,} tool calls, {perf['events']:,} events, "
                f"wall {st['metrics']['wall_time_s']:.1f} s"),
        ("event → screen p50 / p99 / max", f"{pct(lat, 50):.0f} / {pct(lat, 99):.0f} / {max(lat):.0f} ms"),
        ("  of which before the page (actor → store → SSE) p50 / p99", f"{pct(recv, 50):.0f} / {pct(recv, 99):.0f} ms"),
        ("  of which in the page (queue → frame) p50 / p99", f"{pct(own, 50):.0f} / {pct(own, 99):.0f} ms"),
        ("DOM updates (coalesced flushes) for all events", f"{perf['flushes']:,} ({perf['events'] / max(1, perf['flushes']):.1f} events per flush)"),
        ("flush cost (apply + render) p50 / p99 / max", f"{pct(perf['apply'], 50):.1f} / {pct(perf['apply'], 99):.1f} / {max(perf['apply'] or [0]):.1f} ms"),
        ("  of which graph / timeline p99", f"{pct(perf['dag'], 99):.1f} / {pct(perf['gantt'], 99):.1f} ms"),
        ("frame time while streaming p50 / p99 / max", f"{pct(frames, 50):.1f} / {pct(frames, 99):.1f} / {max(frames or [0]):.1f} ms"),
        ("frames over 33 ms (2 frames at 60 Hz)", f"{sum(f > 33.4 for f in frames)} of {len(frames)}"),
        ("long tasks (> 50 ms)", f"{len(perf['long'])}" + (f", max {max(perf['long']):.0f} ms" if perf["long"] else "")),
        ("replay of the finished job (load → drawn)", f"{replay_s * 1000:.0f} ms"),
    ]
    print("| measure | value |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")
    ray.shutdown()


if __name__ == "__main__":
    main()
