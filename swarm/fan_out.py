"""Fan-out ("for each"): one plan node that runs as one sub-agent per chunk of a list that an earlier
sub-agent returned, or ("for range") per window of numbers the plan names.

A plan is written before any sub-agent has run, so it cannot name the items of a list that a lister
will find ("the countries of Africa"). A node with `for_each` says instead: when `source` finishes,
split its answer into items (repeats dropped), and run my task once per `chunk` items, all in parallel. Each copy sees
only its chunk (keeping the list's label), so every copy is short whatever the list's length; the
node's result is the copies' results merged (markdown tables with one header become one table).

A node with `for_range` needs no list: "cities ranked {start} to {end}" with start 1, end 50, chunk 15
runs four copies (1-15, 16-30, 31-45, 46-50), each with its window's bounds in its task. A policy
writes one agent instead of counting out ten, and cannot write an eleventh.

Either form may set `max_parallel` N: copy k then starts when copy k-N has ended (N lanes; N = 1 is a
serial fan-out). The job host adds copy k-N to copy k's dependencies for ordering only: copy k never
sees its result.

Kept free of Ray: the trace synthesizer (planner.traces) renders exactly what the runtime sends.
"""

from __future__ import annotations

import re

from swarm.messages import concat_results
from swarm.plans import ForRange, SubAgentSpec
from swarm.row_filter import is_separator

# "Countries: A; B; C" -> label "Countries: "; a label is short and holds no list separator.
_LABEL_RE = re.compile(r"^([A-Za-z][^:;\n|]{0,60}:\s*)(?=\S)")
_BULLET_RE = re.compile(r"^\s*(?:[-*•]|\d{1,4}[.)])\s+")


def _table_rows(text: str) -> tuple[str, list[str]] | None:
    """(header + separator lines, body lines) of the first markdown table in `text`, else None."""
    lines = [ln.strip() for ln in text.splitlines()]
    for i in range(len(lines) - 1):
        if lines[i].startswith("|") and is_separator(lines[i + 1]):
            body = []
            for ln in lines[i + 2 :]:
                if not ln.startswith("|"):
                    break
                body.append(ln)
            return lines[i] + "\n" + lines[i + 1], body
    return None


def list_items(text: str) -> tuple[str, list[str]]:
    """(label, items) of a list answer.

    Accepted forms, tried in order: a markdown table (items are its rows, label its header), a
    `;`-separated list with an optional short "Label:" in front, one item per line (bullets and
    numbers stripped). Empty items are dropped.
    """
    text = text.strip()
    table = _table_rows(text)
    if table is not None:
        header, body = table
        return header, body
    label = ""
    m = _LABEL_RE.match(text)
    if m:
        label, text = m.group(1), text[m.end() :]
    if ";" in text:
        parts = text.split(";")
    else:
        parts = text.splitlines()
    items = [_BULLET_RE.sub("", p).strip().rstrip(".").strip() for p in parts]
    return label, [p for p in items if p]


def distinct(items: list[str]) -> list[str]:
    """The items without repeats (first occurrence kept; compared ignoring case and spacing). A small
    model's lister can loop ("Laos; Lebanon; Laos; Lebanon; ..."): each repeat would be one more copy
    doing the same work and one more duplicate row."""
    seen: set[str] = set()
    out = []
    for item in items:
        key = " ".join(item.split()).casefold()
        if key not in seen:
            seen.add(key)
            out.append(item)
    return out


def chunk_text(label: str, items: list[str]) -> str:
    """How a chunk of a list is shown to one copy: the list's own form, with its label."""
    if label.startswith("|"):  # a table: its header, then the chunk's rows
        return label + "\n" + "\n".join(items)
    return label + "; ".join(items)


def chunks(items: list[str], size: int) -> list[list[str]]:
    if size < 1:
        raise ValueError(f"chunk size must be >= 1, got {size}")
    return [items[i : i + size] for i in range(0, len(items), size)]


def range_windows(r: ForRange) -> list[tuple[int, int]]:
    """The (start, end) windows of a range fan-out: `chunk` numbers each, the last ending at r.end."""
    return [(s, min(s + r.chunk - 1, r.end)) for s in range(r.start, r.end + 1, r.chunk)]


def range_task(task: str, start: int, end: int) -> str:
    """A range copy's task: the node's task with its window's bounds in place of {start} and {end}."""
    return task.replace("{start}", str(start)).replace("{end}", str(end))


def copy_id(parent_id: str, k: int) -> str:
    """The id of a fan-out node's k-th copy (1-based): "<parent>.<k>"."""
    return f"{parent_id}.{k}"


def copy_spec(parent: SubAgentSpec, k: int, task: str | None = None) -> SubAgentSpec:
    """The k-th copy of a fan-out node: same role, task (or `task`: a range copy's own) and tools, and
    no fan-out of its own."""
    update: dict = {"id": copy_id(parent.id, k), "for_each": None, "for_range": None}
    if task is not None:
        update["task"] = task
    return parent.model_copy(update=update)


def merge_results(results: list[tuple[SubAgentSpec, str]]) -> str:
    """The copies' answers as one: markdown tables that share one header become one table (rows in
    copy order, a copy that kept no row adds none); one-line lists that share a label ("Countries: A; B")
    become one list, so a fan-out can split a fan-out's result again (listers of a list's parts, then
    fillers of its items); anything else is each answer under its label."""
    tables = [t for t in (_table_rows(text) for _, text in results) if t is not None]
    if results and len(tables) == len(results) and len({_norm_header(h) for h, _ in tables}) == 1:
        return "\n".join([tables[0][0], *(row for _, body in tables for row in body)])
    if results and not tables and all("\n" not in text.strip() for _, text in results):  # one-line lists only
        lists = [list_items(text) for _, text in results]
        labels = {label.strip().casefold() for label, _ in lists}
        if len(labels) == 1 and labels != {""}:
            return chunk_text(lists[0][0], [item for _, items in lists for item in items])
    return concat_results(results)


def _norm_header(header: str) -> str:
    top = header.splitlines()[0]
    return "|".join(c.strip().lower() for c in top.strip().strip("|").split("|"))
