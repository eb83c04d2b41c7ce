"""``slim-peft plan --model ID_OR_CONFIG --method M``: trainable parameters, adapter file size, optimizer state and
activation memory of a training run, from the model's config alone (built on the meta device, no weights)."""

from __future__ import annotations

import argparse
import json
import typing
from typing import Any

from slim_peft.adapters import METHODS, get_method
from slim_peft.assets import EMBEDDED_MODEL
from slim_peft.errors import CLIError
from slim_peft.training.job import coerce
from slim_peft.training.plan import DTYPES, MODEL_SHAPES, format_plan, format_plans, load_model_config, plan

ALL = "all"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=EMBEDDED_MODEL,
                   help=f"one of {', '.join(sorted(MODEL_SHAPES))}, a local directory or config.json, or a "
                        f"Hugging Face id org/name (default {EMBEDDED_MODEL})")
    p.add_argument("--method", default="slim", help=f"one of {', '.join(sorted(METHODS))}, or '{ALL}'")
    p.add_argument("--batch", type=int, default=1, help="micro-batch size (rows)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per row")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="base model dtype (adapters stay fp32)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="where the run trains (sets the size of the dropout masks)")
    p.add_argument("--supervised", type=float, default=1.0, help="share of positions with a label")
    p.add_argument("--no-padding", action="store_true",
                   help="rows without padding (SDPA then keeps k and v at the KV heads, and there is no mask)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a field of the method's config (repeatable), e.g. --set r=8 --set top_p=0.8")
    p.add_argument("--json", action="store_true", help="print JSON")


def parse_overrides(items: list[str]) -> dict[str, str]:
    """KEY=VALUE strings -> {KEY: VALUE}."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise CLIError(f"--set takes KEY=VALUE, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def method_overrides(method: str, raw: dict[str, str]) -> dict[str, Any]:
    """The values converted to the types of `method`'s config fields, as `train`'s overrides are (unknown keys
    pass through for the config to reject by name)."""
    hints = typing.get_type_hints(get_method(method).config_class)
    return {k: coerce(k, v, hints[k]) if k in hints else v for k, v in raw.items()}


def command(args: argparse.Namespace) -> int:
    """Print the plan of `--method` (or of every method) on `--model`."""
    methods = sorted(METHODS) if args.method == ALL else [get_method(args.method).name]
    config = load_model_config(args.model)
    raw = parse_overrides(args.overrides)
    plans = [plan(config, m, method_overrides(m, raw), args.batch, args.seq_len, args.dtype, device=args.device,
                  supervised=args.supervised, padded=not args.no_padding) for m in methods]
    if args.json:
        print(json.dumps([p.to_dict() for p in plans] if args.method == ALL else plans[0].to_dict(), indent=2))
    elif args.method == ALL:
        print(format_plans(plans))
    else:
        print(format_plan(plans[0]))
    return 0

