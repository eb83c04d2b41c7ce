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
