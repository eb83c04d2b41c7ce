"""The report directory of a continual run, from its results.json content: summary.md (the accuracy matrix,
AP / BWT / FWT and the general side after each stage), accuracy_matrix.png (a heatmap of R) and
task_curves.png (each task's score over the stages)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from slim_peft.evaluation.continual import ContinualMetrics, Estimate

CONTINUAL_FILES = ("results.json", "summary.md", "accuracy_matrix.png", "task_curves.png")


def _est(e: Estimate, digits: int = 3, signed: bool = True) -> str:
    if e.value is None:
        return "-"
    return f"{e.value:{'+' if signed else ''}.{digits}f}" + ("" if e.stderr is None else f" ± {e.stderr:.{digits}f}")


def stage_names(results: dict[str, Any]) -> list[str]:
    return ["base"] + [f"after {i + 1}: {t}" for i, t in enumerate(results["tasks"])]


def matrix_markdown(results: dict[str, Any]) -> str:
    """R as a table: a row per stage (base first), a column per task; the diagonal (just trained) in bold."""
    tasks = results["tasks"]
    lines = ["| after stage | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for i, (name, row) in enumerate(zip(stage_names(results), results["matrix"], strict=True)):
        cells = [f"**{v:.3f}**" if i == j + 1 else f"{v:.3f}" for j, v in enumerate(row)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def metrics_markdown(metrics: ContinualMetrics) -> str:
    lines = ["| metric | value ± stderr |", "|---|---|",
             f"| AP (mean accuracy after the last stage) | {_est(metrics.average, signed=False)} |",
             f"| BWT (backward transfer) | {_est(metrics.backward_transfer)} |",
             f"| FWT (forward transfer) | {_est(metrics.forward_transfer)} |"]
    for i, e in enumerate(metrics.general_retention):
        lines.append(f"| general delta after stage {i + 1} | {_est(e)} |")
    return "\n".join(lines)


def summary_markdown(results: dict[str, Any]) -> str:
    cfg = results["config"]
    metrics = ContinualMetrics.from_dict(results["metrics"])
    stages = results.get("stages", [])
    lines = [f"# slim-peft continual: {cfg['method']} on {cfg['model']}", "",
             f"Sequence: {' -> '.join(results['tasks'])}; {cfg['max_steps']} optimizer steps per stage, seed "
             f"{cfg['seed']}. Each task is judged on its test split (letter format) or its held-out rows "
             f"(generated answers), at most {cfg['eval_limit']} each, before training and after every stage; "
             f"general suite: {', '.join(cfg.get('general_tasks', []))} (loglik)"
             + (f" and the open probe on {', '.join(cfg['probe_tasks'])}" if cfg.get("probe_tasks") else "")
             + ".", "", "## Accuracy matrix R[stage][task]", "", matrix_markdown(results), "",
             "## Continual metrics", "", metrics_markdown(metrics), "",
             "AP = mean of the last row; BWT = mean over earlier tasks of (last row - the row right after the "
             "task was trained), negative = forgetting; FWT = mean over later tasks of (the row before the task "
             "was trained - base). Every difference is paired question by question; ± is the stderr.", ""]
    if stages:
        lines += ["## Stages", "", "| stage | task | steps | final loss | seconds |", "|---|---|---|---|---|"]
        lines += [f"| {s['stage']} | {s['task']} | {s['steps']} | {s['final_loss']:.4f} | {s['seconds']:.0f} |"
                  for s in stages]
        lines.append("")
    return "\n".join(lines)


def plot_accuracy_matrix(results: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = np.asarray(results["matrix"], dtype=float)
    names = stage_names(results)
    fig, ax = plt.subplots(figsize=(1.3 * m.shape[1] + 3, 0.5 * m.shape[0] + 2))
    im = ax.imshow(m, cmap="viridis", vmin=0.0, vmax=max(1e-6, float(m.max())))
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", color="white" if m[i, j] < m.max() * 0.6
                    else "black", fontweight="bold" if i == j + 1 else "normal")
    ax.set_xticks(range(m.shape[1]), results["tasks"], rotation=30, ha="right")
    ax.set_yticks(range(m.shape[0]), names)
    ax.set_xlabel("task judged")
    ax.set_title(f"{results['config']['method']}: accuracy after each stage")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_task_curves(results: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = np.asarray(results["matrix"], dtype=float)
    fig, ax = plt.subplots(figsize=(6.5, 4.0))
    for j, task in enumerate(results["tasks"]):
        ax.plot(range(m.shape[0]), m[:, j], marker="o", label=task)
        ax.axvline(j + 1, color="grey", lw=0.5, ls=":")
    ax.set_xticks(range(m.shape[0]), ["base"] + [str(i + 1) for i in range(m.shape[0] - 1)])
    ax.set_xlabel("after stage")
    ax.set_ylabel("score")
    ax.set_title(f"{results['config']['method']}: each task over the sequence")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_continual_report(run_dir: str | Path, results: dict[str, Any]) -> dict[str, Path]:
    """results.json, summary.md and the two plots; returns their paths."""
    run_dir = Path(run_dir)
    paths = {"results": run_dir / "results.json", "summary": run_dir / "summary.md"}
    paths["results"].write_text(json.dumps(results, indent=2, default=str))
    paths["summary"].write_text(summary_markdown(results))
    paths["matrix"] = plot_accuracy_matrix(results, run_dir / "accuracy_matrix.png")
    paths["curves"] = plot_task_curves(results, run_dir / "task_curves.png")
    return paths
