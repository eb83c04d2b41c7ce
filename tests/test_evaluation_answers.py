"""The generative scorers (evaluation/answers.py) on hand-written cases: SQuAD normalisation, exact / normalised /
contains / token F1 / ROUGE-L against values worked out by hand, and the open probe's rule, including a correct
answer that also names a wrong option."""

from __future__ import annotations

import pytest

from slim_peft.evaluation.answers import (
    contains_answer,
    exact_match,
    normalize_answer,
    normalized_match,
    rouge_l,
    states_option,
    token_f1,
)


def test_normalisation_follows_squad():
    assert normalize_answer("The  Cat, sat!") == "cat sat"
    assert normalize_answer("An apple a day") == "apple day"
    assert normalize_answer("theory") == "theory"  # articles only as whole words


@pytest.mark.parametrize("answer, reference, exact, normalized, contains", [
    ("Paris", "Paris", 1, 1, 1),
    (" Paris ", "Paris", 1, 1, 1),
    ("paris.", "Paris", 0, 1, 1),
    ("The capital is Paris.", "Paris", 0, 0, 1),
    ("Parisian food", "Paris", 0, 0, 0),  # whole words only
    ("London", "Paris", 0, 0, 0),
])
def test_match_metrics(answer, reference, exact, normalized, contains):
    assert exact_match(answer, reference) == exact
    assert normalized_match(answer, reference) == normalized
    assert contains_answer(answer, reference) == contains


def test_token_f1_by_hand():
    # answer "cat sat on mat" (4 tokens), reference "cat on red mat" (4): common cat, on, mat = 3 -> P = R = 3/4
    assert token_f1("The cat sat on the mat", "the cat on the red mat") == pytest.approx(0.75)
    assert token_f1("dog", "cat") == 0.0
    assert token_f1("", "") == 1.0 and token_f1("", "cat") == 0.0


def test_rouge_l_by_hand():
    # answer a b c d (after normalisation: "x y z w"), reference "x z w v": LCS x z w = 3, P = 3/4, R = 3/4
    assert rouge_l("x y z w", "x z w v") == pytest.approx(0.75)
    # order matters for ROUGE-L, not for F1: reversed tokens share one LCS token
    assert rouge_l("w z y x", "x y z w") == pytest.approx(0.25)
    assert token_f1("w z y x", "x y z w") == pytest.approx(1.0)
    # P = 2/2, R = 2/5 -> F = 2 * 1 * 0.4 / 1.4
    assert rouge_l("red mat", "cat sat on red mat") == pytest.approx(0.8 / 1.4)


OPTIONS = ["water", "salt water", "oil", "sand"]


@pytest.mark.parametrize("answer, correct, expected", [
    ("Water.", 0, True),
    ("It is water.", 0, True),
    ("Salt water", 1, True),  # "water" inside the correct "salt water" is no wrong option
    ("salt water", 0, False),  # names the wrong "salt water", which contains the correct "water"
    ("Water or oil.", 0, False),  # the correct answer, but a wrong option too
    ("sandy soil", 3, False),  # whole words only
    ("I do not know.", 0, False),
])
def test_states_option(answer, correct, expected):
    assert states_option(answer, OPTIONS, correct) is expected


def test_states_option_for_long_options_compares_f1():
    options = ["they push the cart forward with both hands slowly", "they pull the cart backward with a rope"]
    assert states_option("Push the cart forward with both hands.", options, 0)
    assert not states_option("Pull it backward with a rope.", options, 0)
    assert not states_option("cart", options, 0)
