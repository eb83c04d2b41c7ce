"""The learn/forget comparison of a base and an adapted model's evaluations, task by task."""

from __future__ import annotations

import math
from collections.abc import Sequence

from slim_peft.errors import ConfigError

from .metrics import paired_delta_stderr
from .results import EvalResult, LearnForgetReport, TaskDelta, TaskResult


def forgetting_report(base: EvalResult, adapted: EvalResult, tasks: Sequence[str] | None = None
                      ) -> LearnForgetReport:
    """Compare a base and an adapted model's `evaluate` results, task by task.

    `general` lists every general task (role "general") present in both: base and adapted score, delta,
    the stderr of each and of the delta, and retention (adapted / base); `mean_retention` averages it.
    `downstream` lists the downstream tasks the same way (what was learned). Results to compare must
    share protocol, split and n per task.
    """
    common = [t for t in base.tasks if t in adapted.tasks]
    if tasks is not None:
        missing = [t for t in tasks if t not in common]
        if missing:
            raise ConfigError(f"tasks missing from one of the results: {', '.join(missing)}")
        common = list(tasks)
    general: list[TaskDelta] = []
    downstream: list[TaskDelta] = []
    for name in common:
        b, a = base.tasks[name], adapted.tasks[name]
        _check_comparable(name, b, a)
        (general if b.role == "general" else downstream).append(task_delta(b, a))
    retentions = [r.retention for r in general if r.retention is not None]
    deltas = [r.delta for r in general]
    return LearnForgetReport(
        base={"model": base.model, "adapter": base.adapter},
        adapted={"model": adapted.model, "adapter": adapted.adapter},
        protocol=base.protocol, split=base.split, general=general, downstream=downstream,
        mean_retention=sum(retentions) / len(retentions) if retentions else None,
        mean_delta=sum(deltas) / len(deltas) if deltas else None,
        mean_downstream_delta=sum(r.delta for r in downstream) / len(downstream) if downstream else None,
    )


def _check_comparable(name: str, b: TaskResult, a: TaskResult) -> None:
    for key in ("protocol", "metric", "n"):
        if getattr(b, key) != getattr(a, key):
            raise ConfigError(f"{name}: base and adapted results differ in {key} ({getattr(b, key)} vs "
                              f"{getattr(a, key)}); compare like with like")
    if any(b.split.get(k) != a.split.get(k) for k in ("name", "test_fraction")):
        raise ConfigError(f"{name}: base and adapted results were computed on different splits")


def task_delta(b: TaskResult, a: TaskResult) -> TaskDelta:
    """One task's row of the report."""
    return TaskDelta(task=b.task, metric=b.metric, n=b.n, chance=b.chance, base=b.score, adapted=a.score,
                     delta=a.score - b.score, base_stderr=b.stderr, adapted_stderr=a.stderr,
                     delta_stderr=delta_stderr(b, a), retention=a.score / b.score if b.score else None,
                     protocol=b.protocol)


def delta_stderr(b: TaskResult, a: TaskResult) -> float | None:
    """Paired stderr of the delta when both results carry per-question outcomes of the same questions;
    else the independent-samples sqrt(se_b^2 + se_a^2) (results written before outcomes were recorded)."""
    if b.outcomes is not None and a.outcomes is not None and b.ids_digest == a.ids_digest:
        return paired_delta_stderr(b.outcomes, a.outcomes)
    if b.stderr is None or a.stderr is None:
        return None
    return math.sqrt(b.stderr**2 + a.stderr**2)
