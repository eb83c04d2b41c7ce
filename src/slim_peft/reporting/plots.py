"""Plots (PNG, matplotlib's Agg backend) of evaluation results."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from slim_peft.evaluation.results import LearnForgetReport


def plot_forgetting(report: LearnForgetReport, path: str | Path) -> Path:
    """Bar chart of base vs adapted score per task (error bars = stderr, ticks = chance); PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report.general + report.downstream
    n = len(rows)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * n + 2), 4.0))
    x = np.arange(n)
    w = 0.38
    ax.bar(
        x - w / 2,
        [r.base for r in rows],
        w,
        yerr=[r.base_stderr or 0 for r in rows],
        label="base",
        color="#8c9fb5",
        capsize=3,
    )
    ax.bar(
        x + w / 2,
        [r.adapted for r in rows],
        w,
        yerr=[r.adapted_stderr or 0 for r in rows],
        label="adapted",
        color="#d9822b",
        capsize=3,
    )
    for i, r in enumerate(rows):
        if r.chance is not None:
            ax.hlines(r.chance, i - 0.45, i + 0.45, colors="k", linestyles="dotted", linewidth=1)
    if report.downstream and report.general:
        ax.axvline(len(report.general) - 0.5, color="grey", linewidth=0.8)
    ax.set_xticks(x)
    ax.set_xticklabels(
        [r.task + ("" if i < len(report.general) else "\n(downstream)") for i, r in enumerate(rows)],
        rotation=30,
        ha="right",
        fontsize=8,
    )
    ax.set_ylabel("score")
    ax.set_ylim(0, 1)
    title = "base vs adapted (dotted: chance)"
    if report.mean_retention is not None:
        title += f"; mean retention of general tasks {report.mean_retention:.3f}"
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


