"""From text examples to training batches: tokenisation with loss on the answer only, a right-padding
collator that carries each example's ``sample_type``, and a seeded batch order whose position can be saved
and restored exactly (epoch, batch index).

Training text (tasks' letter format): ``chat_prompt(tok, letter_prompt(ex)) + letter_target(ex) + <end of
turn>``; only the target and end-of-turn tokens carry labels (everything else is ``IGNORE_INDEX``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

IGNORE_INDEX = -100


class DataError(ValueError):
    """Training data is missing, empty or malformed; the message names the source."""


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
    from slim_peft.tasks import encode_prompt_target

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
    from slim_peft import tasks as tasks_mod

    end_text = end_of_turn_text(tokenizer)
    out: list[TokenizedExample] = []
    counts: dict[str, int] = {}
    truncated = 0
    for name in task_names:
        task = tasks_mod.get_task(name)
        examples = task.examples(split=split, limit=limit)
        if not examples:
            raise DataError(f"task {name!r} has no {split!r} examples")
        sample_type = int(getattr(task, "sample_type", 1))
        for ex in examples:
            prompt = tasks_mod.chat_prompt(tokenizer, tasks_mod.letter_prompt(ex))
            enc, cut = encode_example(tokenizer, prompt, tasks_mod.letter_target(ex),
                                      max_seq_length=max_seq_length, sample_type=sample_type, end_text=end_text)
            out.append(enc)
            truncated += int(cut)
        counts[name] = len(examples)
    counts["truncated"] = truncated
    return out, counts


def dataset_fingerprint(examples: Sequence[TokenizedExample]) -> str:
    """A sha256 over every example's ids, labels and sample type: identifies the training data for resume."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps([ex.input_ids, ex.labels, ex.sample_type]).encode())
    return h.hexdigest()[:16]


@dataclass
class Collator:
    """Right-pads a list of examples into ``input_ids``, ``attention_mask``, ``labels`` and ``sample_type``."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: Sequence[TokenizedExample]) -> dict[str, torch.Tensor]:
        if not examples:
            raise DataError("cannot collate an empty batch")
        length = max(len(ex) for ex in examples)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            length = (length + m - 1) // m * m
        n = len(examples)
        input_ids = torch.full((n, length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((n, length), dtype=torch.long)
        for i, ex in enumerate(examples):
            k = len(ex)
            input_ids[i, :k] = torch.tensor(ex.input_ids, dtype=torch.long)
            labels[i, :k] = torch.tensor(ex.labels, dtype=torch.long)
            attention_mask[i, :k] = 1
        sample_type = torch.tensor([ex.sample_type for ex in examples], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                "sample_type": sample_type}


class SeededBatchOrder:
    """The order of (global) micro-batches of one epoch, a pure function of ``(seed, epoch)``.

    A position in the data is ``(epoch, batch_index)``, so a checkpoint restores it exactly. Each micro-batch
    holds ``batch_size`` example indices (the batch over all processes; process r takes its slice). The last
    incomplete batch of an epoch is dropped. ``group_by_length`` sorts the examples of each mega-batch of
    ``50 * batch_size`` by length (less padding), then shuffles the batches.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, group_by_length: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(lengths) < batch_size:
            raise DataError(f"the training data has {len(lengths)} examples, fewer than one batch of "
                            f"{batch_size} (per-device batch x processes); add data or lower the batch size")
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.group_by_length = group_by_length
        self._cache: tuple[int, list[list[int]]] | None = None

    @property
    def batches_per_epoch(self) -> int:
        return len(self.lengths) // self.batch_size

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """Every micro-batch of ``epoch``, each a list of example indices."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        rng = np.random.default_rng([self.seed, epoch])
        perm = rng.permutation(len(self.lengths))
        b = self.batch_size
        if self.group_by_length:
            mega = 50 * b
            chunks = [perm[i:i + mega] for i in range(0, len(perm), mega)]
            perm = np.concatenate([c[np.argsort(-self.lengths[c], kind="stable")] for c in chunks])
        batches = [perm[i * b:(i + 1) * b].tolist() for i in range(self.batches_per_epoch)]
        if self.group_by_length:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        self._cache = (epoch, batches)
        return batches

    def batch_at(self, epoch: int, index: int) -> list[int]:
        return self.epoch_batches(epoch)[index]


def shard(indices: Sequence[int], rank: int, world_size: int) -> list[int]:
    """Process ``rank``'s contiguous slice of a global micro-batch."""
    per = len(indices) // world_size
    return list(indices[rank * per:(rank + 1) * per])
