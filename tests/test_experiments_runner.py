"""slim_peft.experiments.runner: what every run, step timing and profile shares (the protocol's training
arguments), the scores' summary, the arithmetic metric, curve points and resuming. Nothing is trained."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from study_fakes import PLAN, TASKS, fake_scores

from slim_peft.experiments.runner import CurveScorer, Study, curve_points, environment, number_match, summarize
from slim_peft.experiments.study import Run


def test_training_arguments_follow_the_protocol(tmp_path):
    p = PLAN.protocols["study"]
    args = Study(PLAN, p, tmp_path, tmp_path, threads=1).training_arguments(str(tmp_path), "dora", 7, seed=3,
                                                                            save_steps=0)
    assert (args.learning_rate, args.max_steps, args.seed, args.save_steps) == (PLAN.methods["dora"].lr, 7, 3, 0)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (p.per_device_batch, p.grad_accum)
    assert (args.lr_scheduler_type, args.warmup_ratio, args.weight_decay, args.max_grad_norm) == (
        p.scheduler, p.warmup_ratio, p.weight_decay, p.max_grad_norm)
    assert args.max_seq_length == p.max_seq_length and args.group_by_length and args.torch_num_threads == 1


def test_environment_records_versions_dropout_and_allocator():
    import transformers

    env = environment()
    assert env["transformers"] == transformers.__version__ and env["adapter_dropout"] == "LoraDropout"
    assert env["allocator"] in ("system", "jemalloc") and env["threads"] >= 1


def test_math_score_is_the_last_number_of_the_generation():
    assert number_match(" 18 + 37 = 55", "55") == 1.0
    assert number_match(" 5 + 91 = 141", "96") == 0.0
    assert number_match("", "3") == 0.0
    assert number_match(" 1,000", "1000") == 1.0


def test_summarize_adds_the_part_means():
    scores = fake_scores(0.1)
    scores["general"]["piqa"]["score"] = 0.75
    summarize(scores, TASKS.math)
    assert scores["downstream_mean"] == pytest.approx(0.4) and scores["math_score"] == 0.1
    assert scores["general_mean"] == pytest.approx((6 * 0.4 + 0.75) / 7)
    empty = {"general": {}}
    summarize(empty, TASKS.math)
    assert empty["general_mean"] is None and empty["math_score"] is None


def test_curve_points_come_from_the_intermediate_scorings_of_the_log():
    records = [{"step": 1, "loss": 2.0}, {"step": 10, "eval/general_mean": 0.4, "eval/math": 0.1,
                                          "eval/general/piqa": 0.6, "eval/eval_seconds": 3.0}]
    assert curve_points(records) == [{"step": 10, "general_mean": 0.4, "math": 0.1, "general": {"piqa": 0.6},
                                      "eval_seconds": 3.0}]


def test_curve_scorer_scores_each_intermediate_step_once(tmp_path, monkeypatch):
    study = Study(PLAN, PLAN.protocols["study"], tmp_path, tmp_path)
    scored = []
    monkeypatch.setattr(Study, "evaluate_all", lambda self, m, tok, with_downstream=True:
                        scored.append(with_downstream) or {**fake_scores(), "cpu_seconds": 2.0})
    curve = CurveScorer(study, tokenizer=None)
    curve.trainer = SimpleNamespace(state=SimpleNamespace(global_step=10))
    flat = curve(None)
    assert flat["general_mean"] == pytest.approx(0.5) and flat["general/piqa"] == pytest.approx(0.5)
    assert curve(None) == {} and scored == [False]  # the same step again; the downstream tasks are not scored
    curve.trainer.state.global_step = PLAN.protocols["study"].max_steps
    assert curve(None) == {} and curve.cpu_seconds() == 2.0  # the final step is scored after training


def test_a_run_resumes_from_its_last_checkpoint(tmp_path):
    study = Study(PLAN, PLAN.protocols["study"], tmp_path, tmp_path)
    out_dir = tmp_path / "run"
    for step in (10, 20):
        (out_dir / f"checkpoint-{step}").mkdir(parents=True)
        (out_dir / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    assert study._resume_point(Run("slim", "mds", 0), out_dir) == ("latest", 20)
    partial = tmp_path / "partial"
    (partial / "checkpoint-5").mkdir(parents=True)  # incomplete (no state): started afresh, cleared
    assert study._resume_point(Run("slim", "mds", 0), partial) == (None, 0) and not partial.exists()
