"""User tasks from a JSONL file, no code needed.

One JSON object per line::

    {"question": "2 + 2 =", "choices": ["3", "4"], "label": 1}
    {"question": "...", "choices": ["x", "y", "z"], "label": 0, "context": "optional passage", "id": "q7"}

``question`` (non-empty string), ``choices`` (list of at least two non-empty strings) and ``label`` (0-based
int index into ``choices``) are required; ``context`` (string) and ``id`` (string or int) are optional;
other keys are kept in ``Example.raw``. Blank lines are skipped.

The lm-eval-style format of such a task is ARC's: ``[context + "\\n"] + "Question: {question}\\nAnswer:"``
scored against ``" " + choice``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from slim_peft.errors import TaskFileError
from slim_peft.tasks.registry import register_task
from slim_peft.tasks.types import DOWNSTREAM, Example, LmEvalRequest, Task, _build_examples


def _check_row(row: Any, where: str) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise TaskFileError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for key in ("question", "choices", "label"):
        if key not in row:
            raise TaskFileError(f"{where}: missing field {key!r} (required: question, choices, label)")
    if not isinstance(row["question"], str) or not row["question"].strip():
        raise TaskFileError(f"{where}: field 'question' must be a non-empty string")
    choices = row["choices"]
    if not isinstance(choices, list) or len(choices) < 2:
        raise TaskFileError(f"{where}: field 'choices' must be a list of at least 2 strings")
    for i, c in enumerate(choices):
        if not isinstance(c, str) or not c.strip():
            raise TaskFileError(f"{where}: field 'choices'[{i}] must be a non-empty string")
    label = row["label"]
    if isinstance(label, bool) or not isinstance(label, int):
        raise TaskFileError(f"{where}: field 'label' must be an integer index into 'choices', got {label!r}")
    if not 0 <= label < len(choices):
        raise TaskFileError(f"{where}: field 'label' = {label} is out of range for {len(choices)} choices")
    if "context" in row and not isinstance(row["context"], str):
        raise TaskFileError(f"{where}: field 'context' must be a string")
    if "id" in row and (isinstance(row["id"], bool) or not isinstance(row["id"], (str, int))):
        raise TaskFileError(f"{where}: field 'id' must be a string or an integer")
    return row


def read_jsonl_rows(path: str | Path) -> list[dict[str, Any]]:
    """Validated rows of a JSONL task file, in file order."""
    path = Path(path)
    if not path.is_file():
        raise TaskFileError(f"{path}: no such file")
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskFileError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            rows.append(_check_row(row, where))
    if not rows:
        raise TaskFileError(f"{path}: the file holds no examples (expected one JSON object per line)")
    return rows


def jsonl_example(task: str, row: dict[str, Any], ex_id: str) -> Example:
    ex_id = str(row["id"]) if "id" in row else ex_id
    return Example(
        task=task,
        id=ex_id,
        question=row["question"],
        choices=tuple(row["choices"]),
        label=row["label"],
        context=row.get("context", ""),
        raw=row,
    )


def jsonl_lm(ex: Example) -> LmEvalRequest:
    ctx = (ex.context + "\n" if ex.context else "") + f"Question: {ex.question}\nAnswer:"
    return LmEvalRequest(
        contexts=tuple(ctx for _ in ex.choices),
        continuations=tuple(" " + c for c in ex.choices),
        choice_texts=ex.choices,
        gold=ex.label,
    )


def register_jsonl_task(
    path: str | Path,
    name: str | None = None,
    role: str = DOWNSTREAM,
    test_fraction: float = 0.5,
    overwrite: bool = True,
) -> Task:
    """Register the task in a JSONL file (validated now; errors name the line and the field).

    ``name`` defaults to the file's stem; ``role`` is "downstream" (LoRAMoE sample_type 1) or "general".
    """
    path = Path(path)
    rows = read_jsonl_rows(path)
    name = name or re.sub(r"[^A-Za-z0-9_.-]+", "_", path.stem)
    if role not in ("general", "downstream"):
        raise TaskFileError(f"role must be 'general' or 'downstream', got {role!r}")
    chance = sum(1.0 / len(r["choices"]) for r in rows) / len(rows)
    task = Task(
        name,
        lambda: read_jsonl_rows(path),
        jsonl_example,
        jsonl_lm,
        chance=chance,
        role=role,
        test_fraction=test_fraction,
        source=f"jsonl:{path.resolve()}",
        description=f"user task from {path.name}",
    )
    task._cache = _build_examples(name, rows, jsonl_example)
    return register_task(task, overwrite=overwrite)
