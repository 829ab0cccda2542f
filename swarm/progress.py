"""Live terminal view of one job, built from its events (shared by `swarm run`, `submit --follow`).

`JobProgress.update(event)` folds events into a small state; rendering is separate (`__rich__` for
the live view, `summary()` for the end), so the same state can be fed from an in-process runtime
or from the REST event stream.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from swarm.events import (
    ORCHESTRATOR_ID,
    Event,
    JobFinished,
    JobStarted,
    JobSubmitted,
    SubAgentCancelled,
    SubAgentCreated,
    SubAgentFailed,
    SubAgentFinished,
    SubAgentRetried,
    SubAgentStarted,
    SubAgentStep,
    ToolCalled,
    ToolResult,
)
from swarm.plans import JobState

_STATE_STYLE = {"succeeded": "green", "failed": "red", "cancelled": "yellow", "interrupted": "magenta"}


@dataclass
class AgentView:
    agent_id: str
    name: str = ""
    state: str = "pending"  # pending | running | retrying | done | failed | cancelled
    step: int = 0
    last_tool: str = ""
    attempt: int = 1
    tool_calls: int = 0


@dataclass
class JobProgress:
    """What the live view shows, folded from a job's events."""

    job_id: str = ""
    name: str = ""
    max_tool_calls: int | None = None
    max_subagents: int | None = None
    started_at: float | None = None
    tool_calls: int = 0
    orchestrator_step: int = 0
    agents: dict[str, AgentView] = field(default_factory=dict)
    finished: JobFinished | None = None
    last_seq: int = 0

    def update(self, ev: Event) -> None:
        self.last_seq = max(self.last_seq, ev.seq)
        self.job_id = self.job_id or ev.job_id
        if isinstance(ev, JobSubmitted):
            self.name = ev.name
            limits = ev.spec.get("limits") or {}
            self.max_tool_calls = limits.get("max_tool_calls", self.max_tool_calls)
            self.max_subagents = limits.get("max_subagents", self.max_subagents)
        elif isinstance(ev, JobStarted):
            self.started_at = ev.ts
        elif isinstance(ev, JobFinished):
            self.finished = ev
        elif isinstance(ev, SubAgentCreated):
            self.agents.setdefault(ev.agent_id, AgentView(ev.agent_id, ev.name or ev.agent_id))
        elif isinstance(ev, SubAgentStep):
            if ev.agent_id == ORCHESTRATOR_ID:
                self.orchestrator_step = max(self.orchestrator_step, ev.step)
            else:
                self._agent(ev.agent_id).step = ev.step
        elif isinstance(ev, ToolCalled):
            if ev.agent_id != ORCHESTRATOR_ID:
                self._agent(ev.agent_id).last_tool = ev.tool
        elif isinstance(ev, ToolResult):
            self.tool_calls += 1
            if ev.agent_id != ORCHESTRATOR_ID:
                self._agent(ev.agent_id).tool_calls += 1
        elif isinstance(ev, SubAgentStarted):
            a = self._agent(ev.agent_id)
            a.state, a.attempt = "running", ev.attempt
        elif isinstance(ev, SubAgentRetried):
            a = self._agent(ev.agent_id)
            a.state, a.attempt = "retrying", ev.attempt
        elif isinstance(ev, SubAgentFinished):
            self._agent(ev.agent_id).state = "done"
        elif isinstance(ev, SubAgentFailed):
            if not ev.will_retry:
                self._agent(ev.agent_id).state = "failed"
        elif isinstance(ev, SubAgentCancelled):
            self._agent(ev.agent_id).state = "cancelled"

    def _agent(self, agent_id: str) -> AgentView:
        a = self.agents.get(agent_id)
        if a is None:
            a = self.agents[agent_id] = AgentView(agent_id, agent_id)
        return a

    @property
    def done_count(self) -> int:
        return sum(a.state in ("done", "failed", "cancelled") for a in self.agents.values())

    def elapsed(self, now: float | None = None) -> float:
        if self.started_at is None:
            return 0.0
        end = self.finished.ts if self.finished else (now or time.time())
        return max(0.0, end - self.started_at)

    def __rich__(self) -> RenderableType:
        total = len(self.agents)
        head = Text.assemble(
            ("job ", "dim"), (self.job_id or "?", "bold"), f"  {self.name}  " if self.name else "  ",
            ("elapsed ", "dim"), f"{self.elapsed():.1f}s",
            ("  orchestrator step ", "dim"), str(self.orchestrator_step),
        )
        bar = Table.grid(padding=(0, 1))
        bar.add_row(
            Text("sub-agents", style="dim"),
            ProgressBar(total=max(total, 1), completed=self.done_count, width=30),
            Text(f"{self.done_count}/{total}"),
            Text("tool calls", style="dim"),
            Text(f"{self.tool_calls}" + (f"/{self.max_tool_calls}" if self.max_tool_calls is not None else "")),
        )
        running = [a for a in self.agents.values() if a.state in ("running", "retrying")]
        table = Table(box=None, show_header=bool(running), pad_edge=False)
        for col in ("agent", "state", "step", "last tool", "attempt"):
            table.add_column(col, style="dim" if col == "state" else None)
        for a in running[:20]:
            table.add_row(a.name, a.state, str(a.step), a.last_tool or "-", str(a.attempt))
        if len(running) > 20:
            table.add_row(f"... {len(running) - 20} more", "", "", "", "")
        return Group(head, bar, table)

    def summary(self) -> RenderableType:
        """The end of the job: state, metrics (critical steps first) and the final answer."""
        if self.finished is None:
            return Text(f"job {self.job_id} has not finished", style="yellow")
        f = self.finished
        state = JobState(f.state).value
        m = f.metrics
        t = Table.grid(padding=(0, 2))
        t.add_row("state", Text(state, style=_STATE_STYLE.get(state, "")))
        t.add_row("critical steps", str(m.critical_steps))
        t.add_row("total steps", str(m.total_steps))
        t.add_row("sub-agents", str(m.subagents))
        t.add_row("tool calls", str(m.tool_calls))
        t.add_row("tokens (prompt/completion)", f"{m.prompt_tokens}/{m.completion_tokens}")
        t.add_row("retries", str(m.retries))
        t.add_row("wall time", f"{m.wall_time_s:.2f}s")
        parts: list[RenderableType] = [t]
        if f.error:
            parts.append(Panel(f.error, title="error", border_style="red"))
        if f.result:
            parts.append(Panel(f.result, title="answer", border_style="green"))
        return Group(*parts)


def event_line(ev: Event) -> str:
    """One human-readable line per event (for `swarm events`)."""
    agent = getattr(ev, "agent_id", "")
    detail = ""
    if isinstance(ev, ToolCalled):
        detail = f"{ev.tool}({ev.arguments[:80]})"
    elif isinstance(ev, ToolResult):
        detail = f"{ev.tool} -> {'ERROR ' if ev.is_error else ''}{ev.content[:80]!r}"
    elif isinstance(ev, SubAgentStep):
        detail = f"step {ev.step}" + (f": {ev.content[:80]!r}" if ev.content else "")
    elif isinstance(ev, SubAgentFinished):
        detail = f"{ev.result[:80]!r}"
    elif isinstance(ev, SubAgentFailed):
        detail = ev.error[:120]
    elif isinstance(ev, JobFinished):
        detail = f"{JobState(ev.state).value} critical_steps={ev.metrics.critical_steps}" + (
            f" error={ev.error!r}" if ev.error else ""
        )
    stamp = time.strftime("%H:%M:%S", time.localtime(ev.ts))
    return f"{ev.seq:>5} {stamp} {ev.type:<18} {agent:<14} {detail}".rstrip()


def show_progress(events: Iterable[Event], console: Console | None = None, live: bool = True) -> JobProgress:
    """Drive a live view from an event iterator until it ends; print the summary; return the state."""
    console = console or Console()
    prog = JobProgress()
    if live and console.is_terminal:
        with Live(prog, console=console, refresh_per_second=4, transient=True):
            for ev in events:
                prog.update(ev)
    else:
        for ev in events:
            prog.update(ev)
    console.print(prog.summary())
    return prog
