"""SQLite job store: one row per job, one row per event, the durable record behind the REST API.

Events are keyed by (job_id, seq), so storing an event twice is a no-op: the service may re-read
a job's stream after a restart without duplicating anything. A job's state, result and metrics
are derived from its JobStarted / JobFinished events inside the same transaction that stores them.
One connection guarded by a lock (WAL mode), so the store can be shared by threads.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import orjson

from swarm.events import Event, JobFinished, JobStarted, event_from_json
from swarm.plans import JobMetrics, JobSpec, JobState, JobStatus

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL DEFAULT '',
    mode        TEXT NOT NULL,
    state       TEXT NOT NULL,
    spec        TEXT NOT NULL,
    created_at  REAL NOT NULL,
    started_at  REAL,
    finished_at REAL,
    result      TEXT,
    error       TEXT,
    metrics     TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS jobs_state_created ON jobs (state, created_at);
CREATE INDEX IF NOT EXISTS jobs_created ON jobs (created_at);
CREATE TABLE IF NOT EXISTS events (
    job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    seq    INTEGER NOT NULL,
    type   TEXT NOT NULL,
    ts     REAL NOT NULL,
    data   TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
) WITHOUT ROWID;
"""

_UNFINISHED = (JobState.queued.value, JobState.running.value)


class UnknownJobError(KeyError):
    """No job with this id in the store."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "unknown job"


class JobStore:
    """Durable jobs and events. `path` ':memory:' keeps everything in RAM (tests, notebooks)."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).expanduser().parent.mkdir(parents=True, exist_ok=True)
            self.path = str(Path(self.path).expanduser())
        # isolation_level=None: we open transactions ourselves (BEGIN IMMEDIATE) so a batch of
        # events and the job update it implies commit together or not at all.
        self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30.0)
        self._lock = threading.RLock()
        with self._lock:
            self._conn.execute("PRAGMA foreign_keys = ON")
            if self.path != ":memory:":
                self._conn.execute("PRAGMA journal_mode = WAL")
                self._conn.execute("PRAGMA synchronous = NORMAL")
            self._conn.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            else:
                self._conn.execute("COMMIT")

    # ---- jobs -------------------------------------------------------------------------------

    def create_job(self, job_id: str, spec: JobSpec, created_at: float | None = None) -> JobStatus:
        """Store a new job in state `queued`. Raises ValueError if the id is already taken."""
        if not isinstance(spec, JobSpec):
            raise TypeError(f"create_job needs a JobSpec, got {type(spec).__name__}")
        if not job_id:
            raise ValueError("job id is empty")
        now = time.time() if created_at is None else created_at
        try:
            with self._tx() as c:
                c.execute(
                    "INSERT INTO jobs (id, name, mode, state, spec, created_at, metrics) VALUES (?,?,?,?,?,?,?)",
                    (job_id, spec.name, spec.mode, JobState.queued.value, spec.to_json().decode(), now,
                     JobMetrics().to_json().decode()),
                )
        except sqlite3.IntegrityError:
            raise ValueError(f"job {job_id!r} already exists") from None
        return JobStatus(id=job_id, name=spec.name, mode=spec.mode, state=JobState.queued, created_at=now)

    def get_job(self, job_id: str) -> JobStatus | None:
        with self._lock:
            row = self._conn.execute(f"SELECT {_JOB_COLS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _status(row) if row else None

    def get_spec(self, job_id: str) -> JobSpec | None:
        with self._lock:
            row = self._conn.execute("SELECT spec FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return JobSpec.model_validate(orjson.loads(row[0])) if row else None

    def list_jobs(self, state: JobState | str | None = None, limit: int = 100, offset: int = 0) -> list[JobStatus]:
        """Newest first."""
        if limit < 0 or offset < 0:
            raise ValueError(f"limit and offset must be >= 0 (got limit={limit}, offset={offset})")
        sql, args = f"SELECT {_JOB_COLS} FROM jobs", []
        if state is not None:
            sql += " WHERE state = ?"
            args.append(JobState(state).value)
        sql += " ORDER BY created_at DESC, id DESC LIMIT ? OFFSET ?"
        args += [limit, offset]
        with self._lock:
            rows = self._conn.execute(sql, args).fetchall()
        return [_status(r) for r in rows]

    def count_jobs(self, state: JobState | str | None = None) -> int:
        with self._lock:
            if state is None:
                return self._conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
            return self._conn.execute("SELECT COUNT(*) FROM jobs WHERE state = ?", (JobState(state).value,)).fetchone()[0]

    def unfinished_jobs(self) -> list[JobStatus]:
        """Jobs still queued or running, oldest first (what a restarted service must re-attach)."""
        with self._lock:
            rows = self._conn.execute(
                f"SELECT {_JOB_COLS} FROM jobs WHERE state IN (?, ?) ORDER BY created_at, id", _UNFINISHED
            ).fetchall()
        return [_status(r) for r in rows]

    def mark_interrupted(self, job_id: str, reason: str) -> bool:
        """End an unfinished job as `interrupted` (its runtime is gone). See `end_job`."""
        return self.end_job(job_id, JobState.interrupted, reason)

    def end_job(self, job_id: str, state: JobState, reason: str) -> bool:
        """End an unfinished job in a terminal `state` with `reason` as its error, recording a final
        JobFinished event so that event streams of the job terminate. Returns False (and changes
        nothing) if the job already ended."""
        if not JobState(state).terminal:
            raise ValueError(f"end_job needs a terminal state, got {JobState(state).value!r}")
        with self._tx() as c:
            row = c.execute("SELECT state, metrics FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise UnknownJobError(f"unknown job {job_id!r}")
            if row[0] not in _UNFINISHED:
                return False
            seq = c.execute("SELECT COALESCE(MAX(seq), 0) FROM events WHERE job_id = ?", (job_id,)).fetchone()[0] + 1
            ev = JobFinished(
                job_id=job_id, seq=seq, state=JobState(state), error=reason,
                metrics=JobMetrics.model_validate(orjson.loads(row[1])),
            )
            self._insert_events(c, job_id, [ev])
        return True

    def delete_job(self, job_id: str) -> bool:
        """Remove a job and its events (used when starting it was refused). True if it existed."""
        with self._tx() as c:
            c.execute("DELETE FROM events WHERE job_id = ?", (job_id,))
            return c.execute("DELETE FROM jobs WHERE id = ?", (job_id,)).rowcount > 0

    # ---- events -----------------------------------------------------------------------------

    def append_events(self, job_id: str, events: Iterable[Event]) -> int:
        """Store events of one job; ones already stored (same seq) are skipped. Returns how many
        were new. All-or-nothing: any invalid event (wrong job, seq < 1) stores none of the batch."""
        batch = list(events)
        for ev in batch:
            if not hasattr(ev, "type") or not hasattr(ev, "seq"):
                raise TypeError(f"append_events needs swarm.events models, got {type(ev).__name__}")
            if ev.job_id and ev.job_id != job_id:
                raise ValueError(f"event seq {ev.seq} ({ev.type}) belongs to job {ev.job_id!r}, not {job_id!r}")
            if ev.seq < 1:
                raise ValueError(f"event {ev.type} of job {job_id!r} has seq {ev.seq}; seq starts at 1")
        if not batch:
            return 0
        with self._tx() as c:
            if c.execute("SELECT 1 FROM jobs WHERE id = ?", (job_id,)).fetchone() is None:
                raise UnknownJobError(f"unknown job {job_id!r}")
            return self._insert_events(c, job_id, batch)

    def _insert_events(self, c: sqlite3.Connection, job_id: str, batch: list[Event]) -> int:
        new = 0
        for ev in sorted(batch, key=lambda e: e.seq):
            data = ev.model_dump(mode="json")
            data["job_id"] = job_id
            cur = c.execute(
                "INSERT OR IGNORE INTO events (job_id, seq, type, ts, data) VALUES (?,?,?,?,?)",
                (job_id, ev.seq, ev.type, ev.ts, orjson.dumps(data).decode()),
            )
            if cur.rowcount == 0:  # already stored: its effect on the job is already applied
                continue
            new += 1
            if isinstance(ev, JobStarted):
                # A late JobStarted never reopens a job that has ended.
                c.execute(
                    "UPDATE jobs SET state = ?, started_at = COALESCE(started_at, ?) WHERE id = ? AND state IN (?, ?)",
                    (JobState.running.value, ev.ts, job_id, *_UNFINISHED),
                )
            elif isinstance(ev, JobFinished):
                c.execute(
                    "UPDATE jobs SET state = ?, result = ?, error = ?, metrics = ?, finished_at = ?,"
                    " started_at = COALESCE(started_at, ?) WHERE id = ?",
                    (JobState(ev.state).value, ev.result, ev.error, ev.metrics.to_json().decode(), ev.ts, ev.ts, job_id),
                )
        return new

    def events(self, job_id: str, after_seq: int = 0, limit: int | None = None) -> list[Event]:
        """The job's stored events with seq > after_seq, in seq order."""
        sql = "SELECT data FROM events WHERE job_id = ? AND seq > ? ORDER BY seq"
        args: list[object] = [job_id, after_seq]
        if limit is not None:
            if limit < 0:
                raise ValueError(f"limit must be >= 0, got {limit}")
            sql += " LIMIT ?"
            args.append(limit)
        with self._lock:
            rows = self._conn.execute(sql, args).fetchall()
        return [event_from_json(r[0]) for r in rows]

    def last_seq(self, job_id: str) -> int:
        """Highest stored seq of the job (0 if none)."""
        with self._lock:
            return self._conn.execute("SELECT COALESCE(MAX(seq), 0) FROM events WHERE job_id = ?", (job_id,)).fetchone()[0]


_JOB_COLS = "id, name, mode, state, created_at, started_at, finished_at, result, error, metrics"


def _status(row: tuple) -> JobStatus:
    return JobStatus(
        id=row[0], name=row[1], mode=row[2], state=JobState(row[3]), created_at=row[4], started_at=row[5],
        finished_at=row[6], result=row[7], error=row[8], metrics=JobMetrics.model_validate(orjson.loads(row[9])),
    )
