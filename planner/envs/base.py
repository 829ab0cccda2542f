"""The task-environment interface shared by the job service, `swarm eval` and the PARL trainer.

Tasks and scores cross process and HTTP boundaries, so they are pydantic models. An environment
generates tasks per split and seed, serves a fixed held-out evaluation set, builds the document
corpus its `search` tool reads, and scores an agent's final text.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import orjson
from pydantic import BaseModel, ConfigDict, Field, model_validator

Split = Literal["train", "test"]
GoldValue = str | float | int

EVAL_SETS_DIR = Path(__file__).resolve().parent.parent / "eval_sets"


class Task(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1)
    env: str = Field(min_length=1)
    split: Split
    prompt: str = Field(min_length=1)  # never tells the model to parallelise
    columns: list[str] = Field(min_length=1)  # deep tasks: ["answer"]
    key_columns: list[str] = Field(min_length=1)
    gold: list[dict[str, GoldValue]] = Field(min_length=1)  # deep tasks: one row
    # e.g. template, entities involved, hop chain, "aliases" {gold value: [accepted names]},
    # "rel_tol" {column: relative tolerance}.
    meta: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> "Task":
        missing = [k for k in self.key_columns if k not in self.columns]
        if missing:
            raise ValueError(f"task {self.id}: key columns {missing} are not among columns {self.columns}")
        for i, row in enumerate(self.gold):
            if set(row) != set(self.columns):
                raise ValueError(f"task {self.id}: gold row {i} has fields {sorted(row)}, expected {sorted(self.columns)}")
        return self


class Score(BaseModel):
    item_f1: float
    item_precision: float
    item_recall: float
    row_f1: float
    success: bool


@runtime_checkable
class Environment(Protocol):
    name: str
    tools: list[str]

    def tasks(self, split: Split, n: int, seed: int) -> list[Task]: ...

    def eval_set(self, version: str = "v1") -> list[Task]: ...

    def corpus_path(self) -> Path: ...

    def score(self, task: Task, answer: str) -> Score: ...


class EvalSetFile(BaseModel):
    """The on-disk form of a fixed evaluation set (planner/eval_sets/<env>-<version>.json)."""

    model_config = ConfigDict(extra="forbid")

    env: str
    version: str
    split: Split
    seed: int
    n: int
    tasks: list[Task]


def eval_set_path(env: str, version: str, directory: Path | None = None) -> Path:
    return (directory or EVAL_SETS_DIR) / f"{env}-{version}.json"


def load_eval_set(env: str, version: str, directory: Path | None = None) -> list[Task]:
    """Load and check an eval set: the file must exist and say it is this env and version."""
    path = eval_set_path(env, version, directory)
    if not path.is_file():
        have = sorted(p.stem for p in (directory or EVAL_SETS_DIR).glob(f"{env}-*.json"))
        raise FileNotFoundError(f"no eval set {version!r} for env {env!r} at {path}; available: {have or 'none'}")
    data = EvalSetFile.model_validate(orjson.loads(path.read_bytes()))
    if data.env != env or data.version != version:
        raise ValueError(f"{path} holds env={data.env!r} version={data.version!r}, expected env={env!r} version={version!r}")
    if len(data.tasks) != data.n:
        raise ValueError(f"{path}: says n={data.n} but holds {len(data.tasks)} tasks")
    for t in data.tasks:
        if t.env != env or t.split != data.split:
            raise ValueError(f"{path}: task {t.id} is env={t.env!r} split={t.split!r}, expected {env!r}/{data.split!r}")
    return data.tasks


def validate_split(split: str) -> Split:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return split  # type: ignore[return-value]


def validate_count(n: int) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"number of tasks must be a non-negative integer, got {n!r}")
    return n


class GeneratedEnvironment:
    """Shared machinery of an environment whose tasks come from a seeded generator.

    Subclasses set `name` and `tools` and implement `make_task(rng, split, task_id)`, returning a
    Task or None when the parameters it drew do not give a well-posed task (it is then redrawn).
    """

    name: str = ""
    tools: list[str] = []
    max_draws_per_task = 60

    def make_task(self, rng: "random.Random", split: Split, task_id: str, index: int) -> Task | None:
        raise NotImplementedError

    def tasks(self, split: Split, n: int, seed: int) -> list[Task]:
        """`n` tasks of `split`; the same (split, n, seed) always gives the same tasks.

        Prompts are distinct while the templates allow: once a template's combinations are used
        up (large n), a repeated prompt is accepted rather than failing.
        """
        split = validate_split(split)
        n = validate_count(n)
        rng = random.Random(f"{self.name}/{split}/{seed}")
        out: list[Task] = []
        seen: set[str] = set()
        for i in range(n):
            task_id = f"{self.name}-{split}-s{seed}-{i:04d}"
            chosen: Task | None = None
            fallback: Task | None = None
            for _ in range(self.max_draws_per_task):
                task = self.make_task(rng, split, task_id, i)
                if task is None:
                    continue
                if task.prompt not in seen:
                    chosen = task
                    break
                fallback = fallback or task
            chosen = chosen or fallback
            if chosen is None:
                raise RuntimeError(f"{self.name}: could not draw a valid {split} task after {self.max_draws_per_task} tries")
            seen.add(chosen.prompt)
            out.append(chosen)
        return out

    def eval_set(self, version: str = "v1") -> list[Task]:
        return load_eval_set(self.name, version)
