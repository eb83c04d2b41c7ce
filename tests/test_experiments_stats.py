"""slim_peft.experiments.stats: estimates over seeds, paired (question-by-question) stderr, differences."""

from __future__ import annotations

import math

import pytest
from study_fakes import TASKS, fake_scores

from slim_peft.experiments.stats import (
    beyond,
    binary_stderr,
    compare,
    difference,
    estimate,
    fmt_diff,
    fmt_ms,
    fmt_pct,
    learn_forget_front,
    mean_std,
    paired_test_se,
    per_question,
    retention,
    score_se,
)

MATH = (TASKS.math,)


def math_eval(correct: str, digest: str = "q") -> dict:
    hits = [int(c) for c in correct]
    return {"math": {TASKS.math: {"correct": correct, "ids_digest": digest, "n": len(correct), "stderr": 0.1}},
            "math_score": sum(hits) / len(hits)}


def test_estimate_averages_seeds_and_their_test_stderr():
    one = estimate([fake_scores(0.1)], "general", TASKS.general)
    assert one.mean == pytest.approx(0.4) and one.seeds == 1 and one.seed_std is None
    assert one.test_se == pytest.approx(0.05 / math.sqrt(7))  # 7 tasks at stderr 0.05
    two = estimate([fake_scores(0.1), fake_scores(0.0)], "general", TASKS.general)
    assert two.mean == pytest.approx(0.45) and two.seed_std == pytest.approx(math.sqrt(0.005))
    assert score_se(fake_scores(), "downstream", TASKS.downstream) == pytest.approx(0.05 / math.sqrt(3))


def test_difference_adds_test_and_seed_variances():
    a, b = estimate([fake_scores(0.0)], "general", TASKS.general), estimate([fake_scores(0.1)], "general",
                                                                             TASKS.general)
    d = difference(a, b)
    assert d == (pytest.approx(0.1), pytest.approx(0.05 * math.sqrt(2 / 7)))  # unpaired: both test errors
    assert difference(a, b, paired_se=0.01) == (pytest.approx(0.1), pytest.approx(0.01))
    seeds = estimate([fake_scores(0.0), fake_scores(0.1)], "general", TASKS.general)
    assert difference(seeds, b, paired_se=0.0)[1] == pytest.approx(math.sqrt(0.005 / 2))  # seed std^2 / seeds


def test_paired_stderr_pairs_questions_and_averages_seeds():
    # d = (0, 1, 0, 0): sample variance 0.25, / 4 questions -> stderr 0.25
    assert paired_test_se([math_eval("1100")], [math_eval("1000")], "math", MATH) == pytest.approx(0.25)
    # seeds averaged per question first: (1, .5, 0, 0) - (1, 0, 0, 0) = (0, .5, 0, 0) -> stderr 0.125
    assert paired_test_se([math_eval("1100"), math_eval("1000")], [math_eval("1000")], "math", MATH) == \
        pytest.approx(0.125)
    assert paired_test_se([math_eval("1100")], [math_eval("1000", digest="other")], "math", MATH) is None
    no_outcomes = {"math": {TASKS.math: {"n": 4, "stderr": 0.1}}, "math_score": 0.25}  # stored before outcomes
    assert paired_test_se([math_eval("1100")], [no_outcomes], "math", MATH) is None
    assert paired_test_se([math_eval("1100"), no_outcomes], [math_eval("1000")], "math", MATH) == \
        pytest.approx(0.25)


def test_compare_uses_the_paired_stderr_where_both_sides_have_outcomes():
    d = compare([math_eval("1100")], [math_eval("1000")], "math", MATH)
    assert d == (pytest.approx(0.25), pytest.approx(0.25))
    unpaired = compare([math_eval("1100")], [math_eval("1000", digest="other")], "math", MATH)
    assert unpaired[1] == pytest.approx(0.1 * math.sqrt(2))  # the stored stderrs, counted as independent


def test_per_question_outcomes_must_average_to_the_score():
    out = per_question([1.0, 0.0, 1.0], ["a", "b", "c"], 2 / 3)
    assert out["correct"] == "101" and len(out["ids_digest"]) == 10
    assert per_question([0.0], ["a"], 0.0)["ids_digest"] != per_question([0.0], ["b"], 0.0)["ids_digest"]
    with pytest.raises(AssertionError, match="per-question outcomes"):
        per_question([1.0, 0.0], ["a", "b"], 1.0)


def test_binary_stderr_and_mean_std():
    assert binary_stderr([1.0, 0.0, 1.0, 0.0, 1.0]) == pytest.approx(math.sqrt(0.6 * 0.4 / 4))
    assert binary_stderr([1.0]) is None
    assert mean_std([]) == (None, None) and mean_std([0.5]) == (0.5, None)
    assert mean_std([0.2, 0.4]) == (pytest.approx(0.3), pytest.approx(math.sqrt(0.02)))


def test_formatting_in_points():
    assert fmt_diff((0.1, 0.02)) == "+10.0 ± 2.0*" and fmt_diff((-0.01, 0.02)) == "-1.0 ± 2.0"
    assert beyond((0.05, 0.02)) and not beyond((0.04, 0.02)) and beyond((-0.05, 0.02))
    assert fmt_pct(0.1234) == "12.3" and fmt_pct(None) == "-"
    assert fmt_ms([0.2, 0.4, None]) == "30.0 ± 14.1" and fmt_ms([0.2]) == "20.0" and fmt_ms([None]) == "-"


def test_retention_is_relative_to_the_base_general_mean():
    assert retention({"general_mean": 0.4}, {"general_mean": 0.5}) == pytest.approx(0.8)
    assert retention({"general_mean": 0.4}, None) is None and retention({"general_mean": 0.4}, {}) is None


def test_learn_forget_front():
    points = [("A", 0.40, 0.50), ("B", 0.38, 0.52), ("C", 0.37, 0.49), ("D", 0.40, 0.50)]
    assert learn_forget_front(points) == ["A", "D", "B"]  # C is beaten on both; identical points both kept
