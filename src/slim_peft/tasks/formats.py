"""The instruction format with lettered options (train and score), chat prompts and prompt tokenisation."""

from __future__ import annotations

from typing import Any

from slim_peft.tasks.registry import find_task
from slim_peft.tasks.types import LETTERS, Example

DEFAULT_LETTER_INSTRUCTION = "Answer with the option's letter from the given choices."


def letter_prompt(ex: Example, instruction: str | None = None) -> str:
    """The question with lettered options and an instruction line asking for the letter.

    ``instruction`` defaults to the task's ``letter_instruction`` (when the task is registered), else
    :data:`DEFAULT_LETTER_INSTRUCTION`.
    """
    if len(ex.choices) > len(LETTERS):
        raise ValueError(
            f"{ex.task}/{ex.id}: {len(ex.choices)} choices, at most {len(LETTERS)} can be lettered"
        )
    if instruction is None:
        instruction = _task_instruction(ex.task)
    parts = []
    if ex.context:
        parts.append(ex.context.strip() + "\n\n")
    parts.append(ex.question.strip() + "\n")
    parts.extend(f"{LETTERS[i]}. {choice.strip()}\n" for i, choice in enumerate(ex.choices))
    parts.append(instruction)
    return "".join(parts)


def letter_target(ex: Example) -> str:
    """The answer in the letter format: the correct option's letter ("A", "B", ...)."""
    return LETTERS[ex.label]


def letters(ex: Example) -> list[str]:
    """The option letters of an example, in order."""
    return list(LETTERS[: len(ex.choices)])


def chat_prompt(tokenizer: Any, user_text: str) -> str:
    """``user_text`` as one user turn with the tokenizer's chat template and the assistant turn opened;
    ``user_text + "\\nAnswer:"`` when the tokenizer has no chat template."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": user_text}], tokenize=False, add_generation_prompt=True
        )
    return user_text + "\nAnswer:"


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` as lm-eval's HF model encodes it: the tokenizer's default special tokens, none
    when the text already starts with the BOS token (e.g. a rendered chat template)."""
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos):
        return list(tokenizer.encode(text, add_special_tokens=False))
    return list(tokenizer.encode(text))


def encode_prompt_target(tokenizer: Any, prompt: str, target: str) -> tuple[list[int], list[int]]:
    """``(prompt_ids, target_ids)`` with ``prompt_ids + target_ids`` = the tokens of ``prompt + target``.

    The text is encoded whole and split after the prompt's own token count, so a target is tokenised as it
    follows the prompt (the way training on ``prompt + target`` sees it). Whitespace stays where it is.
    """
    whole = encode_text(tokenizer, prompt + target)
    n_prompt = len(encode_text(tokenizer, prompt))
    return whole[:n_prompt], whole[n_prompt:]


def pad_token_id(tokenizer: Any) -> int:
    """The id that pads batches: the tokenizer's pad token, else its EOS token, else 0."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad if pad is not None else 0)


def _task_instruction(task: str) -> str:
    found = find_task(task)
    if found is not None and found.letter_instruction:
        return found.letter_instruction
    return DEFAULT_LETTER_INSTRUCTION
