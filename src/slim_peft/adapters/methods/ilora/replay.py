"""I-LoRA's experience replay: a reservoir buffer of training examples and its (safetensors-able) state."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class ReplayExample:
    input_ids: torch.Tensor  # 1-D, CPU, the example's real tokens only
    labels: torch.Tensor  # 1-D, CPU, -100 where not supervised
    task: int


class ReplayBuffer:
    """Reservoir sampling (Vitter's algorithm R): after n examples were offered, each is held with
    probability capacity / n. Examples are stored on the CPU without their padding."""

    def __init__(self, capacity: int, seed: int = 0) -> None:
        self.capacity = capacity
        self.examples: list[ReplayExample] = []
        self.seen = 0
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.examples)

    def add(self, example: ReplayExample) -> None:
        self.seen += 1
        if len(self.examples) < self.capacity:
            self.examples.append(example)
            return
        j = int(torch.randint(self.seen, (1,), generator=self.generator))
        if j < self.capacity:
            self.examples[j] = example

    def add_batch(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor,
                  task: int) -> None:
        ids, labels = input_ids.detach().cpu(), labels.detach().cpu()
        if attention_mask is None:
            attention_mask = torch.ones_like(ids)
        mask = attention_mask.detach().cpu().bool()
        for row in range(ids.shape[0]):
            keep = mask[row]
            self.add(ReplayExample(ids[row][keep].clone(), labels[row][keep].clone(), task))

    def eligible(self, before_task: int | None = None) -> list[int]:
        """Indices of stored examples; with `before_task`, only those of tasks < before_task."""
        return [i for i, ex in enumerate(self.examples) if before_task is None or ex.task < before_task]

    def sample(self, n: int, pool: list[int]) -> list[ReplayExample]:
        """n examples of `pool`, without replacement when it holds at least n, else with replacement."""
        if len(pool) >= n:
            picks = torch.randperm(len(pool), generator=self.generator)[:n]
        else:
            picks = torch.randint(len(pool), (n,), generator=self.generator)
        return [self.examples[pool[int(i)]] for i in picks]

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, JSON-able metadata) that restore the buffer exactly: the stored examples, how many were
        offered, and the sampling generator (tensors go to safetensors; nothing is pickled)."""
        tensors: dict[str, torch.Tensor] = {"generator": self.generator.get_state()}
        for i, ex in enumerate(self.examples):
            tensors[f"example.{i}.input_ids"] = ex.input_ids.contiguous()
            tensors[f"example.{i}.labels"] = ex.labels.contiguous()
        return tensors, {"seen": self.seen, "tasks": [ex.task for ex in self.examples]}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Inverse of `state`."""
        self.examples = [ReplayExample(tensors[f"example.{i}.input_ids"], tensors[f"example.{i}.labels"], task)
                         for i, task in enumerate(meta["tasks"])]
        self.seen = int(meta["seen"])
        self.generator.set_state(tensors["generator"])


def collate_replay(examples: list[ReplayExample], device: torch.device, pad_id: int = 0
                   ) -> dict[str, torch.Tensor]:
    """Right-pad examples into input_ids / attention_mask / labels (labels -100 on padding)."""
    length = max(ex.input_ids.numel() for ex in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, ex in enumerate(examples):
        n = ex.input_ids.numel()
        ids[row, :n], labels[row, :n], mask[row, :n] = ex.input_ids, ex.labels, 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}
