"""Scoring generated answers against references (pure functions on strings).

- exact match: the stripped strings are equal;
- normalised match: equal after SQuAD's normalisation (lower case, punctuation and the articles a/an/the
  removed, whitespace collapsed; Rajpurkar et al. 2016, the official `evaluate-v1.1.py`);
- contains: the normalised reference appears in the normalised answer as whole words;
- token F1: SQuAD's bag-of-tokens F1 of the normalised strings;
- ROUGE-L: the F-measure (beta = 1) of the longest common subsequence of the normalised tokens
  (Lin 2004): P = LCS / |answer|, R = LCS / |reference|, F = 2PR / (P + R);
- `states_option`: the generative probe's rule for a multiple-choice question asked openly: the answer states
  the correct option and no wrong one (mentions of a wrong option inside a mention of the correct one, e.g.
  "water" in "salt water", do not count; a wrong option that contains the correct one does). Options longer
  than `LONG_OPTION_WORDS` words are rarely repeated verbatim, so for those the answer must be closer
  (token F1 >= 0.5) to the correct option than to any wrong one.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)
LONG_OPTION_WORDS = 5


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(answer: str, reference: str) -> float:
    return float(answer.strip() == reference.strip())


def normalized_match(answer: str, reference: str) -> float:
    return float(normalize_answer(answer) == normalize_answer(reference))


def _mentions(answer_norm: str, option_norm: str) -> bool:
    return bool(option_norm) and f" {option_norm} " in f" {answer_norm} "


def contains_answer(answer: str, reference: str) -> float:
    return float(_mentions(normalize_answer(answer), normalize_answer(reference)))


def token_f1(answer: str, reference: str) -> float:
    a, r = normalize_answer(answer).split(), normalize_answer(reference).split()
    if not a or not r:
        return float(a == r)
    common = sum((Counter(a) & Counter(r)).values())
    if common == 0:
        return 0.0
    p, rec = common / len(a), common / len(r)
    return 2 * p * rec / (p + rec)


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(answer: str, reference: str) -> float:
    a, r = normalize_answer(answer).split(), normalize_answer(reference).split()
    if not a or not r:
        return float(a == r)
    lcs = _lcs(a, r)
    if lcs == 0:
        return 0.0
    p, rec = lcs / len(a), lcs / len(r)
    return 2 * p * rec / (p + rec)


ANSWER_METRICS = {"exact_match": exact_match, "normalized_match": normalized_match, "contains": contains_answer,
                  "f1": token_f1, "rouge_l": rouge_l}


def states_option(answer: str, options: Sequence[str], correct: int) -> bool:
    """Whether `answer` states option `correct` and none of the others (module docstring). A wrong option that
    contains the correct one ("salt water" when "water" is right) is stated wherever it appears; any other wrong
    option counts only outside the mentions of the correct one."""
    norm = normalize_answer(answer)
    right = normalize_answer(options[correct])
    if len(right.split()) > LONG_OPTION_WORDS:
        f1 = [token_f1(answer, o) for o in options]
        return f1[correct] >= 0.5 and all(f1[correct] > v for i, v in enumerate(f1) if i != correct)
    if not _mentions(norm, right):
        return False
    rest = f" {norm} ".replace(f" {right} ", " | ")  # what the answer says besides the correct option
    for i, option in enumerate(options):
        wrong = normalize_answer(option)
        if i == correct or wrong == right:
            continue
        if _mentions(norm if _mentions(wrong, right) else rest, wrong):
            return False
    return True
