"""Learn-vs-forget study of every method on SmolLM2-135M-Instruct.

Each method is fine-tuned on MDS (OpenBookQA + SocialIQA + BoolQ train splits mixed, letter format, loss on the
answer only) with the same data, steps, batch and schedule; only the learning rate differs (each method's paper
or reference code, see the plan's ``methods``). Afterwards it is scored on

- the downstream tasks' test splits with the ``letter`` protocol (what was learned), and
- the general suite (ARC-Easy, ARC-Challenge, PIQA, SciQ, HellaSwag, Winogrande, MMLU) with the ``loglik``
  protocol plus basic_arithmetic by greedy generation (what was kept), compared with the base model.

The plan (methods and their learning rates, settings, protocols, budgets) is data:
``benchmarks/studies/forgetting.yaml``; the training, sweep, statistics and report are ``slim_peft.experiments``.
Every (method, setting, seed) run is stored as ``benchmarks/results/forgetting/<protocol>/<setting>__<method>__
seed<k>.json`` and skipped when present, so the study continues across sessions; the base model is scored once
(``base.json``). The report ``benchmarks/results/forgetting.md`` (and the PNG plots beside it) is regenerated
from the stored JSONs after every run, or alone with ``--report-only``.

    python benchmarks/forgetting.py --budget pilot --methods lora,slim      # small end-to-end check
    python benchmarks/forgetting.py --budget main                           # 8 methods x 3 seeds
    python benchmarks/forgetting.py --budget ablations                      # SLIM ablations (paper Table 3)
    python benchmarks/forgetting.py --budget sweeps                         # mask ratio, number of experts
    python benchmarks/forgetting.py --budget curves                         # general score over steps (*)
    python benchmarks/forgetting.py --budget diagnostics                    # what moves SLIM's retention
    python benchmarks/forgetting.py --plan --budget main                    # what would run, sizes, stderr
    python benchmarks/forgetting.py --report-only

(*) A curve run trains the same model as the main run of its method and seed (seed 0 of LoRA, MixLoRA and
SLIM), so that main run scores the curve as it trains and is stored under both names (``twin``): after
``--budget main`` the curves budget has nothing left to run.

The study runs under glibc's malloc by default. ``--allocator jemalloc`` (or ``auto``: jemalloc when found,
see ``src/slim_peft/training/allocator.py``) gives the same numbers with training steps 1.1-1.3x faster, but with its
decay off jemalloc never returns freed pages: the exact-merge run grew to 23 GB resident by step 16 (glibc:
8.0 GB peak over 10 steps) and was killed for memory, and with its default decay (10 s) its steps were 1.6x
slower than glibc's (110.6 vs 68.8 CPU s). Use it for the runs that fit in memory.

Budgets "main", "ablations", "sweeps", "curves" and "diagnostics" share one protocol ("study"): their runs are
comparable and share the base scores and the SLIM x mds runs. ``--max-steps``, ``--limit-general`` or
``--limit-downstream`` change the protocol, so such runs go into their own directory (``custom-<hash>``) and
never mix with the study's.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))

from slim_peft.experiments import budget, runner, study_report, sweep  # noqa: E402
from slim_peft.experiments.store import load_json  # noqa: E402
from slim_peft.experiments.study import PlanError, load_plan  # noqa: E402

PLAN_FILE = REPO / "benchmarks" / "studies" / "forgetting.yaml"
RESULTS_DIR = REPO / "benchmarks" / "results"
RUNS_DIR = RESULTS_DIR / "forgetting"
REPORT = RESULTS_DIR / "forgetting.md"
README = REPO / "README.md"
DEFAULT_WORK_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "slim-peft" / "forgetting-work"
PLAN = load_plan(PLAN_FILE)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", choices=sorted(PLAN.budgets), default="main",
                    help="which runs: main (8 methods x 3 seeds), ablations, sweeps, curves, diagnostics, pilot")
    ap.add_argument("--methods", default=None, help="comma-separated method keys (default: the budget's)")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds (default: the budget's)")
    ap.add_argument("--settings", default=None,
                    help="comma-separated settings of the budget to run (default: all of them), e.g. "
                         "`--budget sweeps --settings experts2 --seeds 1,2`")
    ap.add_argument("--max-steps", type=int, default=None, help="override the training steps (new protocol)")
    ap.add_argument("--limit-general", type=int, default=None,
                    help="questions per general task (MMLU: at least 1 per subject) (new protocol)")
    ap.add_argument("--limit-downstream", type=int, default=None,
                    help="questions per downstream task (new protocol)")
    ap.add_argument("--limit-math", type=int, default=None, help="basic_arithmetic questions (new protocol)")
    ap.add_argument("--runs-dir", type=Path, default=RUNS_DIR, help="where run JSONs are stored")
    ap.add_argument("--report", type=Path, default=REPORT, help="the Markdown report to regenerate")
    ap.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR,
                    help="training checkpoints (a killed run resumes from its last checkpoint); deleted after a run")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per worker (default 1; 0: torch's default, all cores)")
    ap.add_argument("--workers", type=int, default=1,
                    help="start this many worker processes that share the budget's runs (lock files); on a "
                         "2-core machine 2 workers x 1 thread beat 1 x 2 threads")
    ap.add_argument("--keep-adapters", action="store_true", help="keep each run's adapter in --work-dir")
    ap.add_argument("--rerun-stale", action="store_true",
                    help="re-run runs stored with another protocol or config instead of skipping them")
    ap.add_argument("--plan", action="store_true",
                    help="print the runs, their status and the stderr table; run nothing")
    ap.add_argument("--report-only", action="store_true", help="only regenerate the report from stored JSONs")
    ap.add_argument("--measure-steps", type=int, default=None, metavar="N",
                    help="only time N training steps of each selected (method, setting) (no evaluation) and "
                         "store steps__[<setting>__]<method>[__<allocator>].json, for sizing")
    ap.add_argument("--allocator", choices=("auto", "jemalloc", "system"), default="system",
                    help="malloc of the study's processes: system (default, glibc's), jemalloc (required; "
                         "1.1-1.3x faster training steps, but it keeps every freed page: the exact-merge run "
                         "outgrew 23 GB), auto (jemalloc when found, see src/slim_peft/training/allocator.py)")
    ap.add_argument("--no-report", action="store_true", help="do not regenerate the report after each run")
    ap.add_argument("--max-runs", type=int, default=None, help="stop after this many new runs")
    return ap.parse_args(argv)


def command_line(argv: list[str] | None) -> str:
    """This invocation as a shell command (stored in every run: how to reproduce it)."""
    args = sys.argv[1:] if argv is None else argv
    return f"python {PLAN.script} " + " ".join(shlex.quote(a) for a in args)


def write_report(args: argparse.Namespace, quiet: bool = False) -> Path:
    """The report from the stored runs; the README's headline too, for the repository's own report only."""
    own = args.report == REPORT and args.runs_dir == RUNS_DIR
    return study_report.write_report(PLAN, args.runs_dir, args.report, readme=README if own else None, quiet=quiet)


def spawn_workers(args: argparse.Namespace, argv: list[str] | None) -> int:
    """Run ``args.workers`` copies of this command (``--workers 1``), the first scoring the base model first;
    each writes its own log next to the work dir. Returns the worst exit code."""
    clean = sweep.without_option(sys.argv[1:] if argv is None else argv, "--workers")
    code = sweep.spawn_workers(sweep.python_command(Path(__file__), [*clean, "--workers", "1"]), args.workers,
                               args.work_dir / "logs", others_extra=["--no-report"],
                               log=lambda m: print(f"[{PLAN.name}] {m}", flush=True))
    if not args.no_report:
        write_report(args)
    return code


def _split(value: str | None, cast: type = str) -> list | None:
    """A comma-separated option as a list (None when not given)."""
    return [cast(x.strip()) for x in value.split(",")] if value else None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report_only:
        write_report(args)
        return 0
    protocol = PLAN.make_protocol(args.budget, args.max_steps, args.limit_general, args.limit_downstream,
                                  args.limit_math)
    try:
        runs = PLAN.runs(args.budget, _split(args.methods), _split(args.seeds, int), _split(args.settings))
    except PlanError as e:
        raise SystemExit(str(e)) from None
    status = budget.statuses(PLAN, runs, args.runs_dir, protocol)
    base = load_json(args.runs_dir / protocol.name / "base.json")
    print("\n".join(budget.plan_lines(PLAN, args.budget, protocol, runs, status, base)))
    if args.plan:
        return 0
    if args.workers > 1:
        return spawn_workers(args, argv)
    study = runner.Study(PLAN, protocol, args.runs_dir, args.work_dir, threads=args.threads,
                         keep_adapters=args.keep_adapters, command=command_line(argv))
    report = None if args.no_report else (lambda quiet: write_report(args, quiet))
    if args.measure_steps:
        return budget.measure_steps(study, runs, args.measure_steps, report)
    return budget.run_budget(study, runs, status, args.rerun_stale, args.max_runs, report)


def _allocator_choice(argv: list[str]) -> str:
    """--allocator's value, read before argparse (the process is replaced before anything else runs)."""
    for i, a in enumerate(argv):
        if a.startswith("--allocator="):
            return a.split("=", 1)[1]
        if a == "--allocator" and i + 1 < len(argv):
            return argv[i + 1]
    return "system"


if __name__ == "__main__":
    choice = _allocator_choice(sys.argv[1:])
    if choice in ("auto", "jemalloc") and not {"--report-only", "--plan", "-h", "--help"} & set(sys.argv):
        from slim_peft.training.allocator import reexec_with_jemalloc

        reexec_with_jemalloc(choice)  # returns only when already preloaded, or (auto) when there is none
    raise SystemExit(main())
