"""Training and scoring a study's runs through slim_peft: one `Study` per protocol.

A run trains the method's adapter on the downstream tasks' train splits with the protocol's arguments (only the
learning rate differs between methods), then scores the downstream tests (what was learned), the general suite
and arithmetic (what was kept); the base model is scored once per protocol. Every slim_peft import is inside a
method: a `Study` is pickled into the fresh process of each run (`sweep.run_isolated`), and planning and reports
never load torch.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import re
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from .stats import binary_stderr, per_question
from .store import load_json, write_json
from .study import Protocol, Run, StudyPlan, base_is_current
from .sweep import RunLock


class Study:
    """Runs the planned runs of one protocol (model loading, training and evaluation through slim_peft)."""

    def __init__(self, plan: StudyPlan, protocol: Protocol, runs_dir: Path, work_dir: Path, threads: int = 0,
                 keep_adapters: bool = False, command: str = "") -> None:
        self.plan = plan
        self.protocol = protocol
        self.runs_dir = runs_dir
        self.work_dir = work_dir
        self.threads = threads
        self.keep_adapters = keep_adapters
        self.command = command
        self._train_data: tuple[list, dict] | None = None

    @property
    def dir(self) -> Path:
        return self.runs_dir / self.protocol.name

    def log(self, message: str) -> None:
        print(f"[{self.plan.name}] {message}", flush=True)

    # -- helpers
    def _torch_setup(self) -> None:
        import torch

        if self.threads > 0:
            torch.set_num_threads(self.threads)

    def load_model(self) -> tuple[Any, Any]:
        """The base model and its tokenizer."""
        from slim_peft.assets import load_base_model

        return load_base_model(self.plan.model)

    def train_data(self, tokenizer: Any) -> tuple[list, dict]:
        """The downstream tasks' train splits, encoded once per process: (examples, counts per task)."""
        if self._train_data is None:
            from slim_peft.data import build_task_examples

            self._train_data = build_task_examples(tokenizer, self.plan.tasks.downstream, split="train",
                                                   max_seq_length=self.protocol.max_seq_length)
        return self._train_data

    def suites(self, with_downstream: bool = True, with_math: bool = True) -> dict[str, Any]:
        """The protocol's suites: downstream (letter), general (loglik, per-task sizes), arithmetic (generate)."""
        from .learn_forget import Suite

        p, tasks = self.protocol, self.plan.tasks
        suites = {"downstream": Suite(tuple(tasks.downstream) if with_downstream else (), "letter",
                                      p.downstream_limit),
                  "general": Suite(tuple(tasks.general), "loglik",
                                   limits=tuple((t, p.general_limit(t)) for t in tasks.general))}
        suites["math"] = Suite((tasks.math,) if with_math else (), "generate", p.math_limit)
        return suites

    def evaluate_all(self, model: Any, tokenizer: Any, with_downstream: bool = True, with_math: bool = True) -> dict:
        """Downstream (letter), general (loglik, per-task sizes) and arithmetic (generate) scores, judged by the
        library's `judge` (the one `slim-peft run` uses), in the study's record format."""
        from .learn_forget import judge

        t0, c0 = time.perf_counter(), time.process_time()
        judged = judge(model, tokenizer, self.suites(with_downstream, with_math),
                       batch_size=self.protocol.eval_batch_size, log_samples=True, routing=False)
        out: dict[str, Any] = {part: {task: study_entry(r) for task, r in res.tasks.items()}
                               for part, res in judged.parts.items()}
        out["seconds"] = round(time.perf_counter() - t0, 2)
        out["cpu_seconds"] = round(time.process_time() - c0, 2)
        summarize(out, self.plan.tasks.math)
        return out

    # -- base
    def base_path(self) -> Path:
        return self.dir / "base.json"

    def ensure_base(self, wait: bool = True) -> dict | None:
        """Score the base model unless stored; when another worker is scoring it, wait (or, with
        ``wait=False``, return None at once: runs do not need it, only the report does)."""
        lock = RunLock(self.work_dir / self.protocol.name / "base.lock")
        while not lock.acquire():  # another worker is scoring it
            if not wait:
                return None
            time.sleep(10)
        try:
            return self._ensure_base()
        finally:
            lock.release()

    def _ensure_base(self) -> dict:
        path = self.base_path()
        data = load_json(path)
        if base_is_current(data, self.protocol):
            return data
        if data is not None:
            self.log(f"{path} was scored with other test sizes or without per-question outcomes; "
                     "re-scoring the base model")
        self._torch_setup()
        self.log(f"scoring the base model ({self.protocol.name} sizes)")
        model, tok = self.load_model()
        t0 = time.perf_counter()
        scores = self.evaluate_all(model, tok)
        data = {"kind": "base", "model": self.plan.model, "protocol": self.protocol.to_dict(),
                "eval_digest": self.protocol.eval_digest(), **scores,
                "wall_seconds": round(time.perf_counter() - t0, 2),
                "environment": environment(), "command": self.command,
                "finished_at": _dt.datetime.now().isoformat(timespec="seconds")}
        write_json(path, data)
        self.log(f"base: downstream {_pct(data['downstream_mean'])}, general {_pct(data['general_mean'])}, "
                 f"arithmetic {_pct(data['math_score'])} ({data['wall_seconds']:.0f} s)")
        return data

    def training_arguments(self, output_dir: str, method: str, max_steps: int, seed: int, **extra: Any) -> Any:
        """The protocol's TrainingArguments for `method` (its paper's learning rate), the same for every run,
        step timing and profile; `extra` sets the run-specific fields (checkpoints, evaluation, logging)."""
        from slim_peft.training import TrainingArguments

        p = self.protocol
        return TrainingArguments(
            output_dir=output_dir, learning_rate=self.plan.methods[method].lr, weight_decay=p.weight_decay,
            per_device_train_batch_size=p.per_device_batch, gradient_accumulation_steps=p.grad_accum,
            max_steps=max_steps, lr_scheduler_type=p.scheduler, warmup_ratio=p.warmup_ratio,
            max_grad_norm=p.max_grad_norm, seed=seed, logging_steps=1, max_seq_length=p.max_seq_length,
            group_by_length=True, torch_num_threads=self.threads, **extra)

    def adapter_model(self, run: Run, seed: int) -> tuple[Any, Any, Any, list, dict]:
        """(base model, tokenizer, adapter model of `run`'s config, train examples, counts), seeded."""
        from slim_peft.adapters import config_from_dict, get_adapter_model
        from slim_peft.training import seed_everything

        base_model, tok = self.load_model()
        examples, counts = self.train_data(tok)
        seed_everything(seed)
        model = get_adapter_model(base_model, config_from_dict(self.plan.run_config(run)))
        return base_model, tok, model, examples, counts

    # -- training cost only
    def measure_steps(self, run: Run, steps: int) -> dict:
        """Train ``steps`` steps of ``run``'s method and setting (seed 0) on the protocol's data and batch (no
        evaluation): CPU and wall seconds per step, for sizing the study."""
        import tempfile

        from slim_peft.training import read_metrics

        from .learn_forget import train_adapter

        self._torch_setup()
        _, tok, model, examples, _ = self.adapter_model(run, 0)
        with tempfile.TemporaryDirectory() as tmp:
            args = self.training_arguments(tmp, run.method, steps, seed=0, save_steps=0, disable_tqdm=True)
            trained = train_adapter(model, tok, examples, args, run_config={})
            wall, cpu = trained.seconds, trained.cpu_seconds
            tokens = read_metrics(Path(trained.output.run_dir) / "metrics.jsonl")[-1].get("tokens_seen")
        return {"kind": "steps", "method": run.method, "setting": run.setting, "steps": steps,
                "protocol": self.protocol.to_dict(),
                "cpu_seconds_per_step": round(cpu / steps, 3), "wall_seconds_per_step": round(wall / steps, 3),
                "tokens_per_step": tokens / steps if tokens else None,
                "trainable_parameters": model.num_parameters()[0],
                "environment": environment(), "command": self.command,
                "finished_at": _dt.datetime.now().isoformat(timespec="seconds")}

    # -- one run
    def execute(self, run: Run) -> dict:
        """Train `run` (resuming from its last checkpoint of this protocol), score it, and return its record;
        a run that is a curve run too (`StudyPlan.twin`) scores the general suite at intermediate steps."""
        from .learn_forget import train_adapter

        self._torch_setup()
        p = self.protocol
        t_start = time.perf_counter()
        base_model, tok, model, examples, counts = self.adapter_model(run, run.seed)
        trainable, total = model.num_parameters()
        out_dir = self.work_dir / p.name / f"{run.run_id}-{p.digest()}"  # checkpoints of this protocol only
        resume, start_step = self._resume_point(run, out_dir)
        curve = CurveScorer(self, tok) if self._with_curve(run) else None
        args = self.training_arguments(
            str(out_dir), run.method, p.max_steps, seed=run.seed,
            eval_steps=max(1, math.ceil(p.max_steps / p.curve_points)) if curve else 0,
            save_steps=max(5, p.max_steps // 4), save_total_limit=1, resume_from_checkpoint=resume,
            disable_tqdm=not sys.stderr.isatty(), report_to="jsonl")
        self.log(f"{run.run_id}: training {p.max_steps} steps x batch {p.batch}, lr "
                 f"{self.plan.methods[run.method].lr:g}, {trainable:,d} trainable parameters")
        trained = train_adapter(model, tok, examples, args, eval_fn=curve,
                                run_config={"study": self.plan.name, "run": run.run_id, "model": self.plan.model},
                                on_trainer=curve.attach if curve is not None else None)
        out = trained.output
        train = {"out": out, "seconds": trained.seconds, "cpu": trained.cpu_seconds, "start_step": start_step,
                 "resumed": resume is not None, "curve_cpu": curve.cpu_seconds() if curve else 0.0,
                 "trainable": trainable, "total": total, "counts": counts}
        result = self._finish(run, model, tok, out_dir, train, with_curve=curve is not None)
        result["wall_seconds"] = round(time.perf_counter() - t_start, 2)
        if self.keep_adapters:
            result["adapter_dir"] = out.adapter_dir
        else:
            shutil.rmtree(out_dir, ignore_errors=True)
        del model, base_model, trained
        return result

    def _resume_point(self, run: Run, out_dir: Path) -> tuple[str | None, int]:
        """("latest", its step) when `out_dir` holds a checkpoint; else (None, 0), `out_dir` cleared."""
        from slim_peft.training import CHECKPOINT_PREFIX, list_checkpoints

        if checkpoints := list_checkpoints(out_dir):
            self.log(f"{run.run_id}: resuming training from {checkpoints[-1]}")
            return "latest", int(checkpoints[-1].name[len(CHECKPOINT_PREFIX):])
        if out_dir.exists():
            shutil.rmtree(out_dir)
        return None, 0

    def _with_curve(self, run: Run) -> bool:
        other = self.plan.twin(run, self.protocol.name)
        return self.plan.settings[run.setting].curve or (other is not None and self.plan.settings[other.setting].curve)

    def _finish(self, run: Run, model: Any, tok: Any, out_dir: Path, train: dict[str, Any], with_curve: bool) -> dict:
        """Score the trained model and assemble the run's record (training log, scores, curve, routing)."""
        from slim_peft.training import read_metrics

        p = self.protocol
        records = read_metrics(out_dir / "metrics.jsonl")
        step_times = [r for r in records if "tokens_per_s" in r]
        curve = curve_points(records)
        routing = model.routing_stats() if hasattr(model, "routing_stats") else {}
        model.eval()
        if hasattr(model, "reset_routing_stats"):
            model.reset_routing_stats()
        scores = self.evaluate_all(model, tok)
        eval_routing = model.routing_stats() if hasattr(model, "routing_stats") else {}
        curve.append({"step": p.max_steps, "general_mean": scores["general_mean"], "math": scores["math_score"],
                      "general": {t: r["score"] for t, r in scores["general"].items()}})
        curve_eval_seconds = sum(c.get("eval_seconds") or 0 for c in curve[:-1])
        out, start_step = train["out"], train["start_step"]
        spec, setting = self.plan.methods[run.method], self.plan.settings[run.setting]
        return {
            "kind": "run", "run_id": run.run_id, "method": run.method, "method_label": spec.label,
            "setting": run.setting, "setting_label": setting.label, "group": setting.group, "seed": run.seed,
            "model": self.plan.model, "protocol": p.to_dict(), "protocol_digest": p.digest(),
            "adapter_config": self.plan.run_config(run),
            "learning_rate": spec.lr, "lr_source": spec.lr_source, "method_note": spec.note,
            "train": {"steps": out.global_step, "final_loss": out.final_loss,
                      "losses": [(r["step"], r["loss"]) for r in records if "loss" in r],
                      "seconds": round(train["seconds"] - curve_eval_seconds, 2),
                      "seconds_per_step": round((train["seconds"] - curve_eval_seconds)
                                                / max(1, out.global_step - start_step), 3),
                      "cpu_seconds": round(train["cpu"] - train["curve_cpu"], 2),
                      "tokens_seen": step_times[-1]["tokens_seen"] if step_times else None,
                      "trainable_parameters": train["trainable"], "total_parameters": train["total"],
                      "data_counts": train["counts"], "resumed": train["resumed"],
                      "steps_timed": out.global_step - start_step},
            **scores,
            "curve": curve if with_curve else [],
            "routing_train": _routing_summary(routing), "routing_eval": _routing_summary(eval_routing),
            "environment": environment(), "command": self.command,
            "finished_at": _dt.datetime.now().isoformat(timespec="seconds"),
        }


class CurveScorer:
    """The trainer's `eval_fn` of a curve run: the general suite (and arithmetic) at intermediate steps; the
    final step is scored after training. `trainer` is set once the trainer exists (it reads the step)."""

    def __init__(self, study: Study, tokenizer: Any) -> None:
        self.study = study
        self.tokenizer = tokenizer
        self.trainer = None
        self.state: dict[int, dict] = {}

    def attach(self, trainer: Any) -> None:
        """Given the trainer before training starts (its state says which step is being scored)."""
        self.trainer = trainer

    def __call__(self, model: Any) -> dict[str, Any]:
        step = self.trainer.state.global_step
        if step >= self.study.protocol.max_steps or step in self.state:
            return {}
        res = self.study.evaluate_all(model, self.tokenizer, with_downstream=False)
        self.state[step] = res
        flat = {f"general/{t}": r["score"] for t, r in res["general"].items()}
        flat["general_mean"] = res["general_mean"]
        flat["math"] = res["math_score"]
        flat["eval_seconds"] = res["seconds"]
        return flat

    def cpu_seconds(self) -> float:
        """CPU time the intermediate scorings took (not training)."""
        return sum(r.get("cpu_seconds", 0) for r in self.state.values())


def study_entry(r: Any) -> dict[str, Any]:
    """A `TaskResult` (with samples) as the study's record of one task: score, stderr, timing, metrics and the
    per-question outcomes; arithmetic is scored by `number_match`."""
    samples = r.samples or []
    entry = {"score": r.score, "stderr": r.stderr, "metric": r.metric, "n": r.n, "seconds": r.seconds,
             "cpu_seconds": r.cpu_seconds, "chance": r.chance, "metrics": dict(r.metrics)}
    if r.protocol == "generate":  # see number_match: the study's math score
        hits = [number_match(s["generated"], s["gold"]) for s in samples]
        entry["metrics"]["number_match"] = statistics.fmean(hits)
        entry["metric"], entry["score"] = "number_match", statistics.fmean(hits)
        entry["stderr"] = binary_stderr(hits)
        entry["examples"] = [{"generated": s["generated"], "gold": s["gold"]} for s in samples[:5]]
    else:
        pred = "pred_norm" if r.metric == "acc_norm" else "pred"
        hits = [float(s[pred] == s["gold"]) for s in samples]
    # the study's own outcomes and ids digest (not the evaluator's): stored runs are paired by this digest
    entry.update(per_question(hits, [s["id"] for s in samples], entry["score"]))
    return entry


def curve_points(records: list[dict]) -> list[dict]:
    """The intermediate scorings a training log holds (`eval/...` records), one point per step."""
    curve = []
    for r in records:
        if "eval/general_mean" in r:
            curve.append({"step": r["step"], "general_mean": r["eval/general_mean"], "math": r.get("eval/math"),
                          "general": {k.split("/", 2)[2]: v for k, v in r.items() if k.startswith("eval/general/")},
                          "eval_seconds": r.get("eval/eval_seconds")})
    return curve


def number_match(generated: str, gold: str) -> float:
    """1.0 when the last number in the greedy generation equals the gold answer. The evaluator's exact match
    compares the whole first line, and this model restates the sum before answering (" 18 + 37 = 55"), so
    exact match is 0 for nearly every question whatever the model knows; the last number is its answer."""
    nums = re.findall(r"-?\d+(?:\.\d+)?", generated.replace(",", ""))
    return float(bool(nums) and nums[-1] == gold.strip())


def summarize(scores: dict, math_task: str) -> None:
    """Add the means: downstream_mean (3 tasks), general_mean (7 loglik tasks), math_score."""
    d, g, m = scores.get("downstream", {}), scores.get("general", {}), scores.get("math", {})
    scores["downstream_mean"] = statistics.fmean(r["score"] for r in d.values()) if d else None
    scores["general_mean"] = statistics.fmean(r["score"] for r in g.values()) if g else None
    scores["math_score"] = m[math_task]["score"] if math_task in m else None


def _routing_summary(stats: dict) -> dict:
    if not stats:
        return {}
    return {"mean_identity_share": stats.get("mean_identity_share"), "sites": len(stats.get("sites", {}))}


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def environment() -> dict[str, Any]:
    """Where a measurement ran: allocator, versions, threads, adapter dropout, machine and load."""
    import torch
    import transformers

    from slim_peft.adapters import adapter_dropout
    from slim_peft.training.allocator import loaded_allocator

    return {"allocator": loaded_allocator(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "threads": torch.get_num_threads(),
            "adapter_dropout": type(adapter_dropout(0.1)).__name__,  # absent in runs trained with nn.Dropout
            "cpu_count": os.cpu_count(), "machine": platform.machine(),
            "loadavg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
