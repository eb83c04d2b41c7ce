"""Markdown tables of evaluation results and of the learn/forget report."""

from __future__ import annotations

from slim_peft.evaluation.results import EvalResult, LearnForgetReport, TaskDelta


def _fmt(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def results_table(results: EvalResult) -> str:
    """A Markdown table of one ``evaluate`` result."""
    lines = [
        "| task | metric | score | stderr | acc_norm | n | chance | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.tasks.items():
        norm = r.metrics.get("acc_norm")
        lines.append(
            f"| {name} | {r.metric} | {_fmt(r.score)} | {_fmt(r.stderr)} | "
            f"{_fmt(norm) if norm is not None else '-'} | {r.n} | {r.chance:.3f} | {r.seconds:.1f} |"
        )
    return "\n".join(lines)


def forgetting_markdown(report: LearnForgetReport) -> str:
    """The forgetting report as Markdown."""
    head = "| task | metric | n | base | adapted | delta | stderr (delta) | retention |"
    sep = "|---|---|---|---|---|---|---|---|"

    def table(rows: list[TaskDelta]) -> list[str]:
        return [head, sep] + [
            f"| {r.task} | {r.metric} | {r.n} | {_fmt(r.base)} ± {_fmt(r.base_stderr)} | "
            f"{_fmt(r.adapted)} ± {_fmt(r.adapted_stderr)} | {r.delta:+.4f} | {_fmt(r.delta_stderr)} | "
            f"{_fmt(r.retention, 3)} |"
            for r in rows
        ]

    lines = [
        "# Forgetting report",
        "",
        f"base: {report.base['model']} (adapter: {report.base['adapter']}); adapted: "
        f"{report.adapted['model']} (adapter: {report.adapted['adapter']}); "
        f"protocol {report.protocol}, "
        f"split {report.split}.",
        "",
        "## General tasks (what is kept)",
        "",
        *table(report.general),
        "",
        f"Mean retention (adapted / base): **{_fmt(report.mean_retention, 3)}**; "
        f"mean delta {_fmt(report.mean_delta)}.",
    ]
    if report.downstream:
        lines += [
            "",
            "## Downstream tasks (what is learned)",
            "",
            *table(report.downstream),
            "",
            f"Mean downstream delta: {_fmt(report.mean_downstream_delta)}.",
        ]
    return "\n".join(lines) + "\n"


