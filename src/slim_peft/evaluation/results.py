"""Typed results that cross package borders: one task's evaluation, one model's evaluation, and the
learn/forget comparison of two evaluations. `to_dict()` gives the JSON written to results files (the same
keys in the same order as before these types existed); `from_dict()` reads it back, also from files written
before per-question outcomes were recorded (their `outcomes` are None)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class TaskResult:
    """One task scored with one protocol: metrics with stderr, the primary `metric` and its `score`, and the
    per-question outcomes of the primary metric (in question order) that paired statistics need."""

    task: str
    protocol: str
    metric: str
    score: float | None
    stderr: float | None
    metrics: dict[str, float | None]
    n: int
    split: dict[str, Any]
    seed: int
    model: str | None
    adapter: str | None
    chance: float
    role: str
    sample_type: int
    seconds: float
    cpu_seconds: float | None = None  # process CPU time (all threads) the task took
    outcomes: list[float] | None = None
    ids_digest: str | None = None
    samples: list[dict[str, Any]] | None = None  # per-example predictions, with `log_samples`

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if self.samples is None:
            del d["samples"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TaskResult:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class EvalResult:
    """One model evaluated on some tasks with one protocol (run metadata and a `TaskResult` per task)."""

    model: str | None
    adapter: str | None
    protocol: str
    split: str
    limit: int | None
    seed: int
    batch_size: int
    versions: dict[str, str]
    tasks: dict[str, TaskResult] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["tasks"] = {name: r.to_dict() for name, r in self.tasks.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalResult:
        names = {f.name for f in dataclasses.fields(cls)} - {"tasks"}
        meta = {k: d.get(k) for k in names if k in d}
        tasks = {name: TaskResult.from_dict(r) for name, r in d.get("tasks", {}).items()}
        return cls(**{"versions": {}, "batch_size": 0, **meta, "tasks": tasks})

    def relabelled(self, label: str = "", role: str | None = None) -> EvalResult:
        """A copy whose task names end with `label` and whose tasks have `role` (when given)."""
        if not label and role is None:
            return self
        tasks = {f"{k}{label}": dataclasses.replace(r, task=f"{r.task}{label}", role=role or r.role)
                 for k, r in self.tasks.items()}
        return dataclasses.replace(self, tasks=tasks)

    def merged(self, other: EvalResult) -> EvalResult:
        """This result's metadata with both results' tasks (e.g. downstream and general parts of one model)."""
        return dataclasses.replace(self, tasks={**self.tasks, **other.tasks}, seconds=self.seconds + other.seconds)


@dataclass
class TaskDelta:
    """One task before and after: scores, their stderr, the delta with its stderr, retention."""

    task: str
    metric: str
    n: int
    chance: float | None
    base: float
    adapted: float
    delta: float
    base_stderr: float | None
    adapted_stderr: float | None
    delta_stderr: float | None  # paired (question by question) when both results carry outcomes
    retention: float | None
    protocol: str | None = None  # None in reports written before it was recorded


@dataclass
class LearnForgetReport:
    """What a model learned (downstream tasks) and forgot (general tasks) against its base."""

    base: dict[str, str | None]
    adapted: dict[str, str | None]
    protocol: str | None
    split: str | None
    general: list[TaskDelta]
    downstream: list[TaskDelta]
    mean_retention: float | None
    mean_delta: float | None
    mean_downstream_delta: float | None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LearnForgetReport:
        rows = {k: [TaskDelta(**r) for r in d.get(k, [])] for k in ("general", "downstream")}
        return cls(**{**d, **rows})

    @property
    def learned(self) -> float | None:
        """Mean downstream delta (what was learned)."""
        return self.mean_downstream_delta

    @property
    def forgotten(self) -> float | None:
        """Minus the mean general delta (what was forgotten; negative when the general suite improved)."""
        return None if self.mean_delta is None else -self.mean_delta
