"""Running a budget of a study: which runs are left, the base model first, each run locked and in a process of its
own (`sweep`), a run's twin stored with it, and the report regenerated after each run.

The study-specific glue between a plan (`study`), the runs' training and scoring (`runner.Study`) and the generic
sweep executor: what counts as stored (`run_status`), where a result goes, and what a worker prints.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from . import sweep
from .sizing import stderr_markdown, stderr_table
from .stats import fmt_pct, retention
from .store import load_json, write_json
from .study import Protocol, Run, StudyPlan, base_is_current, run_status, steps_path

if TYPE_CHECKING:
    from .runner import Study

Report = Callable[[bool], object]  # regenerate the report (quiet: no "wrote ..." line)


def statuses(plan: StudyPlan, runs: list[Run], runs_dir: Path, protocol: Protocol) -> dict[Run, str]:
    return {r: run_status(plan, r, runs_dir, protocol) for r in runs}


def plan_lines(plan: StudyPlan, budget: str, protocol: Protocol, runs: list[Run], status: dict[Run, str],
               base: dict | None) -> list[str]:
    """What `--plan` prints: the runs with their status and learning rate, then the stderr table."""
    lines = [f"[{plan.name}] budget {budget}, protocol {protocol.name} ({protocol.digest()}): {len(runs)} runs, "
             f"{sum(s == 'done' for s in status.values())} done, {sum(s == 'stale' for s in status.values())} stale"]
    lines += [f"  {r.run_id:40s} {status[r]:8s} lr {plan.methods[r.method].lr:g}" for r in runs]
    return lines + [stderr_markdown(stderr_table(plan, protocol, base))]


def measure_steps(study: Study, runs: list[Run], steps: int, report: Report | None = None) -> int:
    """Time `steps` training steps of each distinct (method, setting) of `runs` (seed 0), each in a fresh
    process, and store each timing under the allocator it ran with."""
    protocol_dir = study.runs_dir / study.protocol.name
    for r in dict.fromkeys(Run(r.method, r.setting, 0) for r in runs):
        res = sweep.run_isolated(study.measure_steps, r, steps)
        write_json(steps_path(protocol_dir, r, res["environment"]["allocator"]), res)
        study.log(f"{r.setting} {r.method}: {res['cpu_seconds_per_step']:.2f} CPU s/step, "
                  f"{res['wall_seconds_per_step']:.2f} wall s/step, peak RSS {res['peak_rss_gb']} GB "
                  f"({res['environment']['allocator']} malloc)")
    if report is not None:
        report(False)
    return 0


def run_budget(study: Study, runs: list[Run], status: dict[Run, str], rerun_stale: bool = False,
               max_runs: int | None = None, report: Report | None = None) -> int:
    """Execute and store the pending runs (and the stale ones with `rerun_stale`), at most `max_runs`; the
    base model is scored first when it is not stored at this protocol's sizes. Returns 1 if any run failed."""
    plan, protocol = study.plan, study.protocol
    todo = [r for r in runs if status[r] == "pending" or (status[r] == "stale" and rerun_stale)]
    for r in runs:
        if status[r] == "stale" and not rerun_stale:
            study.log(f"{r.run_id}: stored with another protocol or config; kept (use --rerun-stale)")
    if todo and not base_is_current(load_json(study.dir / "base.json"), protocol):
        sweep.run_isolated(study.ensure_base, False)
    work = sweep.Sweep(
        name=lambda r: r.run_id, is_done=lambda r: run_status(plan, r, study.runs_dir, protocol) == "done",
        execute=lambda r: sweep.run_isolated(study.execute, r), store=lambda r, res: store_run(study, r, res),
        lock_dir=study.work_dir / protocol.name, log=study.log)

    def after_each(r: Run, result: dict, seconds: float) -> None:
        log_result(study, r, result, seconds)
        if report is not None:
            report(True)

    tally = sweep.run_sweep(work, todo, max_runs, after_each)
    if report is not None:
        report(False)
    return 1 if tally.failures else 0


def store_run(study: Study, run: Run, result: dict) -> None:
    """Store a run's result, and under its twin's name too when the twin is not stored (`StudyPlan.twin`)."""
    plan, protocol = study.plan, study.protocol
    write_json(run.path(study.runs_dir, protocol), result)
    other = plan.twin(run, protocol.name)
    if other is not None and run_status(plan, other, study.runs_dir, protocol) != "done":
        write_json(other.path(study.runs_dir, protocol), plan.twin_result(result, other))
        study.log(f"{run.run_id}: stored as {other.run_id} too (the same training)")


def log_result(study: Study, run: Run, result: dict, seconds: float) -> None:
    """One line per stored run: its scores, retention against the stored base, and its times."""
    base = load_json(study.dir / "base.json")
    ret = retention(result, base)
    study.log(f"{run.run_id}: downstream {fmt_pct(result['downstream_mean'])}, general "
              f"{fmt_pct(result['general_mean'])} (retention {fmt_pct(ret)}%), arithmetic "
              f"{fmt_pct(result['math_score'])}; train {result['train']['seconds']:.0f} s, eval "
              f"{result['seconds']:.0f} s, total {seconds:.0f} s")
