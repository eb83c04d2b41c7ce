"""From text examples to training sequences: tokenisation with loss on the answer only.

Training text (tasks' letter format): ``chat_prompt(tok, letter_prompt(ex)) + letter_target(ex) + <end of
turn>``; only the target and end-of-turn tokens carry labels (everything else is ``IGNORE_INDEX``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from slim_peft.errors import DataError
from slim_peft.tasks import chat_prompt, encode_prompt_target, get_task, letter_prompt, letter_target

IGNORE_INDEX = -100



@dataclass(frozen=True)
class TokenizedExample:
    """One training sequence: token ids, labels (``IGNORE_INDEX`` where no loss) and the sample type
    (0 = world knowledge, 1 = downstream; LoRAMoE uses it)."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    sample_type: int = 1

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.labels):
            raise DataError(f"input_ids ({len(self.input_ids)}) and labels ({len(self.labels)}) differ in length")
        if len(self.input_ids) == 0:
            raise DataError("empty example")

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_target_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


def end_of_turn_text(tokenizer: Any) -> str:
    """The text that closes an assistant turn: the chat template's end-of-turn marker (e.g. ``<|im_end|>``)
    when the tokenizer has a template, else the eos token."""
    template = getattr(tokenizer, "chat_template", None)
    if template:
        sentinel = "XQZSENTINELQZX"
        try:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": "hi"}, {"role": "assistant", "content": sentinel}],
                tokenize=False)
        except Exception:  # noqa: BLE001 - templates that reject this shape fall back to eos
            text = ""
        if sentinel in text:
            suffix = text.split(sentinel, 1)[1].strip()
            if suffix:
                # keep the first special marker only (templates may append a newline or more)
                for tok in getattr(tokenizer, "all_special_tokens", []) or []:
                    if tok and suffix.startswith(tok):
                        return tok
                return suffix
    eos = getattr(tokenizer, "eos_token", None)
    if not eos:
        raise DataError("the tokenizer has neither a chat template nor an eos token to end the answer with")
    return eos


def encode_example(tokenizer: Any, prompt: str, target: str, *, max_seq_length: int, sample_type: int = 1,
                   end_text: str | None = None) -> tuple[TokenizedExample, bool]:
    """Tokenise ``prompt + target + end_text`` and label only ``target + end_text``.

    The split follows ``slim_peft.tasks.encode_prompt_target`` (the whole text encoded, split after the
    prompt's own token count), the tokenisation the letter evaluator scores, so training and evaluation see
    the same answer tokens. Too-long sequences lose prompt tokens from the left (the question and options
    sit at the end of the prompt). Returns the example and whether it was truncated.
    """
    if end_text is None:
        end_text = end_of_turn_text(tokenizer)
    prompt_ids, target_ids = encode_prompt_target(tokenizer, prompt, target + end_text)
    prompt_ids, target_ids = list(prompt_ids), list(target_ids)
    if not target_ids:
        raise DataError(f"target {target!r} tokenises to nothing")
    if len(target_ids) >= max_seq_length:
        raise DataError(f"target of {len(target_ids)} tokens does not fit max_seq_length={max_seq_length}")
    truncated = len(prompt_ids) + len(target_ids) > max_seq_length
    if truncated:
        prompt_ids = prompt_ids[len(prompt_ids) + len(target_ids) - max_seq_length:]
    ids = tuple(prompt_ids + target_ids)
    labels = tuple([IGNORE_INDEX] * len(prompt_ids) + target_ids)
    return TokenizedExample(ids, labels, int(sample_type)), truncated


def build_task_examples(tokenizer: Any, task_names: Sequence[str], *, split: str = "train",
                        limit: int | None = None, max_seq_length: int = 512) -> tuple[list[TokenizedExample], dict]:
    """Tokenised letter-format examples of every task in ``task_names`` (``limit`` per task), in task order;
    the sampler mixes them. Returns the examples and per-task counts (``{"task": n, ..., "truncated": k}``)."""
    end_text = end_of_turn_text(tokenizer)
    out: list[TokenizedExample] = []
    counts: dict[str, int] = {}
    truncated = 0
    for name in task_names:
        task = get_task(name)
        examples = task.examples(split=split, limit=limit)
        if not examples:
            raise DataError(f"task {name!r} has no {split!r} examples")
        sample_type = int(getattr(task, "sample_type", 1))
        for ex in examples:
            prompt = chat_prompt(tokenizer, letter_prompt(ex))
            enc, cut = encode_example(tokenizer, prompt, letter_target(ex),
                                      max_seq_length=max_seq_length, sample_type=sample_type, end_text=end_text)
            out.append(enc)
            truncated += int(cut)
        counts[name] = len(examples)
    counts["truncated"] = truncated
    return out, counts
