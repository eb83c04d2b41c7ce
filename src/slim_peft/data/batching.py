"""From tokenised examples to batches: a right-padding collator that carries each example's ``sample_type``,
a seeded batch order whose position can be saved and restored exactly (epoch, batch index), and the
data fingerprint a resume checks."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from slim_peft.errors import ConfigError, DataError

from .encode import IGNORE_INDEX, TokenizedExample


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
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
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


@dataclass
class PackingCollator:
    """Packs a micro-batch's examples into as few rows of at most `max_length` tokens as it can (first fit,
    longest first; examples of different `sample_type` never share a row), for less padding.

    Each packed example keeps its own positions (`position_ids` restart at 0) and attends only to itself:
    `sequence_ids` ([R, L], the example's index in the batch, -1 on padding; `sample_type` is per example)
    becomes a block-diagonal causal mask in `AdapterModel.forward` (`packed_attention_mask`). The loss is the
    mean over the supervised tokens of the micro-batch, so it equals the unpacked batch's (tested);
    `attention_mask` marks real tokens.
    """

    pad_token_id: int
    max_length: int

    def rows(self, examples: Sequence[TokenizedExample]) -> list[list[int]]:
        """Indices of the examples in each packed row."""
        order = sorted(range(len(examples)), key=lambda i: (examples[i].sample_type, -len(examples[i])))
        rows: list[list[int]] = []
        room: list[int] = []
        for i in order:
            n = len(examples[i])
            if n > self.max_length:
                raise DataError(f"an example of {n} tokens is longer than max_seq_length={self.max_length}")
            fit = next((r for r, free in enumerate(room) if free >= n and
                        examples[rows[r][0]].sample_type == examples[i].sample_type), None)
            if fit is None:
                rows.append([i])
                room.append(self.max_length - n)
            else:
                rows[fit].append(i)
                room[fit] -= n
        return rows

    def __call__(self, examples: Sequence[TokenizedExample]) -> dict[str, torch.Tensor]:
        if not examples:
            raise DataError("cannot collate an empty batch")
        rows = self.rows(examples)
        width = max(sum(len(examples[i]) for i in row) for row in rows)
        n = len(rows)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((n, width), dtype=torch.long)
        sequence_ids = torch.full((n, width), -1, dtype=torch.long)
        order = [i for row in rows for i in row]  # example j of the batch (sequence id j) in row order
        j = 0
        for r, row in enumerate(rows):
            at = 0
            for i in row:
                ex, k = examples[i], len(examples[i])
                input_ids[r, at:at + k] = torch.tensor(ex.input_ids, dtype=torch.long)
                labels[r, at:at + k] = torch.tensor(ex.labels, dtype=torch.long)
                position_ids[r, at:at + k] = torch.arange(k)
                sequence_ids[r, at:at + k] = j
                at += k
                j += 1
        sample_type = torch.tensor([examples[i].sample_type for i in order], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": (sequence_ids >= 0).long(), "labels": labels,
                "position_ids": position_ids, "sequence_ids": sequence_ids, "sample_type": sample_type}


def packed_attention_mask(sequence_ids: torch.Tensor, attn_implementation: str | None,
                          dtype: torch.dtype) -> torch.Tensor | None:
    """The 4D mask [R, 1, L, L] of packed rows: token q attends to k <= q of its own example (padding only
    to itself). Boolean (True = attend) for SDPA, additive (0 / min) for eager attention; None for flash
    attention, which reads the restarting `position_ids` instead."""
    if attn_implementation and "flash" in attn_implementation:
        return None
    length = sequence_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=sequence_ids.device).tril()
    same = sequence_ids[:, :, None] == sequence_ids[:, None, :]
    allowed = (same & causal)[:, None]
    if attn_implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed,
                                                                                       torch.finfo(dtype).min)
