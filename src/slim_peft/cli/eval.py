"""``slim-peft eval``: evaluate a model (with an adapter) on tasks, print a table, write the JSON (and a
forgetting report against a base model's JSON)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from slim_peft.adapters import AdapterModel
from slim_peft.assets import EMBEDDED_MODEL, load_base_model
from slim_peft.evaluation import PROTOCOLS, EvalResult, evaluate, forgetting_report
from slim_peft.reporting import results_table, write_forgetting_report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``slim-peft eval``."""
    parser.add_argument(
        "--tasks",
        required=True,
        help="comma-separated task names (e.g. arc_easy,piqa,mmlu) or paths of JSONL task files",
    )
    parser.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default="loglik",
        help="loglik (lm-eval multiple choice), letter (option letter), generate (exact match)",
    )
    parser.add_argument(
        "--split",
        choices=("train", "test", "full"),
        default="test",
        help="hash-based train/test part, or the full file in file order (default: test)",
    )
    parser.add_argument(
        "--limit",
        type=int,
        default=None,
        help="first N examples of the split in file order (per subject for mmlu), as lm-eval",
    )
    parser.add_argument("--test-fraction", type=float, default=None, help="override the task's test fraction")
    parser.add_argument(
        "--model", default=None, help="base model: 'smollm2-135m' (default), a local dir or HF id"
    )
    parser.add_argument("--adapter", default=None, help="adapter directory saved by slim-peft (or PEFT LoRA)")
    parser.add_argument("--batch-size", type=int, default=16, help="questions per forward pass (default 16)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps ...")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument(
        "--no-pack",
        action="store_true",
        help="one row per (context, choice) pair instead of one token tree per question",
    )
    parser.add_argument("--output", default=None, help="write the results JSON here")
    parser.add_argument(
        "--log-samples", action="store_true", help="include per-example predictions in the JSON"
    )
    parser.add_argument(
        "--forgetting-base",
        default=None,
        metavar="BASE_JSON",
        help="results JSON of the base model: also write a forgetting report (.md/.json/.png) "
        "next to --output",
    )


def _device(name: str) -> str:
    if name != "auto":
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model_for_eval(
    model: str | None, adapter: str | None, dtype: str = "float32", device: str = "auto"
) -> tuple[Any, Any]:
    """(model, tokenizer): the base model (embedded by default) with an optional adapter loaded."""
    base, tokenizer = load_base_model(
        model or EMBEDDED_MODEL, dtype=getattr(torch, dtype), device=_device(device)
    )
    if adapter is None:
        return base, tokenizer
    return AdapterModel.from_pretrained(base, adapter).to(_device(device)), tokenizer


def command(args: argparse.Namespace) -> int:
    """``slim-peft eval``: evaluate, print a table, write the JSON (and a forgetting report)."""
    model, tokenizer = load_model_for_eval(args.model, args.adapter, args.dtype, args.device)
    results = evaluate(model, tokenizer, args.tasks, protocol=args.protocol, split=args.split, limit=args.limit,
                       batch_size=args.batch_size, seed=args.seed, test_fraction=args.test_fraction,
                       pack=not args.no_pack, log_samples=args.log_samples, adapter=args.adapter, progress=True)
    print(results_table(results))
    print(f"total {results.seconds:.1f} s")
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results.to_dict(), indent=2))
        print(f"wrote {out}")
    if args.forgetting_base:
        base = EvalResult.from_dict(json.loads(Path(args.forgetting_base).read_text()))
        prefix = Path(args.output).with_suffix("") if args.output else Path("forgetting")
        paths = write_forgetting_report(forgetting_report(base, results), f"{prefix}_forgetting")
        print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
