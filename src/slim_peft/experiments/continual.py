"""Continual learning: one adapter trained on a sequence of tasks, stage by stage (`slim-peft continual`).

Stage i trains task i of the sequence (an embedded task or task file in the letter format, or instruction rows
of any supported format, of which a content-hash part is held out) for `max_steps` optimizer steps, with a fresh
optimizer and schedule. Between stages the method's task-boundary hook runs (`AdapterModel.start_task`: the
replay methods move their task id, so with `replay_from="previous_tasks"`, which this runner sets unless the
adapter overrides say otherwise, I-LoRA and ER replay only earlier tasks' rows, the I-LoRA paper's setting; SLIM
with `clusters_across_tasks="keep"` keeps the finished task's clusters; other methods have no hook).

The base model and the model after every stage are judged on every task of the sequence (test split / held-out
rows; seen and not yet seen) and on the general suite (loglik, and the generative probe when asked): the
accuracy matrix R[i][j] and the metrics of `evaluation.continual` (AP, BWT, FWT, general retention, each with
stderr).

Resumable: each stage trains in its own directory with the trainer's atomic checkpoints (`save_steps`); a
finished stage leaves its end state (adapter tensors, the method's training state) and its judgement, so a
resumed run (`resume=True`) reloads finished stages, continues the interrupted one from its last checkpoint and
reaches the same final adapter as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from slim_peft.adapters import config_from_dict, get_method
from slim_peft.assets import EMBEDDED_MODEL
from slim_peft.data import (
    EMBEDDED_DATA,
    build_row_examples,
    build_task_examples,
    parse_sources,
    read_sources,
    train_and_held_out,
)
from slim_peft.errors import ConfigError
from slim_peft.evaluation import EvalResult, TaskResult
from slim_peft.evaluation.continual import ContinualMetrics, continual_metrics
from slim_peft.reporting.continual_report import write_continual_report
from slim_peft.tasks import get_task, pad_token_id
from slim_peft.training import Trainer, TrainingArguments, list_checkpoints, seed_everything, staged_output_dir
from slim_peft.training.checkpoint import (
    adapter_state_dict,
    load_adapter_state_dict,
    load_method_state,
    save_method_state,
)
from slim_peft.training.logging import write_json

from .learn_forget import RUN_EVAL_LIMIT, RUN_PROBE_LIMIT, RUN_TRAINING, Judgement, Suite, judge
from .setup import attach_adapter, load_base, register_tasks

CONTINUAL_GENERAL_TASKS = ("arc_easy", "arc_challenge", "piqa", "sciq")
CONTINUAL_MAX_STEPS = 40
END_STATE = "end_state.safetensors"
DONE = "stage_done.json"


@dataclass
class ContinualConfig:
    """A task sequence and how each stage trains and is judged (the `slim-peft continual` flags)."""

    tasks: Sequence[str]  # embedded task names / task files (letter format) or instruction data sources
    method: str = "ilora"
    model: str = EMBEDDED_MODEL
    max_steps: int = CONTINUAL_MAX_STEPS  # per stage
    train_limit: int | None = None  # training examples per task
    eval_limit: int = RUN_EVAL_LIMIT  # questions (held-out rows) per task and general task
    general_tasks: Sequence[str] = CONTINUAL_GENERAL_TASKS
    probe_tasks: Sequence[str] = ()  # the generative probe on the general side (open questions)
    probe_limit: int = RUN_PROBE_LIMIT
    batch_size: int | None = None  # one micro-batch of this size instead of 2 x 4
    learning_rate: float | None = None
    save_steps: int = 10
    seed: int = 0
    output_dir: str | None = None  # default runs/continual-<method>-<time>
    overwrite: bool = False
    resume: bool = False
    held_out_fraction: float = 0.2  # of instruction-data tasks
    threads: int = 0  # torch threads for training (0: the cores shared among this machine's processes)
    adapter: dict[str, Any] = field(default_factory=dict)  # overrides of the method's config defaults
    progress: Callable[[str], None] = print

    def adapter_config(self) -> Any:
        """The method's config: continual defaults (replay from earlier tasks only) under the overrides."""
        fields = {f.name for f in dataclasses.fields(get_method(self.method).config_class)}
        defaults = {"replay_from": "previous_tasks"} if "replay_from" in fields else {}
        return config_from_dict({"method": self.method, **defaults, **self.adapter})

    def training_arguments(self, stage_dir: Path) -> TrainingArguments:
        training = dict(RUN_TRAINING, max_steps=self.max_steps, seed=self.seed, output_dir=str(stage_dir),
                        save_steps=self.save_steps, report_to="jsonl", torch_num_threads=self.threads)
        if self.batch_size:
            training.update(per_device_train_batch_size=self.batch_size, gradient_accumulation_steps=1)
        if self.learning_rate:
            training["learning_rate"] = self.learning_rate
        if list_checkpoints(stage_dir):
            training["resume_from_checkpoint"] = "latest"
        return TrainingArguments(**training)

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()
                if k not in ("progress", "overwrite", "resume", "threads")}  # what the results depend on


@dataclass
class SequenceTask:
    """One task of the sequence: a registered task (letter format) or instruction rows with a held-out part."""

    name: str
    registered: str | None  # the task name to train and judge with, or None for rows
    rows: list = field(default_factory=list)
    held_out: list = field(default_factory=list)

    def suite(self, limit: int) -> Suite:
        if self.registered is not None:
            return Suite((self.registered,), "letter", limit, role="downstream")
        return Suite((self.name,), "freeform", limit, role="downstream", rows=tuple(self.held_out))

    def examples(self, tokenizer: Any, limit: int | None, max_seq_length: int) -> list:
        if self.registered is not None:
            return build_task_examples(tokenizer, [self.registered], split="train", limit=limit,
                                       max_seq_length=max_seq_length)[0]
        rows = self.rows[:limit] if limit else self.rows
        return build_row_examples(tokenizer, rows, max_seq_length=max_seq_length)[0]


def _is_task(name: str) -> bool:
    """An embedded task, or a JSONL file whose first row has the multiple-choice fields (else: data rows)."""
    if name in EMBEDDED_DATA:
        return False
    path = Path(name).expanduser()
    if not path.is_file():
        return "/" not in name and Path(name).suffix == ""  # a name (an unknown one fails in get_task)
    if path.suffix != ".jsonl":
        return False
    with path.open(encoding="utf-8") as f:
        first = next((line for line in f if line.strip()), "")
    try:
        row = json.loads(first)
    except json.JSONDecodeError:
        return False
    return isinstance(row, dict) and {"question", "choices", "label"} <= set(row)


def read_sequence(cfg: ContinualConfig) -> list[SequenceTask]:
    """Every task of the sequence resolved and its data read (an unknown task, a repeated task or a bad row
    fails here, before any model is loaded)."""
    names = [str(t).strip() for t in cfg.tasks if str(t).strip()]
    if len(names) < 2:
        raise ConfigError(f"a task sequence needs at least 2 tasks, got {names}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"task {repeated[0]!r} appears twice in the sequence; each task is one stage")
    out = []
    for name in names:
        if _is_task(name):
            (registered,) = register_tasks([name])
            get_task(registered)
            out.append(SequenceTask(registered, registered))
            continue
        rows = read_sources(parse_sources(name), seed=cfg.seed)
        train, held = train_and_held_out(rows, cfg.held_out_fraction, name)
        out.append(SequenceTask(Path(name).stem if Path(name).suffix else name, None, train, held))
    return out


def judge_suites(cfg: ContinualConfig, sequence: list[SequenceTask], general: list[str]) -> dict[str, Suite]:
    """Every task of the sequence (one suite each, "task1", ...), the general suite and the probe."""
    suites = {f"task{j + 1}": t.suite(cfg.eval_limit) for j, t in enumerate(sequence)}
    suites["general"] = Suite(tuple(general), "loglik", cfg.eval_limit, role="general")
    if cfg.probe_tasks:
        suites["probe"] = Suite(tuple(register_tasks(cfg.probe_tasks)), "open", cfg.probe_limit, role="general",
                                label=" (open)")
    return suites


@dataclass
class ContinualResult:
    """What a continual run measured; `to_dict()` is its results.json."""

    config: dict[str, Any]
    tasks: list[str]
    judgements: list[Judgement]  # base, then after each stage
    matrix: list[list[float]]  # R[i][j] scores
    metrics: ContinualMetrics
    stages: list[dict[str, Any]]  # per stage: steps, final loss, seconds
    output_dir: Path

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config, "tasks": self.tasks, "matrix": self.matrix,
                "metrics": self.metrics.to_dict(), "stages": self.stages,
                "judgements": [j.to_dict() for j in self.judgements]}


def accuracy_matrix(judgements: Sequence[Judgement], n_tasks: int) -> list[list[TaskResult]]:
    """R[i][j]: the result of task j (suite "task{j+1}") in judgement i."""
    return [[next(iter(j.parts[f"task{t + 1}"].tasks.values())) for t in range(n_tasks)] for j in judgements]


def general_results(judgements: Sequence[Judgement]) -> list[list[TaskResult]]:
    """Per judgement, the general suite's and the probe's results (in a fixed order)."""
    rows = []
    for j in judgements:
        row = []
        for part in ("general", "probe"):
            if part in j.parts:
                row += list(j.parts[part].tasks.values())
        rows.append(row)
    return rows


def _load_judgement(path: Path) -> Judgement:
    d = json.loads(path.read_text())
    return Judgement({k: EvalResult.from_dict(v) for k, v in d["parts"].items()}, d.get("routing", {}),
                     d.get("seconds", 0.0))


def _save_judgement(path: Path, judgement: Judgement) -> None:
    write_json(path, {"parts": judgement.to_dict(), "routing": judgement.routing, "seconds": judgement.seconds})


def _judged(path: Path, make: Callable[[], Judgement]) -> Judgement:
    """The judgement stored at `path`, or a new one (stored)."""
    if path.is_file():
        return _load_judgement(path)
    judgement = make()
    _save_judgement(path, judgement)
    return judgement


def run_continual(cfg: ContinualConfig) -> ContinualResult:
    """Judge the base model, then train and judge stage by stage (module docstring); writes results.json,
    summary.md and the plots into the output directory."""
    adapter_cfg = cfg.adapter_config()
    sequence = read_sequence(cfg)
    names = [t.name for t in sequence]
    general = [g for g in register_tasks(cfg.general_tasks) if g not in names]
    suites = judge_suites(cfg, sequence, general)
    out_dir = Path(cfg.output_dir or f"runs/continual-{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}")
    with staged_output_dir(out_dir, overwrite=cfg.overwrite, resume=cfg.resume) as run_dir:
        _check_same_config(run_dir / "continual_config.json", {**cfg.to_dict(), "adapter": adapter_cfg.to_dict()})
        cfg.progress(f"[base] loading {cfg.model}")
        base, tokenizer = load_base(cfg.model)
        judge_ = lambda m: judge(m, tokenizer, suites, seed=cfg.seed, model_name=cfg.model)  # noqa: E731
        cfg.progress(f"[base] judging the base model on {', '.join(names)} and {', '.join(general)}")
        judgements = [_judged(run_dir / "base_eval.json", lambda: judge_(base))]
        seed_everything(cfg.seed)
        model = attach_adapter(base, adapter_cfg, cfg.model)
        stages = []
        for i, task in enumerate(sequence):
            stage_dir = run_dir / f"stage{i + 1}-{task.name}"
            if (stage_dir / DONE).is_file():  # finished before: its end state and judgement
                load_adapter_state_dict(model, load_file(str(stage_dir / END_STATE)))
                load_method_state(model, stage_dir)
                stages.append(json.loads((stage_dir / DONE).read_text()))
                judgements.append(_load_judgement(stage_dir / "eval.json"))
                cfg.progress(f"[stage {i + 1}/{len(sequence)}] {task.name}: done before, loaded")
                continue
            stage_dir.mkdir(parents=True, exist_ok=True)
            if i > 0:
                model.start_task(i)
            targs = cfg.training_arguments(stage_dir)
            examples = task.examples(tokenizer, cfg.train_limit, targs.max_seq_length)
            cfg.progress(f"[stage {i + 1}/{len(sequence)}] training {cfg.method} on {task.name}: "
                         f"{targs.max_steps} steps, {len(examples)} examples")
            model.train()
            t0 = time.perf_counter()
            out = Trainer(model, targs, examples, pad_token_id=pad_token_id(tokenizer),
                          run_config={"model": cfg.model, "stage": i + 1, "task": task.name}).train(run_dir=stage_dir)
            summary = {"stage": i + 1, "task": task.name, "steps": out.global_step, "final_loss": out.final_loss,
                       "examples": len(examples), "seconds": round(time.perf_counter() - t0, 1)}
            save_file(adapter_state_dict(model), str(stage_dir / END_STATE))
            save_method_state(model, stage_dir)
            model.eval()
            cfg.progress(f"[stage {i + 1}/{len(sequence)}] judging every task and the general suite")
            judgements.append(_judged(stage_dir / "eval.json", lambda: judge_(model)))
            write_json(stage_dir / DONE, summary)
            stages.append(summary)
        matrix = accuracy_matrix(judgements, len(sequence))
        result = ContinualResult(
            config={**cfg.to_dict(), "adapter": adapter_cfg.to_dict(), "general_tasks": general},
            tasks=names, judgements=judgements, matrix=[[r.score for r in row] for row in matrix],
            metrics=continual_metrics(matrix, general_results(judgements)), stages=stages, output_dir=out_dir)
        write_continual_report(run_dir, result.to_dict())
        model.save_pretrained(str(run_dir / "adapter"))
    return result


def _check_same_config(path: Path, config: dict[str, Any]) -> None:
    """A resumed run must be the run that was started: the stored config equals this one."""
    current = json.loads(json.dumps(config, default=str))
    if path.is_file():
        stored = json.loads(path.read_text())
        changed = sorted(k for k in set(stored) | set(current) if stored.get(k) != current.get(k))
        if changed:
            raise ConfigError(f"{path.parent} was started with other settings ({', '.join(changed)}); resume it "
                              f"with the same flags, or choose a new output directory")
        return
    write_json(path, current)
