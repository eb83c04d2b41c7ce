"""The generative probe's baseline: the embedded model (or any model, with an adapter) before fine-tuning, on
every task with an open-question form (the question asked in the chat template without its options; right when
the answer states the correct option and no wrong one) and on basic_arithmetic by generation, with stderr.

    python benchmarks/generative_probe.py [--limit 200] [--output benchmarks/results/generative_probe_baseline]

Writes <output>.json (the `EvalResult`s) and <output>.md (the table, and the first answers of each task).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from slim_peft.assets import EMBEDDED_MODEL
from slim_peft.evaluation import OPEN_TASKS, EvalResult, evaluate

ARITHMETIC = "basic_arithmetic"


def probe(model: Any, tokenizer: Any, *, limit: int | None, batch_size: int = 16,
          tasks: tuple[str, ...] = OPEN_TASKS) -> list[EvalResult]:
    """One `EvalResult` per protocol: the open tasks, then arithmetic by generation (with samples)."""
    return [evaluate(model, tokenizer, list(tasks), protocol="open", limit=limit, batch_size=batch_size,
                     log_samples=True, progress=True),
            evaluate(model, tokenizer, [ARITHMETIC], protocol="generate", limit=limit, batch_size=batch_size,
                     log_samples=True, progress=True)]


def markdown(results: list[EvalResult], *, model: str, command: str, examples: int = 3) -> str:
    lines = [f"# Generative probe: {model} before fine-tuning", "",
             "Open: the question in the chat template without its options (a support passage first where the task "
             "has one), greedy answer of at most 32 tokens to the end of the turn; `open_acc` = it states the "
             "correct option's text and no wrong option (normalised, whole words; options over 5 words by token "
             "F1); `f1` = token F1 against the correct option. Arithmetic: greedy, first line, the last number "
             "equals the answer. Test splits (content-hash halves), first N questions; ± is the stderr.", "",
             f"Command: `{command}`", "",
             "| task | protocol | n | score | ± | f1 | seconds |", "|---|---|---|---|---|---|---|"]
    for res in results:
        for name, r in res.tasks.items():
            f1 = r.metrics.get("f1")
            lines.append(f"| {name} | {r.protocol} | {r.n} | {r.score:.3f} | {r.stderr:.3f} | "
                         f"{'-' if f1 is None else f'{f1:.3f}'} | {r.seconds:.0f} |")
    lines += ["", "## First answers", ""]
    for res in results:
        for name, r in res.tasks.items():
            for s in (r.samples or [])[:examples]:
                text = " ".join(str(s.get("generated", "")).split())
                lines.append(f"- {name}: gold `{s.get('gold')}`, generated `{text[:160]}`")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=EMBEDDED_MODEL)
    parser.add_argument("--limit", type=int, default=200, help="questions per task (default 200)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    parser.add_argument("--output", default="benchmarks/results/generative_probe_baseline")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from slim_peft import load_base_model

    model, tokenizer = load_base_model(args.model)
    t0 = time.perf_counter()
    results = probe(model, tokenizer, limit=args.limit)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps([r.to_dict() for r in results], indent=2))
    command = f"python benchmarks/generative_probe.py --limit {args.limit}"
    out.with_suffix(".md").write_text(markdown(results, model=args.model, command=command)
                                      + f"\nTotal {time.perf_counter() - t0:.0f} s.\n")
    print(f"wrote {out}.md and {out}.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
