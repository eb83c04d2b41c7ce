"""Evaluation: lm-eval-compatible log-likelihood scoring, letter scoring, greedy generation, metrics with
stderr, and the learn/forget comparison of two evaluations."""

from .answers import ANSWER_METRICS, normalize_answer, rouge_l, states_option, token_f1
from .forgetting import forgetting_report
from .freeform import FREEFORM_METRICS, evaluate_rows
from .generation import ChatSession, extract_answer, generate_greedy, generate_text, stop_token_ids
from .metrics import mean_stderr, paired_delta_stderr
from .protocols import OPEN_TASKS, PROTOCOLS, evaluate, letter_requests, open_question
from .results import EvalResult, LearnForgetReport, TaskDelta, TaskResult
from .scorer import packing_stats, score_requests
from .tokenize import PackedGroup, encode_pair, pack_sequences

__all__ = [
    "ANSWER_METRICS", "ChatSession", "EvalResult", "FREEFORM_METRICS", "LearnForgetReport", "OPEN_TASKS", "PROTOCOLS",
    "PackedGroup", "TaskDelta", "TaskResult", "encode_pair", "evaluate", "evaluate_rows", "extract_answer",
    "forgetting_report", "generate_greedy", "generate_text", "letter_requests", "mean_stderr", "normalize_answer",
    "open_question", "pack_sequences", "packing_stats", "paired_delta_stderr", "rouge_l", "score_requests",
    "states_option", "stop_token_ids", "token_f1",
]
