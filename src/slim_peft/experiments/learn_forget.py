"""One learn-vs-forget run: judge the base model, train one adapter on the downstream tasks, judge it again,
write the report. `slim-peft run` is this function with its defaults.

Judging = the downstream tasks with the letter protocol (what was learned) and the general suite with the
loglik protocol (what was kept), on the test splits, the same questions before and after; the report's
± column is the paired (question-by-question) stderr of each delta.

With `data` (instruction, chat or text rows: `slim-peft run --data FILE_OR_NAME`) the run trains on those rows
instead of the tasks: a content-hash `held_out_fraction` of them is kept out of training and is the downstream
side, scored generatively (`evaluation.freeform`: the model answers each held-out prompt, ROUGE-L / match
metrics against the reference). The general side adds the generative probe (`probe_tasks`: the open-question
protocol, and arithmetic by generation), the forgetting signal the log-likelihood suite misses. Evaluation tasks
an embedded data set was drawn from (SciQ for `sciq_instruct`) leave the general side: they are not kept
knowledge but the trained domain.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slim_peft.adapters import config_from_dict
from slim_peft.assets import EMBEDDED_MODEL
from slim_peft.data import (
    SourcedRow,
    build_row_examples,
    build_task_examples,
    parse_sources,
    read_sources,
    related_tasks,
    train_and_held_out,
)
from slim_peft.errors import ConfigError
from slim_peft.evaluation import (
    FREEFORM_METRICS,
    OPEN_TASKS,
    EvalResult,
    LearnForgetReport,
    evaluate,
    evaluate_rows,
    forgetting_report,
)
from slim_peft.reporting import forgetting_markdown, write_run_report
from slim_peft.tasks import get_task, pad_token_id
from slim_peft.training import (
    Trainer,
    TrainingArguments,
    TrainOutput,
    read_metrics,
    seed_everything,
    staged_output_dir,
)
from slim_peft.training.job import DataArguments, write_effective_config

from .setup import attach_adapter, load_base, register_tasks

DEFAULT_TASKS = ("openbookqa", "social_iqa", "boolq")
# General suite of `run`: cloze probes the embedded model answers clearly above chance before fine-tuning
# (0.35-0.77 accuracy on 150 test questions each, chance 0.25-0.5)
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
# `run --data`: the generative probe of the general side (open questions; arithmetic by generation) and the
# longer sequences instruction rows need
RUN_PROBE_TASKS = ("arc_easy", "arc_challenge", "sciq", "piqa", "commonsense_qa", "basic_arithmetic")
RUN_DATA_MAX_SEQ_LENGTH = 512
# generation is the slow part of judging on a CPU (~0.6 s per open question at 32 tokens, batch 16, 2 cores)
RUN_PROBE_LIMIT = 100
RUN_MAX_NEW_TOKENS = 32


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
    # instruction / chat / text sources ("a.jsonl,b.parquet*0.5", a save_to_disk dir, an embedded name such as
    # sciq_instruct, a Hub id): trained on instead of `tasks`, a held-out part judged generatively
    data: str | None = None
    data_format: str | None = None
    held_out_fraction: float = 0.2
    metric: str = "rouge_l"  # primary metric of the held-out rows (`evaluation.FREEFORM_METRICS`)
    max_new_tokens: int = RUN_MAX_NEW_TOKENS  # answer length on the held-out rows
    probe_tasks: Sequence[str] | None = None  # the generative probe; None: RUN_PROBE_TASKS with `data`, none without
    probe_limit: int = RUN_PROBE_LIMIT  # questions per probe task
    max_seq_length: int | None = None  # default 320 for tasks, 512 for data
    packing: bool = False  # each micro-batch's sequences packed into rows (data/batching.py)

    def __post_init__(self) -> None:
        if self.metric not in FREEFORM_METRICS:
            raise ConfigError(f"metric {self.metric!r} is not one of {', '.join(FREEFORM_METRICS)}")
        if not 0.0 < self.held_out_fraction < 1.0:
            raise ConfigError(f"held_out_fraction must be in (0, 1), got {self.held_out_fraction}")

    def probe(self) -> tuple[str, ...]:
        if self.probe_tasks is not None:
            return tuple(self.probe_tasks)
        return RUN_PROBE_TASKS if self.data else ()

    def training_arguments(self, output_dir: Path) -> TrainingArguments:
        training = dict(RUN_TRAINING, max_steps=self.max_steps, seed=self.seed, output_dir=str(output_dir),
                        report_to="tensorboard" if self.tensorboard else "jsonl")
        if self.batch_size:
            training.update(per_device_train_batch_size=self.batch_size, gradient_accumulation_steps=1)
        if self.learning_rate:
            training["learning_rate"] = self.learning_rate
        if self.max_seq_length or self.data:
            training["max_seq_length"] = self.max_seq_length or RUN_DATA_MAX_SEQ_LENGTH
        return TrainingArguments(**training, packing=self.packing)


@dataclass(frozen=True)
class Suite:
    """Tasks scored with one protocol on their test splits: `limit` questions each, or `limits[task]`.

    `role` ("general" / "downstream") overrides the tasks' own roles in the report; `label` is appended to the
    task names in the results (the same task under two protocols, e.g. "arc_easy" and "arc_easy (open)").
    Protocol "freeform" scores held-out instruction `rows` generatively as one task named `tasks[0]`."""

    tasks: tuple[str, ...]
    protocol: str
    limit: int | None = None
    limits: tuple[tuple[str, int], ...] = ()  # per-task overrides (a study's general suite)
    role: str | None = None
    label: str = ""
    rows: tuple[SourcedRow, ...] = ()
    metric: str = "rouge_l"
    max_new_tokens: int = 64

    def limit_of(self, task: str) -> int | None:
        return dict(self.limits).get(task, self.limit)


@dataclass
class Judgement:
    """One model judged on some suites (e.g. "downstream": letter, "general": loglik): an `EvalResult` per
    suite, and the routing statistics of each suite for methods that route."""

    parts: dict[str, EvalResult]
    routing: dict[str, Any]
    seconds: float

    def merged(self) -> EvalResult:
        """Every suite's tasks as one result (the input of `forgetting_report`)."""
        results = list(self.parts.values())
        out = results[0]
        for other in results[1:]:
            out = out.merged(other)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {name: part.to_dict() for name, part in self.parts.items()}


@dataclass
class RunResult:
    """What a run measured; `to_dict()` is its results.json."""

    config: dict[str, Any]
    training: dict[str, Any]
    before: Judgement
    after: Judgement
    learn_forget: LearnForgetReport
    timings_s: dict[str, float]
    output_dir: Path

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config, "training": self.training,
                "before": self.before.to_dict(), "after": self.after.to_dict(),
                "learn_forget": self.learn_forget.to_dict(), "routing": self.after.routing,
                "timings_s": self.timings_s}


def judge(model: Any, tokenizer: Any, suites: dict[str, Suite], *, seed: int = 0, model_name: str | None = None,
          batch_size: int = 16, log_samples: bool = False, routing: bool = True) -> Judgement:
    """Score `model` on each suite, one `evaluate` call per task (so a task's score never depends on which
    tasks came before it), and with `routing` the routing statistics of each suite (methods that route).
    An empty suite gives an empty result."""
    t0 = time.perf_counter()
    routed = routing and hasattr(model, "routing_stats")
    parts: dict[str, EvalResult] = {}
    stats: dict[str, Any] = {}
    for name, suite in suites.items():
        if routed:
            model.reset_routing_stats()
        part = None
        for task in suite.tasks:
            if suite.protocol == "freeform":
                res = evaluate_rows(model, tokenizer, suite.rows[:suite.limit], name=task, primary=suite.metric,
                                    max_new_tokens=suite.max_new_tokens, batch_size=batch_size, seed=seed,
                                    log_samples=log_samples, model_name=model_name, progress=True)
            else:
                res = evaluate(model, tokenizer, [task], protocol=suite.protocol, split="test",
                               limit=suite.limit_of(task), batch_size=batch_size, seed=seed, model_name=model_name,
                               progress=True, log_samples=log_samples)
            part = res if part is None else part.merged(res)
        part = part if part is not None else _empty_result(suite, seed, model_name, batch_size)
        parts[name] = part.relabelled(suite.label, suite.role)
        if routed and suite.tasks:
            stats[name] = model.routing_stats()
    return Judgement(parts, stats, time.perf_counter() - t0)


def _empty_result(suite: Suite, seed: int, model_name: str | None, batch_size: int) -> EvalResult:
    return EvalResult(model=model_name, adapter=None, protocol=suite.protocol, split="test", limit=suite.limit,
                      seed=seed, batch_size=batch_size, versions={})


@dataclass
class TrainedAdapter:
    """A finished training run: the trainer's output and what it cost."""

    output: TrainOutput
    seconds: float
    cpu_seconds: float


def train_adapter(model: Any, tokenizer: Any, examples: list, args: TrainingArguments, run_config: dict[str, Any],
                  *, eval_fn: Callable[[Any], dict[str, float]] | None = None, run_dir: Path | None = None,
                  on_trainer: Callable[[Trainer], None] | None = None) -> TrainedAdapter:
    """Train an adapter model (already seeded and built) on tokenised examples, timed. `on_trainer` sees the
    trainer before it starts (an `eval_fn` that reads the step needs it)."""
    trainer = Trainer(model, args, examples, pad_token_id=pad_token_id(tokenizer), eval_fn=eval_fn,
                      run_config=run_config)
    if on_trainer is not None:
        on_trainer(trainer)
    t0, c0 = time.perf_counter(), time.process_time()
    out = trainer.train(run_dir=run_dir)
    return TrainedAdapter(out, time.perf_counter() - t0, time.process_time() - c0)


@dataclass
class TrainingData:
    """What a run trains on and what it holds out: task names (multiple choice) or instruction rows."""

    tasks: list[str]  # multiple-choice tasks; empty with rows
    rows: list[SourcedRow]
    held_out: list[SourcedRow]
    related: set[str]  # evaluation tasks the rows were drawn from


def read_training_data(cfg: LearnForgetConfig) -> TrainingData:
    """The tasks, or every row of `cfg.data` read, validated and split (a bad row fails here, before any model
    is loaded or file written)."""
    if not cfg.data:
        return TrainingData(register_tasks(cfg.tasks), [], [], set())
    sources = parse_sources(cfg.data, data_format=cfg.data_format)
    train, held_out = train_and_held_out(read_sources(sources, seed=cfg.seed), cfg.held_out_fraction, cfg.data)
    if cfg.train_limit:
        train = train[:cfg.train_limit]
    return TrainingData([], train, held_out, related_tasks(sources))


def run_suites(cfg: LearnForgetConfig, data: TrainingData, general: list[str]) -> dict[str, Suite]:
    """What the run judges before and after: the downstream side (letter, or the held-out rows generatively),
    the general suite (loglik) and the generative probe (open questions, arithmetic by generation)."""
    if data.rows:
        downstream = Suite(("held_out",), "freeform", cfg.eval_limit, role="downstream", rows=tuple(data.held_out),
                           metric=cfg.metric, max_new_tokens=cfg.max_new_tokens)
    else:
        downstream = Suite(tuple(data.tasks), "letter", cfg.eval_limit)
    suites = {"downstream": downstream, "general": Suite(tuple(general), "loglik", cfg.eval_limit)}
    probe = [t for t in register_tasks(cfg.probe()) if t not in data.related]
    open_tasks = tuple(t for t in probe if t.split(":")[0] in OPEN_TASKS)
    generated = tuple(t for t in probe if t not in open_tasks and get_task(t).supports_generation)
    unknown = [t for t in probe if t not in open_tasks + generated]
    if unknown:
        raise ConfigError(f"probe tasks {unknown} have neither an open-question form ({', '.join(OPEN_TASKS)}) nor "
                          f"a generation form (basic_arithmetic)")
    if open_tasks:
        suites["probe"] = Suite(open_tasks, "open", cfg.probe_limit, role="general", label=" (open)")
    if generated:
        suites["arithmetic"] = Suite(generated, "generate", cfg.probe_limit, role="general", label=" (gen)")
    return suites


def _describe(suites: dict[str, Suite]) -> str:
    return "; ".join(f"{name}: {', '.join(s.tasks)} ({s.protocol})" for name, s in suites.items() if s.tasks)


def run_learn_forget(cfg: LearnForgetConfig) -> RunResult:
    """Judge the base model, train `cfg.method` on `cfg.tasks` (or `cfg.data`), judge the adapted model, write
    the report directory (results.json, summary.md, metrics.jsonl, plots, adapter/). Bad input (an unknown task,
    a malformed data row) fails before the model is loaded; a failed run never replaces an existing report
    directory."""
    t_start = time.perf_counter()
    adapter_cfg = config_from_dict({"method": cfg.method, **cfg.adapter})
    data = read_training_data(cfg)
    general = [t for t in register_tasks(cfg.general_tasks) if t not in data.related]
    suites = run_suites(cfg, data, general)
    out_dir = Path(cfg.output_dir or f"runs/{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}")
    targs = cfg.training_arguments(out_dir)
    data_args = DataArguments(model_name_or_path=cfg.model, method=cfg.method, tasks=data.tasks,
                              data=cfg.data, data_format=cfg.data_format, max_train_samples=cfg.train_limit)
    timings: dict[str, float] = {}
    with staged_output_dir(out_dir, overwrite=cfg.overwrite) as run_dir:
        write_effective_config(run_dir / "config.yaml", targs, data_args, adapter_cfg,
                               comment=f"# evaluation (test splits, at most {cfg.eval_limit} per task): "
                                       f"{_describe(suites)}\n")
        t = time.perf_counter()
        cfg.progress(f"[1/5] loading {cfg.model}")
        base, tokenizer = load_base(cfg.model)
        if data.rows:
            examples, counts = build_row_examples(tokenizer, data.rows, max_seq_length=targs.max_seq_length)
        else:
            examples, counts = build_task_examples(tokenizer, data.tasks, split="train", limit=cfg.train_limit,
                                                   max_seq_length=targs.max_seq_length)
        timings["load"] = time.perf_counter() - t
        cfg.progress(f"[2/5] evaluating the base model: {_describe(suites)}; at most {cfg.eval_limit} each")
        before = judge(base, tokenizer, suites, seed=cfg.seed, model_name=cfg.model)
        timings["eval_before"] = before.seconds
        cfg.progress(f"[3/5] training {cfg.method} for {targs.max_steps} steps on {len(examples)} examples {counts}")
        seed_everything(cfg.seed)
        model = attach_adapter(base, adapter_cfg, cfg.model)
        model.print_trainable_parameters()
        trained = train_adapter(model, tokenizer, examples, targs, run_dir=run_dir,
                                run_config={"model": cfg.model, "tasks": data.tasks, "data": cfg.data,
                                            "max_train_samples": cfg.train_limit})
        out = trained.output
        timings["train"] = trained.seconds
        cfg.progress("[4/5] evaluating the adapted model")
        model.eval()
        after = judge(model, tokenizer, suites, seed=cfg.seed, model_name=cfg.model)
        timings["eval_after"] = after.seconds
        cfg.progress("[5/5] writing the report")
        t = time.perf_counter()
        timings["total"] = time.perf_counter() - t_start
        result = RunResult(
            config={"method": cfg.method, "model": cfg.model, "tasks": data.tasks, "general_tasks": general,
                    "general_protocol": "loglik", "downstream_protocol": suites["downstream"].protocol,
                    "probe_tasks": {n: list(suites[n].tasks) for n in ("probe", "arithmetic") if n in suites},
                    "data": cfg.data, "held_out_fraction": cfg.held_out_fraction if data.rows else None,
                    "held_out_rows": len(data.held_out) if data.rows else None,
                    "metric": cfg.metric if data.rows else None, "eval_limit": cfg.eval_limit,
                    "train_limit": cfg.train_limit, "seed": cfg.seed, "adapter": adapter_cfg.to_dict(),
                    "training": targs.to_dict()},
            training={"steps": out.global_step, "final_loss": out.final_loss, "examples": len(examples),
                      "examples_per_task": counts, "trainable_parameters": model.num_parameters()[0],
                      "global_batch": targs.per_device_train_batch_size * targs.gradient_accumulation_steps},
            before=before, after=after, learn_forget=forgetting_report(before.merged(), after.merged()),
            timings_s=timings, output_dir=out_dir)
        write_run_report(run_dir, result.to_dict(), read_metrics(run_dir / "metrics.jsonl"))
        model.card_sections["Learned and forgotten"] = (
            f"Before/after, seed {cfg.seed}, at most {cfg.eval_limit} questions per task: {_describe(suites)}.\n\n"
            + forgetting_markdown(result.learn_forget))
        model.write_model_card(run_dir / "adapter")
        timings["report"] = time.perf_counter() - t
    return result
