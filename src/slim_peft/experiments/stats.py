"""Paired, question-by-question statistics of scored runs: estimates over seeds, differences with their stderr.

Two evaluations of one test set answer the same questions, so most of their binomial noise is shared; the stderr
of their difference taken question by question (`paired_test_se`) is far smaller than the independent-samples
one, and it is what separates methods at a few hundred questions per task. Runs that stored no per-question
outcomes fall back to the conservative independent form. The spread over seeds is added where measured.

A scored run (or the base model) is a dict with, per part ("downstream", "general", "math"), a dict of task
entries `{"score", "stderr", "n", "correct": "0110...", "ids_digest"}` and the part means `downstream_mean`,
`general_mean`, `math_score` (see `runner.summarize`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from slim_peft.evaluation.metrics import mean_stderr

from .store import json_digest

MEAN_KEY = {"general": "general_mean", "downstream": "downstream_mean", "math": "math_score"}


@dataclass(frozen=True)
class Estimate:
    """A score averaged over seeds, with its two sources of noise: the spread over seeds (None with one seed)
    and the test-set stderr of one evaluation (binomial, from the stored per-task stderrs)."""

    mean: float
    seeds: int
    seed_std: float | None
    test_se: float


def score(src: dict, part: str) -> float:
    """A run's (or the base model's) mean score over a part's tasks."""
    return src[MEAN_KEY[part]]


def score_se(src: dict, part: str, tasks: Sequence[str]) -> float:
    """Binomial stderr of a run's (or the base model's) mean score over ``tasks`` of ``part``."""
    return math.sqrt(sum(src[part][t]["stderr"] ** 2 for t in tasks)) / len(tasks)


def estimate(rs: list[dict], part: str, tasks: Sequence[str]) -> Estimate:
    """Mean over a group's seeds (the base model: a group of one)."""
    values = [score(r, part) for r in rs]
    return Estimate(statistics.fmean(values), len(values), statistics.stdev(values) if len(values) > 1 else None,
                    statistics.fmean(score_se(r, part, tasks) for r in rs))


def difference(a: Estimate, b: Estimate, paired_se: float | None = None) -> tuple[float, float]:
    """a - b and its stderr. Without ``paired_se`` the test-set errors are counted as independent, which is
    conservative: both evaluations answer the same questions. With it (``paired_test_se``), the test-set part
    is the stderr of the question-by-question difference. The spread over seeds is added where measured."""
    var = paired_se ** 2 if paired_se is not None else a.test_se ** 2 + b.test_se ** 2
    var += sum(e.seed_std ** 2 / e.seeds for e in (a, b) if e.seed_std is not None)
    return a.mean - b.mean, math.sqrt(var)


def paired_test_se(a: list[dict], b: list[dict], part: str, tasks: Sequence[str]) -> float | None:
    """Stderr of the mean over ``tasks`` of the question-by-question difference between two groups of
    evaluations (each question's outcome averaged over a group's seeds). Only the evaluations that stored
    per-question outcomes enter (runs stored before they were recorded have none); None when a group has no
    such evaluation or they answered different questions."""
    a, b = ([src for src in g if all("correct" in src[part][t] for t in tasks)] for g in (a, b))
    if not a or not b:
        return None
    var = 0.0
    for t in tasks:
        entries = [src[part][t] for src in a + b]
        if len({e["ids_digest"] for e in entries}) > 1:
            return None
        mean_a = [statistics.fmean(int(e["correct"][i]) for e in entries[: len(a)]) for i in range(entries[0]["n"])]
        mean_b = [statistics.fmean(int(e["correct"][i]) for e in entries[len(a):]) for i in range(entries[0]["n"])]
        var += mean_stderr([x - y for x, y in zip(mean_a, mean_b, strict=True)]) ** 2  # the paired stderr, squared
    return math.sqrt(var) / len(tasks)


def compare(a: list[dict], b: list[dict], part: str, tasks: Sequence[str]) -> tuple[float, float]:
    """Mean score of group ``a`` minus group ``b`` (runs or the base model) with its stderr, paired by question
    where both stored their per-question outcomes."""
    return difference(estimate(a, part, tasks), estimate(b, part, tasks), paired_test_se(a, b, part, tasks))


def per_question(hits: list[float], ids: list[str], score: float) -> dict[str, str]:
    """A run's per-question outcomes of its primary metric ("0"/"1" per question, in test order) and a digest
    of the question ids: two evaluations with the same digest answered the same questions, so their difference
    can be taken question by question (see ``paired_test_se``)."""
    if abs(statistics.fmean(hits) - score) > 1e-9:
        raise AssertionError(f"per-question outcomes average {statistics.fmean(hits)}, the score is {score}")
    return {"correct": "".join("1" if h else "0" for h in hits), "ids_digest": json_digest(ids)}


def binary_stderr(values: list[float]) -> float | None:
    """Stderr of the mean of 0/1 outcomes, sqrt(p(1-p)/(n-1)); None under two values."""
    n = len(values)
    if n < 2:
        return None
    p = statistics.fmean(values)
    return math.sqrt(p * (1 - p) / (n - 1))


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample std (None with one value; both None with none)."""
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def retention(run: dict, base: dict | None) -> float | None:
    """A run's general-suite mean as a share of the base model's (None without a base score)."""
    if not base or not base.get("general_mean"):
        return None
    return run["general_mean"] / base["general_mean"]


def fmt_pct(x: float | None, digits: int = 1) -> str:
    """A score in percent ("-" for none)."""
    return "-" if x is None else f"{100 * x:.{digits}f}"


def fmt_ms(values: list[float | None], digits: int = 1) -> str:
    """Mean ± std over seeds in percent, ignoring missing values ("-" for none)."""
    m, s = mean_std([v for v in values if v is not None])
    if m is None:
        return "-"
    return f"{100 * m:.{digits}f}" + (f" ± {100 * s:.{digits}f}" if s is not None else "")


def beyond(d: tuple[float, float], k: float = 2.0) -> bool:
    """The difference is more than `k` stderr from zero (the study's decision rule, k = 2)."""
    return abs(d[0]) > k * d[1]


def fmt_diff(d: tuple[float, float]) -> str:
    """Points, with the stderr; '*' marks a difference beyond 2 stderr."""
    return f"{100 * d[0]:+.1f} ± {100 * d[1]:.1f}" + ("*" if beyond(d) else "")


def learn_forget_front(points: list[tuple[str, float, float]]) -> list[str]:
    """Names of the (name, downstream, retention) points that no other point beats on both coordinates, in
    order of falling downstream score."""
    beaten = {n for n, d, r in points
              if any(d2 >= d and r2 >= r and (d2, r2) != (d, r) for _, d2, r2 in points)}
    return [n for n, _, _ in sorted(points, key=lambda p: -p[1]) if n not in beaten]
