"""One learn-vs-forget run: judge the base model, train one adapter on the downstream tasks, judge it again,
write the report. `slim-peft run` is this function with its defaults.

Judging = the downstream tasks with the letter protocol (what was learned) and the general suite with the
loglik protocol (what was kept), on the test splits, the same questions before and after; the report's
± column is the paired (question-by-question) stderr of each delta.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slim_peft.adapters import config_from_dict
from slim_peft.assets import EMBEDDED_MODEL
from slim_peft.data import build_task_examples
from slim_peft.evaluation import evaluate, forgetting_report
from slim_peft.reporting import write_run_report
from slim_peft.training import Trainer, TrainingArguments, read_metrics, seed_everything, staged_output_dir
from slim_peft.training.job import DataArguments, write_effective_config

from .setup import attach_adapter, load_base, pad_id, register_tasks

DEFAULT_TASKS = ("openbookqa", "social_iqa", "boolq")
# General suite of `run`: cloze probes clearly above chance for the embedded model (baseline_eval.md)
RUN_GENERAL_TASKS = ("arc_easy", "arc_challenge", "piqa", "sciq", "hellaswag")
# `run` defaults, sized to finish within 20 minutes on 2 CPU cores. Measured here (single-thread CPU time, a
# busy machine): SLIM training ~12 CPU-s per step of 8 examples (~1,100 tokens); evaluation ~0.19 CPU-s per
# question averaged over the 8 tasks. With 2 threads: ~5-7 s per step and ~0.08-0.12 s per question, so
# 80 steps + 2 x 8 x 150 questions take ~10-16 minutes (README: the wall time measured on a quiet machine).
# 2 x 4 examples per step rather than 1 x 8: the same loss (every answer has 2 tokens, so the mean of the
# micro-batch means is the batch mean; SLIM's clusters move once per micro-batch) at about half the activation
# memory (SLIM at 1 x 8 peaked at 7.3 GB RSS).
RUN_TRAINING = {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 2, "learning_rate": 5e-4,
                "lr_scheduler_type": "cosine", "warmup_ratio": 0.05, "max_grad_norm": 1.0, "logging_steps": 5,
                "save_steps": 0, "max_seq_length": 320}
RUN_MAX_STEPS = 80
RUN_EVAL_LIMIT = 150


@dataclass
class LearnForgetConfig:
    """What one run trains and how it is judged (the `slim-peft run` flags)."""

    method: str = "slim"
    model: str = EMBEDDED_MODEL
    tasks: Sequence[str] = DEFAULT_TASKS
    general_tasks: Sequence[str] = RUN_GENERAL_TASKS
    max_steps: int = RUN_MAX_STEPS
    train_limit: int | None = None  # examples per task for training (None: all)
    eval_limit: int = RUN_EVAL_LIMIT  # questions per task for every evaluation
    batch_size: int | None = None  # one micro-batch of this size instead of 2 x 4
    learning_rate: float | None = None
    seed: int = 0
    output_dir: str | None = None  # default runs/<method>-<time>
    overwrite: bool = False
    tensorboard: bool = False
    adapter: dict[str, Any] = field(default_factory=dict)  # overrides of the method's config defaults
    progress: Callable[[str], None] = print

    def training_arguments(self, output_dir: Path) -> TrainingArguments:
        training = dict(RUN_TRAINING, max_steps=self.max_steps, seed=self.seed, output_dir=str(output_dir),
                        report_to="tensorboard" if self.tensorboard else "jsonl")
        if self.batch_size:
            training.update(per_device_train_batch_size=self.batch_size, gradient_accumulation_steps=1)
        if self.learning_rate:
            training["learning_rate"] = self.learning_rate
        return TrainingArguments(**training)


@dataclass
class Judgement:
    """One model's evaluations: downstream (letter) and general (loglik) results, routing statistics."""

    downstream: dict[str, Any]
    general: dict[str, Any]
    routing: dict[str, Any]
    seconds: float

    def merged(self) -> dict[str, Any]:
        """Both evaluations as one result (the input of `forgetting_report`)."""
        return {**self.downstream, "tasks": {**self.downstream.get("tasks", {}), **self.general.get("tasks", {})}}


@dataclass
class RunResult:
    """What a run measured; `to_dict()` is its results.json."""

    config: dict[str, Any]
    training: dict[str, Any]
    before: Judgement
    after: Judgement
    learn_forget: dict[str, Any]
    timings_s: dict[str, float]
    output_dir: Path

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config, "training": self.training,
                "before": {"downstream": self.before.downstream, "general": self.before.general},
                "after": {"downstream": self.after.downstream, "general": self.after.general},
                "learn_forget": self.learn_forget, "routing": self.after.routing, "timings_s": self.timings_s}


def judge(model: Any, tokenizer: Any, tasks: Sequence[str], general: Sequence[str], cfg: LearnForgetConfig
          ) -> Judgement:
    """Score `model` on the downstream tasks (letter) and the general suite (loglik), with routing statistics
    of each part for methods that route."""
    t0 = time.perf_counter()
    routed = hasattr(model, "routing_stats")
    if routed:
        model.reset_routing_stats()
    kw = dict(split="test", limit=cfg.eval_limit, seed=cfg.seed, model_name=cfg.model, progress=True)
    down = evaluate(model, tokenizer, list(tasks), protocol="letter", **kw)
    routing = {}
    if routed:
        routing["downstream"] = model.routing_stats()
        model.reset_routing_stats()
    gen = evaluate(model, tokenizer, list(general), protocol="loglik", **kw) if general else {"tasks": {}}
    if routed:
        routing["general"] = model.routing_stats()
    return Judgement(down, gen, routing, time.perf_counter() - t0)


def run_learn_forget(cfg: LearnForgetConfig) -> RunResult:
    """Judge the base model, train `cfg.method` on `cfg.tasks`, judge the adapted model, write the report
    directory (results.json, summary.md, metrics.jsonl, plots, adapter/). A failed run never replaces an
    existing report directory."""
    t_start = time.perf_counter()
    adapter_cfg = config_from_dict({"method": cfg.method, **cfg.adapter})
    tasks, general = register_tasks(cfg.tasks), register_tasks(cfg.general_tasks)
    out_dir = Path(cfg.output_dir or f"runs/{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}")
    targs = cfg.training_arguments(out_dir)
    data = DataArguments(model_name_or_path=cfg.model, method=cfg.method, tasks=list(cfg.tasks),
                         max_train_samples=cfg.train_limit)
    timings: dict[str, float] = {}
    with staged_output_dir(out_dir, overwrite=cfg.overwrite) as run_dir:
        write_effective_config(run_dir / "config.yaml", targs, data, adapter_cfg,
                               comment=f"# evaluation: downstream {tasks} (letter, test split), general {general} "
                                       f"(loglik, test split), at most {cfg.eval_limit} questions per task\n")
        t = time.perf_counter()
        cfg.progress(f"[1/5] loading {cfg.model}")
        base, tokenizer = load_base(cfg.model)
        examples, counts = build_task_examples(tokenizer, tasks, split="train", limit=cfg.train_limit,
                                               max_seq_length=targs.max_seq_length)
        timings["load"] = time.perf_counter() - t
        cfg.progress(f"[2/5] evaluating the base model: {', '.join(tasks)} (letter) and {', '.join(general)} "
                     f"(loglik), {cfg.eval_limit} questions each")
        before = judge(base, tokenizer, tasks, general, cfg)
        timings["eval_before"] = before.seconds
        cfg.progress(f"[3/5] training {cfg.method} for {targs.max_steps} steps on {len(examples)} examples {counts}")
        seed_everything(cfg.seed)
        model = attach_adapter(base, adapter_cfg, cfg.model)
        model.print_trainable_parameters()
        t = time.perf_counter()
        trainer = Trainer(model, targs, examples, pad_token_id=pad_id(tokenizer),
                          run_config={"model": cfg.model, "tasks": tasks, "max_train_samples": cfg.train_limit})
        out = trainer.train(run_dir=run_dir)
        timings["train"] = time.perf_counter() - t
        cfg.progress("[4/5] evaluating the adapted model")
        model.eval()
        after = judge(model, tokenizer, tasks, general, cfg)
        timings["eval_after"] = after.seconds
        cfg.progress("[5/5] writing the report")
        t = time.perf_counter()
        timings["total"] = time.perf_counter() - t_start
        result = RunResult(
            config={"method": cfg.method, "model": cfg.model, "tasks": tasks, "general_tasks": general,
                    "general_protocol": "loglik", "downstream_protocol": "letter", "eval_limit": cfg.eval_limit,
                    "train_limit": cfg.train_limit, "seed": cfg.seed, "adapter": adapter_cfg.to_dict(),
                    "training": targs.to_dict()},
            training={"steps": out.global_step, "final_loss": out.final_loss, "examples": len(examples),
                      "examples_per_task": counts, "trainable_parameters": model.num_parameters()[0],
                      "global_batch": targs.per_device_train_batch_size * targs.gradient_accumulation_steps},
            before=before, after=after, learn_forget=forgetting_report(before.merged(), after.merged()),
            timings_s=timings, output_dir=out_dir)
        write_run_report(run_dir, result.to_dict(), read_metrics(run_dir / "metrics.jsonl"))
        timings["report"] = time.perf_counter() - t
    return result

