"""Reporting: Markdown tables, plots and the report directory of a run."""

from .plots import plot_forgetting
from .run_report import (
    REPORT_FILES,
    identity_share_per_layer,
    learn_forget_table,
    plot_identity_routing,
    plot_learn_vs_forget,
    plot_loss_curve,
    summary_markdown,
    write_forgetting_report,
    write_run_report,
)
from .tables import forgetting_markdown, results_table

__all__ = [
    "REPORT_FILES", "forgetting_markdown", "identity_share_per_layer", "learn_forget_table",
    "plot_forgetting", "plot_identity_routing", "plot_learn_vs_forget", "plot_loss_curve", "results_table",
    "summary_markdown", "write_forgetting_report", "write_run_report",
]
