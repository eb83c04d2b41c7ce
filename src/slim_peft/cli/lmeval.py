"""``slim-peft lm-eval --adapter DIR --tasks arc_easy,gsm8k [any lm-eval option]``: lm-evaluation-harness's own
command line (`lm-eval run`) with our backend registered and selected (`--model slim-peft`)."""

from __future__ import annotations

import argparse

from slim_peft.errors import CLIError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", default=None, help="adapter directory (none: the base model alone)")
    p.add_argument("--base-model", default=None, help="base model (default: the adapter's, else smollm2-135m)")
    p.add_argument("--dtype", default="float32", help="base model dtype: float32, bfloat16 or float16")


def lm_eval_argv(args: argparse.Namespace, rest: list[str]) -> list[str]:
    """The `lm-eval run` arguments: ours as `--model slim-peft --model_args ...`, then the user's own."""
    if any(a in ("--model", "--model_args") or a.startswith(("--model=", "--model_args=")) for a in rest):
        raise CLIError("slim-peft lm-eval sets --model and --model_args itself; give --adapter, --base-model "
                       "and --dtype instead")
    model_args = [f"dtype={args.dtype}"]
    if args.adapter:
        model_args.append(f"adapter={args.adapter}")
    if args.base_model:
        model_args.append(f"pretrained={args.base_model}")
    return ["run", "--model", "slim-peft", "--model_args", ",".join(model_args), *rest]


def command(args: argparse.Namespace, rest: list[str]) -> int:
    try:
        from lm_eval.__main__ import HarnessCLI
    except ImportError:
        raise CLIError("slim-peft lm-eval needs lm-evaluation-harness: pip install 'slim-peft[bench]'") from None
    import slim_peft.integrations.lm_eval_backend  # noqa: F401  (registers the backend)

    cli = HarnessCLI()
    cli.execute(cli._parser.parse_args(lm_eval_argv(args, rest)))
    return 0
