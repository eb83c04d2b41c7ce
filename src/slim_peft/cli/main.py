"""``slim-peft``: the command line, a table of commands (each a module with `add_arguments` and `command`).

    slim-peft run                        train SLIM on OBQA+SIQA+BoolQ, judge what it learned and forgot
    slim-peft train --config cfg.yaml    LLaMA-Factory-style YAML; every key also a --key value override
    slim-peft continual --tasks a,b,c,d --method M   a task sequence: accuracy matrix, AP / BWT / FWT
    slim-peft eval --tasks arc_easy,piqa [--adapter DIR]
    slim-peft generate [--adapter DIR] "prompt"
    slim-peft inspect DIR                an adapter's (or a run's) config, sizes and routing statistics
    slim-peft lm-eval --adapter DIR --tasks arc_easy,gsm8k [lm-eval options]   lm-eval with our backend
    slim-peft merge --adapter DIR --output OUT   the base with the adapter folded in (LoRA, DoRA, I-LoRA)
    slim-peft plan --model ID --method M trainable parameters, adapter size, optimizer state and activation memory
                                         of a run, from the model's config alone (meta device, no weights)
    slim-peft fetch                      prefetch the embedded model and data for offline use
    slim-peft bench speed|forgetting|continual|generative_probe   a benchmark script of the source checkout

Input errors (every `slim_peft.errors.SlimPeftError`: unknown keys, bad values, missing data files, target
modules the model lacks, a checkpoint from another configuration) print one ``error:`` line and exit with
status 2; a run that fails while training (NaN loss) exits with 1. ``SLIM_PEFT_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from types import ModuleType

from slim_peft.errors import NonFiniteLossError, SlimPeftError

from . import bench, continual, fetch, generate, inspect, lmeval, merge, plan, run, train
from . import eval as eval_

# command -> (module, help, description)
COMMANDS: dict[str, tuple[ModuleType, str, str | None]] = {
    "run": (run, "train and judge SLIM on the embedded model (the main job)", run.DESCRIPTION),
    "train": (train, "train from a YAML config (+ --key value overrides)",
              "Train any method from a LLaMA-Factory-style YAML of training arguments (HF Trainer spelling), data "
              "keys and the method's keys; every key can be given or overridden as --key value."),
    "continual": (continual, "train task after task, judge every task after each stage (AP, BWT, FWT)",
                  continual.DESCRIPTION),
    "eval": (eval_, "evaluate a model (with an adapter) on tasks", None),
    "generate": (generate, "generate text with the model (and an adapter)", None),
    "inspect": (inspect, "an adapter's config, sizes and routing statistics", None),
    "lm-eval": (lmeval, "lm-evaluation-harness's command line with our backend (any lm-eval option)", None),
    "merge": (merge, "fold an adapter into its base model and write a model directory", None),
    "plan": (plan, "memory and size plan of a training run, without weights", None),
    "fetch": (fetch, "download and convert the embedded model and data", None),
    "bench": (bench, "run a benchmark script (source checkout)", None),
}
TAKES_OVERRIDES = {"train", "lm-eval"}  # commands whose unknown --key value arguments are config overrides


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slim-peft", description="Fine-tune LLMs that learn more and forget less.",
                                     allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module, help_text, description) in COMMANDS.items():
        module.add_arguments(sub.add_parser(name, allow_abbrev=False, help=help_text, description=description))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``slim-peft`` console script."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command not in TAKES_OVERRIDES:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    module = COMMANDS[args.command][0]

    def call() -> int:
        return module.command(args, rest) if args.command in TAKES_OVERRIDES else module.command(args)

    if os.environ.get("SLIM_PEFT_DEBUG"):
        return call()
    try:
        return call()
    except NonFiniteLossError as e:
        _error(args.command, e)
        return 1
    except (SlimPeftError, FileNotFoundError) as e:
        _error(args.command, e)
        return 2


def _error(command: str, e: BaseException) -> None:
    notes = getattr(e, "__notes__", [])
    print(f"slim-peft {command}: error: {e}" + "".join(f"\n  {n}" for n in notes), file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
