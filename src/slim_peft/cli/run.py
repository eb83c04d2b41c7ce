"""``slim-peft run``: the main job. Judge the base model, train an adapter on the downstream tasks, judge it
again, print the learn/forget table and write a report directory (`slim_peft.experiments.learn_forget`)."""

from __future__ import annotations

import argparse

from slim_peft.adapters import method_names
from slim_peft.data import DEMO_DATA, FORMATS
from slim_peft.evaluation import FREEFORM_METRICS
from slim_peft.experiments.learn_forget import (
    DEFAULT_TASKS,
    RUN_EVAL_LIMIT,
    RUN_GENERAL_TASKS,
    RUN_MAX_NEW_TOKENS,
    RUN_MAX_STEPS,
    RUN_PROBE_LIMIT,
    RUN_PROBE_TASKS,
    LearnForgetConfig,
    run_learn_forget,
)
from slim_peft.reporting import learn_forget_table
from slim_peft.training.job import as_list

DESCRIPTION = ("Evaluate the base model, train an adapter on the downstream tasks, evaluate again, print the "
               "learn/forget table and write a report directory.")


def add_arguments(run: argparse.ArgumentParser) -> None:
    run.add_argument("--method", default="slim", help=f"slim (default); one of {', '.join(method_names())}")
    run.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="training/downstream tasks (or .jsonl files)")
    run.add_argument("--general-tasks", default=",".join(RUN_GENERAL_TASKS),
                     help="general suite scored before and after (loglik); '' for none")
    run.add_argument("--model", default="smollm2-135m", help="the embedded smollm2-135m, a local dir or an HF id")
    run.add_argument("--max-steps", type=int, default=RUN_MAX_STEPS, help=f"optimizer steps (default {RUN_MAX_STEPS})")
    run.add_argument("--limit", type=int, default=None,
                     help="at most N examples per task for training and for every evaluation (quick runs)")
    run.add_argument("--train-limit", type=int, default=None, help="examples per task for training (default all)")
    run.add_argument("--eval-limit", type=int, default=None,
                     help=f"questions per task for evaluation (default {RUN_EVAL_LIMIT})")
    run.add_argument("--batch-size", type=int, default=None,
                     help="examples per step in one micro-batch (default 8, as 2 accumulated micro-batches of 4)")
    run.add_argument("--learning-rate", type=float, default=None, help="default 5e-4 (cosine, 5%% warmup)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--output-dir", default=None, help="report directory (default runs/<method>-<time>)")
    run.add_argument("--overwrite", action="store_true",
                     help="replace an existing output dir (only once the new run has succeeded)")
    run.add_argument("--tensorboard", action="store_true", help="also write TensorBoard logs")
    data = run.add_argument_group("own data (instruction, chat or text rows instead of --tasks)")
    data.add_argument("--data", default=None,
                      help=f"files (.jsonl/.json/.csv/.parquet), save_to_disk dirs, Hub ids or the embedded "
                           f"{DEMO_DATA!r}; comma-separated, '*W' weights a source (a.jsonl,b.csv*0.5)")
    data.add_argument("--data-format", default=None, choices=FORMATS, help="default: detected from the fields")
    data.add_argument("--held-out", type=float, default=0.2,
                      help="fraction of the rows held out (content hash) and judged generatively (default 0.2)")
    data.add_argument("--metric", default="rouge_l", choices=FREEFORM_METRICS,
                      help="primary metric of the held-out rows (default rouge_l)")
    data.add_argument("--max-new-tokens", type=int, default=RUN_MAX_NEW_TOKENS,
                      help=f"answer length on the held-out rows (default {RUN_MAX_NEW_TOKENS})")
    data.add_argument("--probe-tasks", default=None,
                      help=f"the generative probe of the general side (default with --data: "
                           f"{','.join(RUN_PROBE_TASKS)}; '' for none)")
    data.add_argument("--probe-limit", type=int, default=RUN_PROBE_LIMIT,
                      help=f"questions per probe task (default {RUN_PROBE_LIMIT})")
    data.add_argument("--max-seq-length", type=int, default=None, help="default 320 for tasks, 512 for --data")
    data.add_argument("--packing", action="store_true",
                      help="pack each micro-batch's rows into rows of max-seq-length (attention kept inside each row)")


def config_from_args(args: argparse.Namespace) -> LearnForgetConfig:
    """The run's config from the flags (`--limit` caps training and evaluation unless they are given)."""
    return LearnForgetConfig(
        method=args.method, model=args.model, tasks=as_list(args.tasks), general_tasks=as_list(args.general_tasks),
        max_steps=args.max_steps, train_limit=args.train_limit if args.train_limit is not None else args.limit,
        eval_limit=args.eval_limit if args.eval_limit is not None else (args.limit or RUN_EVAL_LIMIT),
        batch_size=args.batch_size, learning_rate=args.learning_rate, seed=args.seed, output_dir=args.output_dir,
        overwrite=args.overwrite, tensorboard=args.tensorboard, progress=lambda s: print(s, flush=True),
        data=args.data, data_format=args.data_format, held_out_fraction=args.held_out, metric=args.metric,
        max_new_tokens=args.max_new_tokens, max_seq_length=args.max_seq_length, packing=args.packing,
        probe_limit=min(args.probe_limit, args.limit) if args.limit else args.probe_limit,
        probe_tasks=None if args.probe_tasks is None else as_list(args.probe_tasks))


def command(args: argparse.Namespace) -> int:
    result = run_learn_forget(config_from_args(args))
    t = result.timings_s
    print()
    print(learn_forget_table(result.learn_forget))
    print()
    print(f"{args.method} on {args.model}: {result.training['steps']} steps; wall time {t['total'] / 60:.1f} min "
          f"(load {t['load']:.0f} s, eval before {t['eval_before']:.0f} s, train {t['train']:.0f} s, "
          f"eval after {t['eval_after']:.0f} s)")
    print(f"report: {result.output_dir}/summary.md (results.json, metrics.jsonl, *.png, adapter/)")
    return 0
