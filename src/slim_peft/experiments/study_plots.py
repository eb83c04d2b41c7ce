"""The study report's plots (PNG, matplotlib's Agg backend): learn vs forget, sweeps, curves over steps.

Where a reader would rather look than read: the trade-off between what a method learned and what it kept is a
position on a plane, and a sweep or a curve is a line. Each function returns the path it wrote, or None when the
stored runs do not hold what the plot needs (so the report leaves the image out).
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from .stats import retention
from .study import StudyPlan


def _pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display needed; imported only when a plot is drawn)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def scatter_plot(plan: StudyPlan, groups: dict[tuple, list], base: dict, path: Path, title: str) -> Path | None:
    """Downstream accuracy against general retention, one point per (method, setting) with its seed spread."""
    if not groups or not base:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for key in sorted(groups, key=plan.method_order):
        rs = groups[key]
        xs = [100 * retention(r, base) for r in rs]
        ys = [100 * r["downstream_mean"] for r in rs]
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        ex = statistics.stdev(xs) if len(xs) > 1 else 0
        ey = statistics.stdev(ys) if len(ys) > 1 else 0
        label = rs[0]["method_label"] + ("" if rs[0]["setting"] in ("mds", "curve") else f" ({rs[0]['setting']})")
        ax.errorbar(mx, my, xerr=ex, yerr=ey, fmt="o", capsize=3, label=label,
                    markersize=9 if rs[0]["method"] == "slim" else 6)
        ax.scatter(xs, ys, s=8, alpha=0.35, color=ax.lines[-1].get_color() if ax.lines else None)
    ax.axvline(100, color="grey", lw=0.8, ls=":")
    ax.axhline(100 * base["downstream_mean"], color="grey", lw=0.8, ls="--")
    ax.text(100, 100 * base["downstream_mean"], " base", fontsize=8, va="bottom")
    ax.set_xlabel("general-suite retention (% of the base model's 7-task mean)")
    ax.set_ylabel("downstream accuracy, OBQA+SIQA+BoolQ mean (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def curves_plot(plan: StudyPlan, runs: list[dict], base: dict, path: Path) -> Path | None:
    """General mean and arithmetic over training steps of the runs that scored a curve (step 0: the base)."""
    runs = [r for r in runs if r.get("curve")]
    if not runs or not base:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    for r in sorted(runs, key=lambda r: plan.method_order((r["method"], r["setting"]))):
        steps = [0] + [c["step"] for c in r["curve"]]
        axes[0].plot(steps, [100 * base["general_mean"]] + [100 * c["general_mean"] for c in r["curve"]], "o-",
                     label=f"{r['method_label']} (seed {r['seed']})")
        axes[1].plot(steps, [100 * base["math_score"]] + [100 * (c["math"] or 0) for c in r["curve"]], "o-",
                     label=r["method_label"])
    axes[0].set_ylabel("general 7-task mean (%)")
    axes[1].set_ylabel("basic_arithmetic exact match (%)")
    for ax in axes:
        ax.set_xlabel("training step")
        ax.legend(fontsize=7)
    fig.suptitle("general capability over training steps (step 0 = base model)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _sweep_panels(plan: StudyPlan, runs: dict[str, dict]) -> list[tuple]:
    """(group, field, reference value, runs, x values) of each sweep with at least two points."""
    panels = []
    for group, (fld, ref) in plan.sweep_reference.items():
        if group == "diagnostics":
            continue
        pts = [r for r in runs.values() if r.get("group") == group and r["method"] == "slim"]
        pts += [r for r in runs.values() if r["method"] == "slim" and r["setting"] == "mds"]
        xs = sorted({r["adapter_config"].get(fld, ref) for r in pts})
        if len(xs) < 2:
            continue
        panels.append((group, fld, ref, pts, xs))
    return panels


def sweep_plot(plan: StudyPlan, runs: dict[str, dict], base: dict, path: Path) -> Path | None:
    """Retention and downstream accuracy against the swept field, one panel per sweep group."""
    panels = _sweep_panels(plan, runs)
    if not panels or not base:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6), squeeze=False)
    for ax, (_group, fld, ref, pts, xs) in zip(axes[0], panels, strict=True):
        ret = [statistics.fmean(100 * retention(r, base) for r in pts if r["adapter_config"].get(fld, ref) == x)
               for x in xs]
        down = [statistics.fmean(100 * r["downstream_mean"] for r in pts if r["adapter_config"].get(fld, ref) == x)
                for x in xs]
        ax.plot(xs, ret, "o-", label="general retention %")
        ax.plot(xs, down, "s--", label="downstream acc %")
        ax.set_xlabel(fld)
        ax.set_title(f"SLIM: {fld} sweep", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
