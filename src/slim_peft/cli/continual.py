"""``slim-peft continual --tasks a,b,c,d --method M``: one adapter trained task after task, judged after every
stage on every task and the general suite; the accuracy matrix and AP / BWT / FWT (`experiments.continual`)."""

from __future__ import annotations

import argparse

from slim_peft.adapters import method_names
from slim_peft.experiments.continual import (
    CONTINUAL_GENERAL_TASKS,
    CONTINUAL_MAX_STEPS,
    ContinualConfig,
    run_continual,
)
from slim_peft.experiments.learn_forget import RUN_EVAL_LIMIT
from slim_peft.reporting.continual_report import matrix_markdown, metrics_markdown
from slim_peft.training.job import as_list

from .plan import method_overrides, parse_overrides

DESCRIPTION = ("Train one adapter on a sequence of tasks, stage by stage (the method's task-boundary hook between "
               "stages), judge every task and the general suite after each stage, and report the accuracy matrix, "
               "average accuracy, backward and forward transfer.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tasks", required=True,
                   help="the sequence: embedded task names, task files (question/choices/label) or instruction "
                        "data files, comma-separated, each once")
    p.add_argument("--method", default="ilora", help=f"ilora (default); one of {', '.join(method_names())}")
    p.add_argument("--model", default="smollm2-135m", help="the embedded smollm2-135m, a local dir or an HF id")
    p.add_argument("--max-steps", type=int, default=CONTINUAL_MAX_STEPS,
                   help=f"optimizer steps per stage (default {CONTINUAL_MAX_STEPS})")
    p.add_argument("--limit", type=int, default=None,
                   help="at most N examples per task for training and for every evaluation (quick runs)")
    p.add_argument("--eval-limit", type=int, default=None,
                   help=f"questions per task for evaluation (default {RUN_EVAL_LIMIT})")
    p.add_argument("--general-tasks", default=",".join(CONTINUAL_GENERAL_TASKS),
                   help="general suite scored after every stage (loglik); '' for none")
    p.add_argument("--probe-tasks", default="", help="the open-question probe on the general side (default none)")
    p.add_argument("--batch-size", type=int, default=None, help="examples per step in one micro-batch")
    p.add_argument("--learning-rate", type=float, default=None, help="default 5e-4 (cosine per stage)")
    p.add_argument("--save-steps", type=int, default=10, help="checkpoint every N steps within a stage")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a field of the method's config (repeatable), e.g. --set clusters_across_tasks=keep")
    p.add_argument("--output-dir", default=None, help="report directory (default runs/continual-<method>-<time>)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="continue the run in --output-dir where it stopped")
    group.add_argument("--overwrite", action="store_true",
                       help="replace an existing output dir (only once the new run has succeeded)")


def config_from_args(args: argparse.Namespace) -> ContinualConfig:
    return ContinualConfig(
        tasks=as_list(args.tasks), method=args.method, model=args.model, max_steps=args.max_steps,
        train_limit=args.limit, eval_limit=args.eval_limit or args.limit or RUN_EVAL_LIMIT,
        general_tasks=as_list(args.general_tasks), probe_tasks=as_list(args.probe_tasks),
        probe_limit=min(args.limit, 100) if args.limit else 100, batch_size=args.batch_size,
        learning_rate=args.learning_rate, save_steps=args.save_steps, seed=args.seed, output_dir=args.output_dir,
        overwrite=args.overwrite, resume=args.resume,
        adapter=method_overrides(args.method, parse_overrides(args.overrides)),
        progress=lambda s: print(s, flush=True))


def command(args: argparse.Namespace) -> int:
    result = run_continual(config_from_args(args))
    d = result.to_dict()
    print()
    print(matrix_markdown(d))
    print()
    print(metrics_markdown(result.metrics))
    print(f"\nreport: {result.output_dir}/summary.md (results.json, accuracy_matrix.png, task_curves.png, adapter/)")
    return 0
