"""The learn/forget comparison of a base and an adapted model's evaluation results, task by task."""

from __future__ import annotations

import math
from collections.abc import Sequence

from .metrics import paired_delta_stderr


def forgetting_report(base_results: dict, adapted_results: dict, tasks: Sequence[str] | None = None) -> dict:
    """Compare a base and an adapted model's ``evaluate`` results, task by task.

    ``general`` lists every general task (role "general") present in both: base and adapted score, delta,
    the stderr of each and of the delta, and retention (adapted / base); ``mean_retention`` averages it.
    ``downstream`` lists the downstream tasks the same way (what was learned). Results to compare must
    share protocol, split and n per task.
    """
    common = [t for t in base_results["tasks"] if t in adapted_results["tasks"]]
    if tasks is not None:
        missing = [t for t in tasks if t not in common]
        if missing:
            raise ValueError(f"tasks missing from one of the results: {', '.join(missing)}")
        common = list(tasks)
    general, downstream = [], []
    for name in common:
        b, a = base_results["tasks"][name], adapted_results["tasks"][name]
        for key in ("protocol", "metric", "n"):
            if b[key] != a[key]:
                raise ValueError(
                    f"{name}: base and adapted results differ in {key} ({b[key]} vs {a[key]}); "
                    f"compare like with like"
                )
        if (
            b["split"]["name"] != a["split"]["name"]
            or b["split"]["test_fraction"] != a["split"]["test_fraction"]
        ):
            raise ValueError(f"{name}: base and adapted results were computed on different splits")
        row = _report_row(name, b, a)
        (general if b.get("role", "general") == "general" else downstream).append(row)
    retentions = [r["retention"] for r in general if r["retention"] is not None]
    deltas = [r["delta"] for r in general]
    return {
        "base": {"model": base_results.get("model"), "adapter": base_results.get("adapter")},
        "adapted": {"model": adapted_results.get("model"), "adapter": adapted_results.get("adapter")},
        "protocol": base_results.get("protocol"),
        "split": base_results.get("split"),
        "general": general,
        "downstream": downstream,
        "mean_retention": sum(retentions) / len(retentions) if retentions else None,
        "mean_delta": sum(deltas) / len(deltas) if deltas else None,
        "mean_downstream_delta": (sum(r["delta"] for r in downstream) / len(downstream))
        if downstream
        else None,
    }


def _report_row(name: str, b: dict, a: dict) -> dict:
    bs, as_ = b["stderr"], a["stderr"]
    return {
        "task": name,
        "metric": b["metric"],
        "n": b["n"],
        "chance": b.get("chance"),
        "base": b["score"],
        "adapted": a["score"],
        "delta": a["score"] - b["score"],
        "base_stderr": bs,
        "adapted_stderr": as_,
        "delta_stderr": _delta_stderr(b, a),
        "retention": a["score"] / b["score"] if b["score"] else None,
    }




def _delta_stderr(b: dict, a: dict) -> float | None:
    """Paired stderr of the delta when both results carry per-question outcomes of the same questions;
    else the independent-samples sqrt(se_b^2 + se_a^2) (results written before outcomes were recorded)."""
    if b.get("outcomes") is not None and a.get("outcomes") is not None and b.get("ids_digest") == a.get("ids_digest"):
        return paired_delta_stderr(b["outcomes"], a["outcomes"])
    bs, as_ = b["stderr"], a["stderr"]
    return math.sqrt(bs**2 + as_**2) if bs is not None and as_ is not None else None
