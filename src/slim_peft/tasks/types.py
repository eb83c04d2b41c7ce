"""Core types of the task registry: examples, lm-eval requests, tasks, deterministic splits."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from slim_peft.errors import ConfigError

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

# The split of an example depends on nothing but its content: sha256 of this salt, a newline and the
# canonical JSON of the example's raw fields (sorted keys, no ASCII escaping); the first 8 bytes read as a
# big-endian integer, divided by 2**64, give a number u in [0, 1); u < test_fraction puts it in "test".
SPLIT_SALT = "slim-peft-split-v1"
SPLIT_SCHEME = "sha256(salt + '\\n' + canonical_json(raw)) -> first 8 bytes / 2**64 < test_fraction => test"
SPLITS = ("train", "test", "full")

GENERAL = "general"
DOWNSTREAM = "downstream"


@dataclass(frozen=True)
class Example:
    """One multiple-choice (or generation) question in a task-independent shape."""

    task: str
    id: str
    question: str
    choices: tuple[str, ...]
    label: int
    context: str = ""
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def answer(self) -> str:
        """The text of the correct choice."""
        return self.choices[self.label]


@dataclass(frozen=True)
class LmEvalRequest:
    """An example as lm-evaluation-harness 0.4.x scores it: one (context, continuation) pair per choice.

    ``choice_texts`` are lm-eval's ``doc_to_choice`` strings; their length in characters normalises
    acc_norm. Most tasks share one context; Winogrande ("partial scoring") has one context per choice and
    a shared continuation.
    """

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    choice_texts: tuple[str, ...]
    gold: int


def canonical_json(raw: dict[str, Any]) -> str:
    """The JSON text the split hash and the example id are computed from."""
    return json.dumps(raw, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)


def content_hash(raw: dict[str, Any]) -> str:
    """Hex sha256 of an example's content (independent of file order and of PYTHONHASHSEED)."""
    return hashlib.sha256((SPLIT_SALT + "\n" + canonical_json(raw)).encode("utf-8")).hexdigest()


def split_unit(raw: dict[str, Any]) -> float:
    """A number in [0, 1) fixed by the example's content; below the test fraction means "test"."""
    return int(content_hash(raw)[:16], 16) / 2.0**64


def in_test(raw: dict[str, Any], test_fraction: float) -> bool:
    """Whether an example belongs to the test part of its task."""
    return split_unit(raw) < test_fraction


@dataclass
class Task:
    """A registered evaluation / training task.

    ``load`` returns the raw rows in file order; ``to_example`` maps a raw row (and its content hash) to an
    :class:`Example`; ``lm_eval_request`` renders an example with lm-evaluation-harness's template.
    ``subtasks`` (Task objects) makes a pooled task (MMLU): its examples are those of the subtasks in order,
    and ``limit`` applies to each subtask as lm-eval's ``--limit`` does for a group.
    """

    name: str
    load: Callable[[], list[dict[str, Any]]] | None
    to_example: Callable[[str, dict[str, Any], str], Example] | None
    lm_eval_request: Callable[[Example], LmEvalRequest]
    chance: float
    role: str = GENERAL
    test_fraction: float = 0.5
    source: str = ""
    has_acc_norm: bool = True
    primary_metric: str = "acc"
    supports_generation: bool = False
    letter_instruction: str | None = None
    subtasks: tuple[Task, ...] = ()
    description: str = ""
    _cache: list[Example] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def sample_type(self) -> int:
        """LoRAMoE's sample type: 0 = world knowledge / general capability, 1 = downstream task."""
        return 0 if self.role == GENERAL else 1

    def all_examples(self) -> list[Example]:
        """Every example of the task in file order (cached)."""
        if self._cache is None:
            if self.subtasks:
                self._cache = [ex for sub in self.subtasks for ex in sub.all_examples()]
            else:
                assert self.load is not None and self.to_example is not None
                self._cache = _build_examples(self.name, self.load(), self.to_example)
        return self._cache

    def examples(
        self, split: str = "test", limit: int | None = None, test_fraction: float | None = None
    ) -> list[Example]:
        """The examples of one split in file order; ``limit`` keeps the first N (per subtask if pooled).

        ``split`` is "train", "test" (disjoint, by a stable hash of each example's content) or "full"
        (the whole file).
        """
        if split not in SPLITS:
            raise ConfigError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        if limit is not None and limit < 0:
            raise ConfigError(f"limit must be >= 0, got {limit}")
        if self.subtasks:
            frac = self.test_fraction if test_fraction is None else test_fraction
            return [ex for sub in self.subtasks for ex in sub.examples(split, limit, test_fraction=frac)]
        frac = self.test_fraction if test_fraction is None else test_fraction
        if not 0.0 <= frac <= 1.0:
            raise ConfigError(f"test_fraction must be in [0, 1], got {frac}")
        rows = self.all_examples()
        if split != "full":
            want_test = split == "test"
            rows = [ex for ex in rows if in_test(ex.raw, frac) == want_test]
        return rows if limit is None else rows[:limit]

    def split_info(self, split: str, limit: int | None = None, test_fraction: float | None = None) -> dict:
        """A JSON-able description of a split, recorded in every result."""
        return {
            "name": split,
            "test_fraction": self.test_fraction if test_fraction is None else test_fraction,
            "hash": SPLIT_SCHEME,
            "salt": SPLIT_SALT,
            "limit": limit,
            "limit_per_subtask": bool(self.subtasks),
            "source": self.source,
        }


def _build_examples(
    task: str, rows: list[dict[str, Any]], to_example: Callable[[str, dict[str, Any], str], Example]
) -> list[Example]:
    """Map raw rows to examples with ids derived from content (exact duplicates get a -2, -3 suffix)."""
    seen: dict[str, int] = {}
    out = []
    for row in rows:
        digest = content_hash(row)[:16]
        seen[digest] = seen.get(digest, 0) + 1
        ex_id = digest if seen[digest] == 1 else f"{digest}-{seen[digest]}"
        out.append(to_example(task, row, ex_id))
    return out
