"""Runtime benchmark (issue 2): how close the Ray runtime gets to the critical-path lower bound.

  python bench/swarm_runtime.py            # prints a markdown table; docs/benchmarks.md has the results

1. Wide job: 100 sub-agents x 15 tool calls of 20 ms each, with an instant test policy. Lower bound:
   15 x 20 ms = 0.3 s (every agent's calls are sequential steps; agents are independent).
   Reported: wall time / lower bound (target <= 1.15x), time to dispatch 100 ready sub-agents
   (first SubAgentCreated -> last SubAgentStarted; target < 0.3 s), and the same work as one serial agent.
2. Uneven DAG: two branches of four nodes with different durations, joined at the end, run by this
   runtime (a node starts as soon as its dependencies finish) and by LangGraph's `Send` fan-out
   (superstep barrier), on the same machine. Reported as a ratio.

The policy and the `bench_sleep` tool are benchmark instruments (the policy is the test double from
tests/, used here only to make the model instant), never defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import operator
import os
import sys
import time
from pathlib import Path
from typing import Annotated, TypedDict

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pydantic import BaseModel, Field  # noqa: E402

from swarm.plans import JobSpec, Limits, SubAgentSpec, SwarmPlan, ToolsConfig  # noqa: E402
from tests.scripted_policy import script_task, scripted_llm_factory  # noqa: E402
from workers.tools import build_registry  # noqa: E402
from workers.tools.registry import Tool, ToolContext  # noqa: E402


class SleepArgs(BaseModel):
    seconds: float = Field(ge=0, le=10)


async def _sleep(args: SleepArgs, ctx: ToolContext) -> str:
    await asyncio.sleep(args.seconds)
    return f"slept {args.seconds}"


def bench_registry_factory(config: ToolsConfig):
    reg = build_registry(config)
    reg.register(Tool("bench_sleep", "sleep (benchmark instrument)", SleepArgs, _sleep))
    return reg


def _agent(i: int, calls: int, seconds: float, deps: list[str] | None = None) -> SubAgentSpec:
    steps = [[{"tool": "bench_sleep", "arguments": {"seconds": seconds}}] for _ in range(calls)]
    return SubAgentSpec(
        id=f"a{i}",
        task=script_task({"steps": steps, "answer": f"done {i}"}),
        tools=["bench_sleep"],
        depends_on=deps or [],
        max_steps=calls + 1,
    )


def _job(agents: list[SubAgentSpec]) -> JobSpec:
    return JobSpec(
        plan=SwarmPlan(subagents=agents), limits=Limits(max_tool_calls=100_000, subagent_max_steps=10_000)
    )


async def _run(runtime, spec: JobSpec):
    events = []
    t0 = time.perf_counter()
    status = await runtime.run_job(spec, on_event=events.append)
    wall = time.perf_counter() - t0
    if status.state.value != "succeeded":
        raise SystemExit(f"benchmark job ended {status.state.value}: {status.error}")
    return wall, events, status


def _dispatch_time(events) -> float:
    created = [e.ts for e in events if e.type == "subagent_created"]
    started = [e.ts for e in events if e.type == "subagent_started"]
    return max(started) - min(created)


async def wide(runtime, n: int, calls: int, seconds: float, repeats: int) -> dict:
    lower = calls * seconds
    runs = []
    for _ in range(repeats):
        wall, events, status = await _run(runtime, _job([_agent(i, calls, seconds) for i in range(n)]))
        runs.append((wall, _dispatch_time(events), status.metrics.critical_steps))
    wall, dispatch, cs = min(runs)
    serial_wall, _, _ = await _run(runtime, _job([_agent(0, n * calls, seconds)]))
    return {"n": n, "calls": calls, "lower": lower, "wall": wall, "dispatch": dispatch, "cs": cs, "serial": serial_wall}


class LGState(TypedDict):
    results: Annotated[list, operator.add]


class LGBranch(TypedDict):
    branch: int
    pos: int


UNEVEN = [[0.2, 0.02, 0.02, 0.02], [0.02, 0.02, 0.02, 0.2]]


async def uneven_ours(runtime) -> float:
    agents, k = [], 0
    for branch in UNEVEN:
        prev = None
        for d in branch:
            agents.append(_agent(k, 1, d, [prev] if prev else []))
            prev = f"a{k}"
            k += 1
    wall, _, _ = await _run(runtime, _job(agents))
    return wall


def uneven_langgraph() -> float:
    from langgraph.graph import START, StateGraph
    from langgraph.types import Command, Send

    async def step(b: LGBranch) -> Command:
        # Each branch continues itself with a Send; LangGraph still runs them in supersteps.
        await asyncio.sleep(UNEVEN[b["branch"]][b["pos"]])
        nxt = b["pos"] + 1
        goto = [Send("step", {"branch": b["branch"], "pos": nxt})] if nxt < len(UNEVEN[b["branch"]]) else []
        return Command(update={"results": [(b["branch"], b["pos"])]}, goto=goto)

    def fan_out(state: LGState):
        return [Send("step", {"branch": i, "pos": 0}) for i in range(len(UNEVEN))]

    g = StateGraph(LGState)
    g.add_node("step", step)
    g.add_conditional_edges(START, fan_out, ["step"])
    app = g.compile()
    t0 = time.perf_counter()
    out = asyncio.run(app.ainvoke({"results": []}))
    wall = time.perf_counter() - t0
    assert len(out["results"]) == sum(len(b) for b in UNEVEN), out
    return wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--agents", type=int, default=100)
    ap.add_argument("--calls", type=int, default=15)
    ap.add_argument("--seconds", type=float, default=0.02)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()

    import ray

    from swarm.runtime import SwarmRuntime

    import tests.scripted_policy

    ray.init(num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(tests.scripted_policy)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    runtime = SwarmRuntime(
        num_workers=args.workers, llm_factory=scripted_llm_factory, registry_factory=bench_registry_factory
    )

    async def go():
        await _run(runtime, _job([_agent(0, 1, 0.0)]))  # warm-up: worker actors, imports
        w = await wide(runtime, args.agents, args.calls, args.seconds, args.repeats)
        ours = min([await uneven_ours(runtime) for _ in range(args.repeats)])
        return w, ours

    w, ours = asyncio.run(go())
    lg = min(uneven_langgraph() for _ in range(args.repeats))
    eager_bound = max(sum(b) for b in UNEVEN)
    barrier_bound = sum(max(col) for col in zip(*UNEVEN))
    print(f"machine: {os.cpu_count()} CPU cores; workers={args.workers}; best of {args.repeats}")
    print("| measurement | value |")
    print("|---|---|")
    print(f"| wide job: {w['n']} sub-agents x {w['calls']} tool calls of {args.seconds*1000:.0f} ms, wall | {w['wall']:.3f} s |")
    print(f"| critical-path lower bound | {w['lower']:.3f} s |")
    print(f"| wall / lower bound (target <= 1.15) | {w['wall'] / w['lower']:.2f}x |")
    print(f"| dispatch of {w['n']} ready sub-agents (target < 0.3 s) | {w['dispatch']:.3f} s |")
    print(f"| critical steps reported | {w['cs']} |")
    serial_bound = w["n"] * w["calls"] * args.seconds
    print(
        f"| same work as one serial agent (lower bound {serial_bound:.1f} s), wall "
        f"| {w['serial']:.3f} s ({w['serial'] / w['wall']:.1f}x the swarm) |"
    )
    print(f"| uneven DAG, this runtime (eager bound {eager_bound:.2f} s) | {ours:.3f} s |")
    print(f"| uneven DAG, LangGraph Send fan-out (barrier bound {barrier_bound:.2f} s) | {lg:.3f} s |")
    print(f"| LangGraph / this runtime | {lg / ours:.2f}x |")
    ray.shutdown()


if __name__ == "__main__":
    main()
