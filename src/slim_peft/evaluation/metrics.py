"""Metrics of per-question outcomes: means and lm-eval's stderr, and the paired stderr of a difference."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import numpy as np


def mean_stderr(values: Sequence[float]) -> float | None:
    """lm-eval's ``mean_stderr``: sample std / sqrt(n), i.e. sqrt(p(1-p)/(n-1)) for 0/1 values."""
    n = len(values)
    if n < 2:
        return None
    mu = sum(values) / n
    return math.sqrt(sum((x - mu) ** 2 for x in values) / (n - 1)) / math.sqrt(n)


def _argmax(values: Sequence[float]) -> int:
    """First index of the maximum (numpy's tie rule, as lm-eval)."""
    return int(np.argmax(np.asarray(values, dtype=np.float64)))


def _summary(values: dict[str, list[float]]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for name, vals in values.items():
        out[name] = sum(vals) / len(vals) if vals else None
        out[f"{name}_stderr"] = mean_stderr(vals)
    return out


def paired_delta_stderr(before: Sequence[float], after: Sequence[float]) -> float | None:
    """The stderr of mean(after) - mean(before) when both score the same questions in the same order: the
    sample std of the per-question differences / sqrt(n) (lm-eval's `mean_stderr` of d_i = a_i - b_i).
    A fine-tuned model mostly answers the questions the base answered, so this is far smaller than the
    unpaired sqrt(se_b^2 + se_a^2), which treats the two evaluations as independent samples."""
    if len(before) != len(after):
        raise ValueError(f"paired stderr needs the same questions: {len(before)} vs {len(after)} outcomes")
    return mean_stderr([a - b for a, b in zip(after, before, strict=True)])


def ids_digest(ids: Sequence[str]) -> str:
    """A short digest of question ids in order: two evaluations with the same digest scored the same
    questions, so their outcomes can be paired."""
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]
