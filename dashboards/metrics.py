"""Reading PARL trainer metrics files (format: docs/dashboard.md).

A run is a directory `<runs_dir>/<run-name>/` holding `metrics.jsonl`: one JSON object per line with
an integer "step", a unix "time" and numeric fields (reward, r_parallel, lambda1, ...). The trainer
appends while the dashboard reads, so a reader resumes from a byte offset and only consumes
complete lines: a half-written last line is left for the next read instead of being reported bad.
"""

from __future__ import annotations

import json
import math
import os
import re
import time as _time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

METRICS_FILE = "metrics.jsonl"
RUNS_DIR_ENV = "SWARM_RUNS_DIR"
DEFAULT_RUNS_DIR = "runs"
# Upper bound on bytes parsed per call, so one poll of a huge file stays cheap; the caller pages on.
DEFAULT_MAX_BYTES = 4 << 20
_RUN_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


class RunNotFoundError(LookupError):
    """No run of that name (or the name is not a valid run name)."""


@dataclass
class MetricsRecord:
    step: int
    time: float
    values: dict[str, float | None]  # numeric fields; None where the trainer wrote null/NaN/inf


@dataclass
class MetricsLineError:
    line: int  # 1-based line number in the file
    offset: int  # byte offset of the line's start
    message: str


@dataclass
class MetricsChunk:
    records: list[MetricsRecord] = field(default_factory=list)
    errors: list[MetricsLineError] = field(default_factory=list)
    next_offset: int = 0  # where the next read resumes (always the start of a line)
    next_line: int = 1  # line number at next_offset
    size: int = 0  # file size when read
    eof: bool = True  # False when max_bytes stopped the read before the last complete line


@dataclass
class RunInfo:
    name: str
    path: str
    size: int
    modified: float


def runs_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The runs directory: `explicit`, else $SWARM_RUNS_DIR, else ./runs."""
    value = explicit if explicit is not None else (os.environ.get(RUNS_DIR_ENV) or DEFAULT_RUNS_DIR)
    return Path(value).expanduser()


def check_run_name(name: str) -> str:
    """Run names are single path components (no '/', no '..'), so a name can never escape runs_dir."""
    if not _RUN_NAME_RE.match(name):
        raise RunNotFoundError(
            f"invalid run name {name!r}: use 1-128 letters, digits, '_', '-' or '.', starting with a letter or digit"
        )
    return name


def list_runs(root: str | os.PathLike[str]) -> list[RunInfo]:
    """Runs under `root` (directories holding metrics.jsonl), sorted by name. A missing root has none."""
    base = Path(root)
    if not base.is_dir():
        return []
    out: list[RunInfo] = []
    for d in sorted(base.iterdir(), key=lambda p: p.name):
        f = d / METRICS_FILE
        if not _RUN_NAME_RE.match(d.name) or not f.is_file():
            continue
        st = f.stat()
        out.append(RunInfo(name=d.name, path=str(f), size=st.st_size, modified=st.st_mtime))
    return out


def run_metrics_path(root: str | os.PathLike[str], name: str) -> Path:
    f = Path(root) / check_run_name(name) / METRICS_FILE
    if not f.is_file():
        raise RunNotFoundError(f"no run {name!r}: {f} does not exist")
    return f


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def parse_metrics_line(text: str) -> MetricsRecord:
    """One line -> a record; ValueError saying what is wrong otherwise."""
    try:
        obj = json.loads(text)  # the stdlib parser: trainers written with json.dumps may emit NaN
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    step = obj.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"'step' must be an integer >= 0, got {step!r}")
    t = obj.get("time")
    if not _is_number(t) or not math.isfinite(t):
        raise ValueError(f"'time' must be a finite number (unix seconds), got {t!r}")
    values: dict[str, float | None] = {}
    for k, v in obj.items():
        if k in ("step", "time"):
            continue
        if v is None:
            values[k] = None
        elif _is_number(v):
            values[k] = float(v) if math.isfinite(v) else None
        # strings, lists, objects are annotations (e.g. "phase"), not curves: skipped on purpose
    return MetricsRecord(step=step, time=float(t), values=values)


def read_metrics(
    path: str | os.PathLike[str], offset: int = 0, line: int = 1, max_bytes: int = DEFAULT_MAX_BYTES
) -> MetricsChunk:
    """Complete lines of `path` from byte `offset` (which must start a line; `line` is its number).

    Bad lines are reported in `errors` and skipped, so one corrupt line never hides the curve.
    A file that shrank below `offset` (truncated or rewritten by a restarted trainer) raises
    ValueError: the caller should start again from 0.
    """
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    if line < 1:
        raise ValueError(f"line must be >= 1, got {line}")
    if max_bytes < 1:
        raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if offset > size:
            raise ValueError(f"offset {offset} is past the end of {path} ({size} bytes): the file was truncated; read from 0")
        fh.seek(offset)
        data = fh.read(max_bytes)
    chunk = MetricsChunk(next_offset=offset, next_line=line, size=size)
    end = data.rfind(b"\n")
    if end < 0:
        # No complete line in reach: either a partial last line (wait) or one line longer than max_bytes.
        if len(data) >= max_bytes:
            raise ValueError(f"line {line} at byte {offset} of {path} is longer than {max_bytes} bytes")
        return chunk
    complete = data[: end + 1]
    pos = offset
    for raw in complete.split(b"\n")[:-1]:
        start = pos
        pos += len(raw) + 1
        no = chunk.next_line
        chunk.next_line += 1
        text = raw.decode("utf-8", errors="replace").strip()
        if not text:
            continue  # blank lines are harmless
        try:
            chunk.records.append(parse_metrics_line(text))
        except ValueError as e:
            chunk.errors.append(MetricsLineError(line=no, offset=start, message=f"line {no}: {e}"))
    chunk.next_offset = pos
    # A read shorter than max_bytes reached the end of the file: all that is left is a partial line.
    chunk.eof = pos >= size or len(data) < max_bytes
    return chunk


def append_metrics(
    path: str | os.PathLike[str], step: int, values: Mapping[str, float | int | None], time: float | None = None
) -> None:
    """Append one record for the trainer: checked like a reader would, written with one write() ending
    in a newline, so a concurrent reader never sees half a line as a complete one."""
    if "step" in values or "time" in values:
        raise ValueError("pass 'step' and 'time' as arguments, not inside values")
    bad = [k for k, v in values.items() if v is not None and not _is_number(v)]
    if bad:
        raise ValueError(f"metric values must be numbers or None; not numeric: {', '.join(sorted(bad))}")
    line = json.dumps({"step": step, "time": _time.time() if time is None else time, **values})
    parse_metrics_line(line)  # same rules as the reader: a bad step or time fails here, not in the dashboard
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "a", encoding="utf-8") as fh:
        fh.write(line + "\n")
