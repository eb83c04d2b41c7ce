"""The metrics of continual learning from the accuracy matrix (Lopez-Paz & Ranzato 2017, "Gradient Episodic Memory
for Continual Learning", arXiv 1706.08840; the I-LoRA paper reports the same three).

R[i][j] is the score on task j after training stage i (stage 0 = the base model, stages 1..T each train one task
of the sequence, task j is the one stage j trains), every entry a `TaskResult` of the same questions:
- average performance  AP  = 1/T sum_j R[T][j];
- backward transfer    BWT = 1/(T-1) sum_{j<T} (R[T][j] - R[j][j])        (negative: forgetting);
- forward transfer     FWT = 1/(T-1) sum_{j>1} (R[j-1][j] - R[0][j])      (what earlier tasks lend a later one);
- general retention after stage i = the mean over the general suite of G[i][g] - G[0][g].
Standard errors: every difference is paired question by question (the same questions before and after), tasks
are independent samples, so the stderr of a mean of K task terms is sqrt(sum_k se_k^2) / K.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from .forgetting import delta_stderr
from .results import TaskResult


@dataclass(frozen=True)
class Estimate:
    """A value with its standard error (None when it cannot be estimated, e.g. one question)."""

    value: float | None
    stderr: float | None


@dataclass
class ContinualMetrics:
    """AP, BWT, FWT and the general retention after each stage (module docstring)."""

    average: Estimate
    backward_transfer: Estimate
    forward_transfer: Estimate
    general_retention: list[Estimate]  # after stage 1..T (mean general delta against the base model)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ContinualMetrics:
        return cls(Estimate(**d["average"]), Estimate(**d["backward_transfer"]), Estimate(**d["forward_transfer"]),
                   [Estimate(**e) for e in d["general_retention"]])


def mean_of(terms: Sequence[Estimate]) -> Estimate:
    """The mean of independent estimates, with sqrt(sum se^2) / K (None if any term has no stderr)."""
    if not terms:
        return Estimate(None, None)
    value = sum(t.value for t in terms) / len(terms)
    if any(t.stderr is None for t in terms):
        return Estimate(value, None)
    return Estimate(value, math.sqrt(sum(t.stderr**2 for t in terms)) / len(terms))


def difference(before: TaskResult, after: TaskResult) -> Estimate:
    """after - before on the same questions, with the paired stderr."""
    return Estimate(after.score - before.score, delta_stderr(before, after))


def continual_metrics(matrix: Sequence[Sequence[TaskResult]],
                      general: Sequence[Sequence[TaskResult]] = ()) -> ContinualMetrics:
    """The metrics of an accuracy `matrix` of T + 1 rows (base, then after each stage) and T columns, and of
    `general` (T + 1 rows of the general suite's results, possibly empty)."""
    T = len(matrix) - 1
    if T < 1 or any(len(row) != T for row in matrix):
        raise ValueError(f"the accuracy matrix needs T + 1 rows of T results (T >= 1), got "
                         f"{[len(row) for row in matrix]}")
    last = matrix[T]
    average = mean_of([Estimate(r.score, r.stderr) for r in last])
    backward = mean_of([difference(matrix[j + 1][j], last[j]) for j in range(T - 1)])
    forward = mean_of([difference(matrix[0][j], matrix[j][j]) for j in range(1, T)])
    retention = [mean_of([difference(b, a) for b, a in zip(general[0], general[i], strict=True)])
                 for i in range(1, len(general))]
    return ContinualMetrics(average, backward, forward, retention)
