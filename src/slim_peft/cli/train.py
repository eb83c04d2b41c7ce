"""``slim-peft train --config cfg.yaml [--key value ...]``: train any method from a YAML of training
arguments (HF Trainer spelling), data keys and the method's keys."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from slim_peft.data import build_row_examples, build_task_examples, parse_sources, read_sources
from slim_peft.evaluation import evaluate
from slim_peft.experiments.setup import attach_adapter, load_base, register_tasks
from slim_peft.tasks import pad_token_id
from slim_peft.training import Trainer, seed_everything
from slim_peft.training.job import load_yaml_config, parse_overrides, split_config, write_effective_config


def is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def say(*args: Any) -> None:
    if is_main():
        print(*args, flush=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="YAML file of key: value")


def command(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    """``slim-peft train``: YAML + overrides -> train -> adapter in output_dir/adapter."""
    flat = load_yaml_config(args.config) if args.config else {}
    flat.update(parse_overrides(overrides))
    targs, data, adapter_cfg = split_config(flat)
    tasks = register_tasks(data.tasks)
    eval_tasks = register_tasks(data.eval_tasks)
    rows = None
    if data.data:  # every row read and validated before the model is loaded
        rows = read_sources(parse_sources(data.data, split=data.data_split, subset=data.data_subset,
                                          data_format=data.data_format), seed=targs.seed)
        rows = rows[:data.max_train_samples] if data.max_train_samples else rows

    say(f"loading {data.model_name_or_path} ...")
    base, tokenizer = load_base(data.model_name_or_path)
    if rows is not None:
        examples, counts = build_row_examples(tokenizer, rows, max_seq_length=targs.max_seq_length)
    else:
        examples, counts = build_task_examples(tokenizer, tasks, split=data.train_split,
                                               limit=data.max_train_samples, max_seq_length=targs.max_seq_length)
    say(f"training data: {len(examples)} examples ({counts})")
    seed_everything(targs.seed)
    model = attach_adapter(base, adapter_cfg, data.model_name_or_path)
    if is_main():
        model.print_trainable_parameters()

    eval_fn = None
    if eval_tasks:
        def eval_fn(m: Any) -> dict[str, float]:
            res = evaluate(m, tokenizer, eval_tasks, protocol=data.eval_protocol, split="test", limit=data.eval_limit,
                           seed=targs.seed)
            return {name: float(r.score) for name, r in res.tasks.items()}

    run_config = {"model": data.model_name_or_path, "tasks": tasks, "data": data.data, "train_split": data.train_split,
                  "max_train_samples": data.max_train_samples}
    trainer = Trainer(model, targs, examples, pad_token_id=pad_token_id(tokenizer), eval_fn=eval_fn,
                      run_config=run_config)
    out = trainer.train()
    if is_main():
        write_effective_config(Path(out.run_dir) / "config.yaml", targs, data, adapter_cfg)
        say(f"done: {out.global_step} steps, final loss {out.final_loss:.4f}; adapter in {out.adapter_dir}")
        if out.metrics:
            say("final evaluation: " + ", ".join(f"{k} {v:.4f}" for k, v in out.metrics.items()))
    return 0
