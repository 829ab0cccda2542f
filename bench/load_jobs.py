"""Load benchmark: many concurrent jobs through the job service on local Ray.

  python bench/load_jobs.py                      # 50 jobs x 20 sub-agents, prints a markdown table
  python bench/load_jobs.py --jobs 10 --agents 5 # a quick run

Each job is a two-level DAG: `agents - agents//4` independent sub-agents, then `agents//4` that
depend on all of them; every sub-agent makes `calls` sequential tool calls of `sleep_s` each. With
an instant model the critical-path lower bound of a job is 2 x calls x sleep_s, whatever the
number of agents. All jobs are submitted at once to a JobService (SQLite store on disk) backed by
a SwarmRuntime, exactly as the REST API does.

Reported: all jobs succeeded; no event lost (every job's stored events dense from 1, one
JobFinished, every sub-agent finished); job overhead = (finished_at - created_at) - lower bound,
p50 / p99 / max; throughput; the service process's RSS (sampled every 0.2 s) before, peak and after.

The model is the scripted test policy from tests/ (it answers at once, so the runtime is what is
measured) and `bench_sleep` is the instrument tool of bench/swarm_runtime.py; neither is a default.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.swarm_runtime import bench_registry_factory  # noqa: E402
from swarm.config import Settings  # noqa: E402
from swarm.events import JobFinished, SubAgentFinished  # noqa: E402
from swarm.plans import JobSpec, JobState, Limits, SubAgentSpec, SwarmPlan  # noqa: E402
from swarm.service import JobService  # noqa: E402
from tests.scripted_policy import script_task, scripted_llm_factory  # noqa: E402


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return 0.0


def job_spec(index: int, agents: int, calls: int, sleep_s: float) -> JobSpec:
    steps = [[{"tool": "bench_sleep", "arguments": {"seconds": sleep_s}}] for _ in range(calls)]
    n_join = max(1, agents // 4)
    first = [f"a{i}" for i in range(agents - n_join)]
    subagents = [
        SubAgentSpec(
            id=aid,
            task=script_task({"steps": steps, "answer": f"job {index} {aid}"}),
            tools=["bench_sleep"],
            depends_on=[] if aid in first else first,
            max_steps=calls + 1,
        )
        for aid in first + [f"j{i}" for i in range(n_join)]
    ]
    return JobSpec(name=f"load-{index}", plan=SwarmPlan(subagents=subagents), limits=Limits(job_timeout_s=1800))


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return s[k]


async def run(jobs: int, agents: int, calls: int, sleep_s: float, workers: int, db: str) -> dict:
    import ray

    from swarm.runtime import SwarmRuntime

    runtime = SwarmRuntime(namespace="agent-swarm-bench-load", num_workers=workers,
                           llm_factory=scripted_llm_factory, registry_factory=bench_registry_factory,
                           ray_init_kwargs={"include_dashboard": False, "log_to_driver": False})
    service = JobService(Settings(db_path=db), runtime, poll_timeout_s=0.5)
    await service.start()
    # Warm-up job: starts the worker actors so that their start-up is not billed to the load.
    warm = await service.submit(job_spec(-1, 2, 1, 0.0))
    await service.wait(warm.id, timeout=300)

    samples: list[float] = [rss_mb()]
    stop = asyncio.Event()

    async def sample() -> None:
        while not stop.is_set():
            samples.append(rss_mb())
            await asyncio.sleep(0.2)

    sampler = asyncio.create_task(sample())
    t0 = time.monotonic()
    ids = [(await service.submit(job_spec(i, agents, calls, sleep_s))).id for i in range(jobs)]
    finals = await asyncio.gather(*(service.wait(j, timeout=1800) for j in ids))
    wall = time.monotonic() - t0
    stop.set()
    await sampler
    await asyncio.sleep(1.0)
    rss_after = rss_mb()

    lower = 2 * calls * sleep_s
    overheads, lost = [], []
    for st in finals:
        events = service.store.events(st.id)
        dense = [e.seq for e in events] == list(range(1, len(events) + 1))
        finished = {e.agent_id for e in events if isinstance(e, SubAgentFinished)}
        one_final = sum(isinstance(e, JobFinished) for e in events) == 1 and isinstance(events[-1], JobFinished)
        if not (dense and one_final and len(finished) == agents):
            lost.append(st.id)
        overheads.append((st.finished_at or 0) - st.created_at - lower)
    await service.stop()
    runtime.shutdown()
    if ray.is_initialized():
        ray.shutdown()
    return {
        "jobs": jobs, "agents": agents, "calls": calls, "sleep_s": sleep_s, "workers": workers,
        "succeeded": sum(st.state == JobState.succeeded for st in finals), "lost": lost,
        "lower_bound_s": lower, "wall_s": wall,
        "p50": percentile(overheads, 50), "p99": percentile(overheads, 99), "max": max(overheads),
        "rss_before": samples[0], "rss_peak": max(samples), "rss_after": rss_after,
        "subagents_per_s": jobs * agents / wall,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--jobs", type=int, default=50)
    p.add_argument("--agents", type=int, default=20)
    p.add_argument("--calls", type=int, default=2, help="tool calls per sub-agent")
    p.add_argument("--sleep", type=float, default=0.05, help="seconds per tool call")
    p.add_argument("--workers", type=int, default=4, help="sub-agent worker actors")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        r = asyncio.run(run(a.jobs, a.agents, a.calls, a.sleep, a.workers, str(Path(d) / "load.db")))
    print(f"| jobs x sub-agents | succeeded | events lost | lower bound | overhead p50 | p99 | max | wall | "
          f"sub-agents/s | service RSS before / peak / after |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {r['jobs']} x {r['agents']} ({r['calls']} x {r['sleep_s'] * 1000:.0f} ms calls, {r['workers']} workers) "
          f"| {r['succeeded']}/{r['jobs']} | {len(r['lost'])} | {r['lower_bound_s']:.2f} s | {r['p50']:.2f} s "
          f"| {r['p99']:.2f} s | {r['max']:.2f} s | {r['wall_s']:.1f} s | {r['subagents_per_s']:.0f} "
          f"| {r['rss_before']:.0f} / {r['rss_peak']:.0f} / {r['rss_after']:.0f} MB |")
    if r["lost"] or r["succeeded"] != r["jobs"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
