"""Task registry: loaders, the lm-evaluation-harness and letter prompt formats, deterministic splits.

>>> from slim_peft.tasks import get_task, letter_prompt, letter_target
>>> task = get_task("arc_easy")
>>> ex = task.examples("test", limit=1)[0]
>>> req = task.lm_eval_request(ex)         # lm-eval 0.4.13's contexts / continuations
>>> text = letter_prompt(ex)               # question, "A. ..." options, instruction
>>> answer = letter_target(ex)             # "A", "B", ...

Splits: "train" and "test" are disjoint parts chosen by a sha256 of each example's content (see
:data:`SPLIT_SCHEME`), "full" is the whole file in file order; ``limit`` keeps the first N in file order.
Test fractions: 0.5, except hellaswag and MMLU (0.2: 2,073 of 10,042 and 2,836 of 14,042 questions).
"""

from slim_peft.tasks.builtin import MMLU_SUBJECTS, hellaswag_preprocess, mmlu_description
from slim_peft.tasks.files import TaskFileError, read_jsonl_rows, register_jsonl_task
from slim_peft.tasks.formats import (
    DEFAULT_LETTER_INSTRUCTION,
    chat_prompt,
    encode_prompt_target,
    encode_text,
    letter_prompt,
    letter_target,
    letters,
    pad_token_id,
)
from slim_peft.tasks.registry import GENERAL_SUITE, find_task, get_task, list_tasks, register_task
from slim_peft.tasks.types import (
    DOWNSTREAM,
    GENERAL,
    LETTERS,
    SPLIT_SALT,
    SPLIT_SCHEME,
    SPLITS,
    Example,
    LmEvalRequest,
    Task,
    canonical_json,
    content_hash,
    in_test,
    split_unit,
)

__all__ = [
    "DEFAULT_LETTER_INSTRUCTION",
    "DOWNSTREAM",
    "GENERAL",
    "GENERAL_SUITE",
    "LETTERS",
    "MMLU_SUBJECTS",
    "SPLITS",
    "SPLIT_SALT",
    "SPLIT_SCHEME",
    "Example",
    "LmEvalRequest",
    "Task",
    "TaskFileError",
    "canonical_json",
    "chat_prompt",
    "content_hash",
    "encode_prompt_target",
    "encode_text",
    "find_task",
    "get_task",
    "hellaswag_preprocess",
    "in_test",
    "letter_prompt",
    "letter_target",
    "letters", "pad_token_id",
    "list_tasks",
    "mmlu_description",
    "read_jsonl_rows",
    "register_jsonl_task",
    "register_task",
    "split_unit",
]
