"""Evaluation: lm-eval-compatible log-likelihood scoring, letter scoring, greedy generation, metrics with
stderr, and the learn/forget comparison of two evaluations."""

from .forgetting import forgetting_report
from .generation import extract_answer, generate_greedy
from .metrics import mean_stderr, paired_delta_stderr
from .protocols import PROTOCOLS, evaluate, letter_requests
from .results import EvalResult, LearnForgetReport, TaskDelta, TaskResult
from .scorer import packing_stats, score_requests
from .tokenize import PackedGroup, encode_pair, pack_sequences

__all__ = [
    "PROTOCOLS", "EvalResult", "LearnForgetReport", "PackedGroup", "TaskDelta", "TaskResult", "encode_pair",
    "evaluate", "extract_answer", "forgetting_report", "generate_greedy", "letter_requests", "mean_stderr",
    "pack_sequences", "packing_stats", "paired_delta_stderr", "score_requests",
]
