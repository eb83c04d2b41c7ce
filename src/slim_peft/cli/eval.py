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
from slim_peft.data import FORMATS, SourcedRow, held_out_split, parse_sources, read_sources
from slim_peft.errors import CLIError
from slim_peft.evaluation import FREEFORM_METRICS, PROTOCOLS, EvalResult, evaluate, evaluate_rows, forgetting_report
from slim_peft.reporting import results_table, write_forgetting_report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``slim-peft eval``."""
    parser.add_argument(
        "--tasks",
        default=None,
        help="comma-separated task names (e.g. arc_easy,piqa,mmlu) or paths of JSONL task files",
    )
    parser.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default="loglik",
        help="loglik (lm-eval multiple choice), letter (option letter), generate (exact match), open (the "
        "question without options, answered generatively)",
    )
    rows = parser.add_argument_group("own rows, scored generatively (instead of --tasks)")
    rows.add_argument("--data", default=None,
                      help="instruction / chat rows (files, save_to_disk dirs, embedded names, Hub ids): the model "
                           "answers each row's last prompt and is scored against its last assistant turn")
    rows.add_argument("--data-format", default=None, choices=FORMATS, help="default: detected from the fields")
    rows.add_argument("--held-out", type=float, default=0.2,
                      help="score the content-hash held-out part of this fraction, as `slim-peft run --data` "
                           "holds it out (default 0.2); 1 scores every row")
    rows.add_argument("--metric", default="rouge_l", choices=FREEFORM_METRICS, help="primary metric")
    rows.add_argument("--max-new-tokens", type=int, default=64, help="answer length (default 64)")
    rows.add_argument("--sample", action="store_true", help="nucleus sampling (seeded by --seed), not greedy")
    rows.add_argument("--temperature", type=float, default=0.7)
    rows.add_argument("--top-p", type=float, default=0.95)
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


def rows_to_score(args: argparse.Namespace) -> list[SourcedRow]:
    """The rows `--data` names, read and validated (before any model is loaded), their held-out part."""
    rows = read_sources(parse_sources(args.data, data_format=args.data_format), seed=args.seed)
    if args.held_out < 1.0:
        rows = held_out_split(rows, args.held_out)[1]
    rows = [r for r in rows if r.row.messages]
    if not rows:
        raise CLIError(f"no row of {args.data} with an answer is in the held-out part ({args.held_out}); pass "
                       f"--held-out 1 to score every row")
    return rows[:args.limit] if args.limit else rows


def command(args: argparse.Namespace) -> int:
    """``slim-peft eval``: evaluate, print a table, write the JSON (and a forgetting report)."""
    if bool(args.tasks) == bool(args.data):
        raise CLIError("give --tasks (benchmark tasks) or --data (your own rows), one of the two")
    rows = rows_to_score(args) if args.data else None
    model, tokenizer = load_model_for_eval(args.model, args.adapter, args.dtype, args.device)
    if rows is not None:
        results = evaluate_rows(model, tokenizer, rows, primary=args.metric, max_new_tokens=args.max_new_tokens,
                                batch_size=args.batch_size, do_sample=args.sample, temperature=args.temperature,
                                top_p=args.top_p, seed=args.seed, log_samples=args.log_samples,
                                split={"name": "held-out", "test_fraction": args.held_out})
        results.adapter = args.adapter
    else:
        results = evaluate(model, tokenizer, args.tasks, protocol=args.protocol, split=args.split,
                           limit=args.limit, batch_size=args.batch_size, seed=args.seed,
                           test_fraction=args.test_fraction, pack=not args.no_pack, log_samples=args.log_samples,
                           adapter=args.adapter, progress=True)
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
