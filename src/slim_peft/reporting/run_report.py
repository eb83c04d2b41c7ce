"""The report of a ``slim-peft run``: results JSON, a Markdown summary and PNG plots.

Files (all in the run directory)::

    config.yaml            everything the run was started with (model, method config, training, tasks)
    metrics.jsonl          the training log (written by the trainer)
    results.json           evaluations before and after, the learn/forget report, routing statistics, timings
    summary.md             the learn/forget table and the run's key numbers
    loss_curve.png         training loss (and auxiliary losses) over steps
    learn_vs_forget.png    per task base vs adapted, and the run as a point (learned, forgotten)
    identity_routing.png   share of routing weight on identity experts per layer (downstream vs general data)
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from slim_peft.evaluation.results import LearnForgetReport

from .plots import plot_forgetting
from .tables import forgetting_markdown

REPORT_FILES = ("config.yaml", "metrics.jsonl", "results.json", "summary.md", "loss_curve.png",
                "learn_vs_forget.png", "identity_routing.png")


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _layer_index(name: str) -> int:
    m = re.search(r"\.(?:layers|h|blocks)\.(\d+)\.", "." + name + ".")
    return int(m.group(1)) if m else 0


def identity_share_per_layer(routing_stats: dict[str, Any] | None) -> dict[int, float]:
    """Token-weighted share of routing weight on identity experts per decoder layer ({} without SLIM)."""
    if not routing_stats:
        return {}
    weight: dict[int, float] = defaultdict(float)
    tokens: dict[int, float] = defaultdict(float)
    for name, site in routing_stats.get("sites", {}).items():
        if "identity_share" not in site:
            continue
        layer = _layer_index(name)
        n = max(float(site.get("tokens", 0)), 0.0)
        weight[layer] += site["identity_share"] * (n if n else 1.0)
        tokens[layer] += n if n else 1.0
    return {layer: weight[layer] / tokens[layer] for layer in sorted(weight)}


# ---------------------------------------------------------------------------------------------- plots


def plot_loss_curve(metrics: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Training loss per logged step; auxiliary losses on a second axis; eval/loss as points."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    train = [r for r in metrics if "loss" in r]
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", color="#1f77b4")
    evals = [r for r in metrics if "eval/loss" in r]
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval/loss"] for r in evals], "o--", label="eval loss",
                color="#d62728")
    aux_keys = sorted({k for r in train for k in r if k.startswith("aux/")})
    if aux_keys:
        ax2 = ax.twinx()
        for k, color in zip(aux_keys, ("#2ca02c", "#9467bd", "#8c564b", "#e377c2"), strict=False):
            ax2.plot([r["step"] for r in train if k in r], [r[k] for r in train if k in r], ":", color=color,
                     label=f"{k[4:]} (right axis, unweighted)")
        ax2.set_ylabel("auxiliary loss")
        lines = ax.get_legend_handles_labels()
        lines2 = ax2.get_legend_handles_labels()
        ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8)
    elif train or evals:
        ax.legend(fontsize=8)
    if not train and not evals:
        ax.text(0.5, 0.5, "no training steps logged", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (answer tokens)")
    ax.set_title(title or "training loss", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def plot_learn_vs_forget(report: LearnForgetReport, path: str | Path, label: str = "run",
                         others: dict[str, tuple[float, float]] | None = None) -> Path:
    """Left: base vs adapted score per task. Right: the run as a point (learned = mean downstream gain,
    forgotten = mean general drop, in points), with ``others`` (label -> (learned, forgotten)) beside it."""
    plt = _plt()
    rows = report.downstream + report.general
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [2.2, 1]})
    n = len(rows)
    xs = list(range(n))
    w = 0.38
    ax.bar([x - w / 2 for x in xs], [r.base for r in rows], w, yerr=[r.base_stderr or 0 for r in rows],
           label="before", color="#8c9fb5", capsize=3)
    ax.bar([x + w / 2 for x in xs], [r.adapted for r in rows], w,
           yerr=[r.adapted_stderr or 0 for r in rows], label="after", color="#d9822b", capsize=3)
    for i, r in enumerate(rows):
        if r.chance is not None:
            ax.hlines(r.chance, i - 0.45, i + 0.45, colors="k", linestyles="dotted", linewidth=1)
    nd = len(report.downstream)
    if 0 < nd < n:
        ax.axvline(nd - 0.5, color="grey", linewidth=0.8)
    ax.set_xticks(xs)
    ax.set_xticklabels([r.task + ("\n(learn)" if i < nd else "\n(keep)") for i, r in enumerate(rows)],
                       rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title("before vs after (dotted: chance)", fontsize=9)
    ax.legend(fontsize=8)

    points = dict(others or {})
    learned, forgot = report.learned, report.forgotten
    if learned is not None and forgot is not None:
        points[label] = (learned, forgot)
    for name, (lx, fy) in points.items():
        ax2.scatter([100 * lx], [100 * fy], s=60, color="#d9822b" if name == label else "#4c72b0", zorder=3)
        ax2.annotate(name, (100 * lx, 100 * fy), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax2.axhline(0, color="grey", linewidth=0.8)
    ax2.axvline(0, color="grey", linewidth=0.8)
    ax2.set_xlabel("learned: mean downstream gain (points)")
    ax2.set_ylabel("forgotten: mean general drop (points)")
    ax2.set_title("learn vs forget (right and low is good)", fontsize=9)
    if not points:
        ax2.text(0.5, 0.5, "needs downstream and general results", ha="center", va="center",
                 transform=ax2.transAxes, fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_identity_routing(shares: dict[str, dict[int, float]], path: str | Path, method: str = "") -> Path:
    """Identity share per layer, one bar series per data source (e.g. downstream vs general tasks)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    series = {k: v for k, v in shares.items() if v}
    if series:
        layers = sorted({layer for v in series.values() for layer in v})
        width = 0.8 / len(series)
        colors = ("#d9822b", "#4c72b0", "#55a868", "#c44e52")
        for j, (name, per_layer) in enumerate(series.items()):
            ax.bar([layer + (j - (len(series) - 1) / 2) * width for layer in layers],
                   [per_layer.get(layer, 0.0) for layer in layers], width, label=name, color=colors[j % len(colors)])
        ax.set_xlabel("decoder layer")
        ax.set_ylabel("routing weight on identity experts")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=8)
        ax.set_title("identity-expert share per layer (higher = more of the base model kept)", fontsize=9)
    else:
        ax.text(0.5, 0.5, f"method {method or '?'} has no identity experts: no identity routing to show",
                ha="center", va="center", transform=ax.transAxes, fontsize=9)
        ax.set_axis_off()
    fig.tight_layout()
    return _save(fig, path)


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    _plt().close(fig)
    return path


# ------------------------------------------------------------------------------------------ markdown


def learn_forget_table(report: LearnForgetReport) -> str:
    """The table `slim-peft run` prints: one row per task, downstream (learn) first, then general (keep)."""
    lines = ["| task | kind | metric | n | before | after | delta | ± (delta) |",
             "|---|---|---|---|---|---|---|---|"]
    for kind, rows in (("learn", report.downstream), ("keep", report.general)):
        for r in rows:
            se = r.delta_stderr
            lines.append(f"| {r.task} | {kind} | {r.metric} | {r.n} | {r.base:.3f} | {r.adapted:.3f} "
                         f"| {r.delta:+.3f} | {'-' if se is None else f'{se:.3f}'} |")
    learned, forgot = report.learned, report.forgotten
    if learned is not None:
        lines.append(f"| **mean downstream** | learn | | | | | **{learned:+.3f}** | |")
    protocols = sorted({r.protocol for r in report.general if r.protocol})
    if len(protocols) > 1:  # loglik accuracy and generated answers are different measures: a mean of each
        for p in protocols:
            deltas = [r.delta for r in report.general if r.protocol == p]
            lines.append(f"| **mean general ({p})** | keep | | | | | **{sum(deltas) / len(deltas):+.3f}** | |")
    if forgot is not None:
        lines.append(f"| **mean general** | keep | | | | | **{-forgot:+.3f}** | |")
    return "\n".join(lines)


def summary_markdown(results: dict[str, Any]) -> str:
    """``summary.md`` of a run from its ``results.json`` content."""
    cfg = results.get("config", {})
    tr = results.get("training", {})
    report = LearnForgetReport.from_dict(results["learn_forget"]) if results.get("learn_forget") else None
    t = results.get("timings_s", {})
    shares = results.get("routing", {})
    if cfg.get("data"):
        trained_on = (f"Trained on {cfg['data']} (instruction rows in the chat template, loss on the assistant "
                      f"turns; {cfg.get('held_out_rows')} rows held out by content hash, "
                      f"{tr.get('examples_per_task', {}).get('truncated', 0)} training rows truncated)")
        downstream = (f"Downstream: the held-out rows, answers generated greedily and scored by "
                      f"{cfg.get('metric')} against the reference")
    else:
        trained_on = (f"Trained on {', '.join(cfg.get('tasks', []))} (train splits, letter format, loss on the "
                      f"answer only)")
        downstream = "Downstream tasks: letter protocol on their test splits"
    probe = cfg.get("probe_tasks") or {}
    probe_text = "".join(f"; {name}: {', '.join(tasks)} ({'open questions' if name == 'probe' else 'generated'})"
                         for name, tasks in probe.items())
    lines = [
        f"# slim-peft run: {cfg.get('method', '?')} on {cfg.get('model', '?')}", "",
        f"{trained_on}; {tr.get('steps', '?')} optimizer steps of {tr.get('global_batch', '?')} examples, "
        f"{tr.get('examples', '?')} training examples, final loss {_f(tr.get('final_loss'))}, "
        f"{tr.get('trainable_parameters', 0):,} trainable parameters.",
        f"{downstream}; general suite: {cfg.get('general_protocol', 'loglik')} (lm-eval style) on test splits"
        f"{probe_text}; at most {cfg.get('eval_limit')} questions per task.", "",
        "## What it learned and what it forgot", "",
        learn_forget_table(report) if report else "(no evaluation)", "",
        "Delta = after - before (accuracy); ± is the paired standard error of the delta: both models answer "
        "the same questions, so it is the stderr of the per-question differences.", "",
    ]
    lines += _generative_metrics(results)
    shares = {k: v for k, v in shares.items() if v and v.get("mean_identity_share") is not None}
    if shares:  # methods with identity experts (SLIM)
        lines += ["## Identity routing", "",
                  "Mean share of routing weight on identity experts (the base model's own path): "
                  + ", ".join(f"{k} data {_f(v['mean_identity_share'])}" for k, v in shares.items()) + ".", ""]
    lines += ["## Time", "", "| phase | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in t.items()]
    lines += ["", "Files: " + ", ".join(f"`{f}`" for f in REPORT_FILES) + ", `adapter/`.", ""]
    return "\n".join(lines)


def _generative_metrics(results: dict[str, Any]) -> list[str]:
    """Every metric of the generatively scored tasks (held-out rows, open probe), before and after."""
    rows = []
    for part, before in results.get("before", {}).items():
        after = results.get("after", {}).get(part, {})
        for name, b in before.get("tasks", {}).items():
            a = after.get("tasks", {}).get(name)
            if a is None or b.get("protocol") not in ("freeform", "freeform-sampled", "open"):
                continue
            for metric, value in b.get("metrics", {}).items():
                if not metric.endswith("_stderr") and value is not None:
                    after_value = a["metrics"].get(metric)
                    rows.append(f"| {name} | {metric} | {value:.3f} ± {_f(b['metrics'].get(f'{metric}_stderr'))} | "
                                f"{_f(after_value)} ± {_f(a['metrics'].get(f'{metric}_stderr'))} |")
    if not rows:
        return []
    return ["## Generated answers: every metric", "", "| task | metric | before | after |", "|---|---|---|---|",
            *rows, "", "token_loss is the mean NLL per reference token (lower is better).", ""]


def _f(x: Any) -> str:
    return "-" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)


def write_run_report(run_dir: str | Path, results: dict[str, Any],
                     metrics: Sequence[dict[str, Any]]) -> dict[str, Path]:
    """Write results.json, summary.md and the three plots into ``run_dir``; returns their paths."""
    run_dir = Path(run_dir)
    paths = {"results": run_dir / "results.json", "summary": run_dir / "summary.md"}
    paths["results"].write_text(json.dumps(results, indent=2, default=str))
    paths["summary"].write_text(summary_markdown(results))
    cfg = results.get("config", {})
    paths["loss_curve"] = plot_loss_curve(metrics, run_dir / "loss_curve.png",
                                          title=f"{cfg.get('method', '')} on {cfg.get('model', '')}")
    report = LearnForgetReport.from_dict(results["learn_forget"])
    paths["learn_vs_forget"] = plot_learn_vs_forget(report, run_dir / "learn_vs_forget.png",
                                                    label=str(cfg.get("method", "run")))
    per_layer = {f"{k} data": identity_share_per_layer(v) for k, v in results.get("routing", {}).items()}
    paths["identity_routing"] = plot_identity_routing(per_layer, run_dir / "identity_routing.png",
                                                      method=str(cfg.get("method", "")))
    return paths


def write_forgetting_report(report: LearnForgetReport, prefix: str | Path) -> dict[str, Path]:
    """Write ``<prefix>.md``, ``<prefix>.json`` and ``<prefix>.png`` of a forgetting report; returns the paths."""
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    paths = {"md": prefix.with_suffix(".md"), "json": prefix.with_suffix(".json"), "png": prefix.with_suffix(".png")}
    paths["md"].write_text(forgetting_markdown(report))
    paths["json"].write_text(json.dumps(report.to_dict(), indent=2))
    plot_forgetting(report, paths["png"])
    return paths
